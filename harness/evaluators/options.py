"""Checks shared by evaluator constructors: option names and concept names."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any


def check_option_names(evaluator: str, options: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Raise ValueError when `options` contains a key the evaluator does not read.

    A misspelt option would otherwise be ignored silently and the run would use a default.
    """
    allowed = set(allowed)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for evaluator {evaluator!r}; "
            f"valid: {', '.join(sorted(allowed))}"
        )


def concept_words(text: str) -> list[str]:
    """Lower-case words of a concept or label name: 'Garbage_Truck' -> ['garbage', 'truck']."""
    return [word for word in re.split(r"[\s_\-]+", text.strip().lower()) if word]
