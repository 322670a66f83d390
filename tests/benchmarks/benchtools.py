"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(function: Callable[[], object], repeats: int = 3) -> float:
    """Minimum wall time of `repeats` calls: the least disturbed measurement."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def report_ratio(benchmark, name: str, ratio: float, target: str) -> None:
    benchmark.extra_info[name] = round(ratio, 3)
    benchmark.extra_info[f"{name}_target"] = target
    print(f"\n{name}: {ratio:.2f} (target {target})")


def interleaved_best(
    baseline: Callable[[], object], ours: Callable[[], object], rounds: int = 3
) -> tuple[float, float]:
    """Minimum wall times of baseline and ours, run alternately `rounds` times each.

    Alternating keeps a slow drift of the machine (another process, throttling) from
    landing on one side of the ratio.
    """
    baseline_times, our_times = [], []
    for _ in range(rounds):
        for function, times in ((baseline, baseline_times), (ours, our_times)):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
    return min(baseline_times), min(our_times)
