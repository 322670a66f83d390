"""`arena compare DIR...`: several runs overlaid in one set of tables and plots.

Each run's cells keep their numbers and gain a `run` field (the run directory's name), so
a new defense measured today sits beside the committed baseline run in the same heatmap,
bars and Pareto view. Nothing is recomputed: the inputs are the runs' `summary.json`.

`arena compare A B --check` also tests that B reproduces A: for every cell in both, each
run's ASR lies inside the other run's 95% interval, and the digests of the decoded images
(`images_sha256`) are equal where both runs recorded one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.report.html import write_html
from harness.report.markdown import write_markdown
from harness.report.plots import write_plots


def load_summary(directory: Path) -> dict[str, Any]:
    path = directory / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"no summary.json in {directory}; run `arena report {directory}`")
    return json.loads(path.read_text(encoding="utf-8"))


def compare_runs(directories: list[Path], out_dir: Path) -> dict[str, Any]:
    """Write the overlaid summary, `summary.md` and report into `out_dir`."""
    names = [directory.resolve().name for directory in directories]
    if len(set(names)) != len(names):
        names = [str(directory) for directory in directories]

    cells, runs = [], []
    for name, directory in zip(names, directories, strict=True):
        summary = load_summary(directory)
        runs.append({"run": name, "directory": str(directory), **summary["run"]})
        cells.extend({**cell, "run": name} for cell in summary["cells"])

    first = runs[0]
    combined = {
        "run": {
            "name": "comparison of " + ", ".join(names),
            "environment": first["environment"],
            "sampler": first["sampler"],
            "seeds": first["seeds"],
            "aggregation": first["aggregation"],
            "executor": first.get("executor"),
            "compared_runs": runs,
        },
        "cells": cells,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(combined, indent=2), encoding="utf-8")
    write_markdown(combined, out_dir / "summary.md")
    report_dir = out_dir / "report"
    report_dir.mkdir(exist_ok=True)
    plots = write_plots(combined, report_dir)
    write_html(combined, report_dir / "report.html", plots, images=[])
    return combined


def cell_id(cell: dict[str, Any]) -> tuple[str, str, str, str]:
    return (cell["model"], cell["defense"], cell["attack"], cell["concept"])


def check_reproduction(reference: dict[str, Any], candidate: dict[str, Any]) -> list[dict]:
    """Check, cell by cell of `reference`, whether `candidate` reproduces it.

    A cell passes when it is in both runs, each ASR lies inside the other's 95% interval,
    and the image digests match. A digest missing on either side is reported as unchecked
    and does not fail the cell.
    """
    theirs = {cell_id(cell): cell for cell in candidate["cells"]}
    findings = []
    for cell in reference["cells"]:
        other = theirs.get(cell_id(cell))
        finding: dict[str, Any] = {"cell": " / ".join(cell_id(cell))}
        if other is None:
            findings.append({**finding, "ok": False, "problem": "missing in the second run"})
            continue
        low, high = cell["asr_ci95"]
        other_low, other_high = other["asr_ci95"]
        inside = low <= other["asr"] <= high and other_low <= cell["asr"] <= other_high
        digests = cell.get("images_sha256"), other.get("images_sha256")
        images = None if None in digests else digests[0] == digests[1]
        problems = []
        if not inside:
            problems.append(f"ASR {cell['asr']:.3f} [{low:.3f}, {high:.3f}] vs "
                            f"{other['asr']:.3f} [{other_low:.3f}, {other_high:.3f}]")
        if images is False:
            problems.append("images differ")
        findings.append({**finding, "ok": not problems, "asr": (cell["asr"], other["asr"]),
                         "identical_images": images, "problem": "; ".join(problems)})
    return findings
