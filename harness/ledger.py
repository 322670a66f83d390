"""The run ledger: one SQLite file that is the source of truth of a run.

Every generated image gets one row, written in the same transaction as its batch, after
its PNG is on disk. A run killed at any point therefore resumes by skipping the keys the
ledger holds: a batch is either wholly recorded or not at all, and an image file without
a row is simply written again. The summary and report are derived from these tables
alone.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    config_json TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    environment_json TEXT NOT NULL,
    finished_json TEXT
);
CREATE TABLE IF NOT EXISTS cells (
    cell_key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    defense TEXT NOT NULL,
    attack TEXT NOT NULL,
    concept TEXT NOT NULL,
    prompt_set TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    settings_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS adversarial_prompts (
    prompt_key TEXT PRIMARY KEY,
    attack TEXT NOT NULL,
    attack_hash TEXT NOT NULL,
    defended_model TEXT NOT NULL,
    concept TEXT NOT NULL,
    case_id TEXT NOT NULL,
    original_prompt TEXT NOT NULL,
    prompt TEXT NOT NULL,
    iterations INTEGER NOT NULL,
    denoiser_calls INTEGER NOT NULL,
    text_encoder_calls INTEGER NOT NULL,
    wall_seconds REAL NOT NULL,
    loss_trace_json TEXT NOT NULL,
    extra_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    image_key TEXT PRIMARY KEY,
    cell_key TEXT NOT NULL,
    model TEXT NOT NULL,
    defense TEXT NOT NULL,
    attack TEXT NOT NULL,
    concept TEXT NOT NULL,
    case_id TEXT NOT NULL,
    seed_index INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    guidance REAL NOT NULL,
    prompt TEXT NOT NULL,
    truncated INTEGER NOT NULL,
    image_path TEXT,
    score REAL NOT NULL,
    present INTEGER NOT NULL,
    details_json TEXT NOT NULL,
    hook_json TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    batch_seconds REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_by_cell ON images (cell_key);
CREATE TABLE IF NOT EXISTS timings (
    timing_key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    defense TEXT NOT NULL,
    concept TEXT NOT NULL,
    kind TEXT NOT NULL,
    variant TEXT NOT NULL,
    probe_index INTEGER NOT NULL,
    batch_size INTEGER NOT NULL,
    seconds REAL NOT NULL
);
"""


# The defense part of the key of adversarial prompts that every defense shares (see
# `Attack.depends_on_defense`).
ANY_DEFENSE = "any-defense"


@dataclass(frozen=True)
class ImageRow:
    image_key: str
    cell_key: str
    model: str
    defense: str
    attack: str
    concept: str
    case_id: str
    seed_index: int
    seed: int
    guidance: float
    prompt: str
    truncated: bool
    image_path: str | None
    score: float
    present: bool
    details: dict[str, Any]
    hook_records: dict[str, Any]
    batch_size: int
    batch_seconds: float


def image_key(model: str, defense: str, attack: str, concept: str, case_id: str, k: int) -> str:
    return "|".join([model, defense, attack, concept, case_id, str(k)])


