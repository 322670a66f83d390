"""Build `summary.json` from the ledger alone, so `arena report DIR` can rebuild it."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image

from harness.config import RunConfig
from harness.fidelity import FIELDS, fidelity_metrics
from harness.ledger import ANY_DEFENSE, Ledger
from harness.metrics import cell_metrics


def build_summary(out_dir: str | Path) -> dict[str, Any]:
    """Compute one record per cell plus the run's metadata (config, versions, device)."""
    ledger = Ledger(out_dir)
    try:
        runs = ledger.runs()
        if not runs:
            raise FileNotFoundError(f"{out_dir} holds no run: ledger.sqlite has no runs table rows")
        config = runs[-1]["config"]
        rule = config["evaluation"]["aggregate"]
        resamples = config["runner"]["bootstrap_resamples"]

        images = ledger.images()
        by_cell: dict[str, list[dict]] = defaultdict(list)
        for row in images:
            by_cell[row["cell_key"]].append(row)
        timings: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
        for row in ledger.timings():
            timings[(row["model"], row["defense"], row["concept"])].append(row)
        prompts: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
        for row in ledger.adversarial_prompts():
            model, defense = row["defended_model"].split("|", 1)
            prompts[(row["attack"], f"{model}|{defense}", row["concept"])].append(row)

        records = []
        # Cells in grid order: the Ray executor records them in the order its actors load
        # their groups, which varies from run to run.
        order = _grid_order(config)
        cells = sorted(ledger.cells(), key=lambda cell: order.get(cell["cell_key"], len(order)))
        for cell in cells:
            post_rows = by_cell.get(cell["cell_key"], [])
            pre_key = "|".join([cell["model"], cell["defense"], "none", cell["concept"]])
            pre_rows = by_cell.get(pre_key, [])
            if not post_rows or not pre_rows:
                continue
            record = cell_metrics(
                cell=cell,
                pre_rows=pre_rows,
                post_rows=post_rows,
                timings=timings[(cell["model"], cell["defense"], cell["concept"])],
                prompts=_cell_prompts(prompts, cell),
                rule=rule,
                resamples=resamples,
            )
            record.update(_fidelity(Path(out_dir), config, cell, post_rows, by_cell))
            record["images_sha256"] = images_digest(Path(out_dir), post_rows)
            records.append(record)
        return {
            "run": {
                "name": config["name"],
                "runs_in_ledger": len(runs),
                "environment": runs[-1]["environment"],
                "sampler": config["sampler"],
                "seeds": config["seeds"],
                "aggregation": rule,
                "executor": config["runner"]["executor"],
                "devices": _devices(runs[-1]["environment"]),
                "resources": _resources(runs),
            },
            "cells": records,
        }
    finally:
        ledger.close()


def _grid_order(config: dict[str, Any]) -> dict[str, int]:
    """Position of each cell key in the grid: models, concepts, defenses, then attacks."""
    run = RunConfig.model_validate(config)
    attacks = ["none", *(ref.key for ref in run.attacks if ref.key != "none")]
    keys = [
        "|".join([model.key, defense.key, attack, concept.name])
        for model in run.models
        for concept in run.concepts
        for defense in run.defenses
        for attack in attacks
    ]
    return {key: index for index, key in enumerate(keys)}


def _devices(environment: dict[str, Any]) -> list[dict[str, Any]]:
    """The devices the latest run generated on: one per Ray actor, or the local device."""
    executor = environment.get("executor") or {}
    if "devices" in executor:
        return executor["devices"]
    # Ledgers written before executors recorded their devices.
    return [{"device": environment["device"], "device_name": environment["device_name"]}]


def _cell_prompts(prompts: dict, cell: dict) -> list[dict]:
    """Find a cell's adversarial prompts: its own, or those its attack shares across defenses."""
    own = prompts.get((cell["attack"], f"{cell['model']}|{cell['defense']}", cell["concept"]))
    if own:
        return own
    return prompts.get((cell["attack"], f"{cell['model']}|{ANY_DEFENSE}", cell["concept"]), [])


def _resources(runs: list[dict]) -> dict[str, float | None]:
    """Peak memory over the runs in the ledger and their total wall time."""
    finished = [run["finished"] for run in runs if run.get("finished")]
    if not finished:
        return {"peak_rss_mb": None, "wall_seconds": None}
    return {
        "peak_rss_mb": max(item["peak_rss_mb"] for item in finished),
        "wall_seconds": sum(item["wall_seconds"] for item in finished),
        "peak_gpu_memory_mb": max((item.get("peak_gpu_memory_mb") or 0) for item in finished)
        or None,
    }


def _fidelity(out_dir: Path, config: dict, cell: dict, rows: list, by_cell: dict) -> dict:
    """Quality fields of an unattacked defended cell against the undefended images."""
    reference_key = "|".join([cell["model"], "none", "none", cell["concept"]])
    if cell["attack"] != "none" or cell["defense"] == "none" or reference_key not in by_cell:
        return {**{field: None for field in FIELDS}, "quality_models": {}}
    return fidelity_metrics(out_dir, config.get("quality", {}), rows, by_cell[reference_key])


def images_digest(out_dir: Path, rows: list[dict]) -> str | None:
    """Hash a cell's decoded pixels (SHA-256, image by image in key order), or return None
    when an image file is missing. Two runs with the same seeds and settings must agree
    on it, which `arena compare --check` tests without the images themselves."""
    digest = hashlib.sha256()
    for row in sorted(rows, key=lambda row: row["image_key"]):
        path = out_dir / row["image_path"] if row.get("image_path") else None
        if path is None or not path.is_file():
            return None
        with Image.open(path) as image:
            pixels = image.convert("RGB")
            digest.update(row["image_key"].encode())
            digest.update(f"{pixels.width}x{pixels.height}".encode())
            digest.update(pixels.tobytes())
    return digest.hexdigest()


def write_summary(out_dir: str | Path) -> dict[str, Any]:
    summary = build_summary(out_dir)
    path = Path(out_dir) / "summary.json"
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps(summary, indent=2, sort_keys=False), encoding="utf-8")
    temp.replace(path)
    return summary
