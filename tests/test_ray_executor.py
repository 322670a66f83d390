"""The Ray executor on a local Ray instance: same results as the local executor, no row lost
or written twice when an actor dies, and resume across executors."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.config import ConfigError, load_config
from harness.ray_executor import RayExecutor
from harness.runner import Runner

try:
    import ray
except ModuleNotFoundError:
    ray = None

needs_ray = pytest.mark.skipif(
    ray is None, reason="ray is not installed (pip install 'erasure-arena[ray]')"
)

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
# Fields that depend on the clock; everything else must match between executors.
TIMING_FIELDS = {
    "latency_ms_per_image",
    "throughput_images_per_s",
    "defense_overhead",
    "attack_seconds_per_case",
}
SMOKE_IMAGES = 2 * 6 * 2  # cells x cases x images per case


def _stable(summary: dict) -> list[dict]:
    return [{k: v for k, v in cell.items() if k not in TIMING_FIELDS} for cell in summary["cells"]]


def _image_rows(out: Path) -> list[tuple]:
    with sqlite3.connect(out / "ledger.sqlite") as db:
        return db.execute(
            "SELECT image_key, score, present, image_path FROM images ORDER BY image_key"
        ).fetchall()


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _run(out: Path, executor: str, ray_executor=None) -> dict:
    config = load_config(SMOKE, [f"runner.executor={executor}"])
    Runner(config, out, progress=False, executor=ray_executor).run()
    return _summary(out)


def test_harness_imports_without_ray():
    code = "import sys, harness.runner, harness.cli; print('ray' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_ray_settings_validate():
    config = load_config(
        SMOKE, ["runner.executor=ray", "runner.ray={max_actors: 3, num_gpus_per_actor: 0.5}"]
    )
    assert config.runner.executor == "ray"
    assert config.runner.ray.max_actors == 3
    assert config.runner.ray.num_gpus_per_actor == 0.5
    with pytest.raises(ConfigError, match="runner.ray.max_retry"):
        load_config(SMOKE, ["runner.ray.max_retry=2"])


def test_address_without_ray_executor_rejected(tmp_path, capsys):
    status = main(["run", str(SMOKE), "--out", str(tmp_path / "out"), "--address", "auto"])
    assert status == 2
    assert "--executor ray" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def local_ray():
    # Two CPUs: two single-CPU actors, one per group of the smoke grid.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local")
    _run(out, "local")
    return out


@needs_ray
def test_ray_run_matches_local(local_ray, local_run, tmp_path):
    out = tmp_path / "ray"
    status = main(["run", str(SMOKE), "--executor", "ray", "--out", str(out), "--no-progress"])
    assert status == 0

    summary = _summary(out)
    assert _stable(summary) == _stable(_summary(local_run))
    assert _image_rows(out) == _image_rows(local_run)
    assert summary["run"]["executor"] == "ray"
    devices = summary["run"]["devices"]
    assert len(devices) == 2
    assert all(device["device"] == "cpu" for device in devices)
    actors = summary["run"]["environment"]["executor"]["actors"]
    # An actor whose group ran out of shards may join another group, so a group can be
    # loaded on both actors.
    assert {group for actor in actors for group in actor["groups"]} == {
        "tiny-random-sd|negative-prompt|nudity",
        "tiny-random-sd|none|nudity",
    }
    for relative in (row[3] for row in _image_rows(out)):
        assert (out / relative).is_file()


@needs_ray
def test_lost_actor_loses_and_duplicates_no_rows(local_ray, local_run, tmp_path):
    out = tmp_path / "lost"
    settings = load_config(SMOKE).runner.ray
    # The first actor exits when its second shard (the first image batch) starts.
    summary = _run(out, "ray", RayExecutor(settings, die_on_shard=2))

    executor = summary["run"]["environment"]["executor"]
    assert executor["actors_lost"] == 1
    assert executor["shards_retried"] == 1
    keys = [row[0] for row in _image_rows(out)]
    assert len(keys) == len(set(keys)) == SMOKE_IMAGES
    assert _image_rows(out) == _image_rows(local_run)
    assert _stable(summary) == _stable(_summary(local_run))

    # Finishing the run locally finds nothing left to do.
    _run(out, "local")
    assert _image_rows(out) == _image_rows(local_run)


@needs_ray
def test_resume_local_run_with_ray(local_ray, local_run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(local_run, out)
    # A local run stopped halfway through the second group: half of its images and its
    # latency probe are missing.
    with sqlite3.connect(out / "ledger.sqlite") as db:
        db.execute(
            "DELETE FROM images WHERE defense = 'negative-prompt' AND case_id IN ('3', '4', '5')"
        )
        db.execute("DELETE FROM timings WHERE defense = 'negative-prompt'")
        kept = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    assert kept == SMOKE_IMAGES - 6

    summary = _run(out, "ray")

    keys = [row[0] for row in _image_rows(out)]
    assert len(keys) == len(set(keys)) == SMOKE_IMAGES
    assert _image_rows(out) == _image_rows(local_run)
    assert _stable(summary) == _stable(_summary(local_run))
    # Only the unfinished group was loaded on an actor.
    actors = summary["run"]["environment"]["executor"]["actors"]
    assert {group for actor in actors for group in actor["groups"]} == {
        "tiny-random-sd|negative-prompt|nudity"
    }
