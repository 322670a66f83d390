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
