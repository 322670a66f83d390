"""The `inline` prompt set: cases written directly in the benchmark config.

Example config entry:

    prompt_set:
      name: inline
      concept: nudity
      prompts:
        - a woman at the beach
        - {prompt: a nude sculpture in a museum, seed: 7, guidance: 7.5,
           safe_prompt: a sculpture in a museum}
"""

from __future__ import annotations

import logging
import math
from typing import Any

from harness.prompts.base import Case, PromptSet, PromptSetError
from harness.prompts.parsing import (
    check_options,
    check_unique_ids,
    log_blank_skips,
    select_window,
)

log = logging.getLogger(__name__)

ENTRY_KEYS = ("prompt", "seed", "guidance", "safe_prompt", "case_id")


class InlinePromptSet(PromptSet):
    """Cases from the `prompts` option: a list of prompt strings or mappings.

    Options: `prompts` and `concept` (required); `offset` and `limit`.

    A mapping has `prompt` (required) and optionally `seed` (integer), `guidance` (number),
    `safe_prompt` (string) and `case_id`. The default case id is the entry's 0-based
    position in the list. Entries with a blank prompt are skipped with a logged warning.
    """

    name = "inline"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        check_options(
            self.name, options, required=("prompts", "concept"), optional=("limit", "offset")
        )
        if not isinstance(options["prompts"], list):
            raise PromptSetError(
                f"prompt set {self.name!r}: option prompts must be a list of strings or "
                f"mappings, got {type(options['prompts']).__name__}"
            )

    def load(self) -> list[Case]:
        cases = []
        blank_ids = []
        for position, entry in enumerate(self.options["prompts"]):
            case = self._entry_case(position, entry)
            if not case.prompt.strip():
                blank_ids.append(case.case_id)
                continue
            cases.append(case)

        log_blank_skips(f"prompt set {self.name!r}", blank_ids)
        check_unique_ids(cases, f"prompt set {self.name!r}")
        selected = select_window(cases, self.options, self.name)
        log.info("read %d of %d inline case(s)", len(selected), len(cases))
        return selected

    def _entry_case(self, position: int, entry: Any) -> Case:
        """Turn one list entry into a case, raising `PromptSetError` on a malformed entry."""
        where = f"prompt set {self.name!r}, prompts[{position}]"
        concept = self.options["concept"]
        if isinstance(entry, str):
            return Case(case_id=str(position), prompt=entry, concept=concept)
        if not isinstance(entry, dict):
            raise PromptSetError(
                f"{where}: expected a string or a mapping, got {type(entry).__name__}"
            )

        unknown = sorted(str(key) for key in entry if key not in ENTRY_KEYS)
        if unknown:
            raise PromptSetError(
                f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(ENTRY_KEYS)}"
            )
        prompt = entry.get("prompt")
        if not isinstance(prompt, str):
            raise PromptSetError(f"{where}: missing or non-string 'prompt'")
        safe_prompt = entry.get("safe_prompt")
        if safe_prompt is not None and not isinstance(safe_prompt, str):
            raise PromptSetError(f"{where}: 'safe_prompt' must be a string")
        case_id = entry.get("case_id", position)
        if isinstance(case_id, bool) or not isinstance(case_id, (str, int)):
            raise PromptSetError(f"{where}: 'case_id' must be a string or an integer")

        return Case(
            case_id=str(case_id),
            prompt=prompt,
            concept=concept,
            seed=_seed(entry.get("seed"), where),
            guidance=_guidance(entry.get("guidance"), where),
            safe_prompt=safe_prompt,
        )


def _seed(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PromptSetError(f"{where}: 'seed' must be an integer, got {value!r}")
    return value


def _guidance(value: Any, where: str) -> float | None:
    if value is None:
        return None
    valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not valid or not math.isfinite(value):
        raise PromptSetError(f"{where}: 'guidance' must be a finite number, got {value!r}")
    return float(value)
