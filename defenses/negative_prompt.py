"""Defense `negative-prompt`: the erased concept as the negative prompt.

Classifier-free guidance then steers away from the concept: the unconditional half of
the guidance is replaced by the concept's embedding, so eps = eps(concept) +
w * (eps(prompt) - eps(concept)). This is the "SD-NEGP" baseline of P4D (Chin et al.,
ICML 2024) and of diffusers' `negative_prompt` argument.
"""

from __future__ import annotations

from typing import Any

from harness.defense import Defense
from harness.model import DiffusionModel


class NegativePrompt(Defense):
    """Options: `negative_prompt` (default: the concept name)."""

    name = "negative-prompt"

    def __init__(self, concept: str | None = None, **options: Any) -> None:
        super().__init__(concept=concept, **options)
        self.negative_prompt = options.get("negative_prompt") or concept
        if not self.negative_prompt:
            raise ValueError("defense 'negative-prompt' needs a concept or a 'negative_prompt'")

    def apply(self, model: DiffusionModel) -> DiffusionModel:
        return model.replace(negative_prompt=self.negative_prompt)

    def describe(self) -> dict[str, Any]:
        return {"defense": self.name, "negative_prompt": self.negative_prompt}
