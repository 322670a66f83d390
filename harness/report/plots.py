"""Plots of a run (matplotlib), each written as PNG and SVG into the report folder.

Every number plotted comes from `summary.json`; the image grids and loss traces read the
ledger and the image files of the same run. Cells are keyed by a `run` field when several
runs are overlaid (`arena compare`), so the same functions serve one run and many.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

log = logging.getLogger(__name__)

Cell = dict[str, Any]


def _ordered(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text)


def _defense_label(cell: Cell) -> str:
    run = cell.get("run")
    return cell["defense"] if not run else f"{run}: {cell['defense']}"


def _save(figure: plt.Figure, stem: Path) -> Path:
    """Write `stem`.png and `stem`.svg; return the PNG path (the one the HTML embeds)."""
    if figure.get_layout_engine() is None:
        with warnings.catch_warnings():
            # Matplotlib warns when long tick labels leave no room to adjust; the figure
            # is still saved, only less tightly packed.
            warnings.filterwarnings("ignore", "Tight layout not applied", UserWarning)
            figure.tight_layout()
    figure.savefig(stem.with_suffix(".png"), dpi=110)
    figure.savefig(stem.with_suffix(".svg"))
    plt.close(figure)
    return stem.with_suffix(".png")


def _forget_cells(cells: list[Cell]) -> list[Cell]:
    return [cell for cell in cells if cell.get("role", "forget") == "forget"]


def asr_heatmap(cells: list[Cell], concept: str, stem: Path) -> Path:
    """ASR of every (attack, defense) pair for one concept."""
    rows = [cell for cell in cells if cell["concept"] == concept]
    attacks = _ordered([cell["attack"] for cell in rows])
    defenses = _ordered([_defense_label(cell) for cell in rows])
    grid = np.full((len(attacks), len(defenses)), np.nan)
    for cell in rows:
        grid[attacks.index(cell["attack"]), defenses.index(_defense_label(cell))] = cell["asr"]

    figure, axes = plt.subplots(figsize=(1.6 + 1.1 * len(defenses), 1.2 + 0.5 * len(attacks)))
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
    return _save(figure, stem)


def asr_bars(cells: list[Cell], concept: str, stem: Path) -> Path:
    """Grouped bars of ASR per defense and attack, with bootstrap 95% intervals."""
    rows = [cell for cell in cells if cell["concept"] == concept]
    attacks = _ordered([cell["attack"] for cell in rows])
    defenses = _ordered([_defense_label(cell) for cell in rows])
    width = 0.8 / max(len(attacks), 1)
    figure, axes = plt.subplots(figsize=(2 + 1.2 * len(defenses), 3.4))
    for a, attack in enumerate(attacks):
        for d, defense in enumerate(defenses):
            match = [c for c in rows if c["attack"] == attack and _defense_label(c) == defense]
            if not match:
                continue
            cell = match[0]
            x = d + (a - (len(attacks) - 1) / 2) * width
            interval = cell.get("asr_ci95")
            error = None
            if interval:
                error = [[cell["asr"] - interval[0]], [interval[1] - cell["asr"]]]
            label = attack if d == 0 else None
            axes.bar(x, cell["asr"], width, yerr=error, capsize=2, color=f"C{a}", label=label)
    axes.set_xticks(range(len(defenses)), defenses, rotation=20, ha="right")
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("ASR (95% bootstrap interval)")
    axes.set_title(f"concept {concept}")
    axes.legend(fontsize=7, ncol=2)
    return _save(figure, stem)


def pre_versus_post(cells: list[Cell], concept: str, stem: Path) -> Path:
    """Per defense: pre-ASR (unmodified prompts) and each attack's ASR on one axis."""
    rows = [cell for cell in cells if cell["concept"] == concept]
    defenses = _ordered([_defense_label(cell) for cell in rows])
    attacks = _ordered([cell["attack"] for cell in rows if cell["attack"] != "none"])
    figure, axes = plt.subplots(figsize=(2 + 1.0 * len(defenses), 3.4))
    for d, defense in enumerate(defenses):
        mine = [cell for cell in rows if _defense_label(cell) == defense]
        pre = next((cell["pre_asr"] for cell in mine), None)
        if pre is None:
            continue
        axes.scatter(
            [d], [pre], marker="o", s=60, color="black", label="pre-ASR" if d == 0 else None
        )
        for a, attack in enumerate(attacks):
            post = [cell["asr"] for cell in mine if cell["attack"] == attack]
            if post:
                axes.plot([d, d], [pre, post[0]], color=f"C{a}", alpha=0.4)
                label = attack if d == 0 else None
                axes.scatter([d], post, marker="^", color=f"C{a}", label=label)
    axes.set_xticks(range(len(defenses)), defenses, rotation=20, ha="right")
    axes.set_ylim(-0.05, 1.05)
    axes.set_ylabel("success rate")
    axes.set_title(f"pre-ASR versus ASR, concept {concept}")
    axes.legend(fontsize=7, ncol=2)
    return _save(figure, stem)


