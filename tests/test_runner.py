"""The runner end to end on the smoke config: ledger, summary, report, resume."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import OPENMP_WAIT_VARIABLES
from harness.attack import Attack
from harness.cli import main
from harness.config import load_config
from harness.defense import Defense
from harness.model import DENOISER_GRADIENTS
from harness.registry import registry
from harness.runner import PlanError, Runner

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"

SUMMARY_FIELDS = {
    "model",
    "defense",
    "attack",
    "concept",
    "prompt_set",
    "n_cases",
    "pre_asr",
    "asr",
    "attack_only_asr",
    "asr_ci95",
    "images_per_case",
    "latency_ms_per_image",
    "throughput_images_per_s",
    "defense_overhead",
    "attack_seconds_per_case",
    "attack_model_calls_per_case",
    "evaluator",
    "threshold",
    "sampler",
}
# Fields that depend on the clock; everything else must match between runs.
TIMING_FIELDS = {
    "latency_ms_per_image",
    "throughput_images_per_s",
    "defense_overhead",
    "attack_seconds_per_case",
}


def _run_smoke(out: Path, *extra: str) -> dict:
    status = main(["run", str(SMOKE), "--out", str(out), "--no-progress", *extra])
    assert status == 0
    return json.loads((out / "summary.json").read_text())


def _stable(summary: dict) -> list[dict]:
    return [{k: v for k, v in cell.items() if k not in TIMING_FIELDS} for cell in summary["cells"]]


def _image_rows(out: Path) -> list[tuple]:
    with sqlite3.connect(out / "ledger.sqlite") as db:
        return db.execute(
            "SELECT image_key, score, present, image_path FROM images ORDER BY image_key"
        ).fetchall()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke")
    _run_smoke(out)
    return out


def test_smoke_writes_ledger_summary_report(smoke_run):
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert len(summary["cells"]) == 2
    for cell in summary["cells"]:
        assert SUMMARY_FIELDS <= set(cell)
        assert cell["n_cases"] == 6
        assert cell["images_per_case"] == 2
        assert cell["evaluator"]["preset"] == "nudenet-six"
        assert cell["latency_ms_per_image"]["median"] > 0
        assert cell["defense_overhead"] > 0
    assert summary["run"]["environment"]["packages"]["torch"]

    rows = _image_rows(smoke_run)
    assert len(rows) == 2 * 6 * 2
    for _, _, _, path in rows:
        assert (smoke_run / path).is_file()
    assert list((smoke_run / "report").glob("*.png"))


def test_long_prompt_is_flagged_truncated(smoke_run):
    with sqlite3.connect(smoke_run / "ledger.sqlite") as db:
        flagged = db.execute("SELECT DISTINCT case_id FROM images WHERE truncated = 1").fetchall()
    assert flagged == [("5",)]


def test_report_escapes_prompts(smoke_run):
    page = (smoke_run / "report" / "report.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert(1)</script>" not in page
    assert "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page


def test_report_rebuilds_from_ledger(smoke_run, tmp_path):
    before = json.loads((smoke_run / "summary.json").read_text())
    (smoke_run / "summary.json").unlink()
    assert main(["report", str(smoke_run)]) == 0
    after = json.loads((smoke_run / "summary.json").read_text())
    assert after == before


def test_rerun_adds_nothing(smoke_run):
    before = _image_rows(smoke_run)
    _run_smoke(smoke_run)
    assert _image_rows(smoke_run) == before


def test_changed_settings_rejected(smoke_run, capsys):
    status = main(
        ["run", str(SMOKE), "--out", str(smoke_run), "--no-progress", "--set", "sampler.steps=3"]
    )
    assert status == 2
    assert "other settings" in capsys.readouterr().err


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "harness.cli",
        "run",
        str(SMOKE),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "runner.batch_size=2",
    ]
    process = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ledger = out / "ledger.sqlite"
    deadline = time.monotonic() + 120
    rows = 0
    while time.monotonic() < deadline and process.poll() is None:
        if ledger.exists():
            try:
                with sqlite3.connect(ledger) as db:
                    rows = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
            except sqlite3.OperationalError:
                rows = 0
            if rows >= 4:
                break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    with sqlite3.connect(ledger) as db:
        partial = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    assert 0 < partial < 24

    resumed = _run_smoke(out, "--set", "runner.batch_size=2")
    reference = _run_smoke(tmp_path / "uninterrupted", "--set", "runner.batch_size=2")
    assert _stable(resumed) == _stable(reference)
    keys = [row[0] for row in _image_rows(out)]
    assert len(keys) == len(set(keys)) == 24


class _GradientAttack(Attack):
    name = "needs-gradients"
    model_capabilities = frozenset({DENOISER_GRADIENTS})


class _BlackBoxDefense(Defense):
    name = "black-box"
    removes = frozenset({DENOISER_GRADIENTS})

    def apply(self, model):
        return model


def test_impossible_pairing_rejected_before_work(tmp_path):
    registry("attacks").register("needs-gradients", _GradientAttack)
    registry("defenses").register("black-box", _BlackBoxDefense)
    config = load_config(SMOKE, ["defenses+=black-box", "attacks+=needs-gradients"])
    with pytest.raises(PlanError, match="needs denoiser_gradients.*black-box"):
        Runner(config, tmp_path / "out", progress=False).run()
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_plan(capsys, tmp_path):
    assert main(["run", str(SMOKE), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    output = capsys.readouterr().out
    assert "2 cells, 24 images" in output
    assert "concept nudity: 6 cases" in output
    assert not (tmp_path / "out").exists()


def test_dry_run_reports_missing_evaluator_files(tmp_path, capsys):
    status = main(
        [
            "run",
            str(SMOKE),
            "--dry-run",
            "--set",
            f"concepts.0.evaluator={{name: style, options: {{path: {tmp_path / 'vit'}}}}}",
        ]
    )
    assert status == 2
    error = capsys.readouterr().err
    assert "missing" in error and "config.json" in error


def test_dry_run_estimates_gpu_time_for_sd(tmp_path, capsys):
    overrides = ["--set", "models.0={name: diffusers, options: {path: /absent/sd14}}"]
    assert main(["run", str(SMOKE), "--dry-run", *overrides]) == 0
    output = capsys.readouterr().out
    hours = float(output.split("estimated GPU time: ")[1].split(" h")[0])
    # 2 cells x 12 images x 10 steps x 0.05 s per pass at 512x512, plus no attack cost.
    assert hours == pytest.approx(2 * 12 * 10 * 0.05 / 3600, rel=1e-2)


class _CountingTransferAttack(Attack):
    """Appends a word; shared across defenses, so it must run once per case."""

    name = "counting-transfer"
    calls: list[str] = []

    def depends_on_defense(self) -> bool:
        return False

    def run(self, case, context):
        from harness.attack import AttackResult

        _CountingTransferAttack.calls.append(case.case_id)
        return AttackResult(prompt=case.prompt + " photo", iterations=1)


def test_transfer_attack_runs_once_per_case(tmp_path):
    registry("attacks").register("counting-transfer", _CountingTransferAttack)
    _CountingTransferAttack.calls = []
    overrides = [
        "attacks+=counting-transfer",
        "concepts.0.limit=2",
        "seeds.images_per_case=1",
        "runner.latency_probe_images=0",
    ]
    config = load_config(SMOKE, overrides)
    Runner(config, tmp_path / "out", progress=False).run()
    assert sorted(_CountingTransferAttack.calls) == ["0", "1"]

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    attacked = [cell for cell in summary["cells"] if cell["attack"] == "counting-transfer"]
    assert {cell["defense"] for cell in attacked} == {"none", "negative-prompt"}
    assert all(cell["attack_iterations_per_case"] == 1 for cell in attacked)


def test_concept_attack_subset(tmp_path, capsys):
    registry("attacks").register("counting-transfer", _CountingTransferAttack)
    overrides = ["attacks+=counting-transfer", "concepts.0.attacks=[none]", "concepts.0.limit=1"]
    assert (
        main(["run", str(SMOKE), "--dry-run", *[item for o in overrides for item in ("--set", o)]])
        == 0
    )
    output = capsys.readouterr().out
    assert "2 cells" in output
    assert "counting-transfer" not in output

    bad = ["--set", "attacks+=counting-transfer", "--set", "concepts.0.attacks=[p4d]"]
    assert main(["run", str(SMOKE), "--dry-run", *bad]) == 2
    assert "'p4d' is not a configured attack" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("user_setting", "expected"),
    [({}, "10000"), ({"OMP_WAIT_POLICY": "PASSIVE"}, "None"), ({"GOMP_SPINCOUNT": "5"}, "5")],
)
def test_openmp_spin_count_default(user_setting, expected):
    """`import harness` sets a short spin count, and keeps a wait setting the user chose."""
    env = {name: value for name, value in os.environ.items()
           if name not in OPENMP_WAIT_VARIABLES}
    code = "import os, harness; print(os.environ.get('GOMP_SPINCOUNT'))"
    result = subprocess.run([sys.executable, "-c", code], env=env | user_setting,
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == expected


def test_environment_records_openmp_wait(monkeypatch):
    import torch

    from harness.runner import environment

    monkeypatch.setenv("GOMP_SPINCOUNT", "123")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    recorded = environment(torch.device("cpu"))["openmp_wait"]
    assert recorded == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "123"}
