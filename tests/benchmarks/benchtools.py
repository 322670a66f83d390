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


# The public Stable Diffusion 1.4 UNet config, for building the architecture with random
# weights (FLOP counts, GPU timing) without downloading anything.
SD14_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
