"""The defense plugin interface.

A defense turns a model into a defended model: `apply(model)` returns a new
`DiffusionModel` (edited denoiser, swapped text encoder, default negative prompt, extra
sampler hooks) and leaves the input untouched. Defenses compose by applying one to the
output of another, which is how "SafeRedir over ESD" is one defended model.
"""

from __future__ import annotations

from typing import Any, ClassVar

from harness.model import DiffusionModel


class Defense:
    """Base class. Subclasses set `name` and implement `apply`.

    `removes` lists model capabilities the defended model no longer offers (a black-box
    defense would remove gradient access); the runner rejects attacks that need them.
    """

    name: ClassVar[str] = ""
    removes: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, concept: str | None = None, **options: Any) -> None:
        self.concept = concept
        self.options = options

    def apply(self, model: DiffusionModel) -> DiffusionModel:
        raise NotImplementedError(f"defense {self.name!r} does not implement apply()")

    def describe(self) -> dict[str, Any]:
        return {"defense": self.name, **self.options}

    def wrap(self, model: DiffusionModel) -> DiffusionModel:
        """Apply the defense and record it in the model's defense chain."""
        defended = self.apply(model)
        return defended.replace(
            capabilities=defended.capabilities - self.removes,
            defense_chain=(*model.defense_chain, self.name),
        )
