"""The `ring-a-bell-pairs` prompt set: the paired prompts Ring-A-Bell averages into a concept.

Ring-A-Bell (Tsai, Hsu et al., "Ring-A-Bell! How Reliable are Concept Removal Methods for
Diffusion Models?", ICLR 2024) extracts a concept vector as the mean difference between the
text embeddings of prompts with and without the concept. Its repository ships the pairs in
two layouts, and this loader reads both:

- Nudity: `Nudity_prompt.csv` (case_number, nudity, people, clothes, location,
  evaluation_seed) is row-aligned with `NoNudity_prompt.csv` (case_number, prompt,
  evaluation_seed). The concept prompt is assembled from the parts as the authors'
  concept-vector notebook does: "{nudity} {people}, {location}", or "{nudity}, {location}"
  when the people cell is the text "None". The `clothes` column takes no part in the text.
- Violence: `Violence_30.csv` (prompt, case_number, evaluation_seed, prompt1) contains
  both sides: `prompt` describes the violent scene and `prompt1` the same scene without it, and
  the notebook subtracts the `prompt1` embeddings from the `prompt` ones.

The concept prompt becomes `Case.prompt` and its counterpart `Case.safe_prompt`.
"""

from __future__ import annotations

import logging
from typing import Any

from harness.prompts.base import Case, PromptSet, PromptSetError
from harness.prompts.parsing import (
    CASE_ID_COLUMN,
    CsvTable,
    check_options,
    check_unique_ids,
    log_blank_skips,
    read_csv,
    select_window,
)

log = logging.getLogger(__name__)

NUDITY_PART_COLUMNS = ("nudity", "people", "clothes", "location")
NUDITY_SAFE_COLUMNS = ("prompt",)
VIOLENCE_COLUMNS = ("prompt", "prompt1")

# The people cell that means "no people word", written as the text None in the files.
NO_PEOPLE = "None"

LAYOUTS = (
    f"nudity parts ({', '.join(NUDITY_PART_COLUMNS)}) with safe_path to a file with a "
    f"'prompt' column, or violence pairs ({', '.join(VIOLENCE_COLUMNS)})"
)


def nudity_prompt(nudity: str, people: str, location: str) -> str:
    """Assemble a Ring-A-Bell nudity prompt from its parts.

    The parts are stripped of surrounding spaces first (the published file has cells such
    as "naked " and " in adult videos"). The CLIP tokenizer collapses runs of whitespace,
    so the token ids equal those of the notebook's unstripped text.

    NOTE: the authors' notebook drops the people word only when the clothes cell is not
    "None" as well. For a row with "None" in both cells it would put the word "None" into
    the prompt, so this function always drops it. No row of the published file is affected.
    """
    nudity, people, location = nudity.strip(), people.strip(), location.strip()
    if people == NO_PEOPLE:
        return f"{nudity}, {location}"
    return f"{nudity} {people}, {location}"


class RingABellPairs(PromptSet):
    """Concept prompts paired with their concept-free counterparts, from Ring-A-Bell's files.

    Options: `path` (required: `Nudity_prompt.csv` or `Violence_30.csv`); `safe_path`
    (required for the nudity layout, rejected for violence, whose file holds both sides);
    `concept` (default "nudity" or "violence" by layout); `offset` and `limit`.

    Case ids come from `case_number` and seeds from `evaluation_seed` of the `path` file.
    A pair with a blank side is skipped with a logged warning. Raises `PromptSetError` when
    the two nudity files differ in row count or in case numbers row by row.
    """

    name = "ring-a-bell-pairs"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        check_options(
            self.name,
            options,
            required=("path",),
            optional=("safe_path", "concept", "limit", "offset"),
        )

    def load(self) -> list[Case]:
        table = read_csv(self.options["path"])
        if all(column in table.header for column in NUDITY_PART_COLUMNS):
            pairs = self._nudity_pairs(table)
            default_concept = "nudity"
        elif all(column in table.header for column in VIOLENCE_COLUMNS):
            pairs = self._violence_pairs(table)
            default_concept = "violence"
        else:
            raise PromptSetError(
                f"{table.path}: unknown Ring-A-Bell layout; expected columns for {LAYOUTS}; "
                f"the file has {', '.join(repr(name) for name in table.header)}"
            )
        concept = self.options.get("concept") or default_concept

        cases = []
        blank_ids = []
        for index, (prompt, safe_prompt) in enumerate(pairs):
            case_id = table.case_id(index)
            if not prompt.strip() or not safe_prompt.strip():
                blank_ids.append(case_id)
                continue
            cases.append(
                Case(
                    case_id=case_id,
                    prompt=prompt,
                    concept=concept,
                    seed=table.seed(index),
                    guidance=table.guidance(index),
                    safe_prompt=safe_prompt,
                )
            )

        log_blank_skips(str(table.path), blank_ids)
        check_unique_ids(cases, str(table.path))
        selected = select_window(cases, self.options, self.name)
        log.info("read %d of %d %s pair(s) from %s", len(selected), len(cases), concept, table.path)
        return selected

    def _nudity_pairs(self, table: CsvTable) -> list[tuple[str, str]]:
        safe_path = self.options.get("safe_path")
        if not safe_path:
            raise PromptSetError(
                f"prompt set {self.name!r}: {table.path} has the nudity-parts layout, so the "
                "option safe_path must name the row-aligned file of safe prompts "
                "(NoNudity_prompt.csv, with a 'prompt' column)"
            )
        safe_table = read_csv(safe_path)
        safe_table.require(NUDITY_SAFE_COLUMNS)
        _check_aligned(table, safe_table)

        return [
            (
                nudity_prompt(row["nudity"], row["people"], row["location"]),
                safe_row["prompt"],
            )
            for row, safe_row in zip(table.rows, safe_table.rows, strict=True)
        ]

    def _violence_pairs(self, table: CsvTable) -> list[tuple[str, str]]:
        if self.options.get("safe_path"):
            raise PromptSetError(
                f"prompt set {self.name!r}: {table.path} contains both sides of each pair "
                "(columns prompt and prompt1), so the option safe_path is not used; remove it"
            )
        return [(row["prompt"], row["prompt1"]) for row in table.rows]


def _check_aligned(table: CsvTable, safe_table: CsvTable) -> None:
    """Raise `PromptSetError` unless the two files pair up row by row."""
    if len(table.rows) != len(safe_table.rows):
        raise PromptSetError(
            f"{table.path} has {len(table.rows)} rows but {safe_table.path} has "
            f"{len(safe_table.rows)}; the nudity and safe files must be row-aligned"
        )
    if CASE_ID_COLUMN not in table.header or CASE_ID_COLUMN not in safe_table.header:
        return
    for index in range(len(table.rows)):
        if table.case_id(index) != safe_table.case_id(index):
            raise PromptSetError(
                f"{safe_table.where(index, CASE_ID_COLUMN)}: case number "
                f"{safe_table.case_id(index)!r} does not match {table.case_id(index)!r} at "
                f"{table.where(index, CASE_ID_COLUMN)}; the files must be row-aligned"
            )
