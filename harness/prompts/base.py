"""Prompt cases and the prompt-set plugin interface.

A prompt set turns a source (a CSV or JSON file from published work, or a generated list)
into `Case` records. The runner never reads files itself: it asks a prompt-set plugin for
cases, so every format is parsed in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Case:
    """One prompt of a prompt set, with the sampling settings its source pins.

    `seed` and `guidance` are None when the source gives none; the runner then uses the
    run's defaults. `safe_prompt` is the paired prompt without the concept (IGMU retain
    prompts, Ring-A-Bell's NoNudity pairs), used by attacks and trainers that need pairs.
    """

    case_id: str
    prompt: str
    concept: str
    seed: int | None = None
    guidance: float | None = None
    safe_prompt: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class PromptSetError(ValueError):
    """Invalid prompt-set input: a missing file or column, a bad value or an unknown option.

    The message names the file (or option) and what was expected, so the command line can
    print it as the one-line error.
    """


class PromptSet:
    """A loader plugin. Subclasses set `name` and implement `load`.

    Options come from the config entry (for example `path`, `concept`, `limit`) and are
    passed to the constructor as keyword arguments.
    """

    name: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        self.options = options

    def load(self) -> list[Case]:
        raise NotImplementedError(f"prompt set {self.name!r} does not implement load()")