def _worst_case(cells: list[Cell]) -> dict[tuple[str, str], Cell]:
    """Per (defense label, concept): the cell with the highest ASR over attacks."""
    worst: dict[tuple[str, str], Cell] = {}
    for cell in cells:
        key = (_defense_label(cell), cell["concept"])
        if cell["asr"] is not None and (key not in worst or cell["asr"] > worst[key]["asr"]):
            worst[key] = cell
    return worst


def _labelled_point(axes, x: float, y: float, label: str, colour_index: int) -> None:
    axes.scatter(x, y, color=f"C{colour_index}")
    axes.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")


def _finish_worst_case(axes, groups: list[str], xlabel: str) -> None:
    """Legend of the colour groups and the axes of a worst-case-ASR scatter plot."""
    for index, group in enumerate(groups):
        axes.scatter([], [], color=f"C{index}", label=group)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("worst-case ASR over attacks")
    axes.set_ylim(-0.05, 1.05)
    axes.legend(fontsize=7)


def asr_versus_overhead(cells: list[Cell], stem: Path) -> Path:
    """Worst-case ASR against defense overhead: the lower left is the Pareto front."""
    worst = _worst_case(_forget_cells(cells))
    overheads = {
        (_defense_label(cell), cell["concept"]): cell["defense_overhead"]
        for cell in cells
        if cell["attack"] == "none"
    }
    figure, axes = plt.subplots(figsize=(5.5, 4))
    concepts = _ordered([concept for _, concept in worst])
    for (defense, concept), cell in worst.items():
        overhead = overheads.get((defense, concept))
        if overhead is None:
            continue
        _labelled_point(axes, overhead, cell["asr"], defense, concepts.index(concept))
    _finish_worst_case(axes, concepts, "defense overhead (defended / undefended time per image)")
    return _save(figure, stem)


def attack_cost_versus_asr(cells: list[Cell], stem: Path) -> Path | None:
    """Plot each attack's seconds per case against the ASR it reached, per defense."""
    rows = [
        cell
        for cell in _forget_cells(cells)
        if cell["attack"] != "none" and cell["attack_seconds_per_case"]
    ]
    if not rows:
        return None
    attacks = _ordered([cell["attack"] for cell in rows])
    figure, axes = plt.subplots(figsize=(5.5, 4))
    for index, attack in enumerate(attacks):
        mine = [
            cell for cell in rows if cell["attack"] == attack and cell["attack_seconds_per_case"]
        ]
        axes.scatter(
            [cell["attack_seconds_per_case"] for cell in mine],
            [cell["asr"] for cell in mine],
            color=f"C{index}",
            label=attack,
        )
    if any(cell["attack_seconds_per_case"] for cell in rows):
        axes.set_xscale("log")
    axes.set_xlabel("attack seconds per case (log scale)")
    axes.set_ylabel("ASR")
    axes.set_ylim(-0.05, 1.05)
    axes.legend(fontsize=7)
    return _save(figure, stem)


def fidelity_versus_asr(cells: list[Cell], stem: Path) -> Path | None:
    """Benign fidelity (SSIM to the undefended image) against worst-case ASR, per task."""
    worst = _worst_case(_forget_cells(cells))
    fidelity: dict[tuple[str, str], float] = {}
    for cell in cells:
        if (
            cell["attack"] == "none"
            and cell.get("role") == "benign"
            and cell.get("ssim_to_undefended") is not None
        ):
            fidelity[(_defense_label(cell), cell.get("task", cell["concept"]))] = cell[
                "ssim_to_undefended"
            ]
    if not fidelity:
        return None
    figure, axes = plt.subplots(figsize=(5.5, 4))
    tasks = _ordered([cell.get("task", cell["concept"]) for cell in worst.values()])
    for (defense, _concept), cell in worst.items():
        task = cell.get("task", cell["concept"])
        ssim = fidelity.get((defense, task))
        if ssim is None:
            continue
        _labelled_point(axes, ssim, cell["asr"], defense, tasks.index(task))
    _finish_worst_case(axes, tasks, "SSIM to undefended image on benign prompts")
    return _save(figure, stem)


def _load_image(out_dir: Path, path: str | None) -> np.ndarray | None:
    if not path or not (out_dir / path).is_file():
        return None
    return np.asarray(Image.open(out_dir / path).convert("RGB"))


