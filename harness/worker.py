"""The compute side of a run: one loaded defended model and the work done on it.

A `CellWorker` holds the base model, the defended model and the judge for one (model,
concept, defense) and does everything that needs them: the latency probe, attacks and
batched generation. It never touches the ledger: it returns rows (and PNG bytes) that
the driver writes, so the same worker runs in the driver's process (the local executor)
or as a remote actor on another GPU, with the driver as the single ledger writer.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from harness.attack import NEEDS_EVALUATOR, Attack, AttackContext
from harness.config import ConceptConfig, DefenseRef, PluginRef, RunConfig, stable_hash
from harness.defense import Defense
from harness.evaluators.base import Evaluator
from harness.ledger import image_key
from harness.model import DiffusionModel
from harness.prompts.base import Case
from harness.registry import create

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageJob:
    """One image to generate: a case, which of its seeds, and its ledger key."""

    case: Case
    seed_index: int
    seed: int
    guidance: float
    key: str


@dataclass(frozen=True)
class GeneratedImage:
    """A worker's result per image: the ledger fields and the encoded PNG."""

    job: ImageJob
    prompt: str
    truncated: bool
    score: float
    present: bool
    details: dict[str, Any]
    hook_records: dict[str, Any]
    batch_size: int
    batch_seconds: float
    png: bytes


def load_model(config: RunConfig, model_ref: PluginRef, device, dtype) -> DiffusionModel:
    plugin = create("models", model_ref.name, **{"label": model_ref.key, **model_ref.options})
    model = plugin.load(device, dtype)
    log.info("loaded model %s (%s)", model_ref.key, model.info.get("source", model_ref.name))
    return model


def sampler_settings(config: RunConfig, model: DiffusionModel) -> dict[str, Any]:
    """Return the sampler settings in force: the config's, with the model's defaults filled in."""
    sampler = config.sampler
    guidance = sampler.guidance if sampler.guidance is not None else model.default_guidance
    return {
        "scheduler": sampler.scheduler or model.default_scheduler,
        "steps": sampler.steps or model.default_steps,
        "guidance": guidance,
        "height": sampler.height or model.default_size,
        "width": sampler.width or model.default_size,
        "use_case_guidance": sampler.use_case_guidance,
    }


def plan_jobs(
    config: RunConfig,
    names: tuple[str, str, str, str],
    cases: Sequence[Case],
    sampler: dict[str, Any],
) -> list[ImageJob]:
    """Every image of a cell. `names` is (model, defense, attack, concept).

    Image k of a case uses seed (case seed, or the run's base seed) + k, and the case's
    guidance scale when the prompt file pins one.
    """
    seeds = config.seeds
    jobs = []
    for case in cases:
        use_case_seed = seeds.use_case_seed and case.seed is not None
        base_seed = case.seed if use_case_seed else seeds.base_seed
        guidance = sampler["guidance"]
        if sampler["use_case_guidance"] and case.guidance is not None:
            guidance = case.guidance
        for k in range(seeds.images_per_case):
            key = image_key(*names, case.case_id, k)
            jobs.append(ImageJob(case, k, base_seed + k, float(guidance), key))
    return jobs


