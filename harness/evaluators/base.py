"""The evaluator plugin interface: does an image show the concept, and how strongly.

An evaluator is a judge pinned by a named preset (model, classes, threshold). The preset's
description goes into every summary row, because ASR numbers from different judges are not
comparable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class Judgement:
    """One image's verdict: `score` is the evaluator's concept score, `present` applies the
    preset's threshold to it, `details` holds per-class scores for the ledger."""

    score: float
    present: bool
    details: dict[str, Any] = field(default_factory=dict)


class Evaluator:
    """Base class. Subclasses set `name`, `presets` and implement `evaluate`.

    `presets` maps a preset name to its settings; options given in the config override the
    preset's values, and `describe()` reports the values in force.
    """

    name: ClassVar[str] = ""
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    default_preset: ClassVar[str | None] = None

    def __init__(self, preset: str | None = None, **options: Any) -> None:
        preset = preset or self.default_preset
        if self.presets and preset not in self.presets:
            valid = ", ".join(sorted(self.presets))
            raise ValueError(
                f"unknown preset {preset!r} for evaluator {self.name!r}; valid: {valid}"
            )
        self.preset = preset
        self.settings: dict[str, Any] = {**self.presets.get(preset, {}), **options}

    @property
    def threshold(self) -> float | None:
        value = self.settings.get("threshold")
        return None if value is None else float(value)

    def describe(self) -> dict[str, Any]:
        """The judge's identity for summaries: name, preset and the settings in force."""
        return {"evaluator": self.name, "preset": self.preset, **self.settings}

    def missing_files(self) -> list[str]:
        """Files this evaluator needs that are not present; empty when it can run."""
        return []

    def evaluate(self, images: torch.Tensor, concept: str) -> list[Judgement]:
        """Judge a batch of images (B, 3, H, W) in [0, 1] for `concept`."""
        raise NotImplementedError(f"evaluator {self.name!r} does not implement evaluate()")
