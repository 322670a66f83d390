"""An example third-party defense: remove the concept's direction from the conditioning.

Each token state of the prompt embedding loses its component along the mean token state of
the concept prompt: e' = e - (e . u) u with u the unit concept direction. It is a naive
baseline meant to show the plugin surface: a `Defense` subclass whose `apply` returns the
model with one extra sampler hook, and nothing in erasure-arena edited.
"""

from __future__ import annotations

import torch

from harness.defense import Defense
from harness.model import DiffusionModel
from harness.sampling import SamplerHook, StepState


class _RemoveDirection(SamplerHook):
    def __init__(self, direction: torch.Tensor) -> None:
        self.direction = direction

    def before_denoise(self, state: StepState) -> None:
        if state.step == 0 or state.differentiable:
            cond = state.cond
            projection = (cond @ self.direction).unsqueeze(-1) * self.direction
            state.cond = cond - projection


class ConceptProjection(Defense):
    name = "my-defense"

    def apply(self, model: DiffusionModel) -> DiffusionModel:
        with torch.no_grad():
            concept, _ = model.encode_prompts([self.concept or ""])
        direction = torch.nn.functional.normalize(concept[0].mean(dim=0), dim=0)
        hook = (lambda _model: _RemoveDirection(direction),)
        return model.replace(sampler_hooks=(*model.sampler_hooks, *hook))