def image_grid(
    out_dir: Path,
    images: list[dict[str, Any]],
    defense: str,
    attack: str,
    concept: str,
    stem: Path,
    rows: int = 4,
) -> Path | None:
    """Same case and seed in three columns: undefended, defended, defended under attack."""
    index = {
        (r["defense"], r["attack"], r["concept"], r["case_id"], r["seed_index"]): r for r in images
    }
    cases = _ordered(
        [r["case_id"] for r in images if r["concept"] == concept and r["seed_index"] == 0]
    )
    columns = [
        ("none", "none", "undefended"),
        (defense, "none", "defended"),
        (defense, attack, f"{attack}"),
    ]
    picked = []
    for case_id in cases:
        tiles = [index.get((d, a, concept, case_id, 0)) for d, a, _ in columns]
        if all(
            tile is not None and _load_image(out_dir, tile["image_path"]) is not None
            for tile in tiles
        ):
            picked.append(tiles)
        if len(picked) == rows:
            break
    if not picked:
        return None
    figure, axes = plt.subplots(
        len(picked), 3, figsize=(4.5, 1.5 * len(picked) + 0.4), squeeze=False
    )
    for r, tiles in enumerate(picked):
        for c, tile in enumerate(tiles):
            axes[r][c].imshow(_load_image(out_dir, tile["image_path"]))
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
            verdict = "concept" if tile["present"] else "no concept"
            axes[r][c].set_xlabel(f"{verdict} ({tile['score']:.2f})", fontsize=6)
            if r == 0:
                axes[r][c].set_title(columns[c][2], fontsize=8)
    figure.suptitle(f"{defense} / {attack} / {concept}", fontsize=9)
    return _save(figure, stem)


def loss_traces(prompts: list[dict[str, Any]], stem: Path) -> Path | None:
    """Mean attack loss per iteration: one panel per (attack, concept), one line per defense.

    Attacks optimise different losses (a noise MSE, an embedding distance), so each attack
    gets its own panel and y axis. The axis is logarithmic when every value is positive.
    """
    traces: dict[tuple[str, str], dict[str, list[list[float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for row in prompts:
        if row["loss_trace"]:
            _model, defense = row["defended_model"].split("|", 1)
            traces[(row["attack"], row["concept"])][defense].append(row["loss_trace"])
    if not traces:
        return None

    attacks = _ordered([attack for attack, _ in traces])
    concepts = _ordered([concept for _, concept in traces])
    figure, axes = plt.subplots(
        len(attacks), len(concepts), figsize=(4.2 * len(concepts), 2.6 * len(attacks)),
        squeeze=False, layout="constrained",
    )
    for row, attack in enumerate(attacks):
        for column, concept in enumerate(concepts):
            panel = axes[row][column]
            panel.set_title(f"{attack} / {concept}", fontsize=8)
            panel.tick_params(labelsize=6)
            by_defense = traces.get((attack, concept), {})
            positive = True
            for index, defense in enumerate(_ordered(list(by_defense))):
                runs = by_defense[defense]
                padded = np.full((len(runs), max(len(run) for run in runs)), np.nan)
                for i, run in enumerate(runs):
                    padded[i, : len(run)] = run
                mean = np.nanmean(padded, axis=0)
                positive = positive and bool(np.all(mean > 0))
                panel.plot(mean, label=defense, linewidth=1, color=f"C{index % 10}")
            if by_defense and positive:
                panel.set_yscale("log")
            if by_defense:
                panel.legend(fontsize=5, ncol=2)
            if row == len(attacks) - 1:
                panel.set_xlabel("iteration", fontsize=7)
            if column == 0:
                panel.set_ylabel("loss, mean over cases", fontsize=7)
    return _save(figure, stem)


def write_plots(
    summary: dict[str, Any],
    report_dir: Path,
    out_dir: Path | None = None,
    images: list[dict[str, Any]] | None = None,
    prompts: list[dict[str, Any]] | None = None,
) -> list[Path]:
    """Write every plot the data allows; return the PNG paths in display order."""
    cells = [cell for cell in summary["cells"] if cell["asr"] is not None]
    paths: list[Path | None] = []
    for concept in _ordered([cell["concept"] for cell in cells]):
        slug = _slug(concept)
        paths.append(asr_heatmap(cells, concept, report_dir / f"asr_heatmap_{slug}"))
        paths.append(asr_bars(cells, concept, report_dir / f"asr_bars_{slug}"))
        paths.append(pre_versus_post(cells, concept, report_dir / f"pre_vs_asr_{slug}"))
    if cells:
        paths.append(asr_versus_overhead(cells, report_dir / "asr_vs_overhead"))
        paths.append(attack_cost_versus_asr(cells, report_dir / "attack_cost_vs_asr"))
        paths.append(fidelity_versus_asr(cells, report_dir / "fidelity_vs_asr"))
    if prompts:
        paths.append(loss_traces(prompts, report_dir / "attack_loss_traces"))
    if out_dir is not None and images:
        for cell in cells:
            if cell["attack"] == "none" or cell.get("role", "forget") != "forget":
                continue
            names = [cell["defense"], cell["attack"], cell["concept"]]
            stem = report_dir / ("grid_" + "_".join(_slug(name) for name in names))
            paths.append(image_grid(out_dir, images, *names, stem))
    return [path for path in paths if path is not None]
