"""Runner benchmarks: batched generation and the harness's own overhead, on the shapes model."""

from __future__ import annotations

import shutil

import torch
from benchtools import interleaved_best, report_ratio

from harness.config import validate_config
from harness.runner import Runner

PROMPTS = [
    f"a {colour} {shape}"
    for colour in ("red", "blue")
    for shape in ("star", "heart", "circle", "square")
]
SEEDS = list(range(len(PROMPTS)))


def _generate(model, prompts, seeds):
    return model.generate(
        prompts, seeds=seeds, guidance=model.default_guidance, steps=model.default_steps
    )


def test_batched_generation_speedup(benchmark, shapes_model):
    """Target: the runner's batch of 8 at least 2x the images/s of one prompt per call."""

    def loop_one_per_call():
        for prompt, seed in zip(PROMPTS, SEEDS, strict=True):
            _generate(shapes_model, [prompt], [seed])

    def batched():
        _generate(shapes_model, PROMPTS, SEEDS)

    baseline, ours = interleaved_best(loop_one_per_call, batched, rounds=3)
    benchmark.pedantic(batched, rounds=1, iterations=1)
    ratio = baseline / ours
    report_ratio(benchmark, "batched_speedup", ratio, ">= 2.0")
    assert ratio >= 2.0


def _config(out_name: str, cases: int) -> dict:
    return {
        "name": out_name,
        "models": ["shapes"],
        "defenses": ["none"],
        "attacks": ["none"],
        "concepts": [
            {
                "name": "star",
                "prompt_set": {"name": "shapes/star/benign", "options": {"limit": cases}},
                "evaluator": {"name": "shapes-oracle", "preset": "star"},
            }
        ],
        "runner": {"batch_size": 8, "latency_probe_images": 0},
    }


def test_harness_overhead(benchmark, shapes_model, tmp_path):
    """Target: the runner (ledger, PNGs, judging, timing) at most 5% slower than bare sampling."""
    config = validate_config(_config("overhead", 32))
    runner = Runner(
        config, tmp_path / "unused", progress=False, loaded_models={"shapes": shapes_model}
    )
    cases = runner.load_cases(config.concepts[0])
    prompts = [case.prompt for case in cases]
    seeds = [case.seed if case.seed is not None else 0 for case in cases]

    def bare_loop():
        with torch.no_grad():
            for start in range(0, len(prompts), 8):
                _generate(shapes_model, prompts[start : start + 8], seeds[start : start + 8])

    def harness_run():
        out = tmp_path / "run"
        shutil.rmtree(out, ignore_errors=True)
        harness = Runner(config, out, progress=False, loaded_models={"shapes": shapes_model})
        from harness.ledger import Ledger

        ledger = Ledger(out)
        try:
            harness._run_grid(ledger)
        finally:
            ledger.close()

    baseline, ours = interleaved_best(bare_loop, harness_run, rounds=3)
    benchmark.pedantic(harness_run, rounds=1, iterations=1)
    ratio = ours / baseline
    report_ratio(benchmark, "harness_overhead", ratio, "<= 1.05")
    assert ratio <= 1.05
