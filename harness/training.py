"""The trainer plugin interface behind `arena train NAME CONFIG`.

Defenses that learn weights (ESD, SafeRedir) register a trainer in the entry-point group
`erasure_arena.trainers`. A trainer reads its own YAML config (parsed with
`yaml.safe_load`, validated by the trainer), writes safetensors and a JSON card, and
returns the path of what it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar


class Trainer:
    name: ClassVar[str] = ""

    def run(self, config_path: Path, overrides: list[str], out: Path | None) -> Path:
        raise NotImplementedError(f"trainer {self.name!r} does not implement run()")
