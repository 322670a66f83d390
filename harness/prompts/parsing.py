"""File reading and value parsing shared by the prompt-set loaders.

Published prompt files come with a UTF-8 byte-order mark or without, with an unnamed
leading index column or without, and now and then with rows saved in a Windows code page.
These helpers turn such a file into text, a header and rows, and turn seed and guidance
cells into numbers, raising `PromptSetError` with the file, line and column on bad input.
Prompt text is never edited here: truncation to a tokenizer's limit is the runner's job.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.prompts.base import Case, PromptSetError

log = logging.getLogger(__name__)

# Encodings tried, in order, on each line of a file that is not valid UTF-8. cp1252 is what
# spreadsheet programs on Windows write. latin-1 decodes any byte, so it ends the chain for
# the five bytes cp1252 leaves undefined.
FALLBACK_ENCODINGS = ("cp1252", "latin-1")

# Header names that pandas and spreadsheet tools give an unnamed leading index column.
INDEX_COLUMN_NAMES = ("", "Unnamed: 0")

# Column names of the I2P layout, which the other published prompt files reuse.
CASE_ID_COLUMN = "case_number"
SEED_COLUMN = "evaluation_seed"
GUIDANCE_COLUMN = "evaluation_guidance"


def read_text(path: str | Path) -> str:
    """Read a text file as UTF-8, without its byte-order mark.

    A file with a UTF-16 byte-order mark is decoded as UTF-16. A file that is not valid UTF-8
    is decoded line by line: valid lines as UTF-8, the others with the first encoding of
    `FALLBACK_ENCODINGS` that accepts them, and a warning names the file and those lines.
    Raises `PromptSetError` when the file does not exist or cannot be read.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PromptSetError(f"prompt file not found: {path}") from None
    except OSError as error:
        raise PromptSetError(f"cannot read prompt file {path}: {error}") from None

    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")

    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass

    # Splitting the bytes on line ends is safe, because UTF-8 never uses the bytes of "\n" or
    # "\r" inside a multi-byte character, and cp1252 and latin-1 are single-byte encodings.
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    decoded_lines = []
    fallback_lines: dict[str, list[int]] = {}
    for number, line in enumerate(data.splitlines(keepends=True), start=1):
        try:
            decoded_lines.append(line.decode("utf-8"))
            continue
        except UnicodeDecodeError:
            pass
        for encoding in FALLBACK_ENCODINGS:
            try:
                decoded_lines.append(line.decode(encoding))
            except UnicodeDecodeError:
                continue
            fallback_lines.setdefault(encoding, []).append(number)
            break

    for encoding, numbers in fallback_lines.items():
        first_lines = ", ".join(str(number) for number in numbers[:10])
        more = f" and {len(numbers) - 10} more" if len(numbers) > 10 else ""
        log.warning(
            "%s is not valid UTF-8: decoded %d line(s) as %s (lines %s%s)",
            path,
            len(numbers),
            encoding,
            first_lines,
            more,
        )
    return "".join(decoded_lines)


@dataclass(frozen=True)
class CsvTable:
    """A CSV file split into a header and data rows.

    `rows` contains one dict per data row, keyed by the stripped header names.
    `line_numbers[i]` is the file line on which row i ends, for error messages. Blank lines
    are not rows.
    """

    path: Path
    header: tuple[str, ...]
    rows: tuple[dict[str, str], ...]
    line_numbers: tuple[int, ...]

    def index_column(self) -> str | None:
        """Return the name of the unnamed leading index column, or None if there is none."""
        if self.header and self.header[0] in INDEX_COLUMN_NAMES:
            return self.header[0]
        return None

    def require(self, columns: Iterable[str], expected: str | None = None) -> None:
        """Raise `PromptSetError` unless every column in `columns` is in the header.

        `expected` describes the whole layout in the message; by default it lists `columns`.
        """
        missing = [column for column in columns if column not in self.header]
        if missing:
            layout = expected or ", ".join(columns)
            raise PromptSetError(
                f"{self.path}: missing column(s) {', '.join(missing)}; expected columns "
                f"{layout}; the file has {', '.join(repr(name) for name in self.header)}"
            )

    def where(self, index: int, column: str) -> str:
        """Describe the cell of row `index` in `column` for error messages."""
        return f"{self.path}: line {self.line_numbers[index]}, column {column!r}"

    def case_id(self, index: int) -> str:
        """Return row `index`'s case id: its `case_number` cell, else the row index.

        The row index counts data rows from 0 in file order, before any offset or limit, so
        ids stay stable when a config selects a window. Raises `PromptSetError` for a blank
        `case_number` cell, because falling back for one row could collide with another id.
        """
        if CASE_ID_COLUMN not in self.header:
            return str(index)
        value = self.rows[index][CASE_ID_COLUMN].strip()
        if not value:
            raise PromptSetError(f"{self.where(index, CASE_ID_COLUMN)}: blank case number")
        return value

    def seed(self, index: int) -> int | None:
        """Return row `index`'s `evaluation_seed`, or None without that column or value."""
        if SEED_COLUMN not in self.header:
            return None
        return parse_seed(self.rows[index][SEED_COLUMN], self.where(index, SEED_COLUMN))

    def guidance(self, index: int) -> float | None:
        """Return row `index`'s `evaluation_guidance`, or None without that column or value."""
        if GUIDANCE_COLUMN not in self.header:
            return None
        value = self.rows[index][GUIDANCE_COLUMN]
        return parse_guidance(value, self.where(index, GUIDANCE_COLUMN))


