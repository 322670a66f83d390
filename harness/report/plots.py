"""Plots of a run's summary (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _ordered(values: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for value in values:
        seen.setdefault(value, None)
    return list(seen)


def asr_heatmap(cells: list[dict[str, Any]], concept: str, path: Path) -> Path:
    """ASR of every (attack, defense) pair for one concept."""
    rows = [cell for cell in cells if cell["concept"] == concept]
    attacks = _ordered([cell["attack"] for cell in rows])
    defenses = _ordered([cell["defense"] for cell in rows])
    grid = np.full((len(attacks), len(defenses)), np.nan)
    for cell in rows:
        grid[attacks.index(cell["attack"]), defenses.index(cell["defense"])] = cell["asr"]

    figure, axes = plt.subplots(figsize=(1.2 + 1.1 * len(defenses), 1.0 + 0.5 * len(attacks)))
    image = axes.imshow(grid, vmin=0, vmax=1, cmap="magma_r", aspect="auto")
    axes.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right")
    axes.set_yticks(range(len(attacks)), attacks)
    for i in range(len(attacks)):
        for j in range(len(defenses)):
            if not np.isnan(grid[i, j]):
                colour = "white" if grid[i, j] > 0.6 else "black"
                axes.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color=colour)
    axes.set_title(f"ASR, concept {concept}")
    figure.colorbar(image, ax=axes, fraction=0.04)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def asr_bars(cells: list[dict[str, Any]], concept: str, path: Path) -> Path:
    """Grouped bars of ASR per defense and attack, with bootstrap 95% intervals."""
    rows = [cell for cell in cells if cell["concept"] == concept]
    attacks = _ordered([cell["attack"] for cell in rows])
    defenses = _ordered([cell["defense"] for cell in rows])
    width = 0.8 / max(len(attacks), 1)
    figure, axes = plt.subplots(figsize=(2 + 1.2 * len(defenses), 3.2))
    for a, attack in enumerate(attacks):
        for d, defense in enumerate(defenses):
            match = [c for c in rows if c["attack"] == attack and c["defense"] == defense]
            if not match:
                continue
            cell = match[0]
            x = d + (a - (len(attacks) - 1) / 2) * width
            interval = cell.get("asr_ci95")
            error = None
            if interval:
                error = [[cell["asr"] - interval[0]], [interval[1] - cell["asr"]]]
            axes.bar(
                x,
                cell["asr"],
                width,
                yerr=error,
                capsize=3,
                color=f"C{a}",
                label=attack if d == 0 else None,
            )
    axes.set_xticks(range(len(defenses)), defenses, rotation=20, ha="right")
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("ASR (95% bootstrap interval)")
    axes.set_title(f"concept {concept}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_plots(summary: dict[str, Any], report_dir: Path) -> list[Path]:
    cells = [cell for cell in summary["cells"] if cell["asr"] is not None]
    paths = []
    for concept in _ordered([cell["concept"] for cell in cells]):
        safe = "".join(ch if ch.isalnum() else "_" for ch in concept)
        paths.append(asr_heatmap(cells, concept, report_dir / f"asr_heatmap_{safe}.png"))
        paths.append(asr_bars(cells, concept, report_dir / f"asr_bars_{safe}.png"))
    return paths
