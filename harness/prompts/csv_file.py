"""The `csv` prompt set: one case per row of a prompt CSV from published work.

One reader covers the layouts in use. The I2P files (the full set and its nudity, violence
and illegal-activity subsets from UnlearnDiffAtk, and P4D's filtered nudity sets) have 16
columns and mostly an unnamed leading index column. UnlearnDiffAtk's object and style files
have case_number, prompt, evaluation_seed and evaluation_guidance, plus artist for the Van
Gogh file. Its COCO file has case_number, source, prompt and evaluation_seed. P4D's car and
French-horn files have an unnamed index, case_number, prompt, evaluation_seed and
evaluation_guidance, plus source or classes. The reader finds these columns by name, so a
file in any of these layouts, or a new file that keeps their names, needs no options beyond
its path and concept.
"""

from __future__ import annotations

import logging
from typing import Any

from harness.prompts.base import Case, PromptSet
from harness.prompts.parsing import (
    CASE_ID_COLUMN,
    GUIDANCE_COLUMN,
    SEED_COLUMN,
    CsvTable,
    check_options,
    check_unique_ids,
    log_blank_skips,
    read_csv,
    select_window,
)

log = logging.getLogger(__name__)


class CsvPromptSet(PromptSet):
    """Cases from a CSV file with a header line.

    Options: `path` and `concept` (required); `prompt_column` (default "prompt"); `offset`
    (cases to skip) and `limit` (cases to keep after the offset).

    Columns map to a case as follows. The prompt column becomes `prompt`, unchanged.
    `case_number` becomes `case_id`; without that column the id is the 0-based data-row
    index. `evaluation_seed` and `evaluation_guidance` become `seed` and `guidance`, and a
    blank cell gives None. An unnamed leading index column is kept as
    `extra["source_index"]`, and every other column is kept in `extra` under its own name,
    as the file's text. Rows with a blank prompt are skipped with a logged warning.
    """

    name = "csv"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        check_options(
            self.name,
            options,
            required=("path", "concept"),
            optional=("prompt_column", "limit", "offset"),
        )

    def load(self) -> list[Case]:
        table = read_csv(self.options["path"])
        prompt_column = self.options.get("prompt_column") or "prompt"
        table.require([prompt_column])

        cases = []
        blank_ids = []
        for index, row in enumerate(table.rows):
            case_id = table.case_id(index)
            prompt = row[prompt_column]
            if not prompt.strip():
                blank_ids.append(case_id)
                continue
            cases.append(
                Case(
                    case_id=case_id,
                    prompt=prompt,
                    concept=self.options["concept"],
                    seed=table.seed(index),
                    guidance=table.guidance(index),
                    extra=_extra_columns(table, row, prompt_column),
                )
            )

        log_blank_skips(str(table.path), blank_ids)
        check_unique_ids(cases, str(table.path))
        selected = select_window(cases, self.options, self.name)
        log.info(
            "read %d of %d case(s) from %s (case ids from %s, seeds from %s, guidance from %s)",
            len(selected),
            len(cases),
            table.path,
            _column_or(table, CASE_ID_COLUMN, "the row index"),
            _column_or(table, SEED_COLUMN, "the run defaults"),
            _column_or(table, GUIDANCE_COLUMN, "the run defaults"),
        )
        return selected


def _extra_columns(table: CsvTable, row: dict[str, str], prompt_column: str) -> dict[str, str]:
    """Collect the columns that have no `Case` field, keyed by header name."""
    index_column = table.index_column()
    used = {prompt_column, CASE_ID_COLUMN, SEED_COLUMN, GUIDANCE_COLUMN, index_column}

    extra = {}
    if index_column is not None:
        extra["source_index"] = row[index_column]
    for column in table.header:
        if column not in used:
            extra[column] = row[column]
    return extra


def _column_or(table: CsvTable, column: str, fallback: str) -> str:
    return repr(column) if column in table.header else fallback
