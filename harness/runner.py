"""The shared runner: plans the grid, generates, times and judges every image.

For each model it loads once; for each concept it loads the prompt set and the judge once;
for each defense it builds the defended model once and measures its latency interleaved
with the undefended model; for each attack it produces (or reuses) the adversarial prompts
and generates the cell's images in batches, writing one ledger row per image as it goes.
What the ledger already holds is skipped, which is how a stopped run resumes.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from harness import OPENMP_WAIT_VARIABLES
from harness.config import ConceptConfig, DefenseRef, PluginRef, RunConfig, stable_hash
from harness.ledger import ANY_DEFENSE, ImageRow, Ledger, image_key, write_bytes_atomic
from harness.model import ALL_CAPABILITIES, DiffusionModel
from harness.prompts.base import Case
from harness.registry import create, registry
from harness.worker import (
    CellWorker,
    GeneratedImage,
    ImageJob,
    load_model,
    make_evaluator,
    plan_jobs,
)

log = logging.getLogger(__name__)

NO_ATTACK = PluginRef(name="none")
VARIANTS = ("undefended", "defended")


class PlanError(ValueError):
    """The grid contains a pairing that cannot run; raised before any work starts."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def cell_key(model: str, defense: str, attack: str, concept: str) -> str:
    return "|".join([model, defense, attack, concept])


@dataclass(frozen=True)
class Group:
    """One (model, concept, defense) with its cases: the work one loaded worker serves.

    Both executors plan the grid as groups; a group's cells are its attacks.
    """

    model_ref: PluginRef
    concept: ConceptConfig
    defense_ref: DefenseRef
    cases: tuple[Case, ...]
    attacks: tuple[PluginRef, ...]

    @property
    def names(self) -> tuple[str, str, str]:
        """(model, defense, concept), the prefix of the group's timing and prompt keys."""
        return (self.model_ref.key, self.defense_ref.key, self.concept.name)

    def cell_names(self, attack_key: str) -> tuple[str, str, str, str]:
        """(model, defense, attack, concept) of one cell, as its cell and image keys use."""
        return (self.model_ref.key, self.defense_ref.key, attack_key, self.concept.name)


def batched(items: Sequence, size: int) -> list[list]:
    """`items` cut into consecutive lists of `size` (the last may be shorter)."""
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def attacks_with_baseline(attacks: Sequence[PluginRef]) -> list[PluginRef]:
    """Put `none` first among the attacks: its images give every cell's pre-ASR."""
    rest = [ref for ref in attacks if ref.key != "none"]
    return [NO_ATTACK, *rest]


def attacks_for(config: RunConfig, concept: ConceptConfig) -> list[PluginRef]:
    """Select the attacks run on a concept: all of them, or the subset its `attacks` names."""
    attacks = attacks_with_baseline(config.attacks)
    if concept.attacks is None:
        return attacks
    return [ref for ref in attacks if ref.key == "none" or ref.key in concept.attacks]


