"""The shared runner: plans the grid, generates, times and judges every image.

For each model it loads once; for each concept it loads the prompt set and the judge once;
for each defense it builds the defended model once and measures its latency interleaved
with the undefended model; for each attack it produces (or reuses) the adversarial prompts
and generates the cell's images in batches, writing one ledger row per image as it goes.
What the ledger already holds is skipped, which is how a stopped run resumes.
"""

from __future__ import annotations

import logging
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from harness.attack import NEEDS_EVALUATOR, Attack, AttackContext
from harness.config import ConceptConfig, DefenseRef, PluginRef, RunConfig, stable_hash
from harness.defense import Defense
from harness.evaluators.base import Evaluator
from harness.ledger import ImageRow, Ledger, image_key, save_png_atomic
from harness.model import ALL_CAPABILITIES, DiffusionModel
from harness.prompts.base import Case
from harness.registry import create, registry

log = logging.getLogger(__name__)

NO_ATTACK = PluginRef(name="none")


class PlanError(ValueError):
    """The grid contains a pairing that cannot run; raised before any work starts."""


@dataclass(frozen=True)
class ImageJob:
    case: Case
    seed_index: int
    seed: int
    guidance: float
    key: str


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


def attacks_with_baseline(attacks: Sequence[PluginRef]) -> list[PluginRef]:
    """The configured attacks with `none` first: its images give every cell's pre-ASR."""
    rest = [ref for ref in attacks if ref.key != "none"]
    return [NO_ATTACK, *rest]


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
        "packages": packages,
    }


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80] or "_"


