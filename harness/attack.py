"""The attack plugin interface and its result record.

An attack turns a case into an adversarial prompt against a defended model. The text it
returns is what gets evaluated: the runner re-tokenizes it and generates from it like any
other prompt, so an attack cannot report success on embeddings no text reproduces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from harness.model import DiffusionModel
from harness.prompts.base import Case

# Inputs an attack may need from the runner, beyond the defended model.
NEEDS_ORIGINAL_MODEL = "original_model"  # the undefended model (P4D's teacher, targets)
NEEDS_EVALUATOR = "evaluator"  # early stopping through the judge (UnlearnDiffAtk)


@dataclass
class AttackResult:
    """One case's adversarial prompt and what it cost.

    `prompt` is the text that is evaluated. `loss_trace` holds the loss per iteration;
    `model_calls` counts denoiser and text-encoder forward passes.
    """

    prompt: str
    iterations: int = 0
    denoiser_calls: int = 0
    text_encoder_calls: int = 0
    wall_seconds: float = 0.0
    loss_trace: list[float] = field(default_factory=list)
    token_ids: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_calls(self) -> int:
        return self.denoiser_calls + self.text_encoder_calls


@dataclass
class AttackContext:
    """What the runner hands an attack: the defended model and, when declared, the rest.

    `judge(images, case)` returns per-image concept presence; it exists only for attacks
    that declare `NEEDS_EVALUATOR`.
    """

    model: DiffusionModel
    original_model: DiffusionModel | None
    sampler: dict[str, Any]
    judge: Callable[[torch.Tensor, Case], list[bool]] | None = None
    progress: Callable[[int], None] | None = None


class Attack:
    """Base class. Subclasses set `name`, `needs`, `model_capabilities` and implement `run`.

    `model_capabilities` lists what the defended model must offer (see harness.model);
    `needs` lists what the runner must provide. `run_batch` defaults to one case at a
    time; attacks that can optimise several cases together override it.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    model_capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, **options: Any) -> None:
        self.options = options

    def describe(self) -> dict[str, Any]:
        return {"attack": self.name, **self.options}

    def depends_on_defense(self) -> bool:
        """Whether the adversarial prompt changes with the defense under attack.

        A transfer attack that never queries the defended model produces the same prompt
        for every defense, so the runner computes it once per model and concept.
        """
        return True

    def estimated_denoiser_passes(self, steps: int) -> int:
        """Denoiser forward passes per case under the current options, for planning.

        `steps` is the run's sampling steps, for attacks that generate images.
        """
        return 0

    def run(self, case: Case, context: AttackContext) -> AttackResult:
        raise NotImplementedError(f"attack {self.name!r} does not implement run()")

    def run_batch(self, cases: Sequence[Case], context: AttackContext) -> list[AttackResult]:
        return [self.run(case, context) for case in cases]