def check_pairings(config: RunConfig) -> None:
    """Reject attacks that need a model capability a defense removes, before any work."""
    for model_ref in config.models:
        model_caps = getattr(registry("models").get(model_ref.name), "capabilities", None)
        base_caps = model_caps if model_caps is not None else ALL_CAPABILITIES
        for defense_ref in config.defenses:
            caps = set(base_caps)
            for inner in defense_ref.chain():
                caps -= registry("defenses").get(inner.name).removes
            for attack_ref in config.attacks:
                attack_cls = registry("attacks").get(attack_ref.name)
                missing = set(attack_cls.model_capabilities) - caps
                if missing:
                    raise PlanError(
                        f"attack {attack_ref.key!r} needs {', '.join(sorted(missing))}, which"
                        f" model {model_ref.key!r} under defense {defense_ref.key!r} does not"
                        " offer; remove the pairing from the config"
                    )


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, recorded with every run so numbers can be traced."""
    packages = {}
    for name in ("erasure-arena", "torch", "diffusers", "transformers", "nudenet", "numpy"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    )
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        # The OpenMP wait variables at run start. GNU OpenMP read these values unless torch
        # was imported before harness.
        "openmp_wait": {name: os.environ.get(name) for name in OPENMP_WAIT_VARIABLES},
        "packages": packages,
    }


def resources_used(started: float, device: torch.device) -> dict[str, Any]:
    """Wall time since `started` and peak memory of this process (and of the GPU)."""
    # ru_maxrss is in kilobytes on Linux.
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    used = {"wall_seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb}
    if device.type == "cuda":
        used["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return used


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80] or "_"


class Runner:
    """Runs one config into one output directory."""

    def __init__(
        self,
        config: RunConfig,
        out_dir: str | Path,
        progress: bool = True,
        loaded_models: dict[str, DiffusionModel] | None = None,
        executor: Any | None = None,
    ) -> None:
        """`loaded_models` maps model keys to models already in memory (notebooks,
        benchmarks); the runner loads every other model itself. `executor` replaces the
        one `runner.executor` names (tests pass a `RayExecutor` with a fault injected)."""
        self.config = config
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.loaded_models = dict(loaded_models or {})
        self.executor = executor
        self.device = resolve_device(config.runner.device)
        self.dtype = resolve_dtype(config.runner.dtype, self.device)
        self.fingerprint = config.fingerprint()

    # -- planning ------------------------------------------------------------------------

    def load_cases(self, concept: ConceptConfig) -> list[Case]:
        prompt_set = create("prompt_sets", concept.prompt_set.name, **concept.prompt_set.options)
        cases = prompt_set.load()
        if concept.limit is not None:
            cases = cases[: concept.limit]
        if not cases:
            raise PlanError(f"concept {concept.name!r}: the prompt set gave no cases")
        return cases

    def plan(self) -> dict[str, Any]:
        """Plan the grid without loading any model: cells, cases, images and a time estimate.

        Evaluators are built (they load their weights lazily) so that missing weight files
        are reported now rather than after hours of generation.
        """
        check_pairings(self.config)
        per_concept = {}
        for concept in self.config.concepts:
            per_concept[concept.name] = len(self.load_cases(concept))
            evaluator = create(
                "evaluators",
                concept.evaluator.name,
                preset=concept.evaluator.preset,
                **concept.evaluator.options,
            )
            missing = evaluator.missing_files()
            if missing:
                raise PlanError(
                    f"concept {concept.name!r}: evaluator {concept.evaluator.name!r} is missing"
                    f" {', '.join(missing)}"
                )

        cells = []
        for model in self.config.models:
            for concept in self.config.concepts:
                for defense in self.config.defenses:
                    for attack in attacks_for(self.config, concept):
                        cells.append((model.key, defense.key, attack.key, concept.name))
        images = sum(
            per_concept[concept] * self.config.seeds.images_per_case for *_, concept in cells
        )
        return {
            "cells": cells,
            "cases": per_concept,
            "images": images,
            "estimated_gpu_hours": self._estimate_gpu_hours(per_concept),
        }

    def _estimate_gpu_hours(self, per_concept: dict[str, int]) -> float:
        """Rough GPU time: denoiser passes times each model's estimated seconds per pass.

        Generation costs `steps` guided passes per image. An attack costs what its plugin
        estimates per case (`estimated_denoiser_passes`, single-sample passes, so half a
        guided pass each), with a backward pass counted as two forward passes. An
        estimate for planning, not a measurement.
        """
        seconds = 0.0
        for model_ref in self.config.models:
            model_cls = registry("models").get(model_ref.name)
            pass_seconds = model_cls.estimated_pass_seconds(
                self.config.sampler.height, self.config.sampler.width
            )
            steps = self.config.sampler.steps or model_cls.default_steps
            for concept in self.config.concepts:
                cases = per_concept[concept.name]
                images = cases * self.config.seeds.images_per_case
                attacks = attacks_for(self.config, concept)
                for _defense in self.config.defenses:
                    seconds += len(attacks) * images * steps * pass_seconds
                    for attack_ref in attacks:
                        attack_cls = registry("attacks").get(attack_ref.name)
                        passes = attack_cls(**attack_ref.options).estimated_denoiser_passes(steps)
                        seconds += cases * passes * 3 * pass_seconds / 2
        return seconds / 3600.0

    # -- the run -------------------------------------------------------------------------

    def run(self) -> Path:
        check_pairings(self.config)
        executor = self.executor
        if executor is None and self.config.runner.executor == "ray":
            # Imported here: the harness runs without Ray installed.
            from harness.ray_executor import RayExecutor

            executor = RayExecutor(self.config.runner.ray)
        env = environment(self.device)
        try:
            # Ray starts (or is found missing) before anything is written.
            if executor is None:
                device = {key: env[key] for key in ("device", "device_name")}
                env["executor"] = {
                    "name": "local",
                    "devices": [{"node": platform.node(), **device}],
                }
            else:
                env["executor"] = executor.connect()
            ledger = Ledger(self.out_dir)
            started = time.perf_counter()
            try:
                run_id = ledger.record_run(
                    self.config.model_dump(mode="json"), self.fingerprint, env
                )
                log.info(
                    "run %r into %s on %s (%s)",
                    self.config.name,
                    self.out_dir,
                    self.device,
                    self.dtype,
                )
                if executor is None:
                    self._run_grid(ledger)
                else:
                    executor.run_grid(self, ledger)
                    # The actors' devices are known only now that they have run.
                    env["executor"] = executor.describe()
                    ledger.update_environment(run_id, env)
                # NOTE: under Ray these resources are the driver's; actors report devices only.
                ledger.finish_run(run_id, resources_used(started, self.device))
            finally:
                ledger.close()
        finally:
            if executor is not None:
                executor.close()

        from harness.report import write_outputs

        write_outputs(self.out_dir)
        return self.out_dir

    def cell_count(self) -> int:
        """Cells in the grid, the `none` baseline included."""
        config = self.config
        per_model = sum(len(attacks_for(config, concept)) for concept in config.concepts)
        return len(config.models) * len(config.defenses) * per_model

    def plan_groups(self, ledger: Ledger) -> list[tuple[Group, bool]]:
        """Every group in grid order, with whether the ledger already holds all its work.

        Every cell is checked against the ledger first, so a changed config is rejected
        before any model loads.
        """
        cases = {concept.name: tuple(self.load_cases(concept)) for concept in self.config.concepts}
        groups = []
        for model_ref in self.config.models:
            for concept in self.config.concepts:
                attacks = tuple(attacks_for(self.config, concept))
                for defense_ref in self.config.defenses:
                    group = Group(model_ref, concept, defense_ref, cases[concept.name], attacks)
                    self._check_cells(ledger, model_ref, defense_ref, concept, attacks)
                    done = self._group_done(ledger, group)
                    groups.append((group, done))
        return groups

    def _run_grid(self, ledger: Ledger) -> None:
        """Run every group in turn, in this process, on `self.device` (the local executor)."""
        cells_bar = tqdm(
            total=self.cell_count(), desc="cells", unit="cell", disable=not self.progress
        )
        base: DiffusionModel | None = None
        base_key = None
        evaluators: dict[str, Any] = {}
        for group, done in self.plan_groups(ledger):
            if done:
                cells_bar.update(len(group.attacks))
                continue

            # Models and judges load only when a group still has work, so a finished run
            # resumes without loading anything. One base model is held at a time.
            model_ref, concept = group.model_ref, group.concept
            if base_key != model_ref.key:
                base = None
                base = self.loaded_models.get(model_ref.key) or load_model(
                    self.config, model_ref, self.device, self.dtype
                )
                base_key = model_ref.key
                evaluators = {}
            if concept.name not in evaluators:
                evaluators[concept.name] = make_evaluator(concept)
            worker = CellWorker(
                self.config,
                model_ref,
                concept,
                group.defense_ref,
                self.device,
                self.dtype,
                base=base,
                evaluator=evaluators[concept.name],
            )
            self._run_group(ledger, worker, group, cells_bar)
        cells_bar.close()

    def _probe_keys(self, names: tuple[str, str, str], cases: list[Case]) -> list[str]:
        count = min(self.config.runner.latency_probe_images, len(cases))
        prefix = "|".join(names) + "|probe"
        return [f"{prefix}|{variant}|{i}" for i in range(count) for variant in VARIANTS]

    def cell_fingerprint(self, model_ref, defense_ref, attack_ref, concept) -> str:
        """Hash of the config entries that decide a cell's images and verdicts.

        It is computed from the config alone, so a finished run can be checked against a
        changed config without loading any model.
        """
        return stable_hash(
            {
                "run": self.fingerprint,
                "model": model_ref.model_dump(),
                "defense": defense_ref.model_dump(),
                "attack": attack_ref.model_dump(),
                "concept": concept.model_dump(),
            }
        )

    def _check_cells(self, ledger, model_ref, defense_ref, concept, attacks) -> None:
        for attack_ref in attacks:
            key = cell_key(model_ref.key, defense_ref.key, attack_ref.key, concept.name)
            fingerprint = self.cell_fingerprint(model_ref, defense_ref, attack_ref, concept)
            ledger.check_cell(key, fingerprint)

    def _group_done(self, ledger: Ledger, group: Group) -> bool:
        """Check whether the ledger has every image and timing of a (model, defense, concept)."""
        model_key, defense_key, concept_name = group.names
        cases = group.cases
        if not set(self._probe_keys(group.names, cases)) <= ledger.timing_keys():
            return False
        for attack_ref in group.attacks:
            key = cell_key(model_key, defense_key, attack_ref.key, concept_name)
            existing = ledger.existing_image_keys(key)
            for case in cases:
                for k in range(self.config.seeds.images_per_case):
                    job_key = image_key(
                        model_key, defense_key, attack_ref.key, concept_name, case.case_id, k
                    )
                    if job_key not in existing:
                        return False
        return True

    def _run_group(self, ledger, worker: CellWorker, group: Group, cells_bar) -> None:
        count = self.probe_count(ledger, group)
        if count:
            ledger.add_timings(worker.probe_latency(group.cases, count))

        for attack_ref in group.attacks:
            cells_bar.set_postfix_str(
                f"{worker.defense_key} / {attack_ref.key} / {worker.concept.name}"
            )
            self._run_cell(ledger, worker, group, attack_ref)
            cells_bar.update(1)

    def _run_cell(self, ledger, worker: CellWorker, group: Group, attack_ref: PluginRef) -> None:
        settings = worker.cell_settings(attack_ref)
        key, jobs, todo = self.open_cell(ledger, group, attack_ref, worker.sampler, settings)
        if not todo:
            return

        prompts = self._adversarial_prompts(ledger, worker, group, attack_ref)
        bar = tqdm(
            total=len(jobs),
            initial=len(jobs) - len(todo),
            desc=f"images {attack_ref.key}",
            unit="img",
            leave=False,
            disable=not self.progress,
        )
        names = group.cell_names(attack_ref.key)
        for batch in batched(todo, self.config.runner.batch_size):
            texts = [prompts[job.case.case_id] for job in batch]
            results = worker.generate(batch, texts)
            self.write_images(ledger, key, names, results)
            bar.update(len(batch))
        bar.close()
        log.info("cell %s: %d images generated", key, len(todo))

    def _adversarial_prompts(self, ledger, worker: CellWorker, group, attack_ref) -> dict[str, str]:
        """Return the text to generate from, per case: cached in the ledger, else attacked now."""
        attack_hash = None if attack_ref.key == "none" else worker.attack_hash(attack_ref)
        prompts, todo = self.cached_prompts(ledger, group, attack_ref, attack_hash)
        if not todo:
            return prompts

        bar = tqdm(
            total=len(group.cases),
            initial=len(group.cases) - len(todo),
            desc=f"attack {attack_ref.key}",
            unit="case",
            leave=False,
            disable=not self.progress,
        )
        for batch in batched(todo, self.config.runner.attack_batch_size):
            records = worker.run_attack(attack_ref, batch)
            prompts.update(self.write_prompts(ledger, group, attack_ref, attack_hash, records))
            bar.update(len(batch))
        bar.close()
        return prompts

    # -- shared by the executors: what is left to do, and the ledger writes --------------

    def probe_count(self, ledger: Ledger, group: Group) -> int:
        """Single-image pairs the group's latency probe still needs: all of them or 0."""
        probe_keys = self._probe_keys(group.names, group.cases)
        if not probe_keys or set(probe_keys) <= ledger.timing_keys():
            return 0
        return min(self.config.runner.latency_probe_images, len(group.cases))

    def open_cell(
        self, ledger: Ledger, group: Group, attack_ref: PluginRef, sampler, settings
    ) -> tuple[str, list[ImageJob], list[ImageJob]]:
        """Record a cell; return its key, all its image jobs and the jobs still to do.

        `sampler` and `settings` come from a worker that loaded the group, because the
        model's defaults fill in the sampler settings the config leaves open.
        """
        concept = group.concept
        names = group.cell_names(attack_ref.key)
        key = cell_key(*names)
        cell_names = {
            "model": group.model_ref.key,
            "defense": group.defense_ref.key,
            "attack": attack_ref.key,
            "concept": concept.name,
            "prompt_set": concept.prompt_set.key,
        }
        fingerprint = self.cell_fingerprint(group.model_ref, group.defense_ref, attack_ref, concept)
        ledger.ensure_cell(key, cell_names, fingerprint, settings)

        jobs = plan_jobs(self.config, names, group.cases, sampler)
        existing = ledger.existing_image_keys(key)
        return key, jobs, [job for job in jobs if job.key not in existing]

    def cached_prompts(
        self, ledger: Ledger, group: Group, attack_ref: PluginRef, attack_hash: str | None
    ) -> tuple[dict[str, str], list[Case]]:
        """The text per case that the ledger already holds, and the cases still to attack.

        The `none` attack needs nothing: its text is each case's prompt.
        """
        if attack_ref.key == "none":
            return {case.case_id: case.prompt for case in group.cases}, []

        prefix = self._prompt_prefix(group, attack_ref, attack_hash)
        prompts: dict[str, str] = {}
        todo: list[Case] = []
        for case in group.cases:
            cached = ledger.adversarial_prompt(f"{prefix}|{case.case_id}")
            if cached is None:
                todo.append(case)
            else:
                prompts[case.case_id] = cached["prompt"]
        return prompts, todo

    def write_prompts(
        self, ledger: Ledger, group: Group, attack_ref: PluginRef, attack_hash: str, records
    ) -> dict[str, str]:
        """Cache a batch of attack records (from `CellWorker.run_attack`); return their text."""
        prefix = self._prompt_prefix(group, attack_ref, attack_hash)
        model_key, defense_key, concept = group.names
        prompts = {}
        for record in records:
            record.update(
                prompt_key=f"{prefix}|{record['case_id']}",
                attack=attack_ref.key,
                attack_hash=attack_hash,
                defended_model=self.prompt_target(group, attack_ref),
                concept=concept,
            )
            ledger.add_adversarial_prompt(record)
            prompts[record["case_id"]] = record["prompt"]
        return prompts

    @staticmethod
    def prompt_target(group: Group, attack_ref: PluginRef) -> str:
        """The model an attack's prompts belong to: `model|defense`, or `model|any-defense`
        for attacks whose prompts do not depend on the defense (shared by every defense)."""
        model_key, defense_key, _ = group.names
        attack = create("attacks", attack_ref.name, **attack_ref.options)
        return f"{model_key}|{defense_key if attack.depends_on_defense() else ANY_DEFENSE}"

    def _prompt_prefix(self, group: Group, attack_ref: PluginRef, attack_hash: str | None) -> str:
        target = self.prompt_target(group, attack_ref)
        return f"{attack_ref.key}|{attack_hash}|{target}|{group.concept.name}"

    def write_images(self, ledger: Ledger, key: str, names, results: list[GeneratedImage]) -> None:
        """Write a batch's PNGs, then its rows in one transaction."""
        model_key, defense_key, attack_key, concept = names
        rows = []
        for result in results:
            job = result.job
            path = None
            if self.config.runner.save_images:
                relative = Path(
                    "images",
                    *(_safe_name(name) for name in names),
                    f"{_safe_name(job.case.case_id)}_{job.seed_index}.png",
                )
                write_bytes_atomic(result.png, self.out_dir / relative)
                path = str(relative)
            rows.append(
                ImageRow(
                    image_key=job.key,
                    cell_key=key,
                    model=model_key,
                    defense=defense_key,
                    attack=attack_key,
                    concept=concept,
                    case_id=job.case.case_id,
                    seed_index=job.seed_index,
                    seed=job.seed,
                    guidance=job.guidance,
                    prompt=result.prompt,
                    truncated=result.truncated,
                    image_path=path,
                    score=result.score,
                    present=result.present,
                    details=result.details,
                    hook_records=result.hook_records,
                    batch_size=result.batch_size,
                    batch_seconds=result.batch_seconds,
                )
            )
        ledger.add_images(rows)