def encode_png(image: torch.Tensor) -> bytes:
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class CellWorker:
    """One defended model for one concept, with its judge, ready for any attack."""

    def __init__(
        self,
        config: RunConfig,
        model_ref: PluginRef,
        concept: ConceptConfig,
        defense_ref: DefenseRef,
        device: torch.device,
        dtype: torch.dtype,
        base: DiffusionModel | None = None,
        evaluator: Evaluator | None = None,
    ) -> None:
        self.config = config
        self.model_key = model_ref.key
        self.concept = concept
        self.defense_key = defense_ref.key
        self.device = device
        self.base = base if base is not None else load_model(config, model_ref, device, dtype)
        self.evaluator = evaluator if evaluator is not None else make_evaluator(concept)

        self.defense_settings: list[dict[str, Any]] = []
        defended = self.base
        for inner in defense_ref.chain():
            defense: Defense = create(
                "defenses", inner.name, concept=concept.concept_text, **inner.options
            )
            defended = defense.wrap(defended)
            self.defense_settings.append(defense.describe())
        self.defended = defended
        self.sampler = sampler_settings(config, defended)
        log.info("defense %s ready for concept %s", self.defense_key, concept.name)

    # -- descriptions --------------------------------------------------------------------

    def cell_settings(self, attack_ref: PluginRef) -> dict[str, Any]:
        """Everything that decides a cell's images and verdicts, for the ledger."""
        return {
            "sampler": self.sampler,
            "seeds": self.config.seeds.model_dump(),
            "evaluator": self.evaluator.describe(),
            "defense": self.defense_settings,
            "attack": {"name": attack_ref.name, **attack_ref.options},
            "prompt_set": self.concept.prompt_set.model_dump(),
            "limit": self.concept.limit,
            "task": self.concept.task or self.concept.name,
            "role": self.concept.role,
        }

    def attack_hash(self, attack_ref: PluginRef) -> str:
        attack = create("attacks", attack_ref.name, **attack_ref.options)
        return stable_hash({"attack": attack.describe(), "sampler": self.sampler})

    # -- timing --------------------------------------------------------------------------

    def _timed_generate(self, model: DiffusionModel, prompts, seeds, guidance):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        output = model.generate(
            prompts,
            seeds=seeds,
            guidance=guidance,
            steps=self.sampler["steps"],
            scheduler=self.sampler["scheduler"],
            height=self.sampler["height"],
            width=self.sampler["width"],
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return output, time.perf_counter() - start

    def probe_latency(self, cases: Sequence[Case], count: int) -> list[dict[str, Any]]:
        """Time single images, alternating undefended and defended generations.

        Interleaving (ABBA order) keeps slow drifts of the machine, such as thermal
        throttling or another process, from landing on one side of the overhead ratio.
        """
        names = (self.model_key, self.defense_key, "none", self.concept.name)
        jobs = [job for job in plan_jobs(self.config, names, cases, self.sampler)]
        jobs = [job for job in jobs if job.seed_index == 0][:count]
        if not jobs:
            return []

        # One untimed generation per model, so lazy initialisation is not timed.
        first = jobs[0]
        for model in (self.base, self.defended):
            self._timed_generate(model, [first.case.prompt], [first.seed], [first.guidance])

        prefix = f"{self.model_key}|{self.defense_key}|{self.concept.name}|probe"
        rows = []
        for index, job in enumerate(jobs):
            order = [("undefended", self.base), ("defended", self.defended)]
            if index % 2:
                order.reverse()
            for variant, model in order:
                _, seconds = self._timed_generate(
                    model, [job.case.prompt], [job.seed], [job.guidance]
                )
                rows.append(
                    {
                        "timing_key": f"{prefix}|{variant}|{index}",
                        "model": self.model_key,
                        "defense": self.defense_key,
                        "concept": self.concept.name,
                        "kind": "latency_probe",
                        "variant": variant,
                        "probe_index": index,
                        "batch_size": 1,
                        "seconds": seconds,
                    }
                )
        log.info("latency probe %s: %d single-image pairs timed", prefix, len(jobs))
        return rows

    # -- attacks -------------------------------------------------------------------------

    def run_attack(self, attack_ref: PluginRef, cases: Sequence[Case]) -> list[dict[str, Any]]:
        """Adversarial prompts for `cases`, as ledger records (without the prompt key)."""
        attack: Attack = create("attacks", attack_ref.name, **attack_ref.options)
        judge = self._judge if NEEDS_EVALUATOR in attack.needs else None
        context = AttackContext(
            model=self.defended, original_model=self.base, sampler=self.sampler, judge=judge
        )
        began = time.perf_counter()
        results = attack.run_batch(list(cases), context)
        elapsed = time.perf_counter() - began
        records = []
        for case, result in zip(cases, results, strict=True):
            records.append(
                {
                    "case_id": case.case_id,
                    "original_prompt": case.prompt,
                    "prompt": result.prompt,
                    "iterations": result.iterations,
                    "denoiser_calls": result.denoiser_calls,
                    "text_encoder_calls": result.text_encoder_calls,
                    "wall_seconds": result.wall_seconds or elapsed / len(cases),
                    "loss_trace": result.loss_trace,
                    "extra": result.extra,
                }
            )
        return records

    def _judge(self, images: torch.Tensor, case: Case) -> list[bool]:
        return [j.present for j in self.evaluator.evaluate(images, self.concept.name)]

    # -- generation ----------------------------------------------------------------------

    def generate(self, jobs: Sequence[ImageJob], prompts: Sequence[str]) -> list[GeneratedImage]:
        """Generate, time and judge one batch; `prompts[i]` is the text for `jobs[i]`."""
        truncated = self.defended.tokenize(prompts).truncated
        output, seconds = self._timed_generate(
            self.defended,
            list(prompts),
            [job.seed for job in jobs],
            [job.guidance for job in jobs],
        )
        judgements = self.evaluator.evaluate(output.images, self.concept.name)
        return [
            GeneratedImage(
                job=job,
                prompt=prompts[index],
                truncated=truncated[index],
                score=float(judgements[index].score),
                present=bool(judgements[index].present),
                details=_with_expected(judgements[index].details, job.case),
                hook_records=output.records[index],
                batch_size=len(jobs),
                batch_seconds=seconds,
                png=encode_png(output.images[index]),
            )
            for index, job in enumerate(jobs)
        ]


def _with_expected(details: dict[str, Any], case: Case) -> dict[str, Any]:
    """Add the attribute values the prompt asks for, when its prompt set records them.

    With an evaluator that reports `predicted` attributes (the shapes oracle), the summary
    then scores whether each image shows what its prompt asked for.
    """
    expected = case.extra.get("values") if case.extra else None
    if not isinstance(expected, dict):
        return details
    return {**details, "expected": expected}


def make_evaluator(concept: ConceptConfig) -> Evaluator:
    return create(
        "evaluators",
        concept.evaluator.name,
        preset=concept.evaluator.preset,
        **concept.evaluator.options,
    )
