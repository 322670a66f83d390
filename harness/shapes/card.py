"""The model card of the shipped shapes weights: one JSON file, merged key by key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def update_card(path: Path, changes: dict[str, Any]) -> dict[str, Any]:
    """Merge `changes` into the card at `path` (top-level keys replace) and write it back."""
    card = json.loads(path.read_text()) if path.is_file() else {}
    card.update(changes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card