def read_csv(path: str | Path) -> CsvTable:
    """Read a comma-separated file with a header line into a `CsvTable`.

    Raises `PromptSetError` for a missing or empty file and for a row whose field count
    differs from the header's, so no row is lost or shifted without notice.
    """
    path = Path(path)
    text = read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))

    header = None
    rows = []
    line_numbers = []
    for fields in reader:
        if not fields:
            continue
        if header is None:
            header = tuple(name.strip() for name in fields)
            continue
        if len(fields) != len(header):
            raise PromptSetError(
                f"{path}: line {reader.line_num} has {len(fields)} fields but the header has "
                f"{len(header)} ({', '.join(header)})"
            )
        rows.append(dict(zip(header, fields, strict=True)))
        line_numbers.append(reader.line_num)

    if header is None:
        raise PromptSetError(f"{path}: the file is empty; expected a header line and rows")
    return CsvTable(path, header, tuple(rows), tuple(line_numbers))


def parse_seed(value: str | None, where: str) -> int | None:
    """Parse a seed cell: an integer (also written as "7.0"), or None when blank.

    `where` names the file, line and column for the error message.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None and number.is_integer():
        return int(number)
    raise PromptSetError(f"{where}: invalid seed {value!r}; expected a whole number")


def parse_guidance(value: str | None, where: str) -> float | None:
    """Parse a guidance-scale cell: a finite number, or None when blank."""
    if value is None or not value.strip():
        return None
    try:
        number = float(value.strip())
    except ValueError:
        number = None
    if number is None or not math.isfinite(number):
        raise PromptSetError(f"{where}: invalid guidance scale {value!r}; expected a number")
    return number


def check_options(
    set_name: str,
    options: Mapping[str, Any],
    required: Sequence[str],
    optional: Sequence[str] = (),
) -> None:
    """Raise `PromptSetError` for a missing required option or an unknown one."""
    missing = [name for name in required if options.get(name) in (None, "")]
    if missing:
        raise PromptSetError(
            f"prompt set {set_name!r}: missing option(s) {', '.join(missing)}; "
            f"required: {', '.join(required)}"
        )
    known = (*required, *optional)
    unknown = sorted(name for name in options if name not in known)
    if unknown:
        raise PromptSetError(
            f"prompt set {set_name!r}: unknown option(s) {', '.join(unknown)}; "
            f"known options: {', '.join(known)}"
        )


def parse_count(options: Mapping[str, Any], name: str, set_name: str) -> int | None:
    """Return a non-negative integer option (`limit`, `offset`), or None when not set."""
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PromptSetError(
            f"prompt set {set_name!r}: option {name} must be a non-negative integer, got {value!r}"
        )
    return value


def select_window(cases: list[Case], options: Mapping[str, Any], set_name: str) -> list[Case]:
    """Apply the `offset` and `limit` options: skip `offset` cases, then keep `limit`."""
    offset = parse_count(options, "offset", set_name) or 0
    limit = parse_count(options, "limit", set_name)
    end = None if limit is None else offset + limit
    return cases[offset:end]


def check_unique_ids(cases: Sequence[Case], source: str) -> None:
    """Raise `PromptSetError` when two cases share a case id.

    The ledger keys images by case id, so a repeated id would make one case overwrite
    another.
    """
    seen: set[str] = set()
    repeated: list[str] = []
    for case in cases:
        if case.case_id in seen and case.case_id not in repeated:
            repeated.append(case.case_id)
        seen.add(case.case_id)
    if repeated:
        first_ids = ", ".join(repeated[:10])
        raise PromptSetError(
            f"{source}: case ids must be unique, but {len(repeated)} repeat ({first_ids})"
        )


def log_blank_skips(source: str, skipped_ids: Sequence[str]) -> None:
    """Log, as a warning, the cases skipped because their prompt is blank."""
    if not skipped_ids:
        return
    first_ids = ", ".join(skipped_ids[:10])
    more = f" and {len(skipped_ids) - 10} more" if len(skipped_ids) > 10 else ""
    log.warning(
        "%s: skipped %d case(s) with a blank prompt (case ids %s%s)",
        source,
        len(skipped_ids),
        first_ids,
        more,
    )