class Runner:
    """Runs one config into one output directory."""

    def __init__(self, config: RunConfig, out_dir: str | Path, progress: bool = True) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.progress = progress
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
        """The grid without loading any model: cells, cases and images per concept."""
        check_pairings(self.config)
        attacks = attacks_with_baseline(self.config.attacks)
        per_concept = {}
        for concept in self.config.concepts:
            cases = self.load_cases(concept)
            per_concept[concept.name] = len(cases)
        cells = []
        for model in self.config.models:
            for concept in self.config.concepts:
                for defense in self.config.defenses:
                    for attack in attacks:
                        cells.append((model.key, defense.key, attack.key, concept.name))
        images = sum(
            per_concept[concept] * self.config.seeds.images_per_case for _, _, _, concept in cells
        )
        return {"cells": cells, "cases": per_concept, "images": images}

    # -- the run -------------------------------------------------------------------------

    def run(self) -> Path:
        check_pairings(self.config)
        ledger = Ledger(self.out_dir)
        try:
            env = environment(self.device)
            ledger.record_run(self.config.model_dump(mode="json"), self.fingerprint, env)
            log.info(
                "run %r into %s on %s (%s)", self.config.name, self.out_dir, self.device, self.dtype
            )
            self._run_grid(ledger)
        finally:
            ledger.close()

        from harness.report import write_outputs

        write_outputs(self.out_dir)
        return self.out_dir

    def _run_grid(self, ledger: Ledger) -> None:
        attacks = attacks_with_baseline(self.config.attacks)
        total = (
            len(self.config.models)
            * len(self.config.concepts)
            * len(self.config.defenses)
            * len(attacks)
        )
        cells_bar = tqdm(total=total, desc="cells", unit="cell", disable=not self.progress)
        for model_ref in self.config.models:
            plugin = create(
                "models", model_ref.name, **{"label": model_ref.key, **model_ref.options}
            )
            base = plugin.load(self.device, self.dtype)
            log.info("loaded model %s (%s)", model_ref.key, base.info.get("source", model_ref.name))
            for concept in self.config.concepts:
                cases = self.load_cases(concept)
                evaluator: Evaluator = create(
                    "evaluators",
                    concept.evaluator.name,
                    preset=concept.evaluator.preset,
                    **concept.evaluator.options,
                )
                for defense_ref in self.config.defenses:
                    defended, defense_settings = self._defend(base, defense_ref, concept)
                    self._probe_latency(
                        ledger, base, defended, model_ref.key, defense_ref.key, concept, cases
                    )
                    for attack_ref in attacks:
                        cells_bar.set_postfix_str(
                            f"{defense_ref.key} / {attack_ref.key} / {concept.name}"
                        )
                        self._run_cell(
                            ledger,
                            model_key=model_ref.key,
                            defense_key=defense_ref.key,
                            attack_ref=attack_ref,
                            concept=concept,
                            cases=cases,
                            base=base,
                            defended=defended,
                            evaluator=evaluator,
                            defense_settings=defense_settings,
                        )
                        cells_bar.update(1)
            del base
        cells_bar.close()

    def _defend(
        self, base: DiffusionModel, defense_ref: DefenseRef, concept: ConceptConfig
    ) -> tuple[DiffusionModel, list[dict[str, Any]]]:
        model = base
        settings = []
        for inner in defense_ref.chain():
            defense: Defense = create(
                "defenses", inner.name, concept=concept.concept_text, **inner.options
            )
            model = defense.wrap(model)
            settings.append(defense.describe())
        log.info("defense %s ready for concept %s", defense_ref.key, concept.name)
        return model, settings

    def _sampler_settings(self, model: DiffusionModel) -> dict[str, Any]:
        sampler = self.config.sampler
        return {
            "scheduler": sampler.scheduler,
            "steps": sampler.steps or model.default_steps,
            "guidance": sampler.guidance
            if sampler.guidance is not None
            else model.default_guidance,
            "height": sampler.height or model.default_size,
            "width": sampler.width or model.default_size,
            "use_case_guidance": sampler.use_case_guidance,
        }

    def _jobs(self, model_key, defense_key, attack_key, concept, cases, sampler) -> list[ImageJob]:
        seeds = self.config.seeds
        jobs = []
        for case in cases:
            base_seed = (
                case.seed if (seeds.use_case_seed and case.seed is not None) else seeds.base_seed
            )
            guidance = sampler["guidance"]
            if sampler["use_case_guidance"] and case.guidance is not None:
                guidance = case.guidance
            for k in range(seeds.images_per_case):
                key = image_key(model_key, defense_key, attack_key, concept.name, case.case_id, k)
                jobs.append(ImageJob(case, k, base_seed + k, float(guidance), key))
        return jobs

    # -- timing --------------------------------------------------------------------------

    def _timed_generate(self, model: DiffusionModel, prompts, seeds, guidance, sampler):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        output = model.generate(
            prompts,
            seeds=seeds,
            guidance=guidance,
            steps=sampler["steps"],
            scheduler=sampler["scheduler"],
            height=sampler["height"],
            width=sampler["width"],
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return output, time.perf_counter() - start

    def _probe_latency(
        self, ledger, base, defended, model_key, defense_key, concept, cases
    ) -> None:
        """Time single images, alternating undefended and defended generations.

        Interleaving (ABBA order) keeps slow drifts of the machine, such as thermal
        throttling or another process, from landing on one side of the overhead ratio.
        """
        count = min(self.config.runner.latency_probe_images, len(cases))
        if count == 0:
            return
        prefix = f"{model_key}|{defense_key}|{concept.name}|probe"
        done = ledger.timing_keys()
        if all(f"{prefix}|defended|{i}" in done for i in range(count)):
            return
        sampler = self._sampler_settings(defended)
        jobs = self._jobs(model_key, defense_key, "none", concept, cases[:count], sampler)[::1]
        jobs = [job for job in jobs if job.seed_index == 0][:count]

        # One untimed generation per model, so lazy initialisation is not timed.
        self._timed_generate(
            base, [jobs[0].case.prompt], [jobs[0].seed], [jobs[0].guidance], sampler
        )
        self._timed_generate(
            defended, [jobs[0].case.prompt], [jobs[0].seed], [jobs[0].guidance], sampler
        )

        rows = []
        for index, job in enumerate(jobs):
            order = [("undefended", base), ("defended", defended)]
            if index % 2:
                order.reverse()
            for variant, model in order:
                _, seconds = self._timed_generate(
                    model, [job.case.prompt], [job.seed], [job.guidance], sampler
                )
                rows.append(
                    {
                        "timing_key": f"{prefix}|{variant}|{index}",
                        "model": model_key,
                        "defense": defense_key,
                        "concept": concept.name,
                        "kind": "latency_probe",
                        "variant": variant,
                        "probe_index": index,
                        "batch_size": 1,
                        "seconds": seconds,
                    }
                )
        ledger.add_timings(rows)
        log.info("latency probe %s: %d single-image pairs timed", prefix, len(jobs))

    # -- attacks -------------------------------------------------------------------------

    def _adversarial_prompts(
        self,
        ledger,
        attack_ref,
        concept,
        cases,
        base,
        defended,
        model_key,
        defense_key,
        evaluator,
        sampler,
    ) -> dict[str, str]:
        if attack_ref.key == "none":
            return {case.case_id: case.prompt for case in cases}

        attack: Attack = create("attacks", attack_ref.name, **attack_ref.options)
        attack_hash = stable_hash({"attack": attack.describe(), "sampler": sampler})
        prefix = f"{attack_ref.key}|{attack_hash}|{model_key}|{defense_key}|{concept.name}"
        prompts: dict[str, str] = {}
        todo: list[Case] = []
        for case in cases:
            cached = ledger.adversarial_prompt(f"{prefix}|{case.case_id}")
            if cached is None:
                todo.append(case)
            else:
                prompts[case.case_id] = cached["prompt"]
        if not todo:
            return prompts

        judge = None
        if NEEDS_EVALUATOR in attack.needs:
            judge = self._make_judge(evaluator, concept)
        context = AttackContext(model=defended, original_model=base, sampler=sampler, judge=judge)
        bar = tqdm(
            total=len(todo),
            desc=f"attack {attack_ref.key}",
            unit="case",
            leave=False,
            disable=not self.progress,
        )
        batch_size = self.config.runner.attack_batch_size
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            began = time.perf_counter()
            results = attack.run_batch(batch, context)
            elapsed = time.perf_counter() - began
            for case, result in zip(batch, results, strict=True):
                wall = result.wall_seconds or elapsed / len(batch)
                ledger.add_adversarial_prompt(
                    {
                        "prompt_key": f"{prefix}|{case.case_id}",
                        "attack": attack_ref.key,
                        "attack_hash": attack_hash,
                        "defended_model": f"{model_key}|{defense_key}",
                        "concept": concept.name,
                        "case_id": case.case_id,
                        "original_prompt": case.prompt,
                        "prompt": result.prompt,
                        "iterations": result.iterations,
                        "denoiser_calls": result.denoiser_calls,
                        "text_encoder_calls": result.text_encoder_calls,
                        "wall_seconds": wall,
                        "loss_trace": result.loss_trace,
                        "extra": result.extra,
                    }
                )
                prompts[case.case_id] = result.prompt
            bar.update(len(batch))
        bar.close()
        return prompts

    def _make_judge(self, evaluator: Evaluator, concept: ConceptConfig):
        def judge(images: torch.Tensor, case: Case) -> list[bool]:
            return [j.present for j in evaluator.evaluate(images, concept.name)]

        return judge

    # -- generation ----------------------------------------------------------------------

    def _run_cell(
        self,
        ledger: Ledger,
        *,
        model_key: str,
        defense_key: str,
        attack_ref: PluginRef,
        concept: ConceptConfig,
        cases: list[Case],
        base: DiffusionModel,
        defended: DiffusionModel,
        evaluator: Evaluator,
        defense_settings: list[dict[str, Any]],
    ) -> None:
        sampler = self._sampler_settings(defended)
        key = cell_key(model_key, defense_key, attack_ref.key, concept.name)
        settings = {
            "sampler": sampler,
            "seeds": self.config.seeds.model_dump(),
            "evaluator": evaluator.describe(),
            "defense": defense_settings,
            "attack": {"name": attack_ref.name, **attack_ref.options},
            "prompt_set": concept.prompt_set.model_dump(),
            "limit": concept.limit,
        }
        names = {
            "model": model_key,
            "defense": defense_key,
            "attack": attack_ref.key,
            "concept": concept.name,
            "prompt_set": concept.prompt_set.key,
        }
        ledger.ensure_cell(key, names, stable_hash(settings), settings)

        jobs = self._jobs(model_key, defense_key, attack_ref.key, concept, cases, sampler)
        existing = ledger.existing_image_keys(key)
        todo = [job for job in jobs if job.key not in existing]
        if not todo:
            return

        prompts = self._adversarial_prompts(
            ledger,
            attack_ref,
            concept,
            cases,
            base,
            defended,
            model_key,
            defense_key,
            evaluator,
            sampler,
        )
        bar = tqdm(
            total=len(jobs),
            initial=len(jobs) - len(todo),
            desc=f"images {attack_ref.key}",
            unit="img",
            leave=False,
            disable=not self.progress,
        )
        batch_size = self.config.runner.batch_size
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            texts = [prompts[job.case.case_id] for job in batch]
            truncated = defended.tokenize(texts).truncated
            output, seconds = self._timed_generate(
                defended,
                texts,
                [job.seed for job in batch],
                [job.guidance for job in batch],
                sampler,
            )
            judgements = evaluator.evaluate(output.images, concept.name)

            rows = []
            for index, job in enumerate(batch):
                path = None
                if self.config.runner.save_images:
                    relative = Path(
                        "images",
                        _safe_name(model_key),
                        _safe_name(defense_key),
                        _safe_name(attack_ref.key),
                        _safe_name(concept.name),
                        f"{_safe_name(job.case.case_id)}_{job.seed_index}.png",
                    )
                    save_png_atomic(output.images[index], self.out_dir / relative)
                    path = str(relative)
                rows.append(
                    ImageRow(
                        image_key=job.key,
                        cell_key=key,
                        model=model_key,
                        defense=defense_key,
                        attack=attack_ref.key,
                        concept=concept.name,
                        case_id=job.case.case_id,
                        seed_index=job.seed_index,
                        seed=job.seed,
                        guidance=job.guidance,
                        prompt=texts[index],
                        truncated=truncated[index],
                        image_path=path,
                        score=float(judgements[index].score),
                        present=bool(judgements[index].present),
                        details=judgements[index].details,
                        hook_records=output.records[index],
                        batch_size=len(batch),
                        batch_seconds=seconds,
                    )
                )
            ledger.add_images(rows)
            bar.update(len(batch))
        bar.close()
        log.info("cell %s: %d images generated", key, len(todo))