class Ledger:
    """The SQLite ledger of one output directory. One writer: the runner's process."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "ledger.sqlite"
        self.connection = sqlite3.connect(self.path)
        self.connection.row_factory = sqlite3.Row
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=NORMAL")
        self.connection.executescript(SCHEMA)
        self.connection.commit()

    def close(self) -> None:
        self.connection.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.connection:
            yield self.connection

    # -- runs and cells ----------------------------------------------------------------

    def record_run(self, config: dict[str, Any], fingerprint: str, environment: dict) -> int:
        """Add a run (one invocation of `arena run`) and return its id."""
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO runs (started_at, config_json, fingerprint, environment_json)"
                " VALUES (?, ?, ?, ?)",
                (time.time(), json.dumps(config), fingerprint, json.dumps(environment)),
            )
        return int(cursor.lastrowid)

    def finish_run(self, run_id: int, resources: dict[str, Any]) -> None:
        """Record what a run used once it completes (wall time, peak memory)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET finished_json = ? WHERE run_id = ?",
                (json.dumps(resources), run_id),
            )

    def update_environment(self, run_id: int, environment: dict[str, Any]) -> None:
        """Replace a run's environment (the Ray executor adds its actors' devices at the end)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET environment_json = ? WHERE run_id = ?",
                (json.dumps(environment), run_id),
            )

    def runs(self) -> list[dict[str, Any]]:
        rows = self.connection.execute("SELECT * FROM runs ORDER BY run_id").fetchall()
        return [
            {
                "run_id": row["run_id"],
                "started_at": row["started_at"],
                "config": json.loads(row["config_json"]),
                "fingerprint": row["fingerprint"],
                "environment": json.loads(row["environment_json"]),
                "finished": json.loads(row["finished_json"]) if row["finished_json"] else None,
            }
            for row in rows
        ]

    def check_cell(self, cell_key: str, fingerprint: str) -> bool:
        """Return whether the cell exists; raise if it was made with other settings."""
        row = self.connection.execute(
            "SELECT fingerprint FROM cells WHERE cell_key = ?", (cell_key,)
        ).fetchone()
        if row is None:
            return False
        if row["fingerprint"] != fingerprint:
            raise LedgerMismatchError(
                f"{self.directory} holds cell {cell_key!r} made with other settings"
                f" (fingerprint {row['fingerprint']} != {fingerprint});"
                " choose a new --out directory"
            )
        return True

    def ensure_cell(
        self, cell_key: str, names: dict[str, str], fingerprint: str, settings: dict[str, Any]
    ) -> None:
        """Record a cell, or check that an existing one was made with the same settings."""
        if self.check_cell(cell_key, fingerprint):
            return
        with self.transaction() as db:
            db.execute(
                "INSERT INTO cells VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    cell_key,
                    names["model"],
                    names["defense"],
                    names["attack"],
                    names["concept"],
                    names["prompt_set"],
                    fingerprint,
                    json.dumps(settings, default=str),
                ),
            )

    def cells(self) -> list[dict[str, Any]]:
        rows = self.connection.execute("SELECT * FROM cells ORDER BY rowid").fetchall()
        return [{**dict(row), "settings": json.loads(row["settings_json"])} for row in rows]

    # -- adversarial prompts -----------------------------------------------------------

    def adversarial_prompt(self, prompt_key: str) -> dict[str, Any] | None:
        row = self.connection.execute(
            "SELECT * FROM adversarial_prompts WHERE prompt_key = ?", (prompt_key,)
        ).fetchone()
        return None if row is None else _prompt_row(row)

    def add_adversarial_prompt(self, row: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO adversarial_prompts VALUES"
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row["prompt_key"],
                    row["attack"],
                    row["attack_hash"],
                    row["defended_model"],
                    row["concept"],
                    row["case_id"],
                    row["original_prompt"],
                    row["prompt"],
                    row["iterations"],
                    row["denoiser_calls"],
                    row["text_encoder_calls"],
                    row["wall_seconds"],
                    json.dumps(row["loss_trace"]),
                    json.dumps(row["extra"], default=str),
                ),
            )

    def adversarial_prompts(self) -> list[dict[str, Any]]:
        rows = self.connection.execute("SELECT * FROM adversarial_prompts").fetchall()
        return [_prompt_row(row) for row in rows]

    # -- images ------------------------------------------------------------------------

    def existing_image_keys(self, cell_key: str) -> set[str]:
        rows = self.connection.execute(
            "SELECT image_key FROM images WHERE cell_key = ?", (cell_key,)
        ).fetchall()
        return {row["image_key"] for row in rows}

    def add_images(self, rows: Iterable[ImageRow]) -> None:
        """Insert one batch of rows in one transaction."""
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO images VALUES"
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        row.image_key,
                        row.cell_key,
                        row.model,
                        row.defense,
                        row.attack,
                        row.concept,
                        row.case_id,
                        row.seed_index,
                        row.seed,
                        row.guidance,
                        row.prompt,
                        int(row.truncated),
                        row.image_path,
                        row.score,
                        int(row.present),
                        json.dumps(row.details, default=float),
                        json.dumps(row.hook_records, default=str),
                        row.batch_size,
                        row.batch_seconds,
                        now,
                    )
                    for row in rows
                ],
            )

    def images(self) -> list[dict[str, Any]]:
        rows = self.connection.execute("SELECT * FROM images ORDER BY rowid").fetchall()
        result = []
        for row in rows:
            record = dict(row)
            record["details"] = json.loads(record.pop("details_json"))
            record["hook_records"] = json.loads(record.pop("hook_json"))
            record["present"] = bool(record["present"])
            record["truncated"] = bool(record["truncated"])
            result.append(record)
        return result

    # -- timings -----------------------------------------------------------------------

    def timing_keys(self) -> set[str]:
        rows = self.connection.execute("SELECT timing_key FROM timings").fetchall()
        return {row["timing_key"] for row in rows}

    def add_timings(self, rows: Iterable[dict[str, Any]]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO timings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        row["timing_key"],
                        row["model"],
                        row["defense"],
                        row["concept"],
                        row["kind"],
                        row["variant"],
                        row["probe_index"],
                        row["batch_size"],
                        row["seconds"],
                    )
                    for row in rows
                ],
            )

    def timings(self) -> list[dict[str, Any]]:
        rows = self.connection.execute("SELECT * FROM timings ORDER BY rowid").fetchall()
        return [dict(row) for row in rows]


class LedgerMismatchError(ValueError):
    """The output directory holds results made with different settings."""


def _prompt_row(row: sqlite3.Row) -> dict[str, Any]:
    record = dict(row)
    record["loss_trace"] = json.loads(record.pop("loss_trace_json"))
    record["extra"] = json.loads(record.pop("extra_json"))
    return record


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Write a file through a temp file and a rename, so a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
