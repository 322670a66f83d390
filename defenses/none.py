"""Defense `none`: the undefended model, the baseline every overhead is measured against."""

from __future__ import annotations

from harness.defense import Defense
from harness.model import DiffusionModel


class NoDefense(Defense):
    name = "none"

    def apply(self, model: DiffusionModel) -> DiffusionModel:
        return model
