"""Shared pieces of the performance benchmarks (`tox -e bench`).

Each benchmark measures a ratio in one process, ours against a baseline doing the same
work on the same model, so the ratio holds across machines where seconds do not. Ratios
are printed and stored in pytest-benchmark's `extra_info`, and checked against the
target stated in `docs/performance.md`.
"""

from __future__ import annotations

import os

import harness  # noqa: F401  (sets the OpenMP spin count before torch starts)

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from harness.shapes.model import UNET_WEIGHTS  # noqa: E402


@pytest.fixture(scope="session")
def shapes_model():
    if not UNET_WEIGHTS.is_file():
        pytest.skip(f"shapes weights missing at {UNET_WEIGHTS}; run `arena shapes train`")
    from harness.registry import create

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return create("models", "shapes").load(torch.device("cpu"), torch.float32)
