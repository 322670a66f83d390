"""Third-party plugins from `examples/`, installed as packages and found via entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _install(example: str, target: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO / "examples" / example),
        ],
        check=True,
        capture_output=True,
    )


def test_example_plugins_run_in_the_grid(tmp_path):
    site = tmp_path / "site"
    _install("my-defense", site)
    _install("my-attack", site)
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"

    listing = subprocess.run(
        [sys.executable, "-m", "harness.cli", "list", "--json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    payload = json.loads(listing.stdout)
    assert {
        "name": "my-defense",
        "target": "my_defense:ConceptProjection",
        "distribution": "my-defense",
    } in payload["defenses"]

    subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "run",
            "configs/smoke.yaml",
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "defenses+=my-defense",
            "--set",
            "attacks+=my-attack",
            "--set",
            "concepts.0.limit=2",
            "--set",
            "seeds.images_per_case=1",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads((out / "summary.json").read_text())
    cells = {(cell["defense"], cell["attack"]) for cell in summary["cells"]}
    assert ("my-defense", "my-attack") in cells
    assert ("my-defense", "none") in cells
    defended = next(
        c for c in summary["cells"] if c["defense"] == "my-defense" and c["attack"] == "none"
    )
    assert 0 < defended["ssim_to_undefended"] < 1
