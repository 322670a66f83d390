"""Defense `leace`: LEACE concept erasure on the text encoder's output states.

Belrose, Schneider-Joseph, Ravfogel, Cotterell, Raff and Biderman, "LEACE: Perfect
linear concept erasure in closed form", NeurIPS 2023; fitted with EleutherAI's
`concept-erasure` package (`LeaceFitter`).

LEACE finds the affine map r(x) = x - P (x - mu) of least change (in the sense of the
paper's Theorem 4.3) after which no linear classifier predicts the concept label from x
better than a constant: the class-conditional means of r(x) coincide. Here x is a token
state of the text encoder, the label is 1 for tokens of forget prompts (prompts that name
the concept) and 0 for tokens of retain prompts, and the eraser is applied to every token
state the denoiser's cross-attention reads.

Which positions: every position of every prompt (padding included), each a D-dimensional
sample. The denoiser attends to all positions, and under causal (CLIP) or bidirectional
(BERT) attention the concept spreads into positions after or around its word, so
erasing only the concept's own token would leave it readable elsewhere. Flattening the
(T, D) states into one vector would need a (T*D)^2 covariance from a few hundred prompts;
fitting on the positions as samples keeps it D x D, and since every prompt contributes all
T positions, the class means of the mean-pooled states are also equalised. Option
`positions: pooled` fits on mean-pooled states instead (one sample per prompt) and
applies the same map per token; that guarantees only the pooled means.

Prompts to fit on: options `forget_prompts` and `retain_prompts` (lists); without them,
for a concept that is a shapes-world task (`star`, `swirl`), the train pool of that task's
forget set and its retain twins (never the eval pool that runs score). The eraser is
fitted when the defense is applied, in seconds.

The eraser acts as a `before_denoise` sampler hook on both the conditional and the
unconditional embedding: the defended model behaves like one whose text encoder ends in
the eraser, so everything the denoiser reads from the text passes through it. The map is
idempotent, so applying it at every step is harmless, and it is differentiable, so the
single-step path of adaptive attacks runs through it unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from harness.defense import Defense
from harness.model import DiffusionModel
from harness.sampling import SamplerHook, StepState

log = logging.getLogger(__name__)

OPTIONS = ("forget_prompts", "retain_prompts", "positions", "shrinkage")


@dataclass(frozen=True)
class FittedEraser:
    """x -> x - ((x - bias) @ proj_right^T) @ proj_left^T, LEACE's implicit low-rank form."""

    proj_left: torch.Tensor  # (D, k)
    proj_right: torch.Tensor  # (k, D)
    bias: torch.Tensor  # (D,)
    forget_count: int
    retain_count: int
    samples: int

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        left = self.proj_left.to(states.device, states.dtype)
        right = self.proj_right.to(states.device, states.dtype)
        bias = self.bias.to(states.device, states.dtype)
        return states - ((states - bias) @ right.T) @ left.T


def shapes_task_prompts(concept: str | None) -> tuple[list[str], list[str]] | None:
    """Return the train-pool forget and retain prompts of the shapes task `concept`, if any."""
    from harness.registry import create
    from harness.shapes.tasks import TASKS

    for task in TASKS.values():
        if concept in (task.name, task.value):
            cases = create("prompt_sets", f"shapes/{task.name}/forget", pool="train").load()
            return [case.prompt for case in cases], [case.safe_prompt for case in cases]
    return None


def encode_in_batches(model: DiffusionModel, prompts: list[str], batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        parts = [
            model.encode_prompts(prompts[i : i + batch])[0] for i in range(0, len(prompts), batch)
        ]
    return torch.cat(parts)


def fit_eraser(
    forget_states: torch.Tensor,
    retain_states: torch.Tensor,
    *,
    positions: str = "tokens",
    shrinkage: bool = True,
) -> FittedEraser:
    """Fit LEACE on (N, T, D) forget and retain states (float64 statistics)."""
    from concept_erasure import LeaceFitter

    if positions == "tokens":
        forget = forget_states.reshape(-1, forget_states.shape[-1])
        retain = retain_states.reshape(-1, retain_states.shape[-1])
    elif positions == "pooled":
        forget, retain = forget_states.mean(dim=1), retain_states.mean(dim=1)
    else:
        raise ValueError(f"defense 'leace': positions {positions!r}; valid: tokens, pooled")
    x = torch.cat([forget, retain]).double().cpu()
    z = torch.cat([torch.ones(len(forget)), torch.zeros(len(retain))]).double()[:, None]
    fitter = LeaceFitter(x.shape[1], 1, dtype=torch.float64, shrinkage=shrinkage)
    fitter.update(x, z)
    eraser = fitter.eraser
    return FittedEraser(
        proj_left=eraser.proj_left,
        proj_right=eraser.proj_right,
        bias=eraser.bias,
        forget_count=forget_states.shape[0],
        retain_count=retain_states.shape[0],
        samples=x.shape[0],
    )


class EraserHook(SamplerHook):
    def __init__(self, eraser: FittedEraser) -> None:
        self.eraser = eraser

    def before_denoise(self, state: StepState) -> None:
        state.cond = self.eraser(state.cond)
        state.uncond = self.eraser(state.uncond)


class LeaceDefense(Defense):
    """Options: `forget_prompts`, `retain_prompts`, `positions` (tokens | pooled),
    `shrinkage` (covariance shrinkage, default true as in `concept-erasure`)."""

    name = "leace"

    def __init__(self, concept: str | None = None, **options: Any) -> None:
        super().__init__(concept=concept, **options)
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise ValueError(
                f"defense 'leace': unknown options {sorted(unknown)}; valid: {', '.join(OPTIONS)}"
            )
        forget, retain = options.get("forget_prompts"), options.get("retain_prompts")
        if bool(forget) != bool(retain):
            raise ValueError("defense 'leace': give both 'forget_prompts' and 'retain_prompts'")
        if forget:
            self.forget, self.retain = [str(p) for p in forget], [str(p) for p in retain]
            self.source = "options"
        else:
            task = shapes_task_prompts(concept)
            if task is None:
                raise ValueError(
                    f"defense 'leace': no prompts to fit on for concept {concept!r}; pass "
                    "'forget_prompts' and 'retain_prompts' (the shapes tasks star and swirl"
                    " have defaults)"
                )
            self.forget, self.retain = task
            self.source = f"shapes task {concept}"
        self.positions = str(options.get("positions", "tokens"))
        self.shrinkage = bool(options.get("shrinkage", True))
        self.eraser: FittedEraser | None = None

    def fit(self, model: DiffusionModel) -> FittedEraser:
        started = time.perf_counter()
        eraser = fit_eraser(
            encode_in_batches(model, self.forget),
            encode_in_batches(model, self.retain),
            positions=self.positions,
            shrinkage=self.shrinkage,
        )
        log.info(
            "leace: fitted on %d forget and %d retain prompts (%s, %d samples of dim %d) in %.2f s",
            eraser.forget_count,
            eraser.retain_count,
            self.positions,
            eraser.samples,
            eraser.bias.shape[0],
            time.perf_counter() - started,
        )
        return eraser

    def apply(self, model: DiffusionModel) -> DiffusionModel:
        eraser = self.fit(model)
        self.eraser = eraser
        return model.replace(
            sampler_hooks=(*model.sampler_hooks, lambda _model: EraserHook(eraser))
        )

    def describe(self) -> dict[str, Any]:
        return {
            "defense": self.name,
            "prompts": self.source,
            "forget_prompts": len(self.forget),
            "retain_prompts": len(self.retain),
            "positions": self.positions,
            "shrinkage": self.shrinkage,
        }
