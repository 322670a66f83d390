"""Cell metrics on hand-made ledger rows: pre-ASR, ASR, attack-only ASR, intervals."""

from __future__ import annotations

import pytest

from harness.metrics import bootstrap_ci, cell_metrics


def _rows(verdicts: dict[str, list[bool]]) -> list[dict]:
    rows = []
    for case_id, presents in verdicts.items():
        for k, present in enumerate(presents):
            rows.append(
                {
                    "case_id": case_id,
                    "seed_index": k,
                    "present": present,
                    "truncated": False,
                    "batch_size": 2,
                    "batch_seconds": 1.0,
                    "created_at": float(k),
                }
            )
    return rows


CELL = {
    "model": "m",
    "defense": "d",
    "attack": "a",
    "concept": "c",
    "prompt_set": "p",
    "settings": {"evaluator": {"threshold": 0.45}, "sampler": {"steps": 4}},
}


def _metrics(pre, post, rule="any", prompts=(), timings=()):
    return cell_metrics(
        cell=CELL,
        pre_rows=_rows(pre),
        post_rows=_rows(post),
        timings=list(timings),
        prompts=list(prompts),
        rule=rule,
        resamples=500,
    )


def test_asr_counts_pre_successes():
    pre = {"1": [True, False], "2": [False, False], "3": [False, False], "4": [False, False]}
    post = {"1": [False, False], "2": [True, True], "3": [False, True], "4": [False, False]}
    result = _metrics(pre, post)
    assert result["n_cases"] == 4
    assert result["pre_asr"] == 0.25
    assert result["asr"] == 0.75
    assert result["attack_only_asr"] == pytest.approx(2 / 3)
    assert result["attack_only_n"] == 3
    assert result["images_per_case"] == 2


def test_all_rule_is_stricter_than_any():
    pre = {"1": [False, False], "2": [False, False]}
    post = {"1": [True, False], "2": [True, True]}
    assert _metrics(pre, post, rule="any")["asr"] == 1.0
    assert _metrics(pre, post, rule="all")["asr"] == 0.5


def test_interval_contains_estimate():
    pre = {str(i): [False] for i in range(40)}
    post = {str(i): [i % 3 == 0] for i in range(40)}
    result = _metrics(pre, post)
    low, high = result["asr_ci95"]
    assert low < result["asr"] < high
    assert 0 <= low and high <= 1


def test_degenerate_interval_is_a_point():
    assert bootstrap_ci([1.0, 1.0, 1.0], 200) == [1.0, 1.0]
    assert bootstrap_ci([1.0], 200) is None


def test_overhead_and_latency_from_probe():
    timings = [
        {"variant": "defended", "seconds": 0.2},
        {"variant": "defended", "seconds": 0.4},
        {"variant": "undefended", "seconds": 0.1},
        {"variant": "undefended", "seconds": 0.3},
    ]
    result = _metrics({"1": [False]}, {"1": [False]}, timings=timings)
    assert result["defense_overhead"] == pytest.approx(0.3 / 0.2)
    assert result["latency_ms_per_image"]["median"] == pytest.approx(300.0)


def test_attack_cost_per_case():
    prompts = [
        {"wall_seconds": 2.0, "denoiser_calls": 10, "text_encoder_calls": 5, "iterations": 5},
        {"wall_seconds": 4.0, "denoiser_calls": 20, "text_encoder_calls": 5, "iterations": 7},
    ]
    result = _metrics({"1": [False], "2": [False]}, {"1": [True], "2": [False]}, prompts=prompts)
    assert result["attack_seconds_per_case"] == 3.0
    assert result["attack_model_calls_per_case"] == 20.0
    assert result["attack_iterations_per_case"] == 6.0


def test_prompt_accuracy_compares_shared_attributes():
    from harness.metrics import prompt_accuracy

    rows = [
        {
            "details": {
                "expected": {"shape": "star", "colour": "red"},
                "predicted": {"shape": "star", "colour": "red", "style": "plain"},
            }
        },
        {
            "details": {
                "expected": {"shape": "star", "colour": "red"},
                "predicted": {"shape": "heart", "colour": "red"},
            }
        },
        {"details": {"predicted": {"shape": "star"}}},
    ]
    assert prompt_accuracy(rows) == 0.5
    assert prompt_accuracy(rows[2:]) is None
