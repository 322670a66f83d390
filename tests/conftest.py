"""Shared fixtures. Tests never reach the network: the hub is forced offline here."""

from __future__ import annotations

import os
from pathlib import Path

import harness  # noqa: F401  (sets the OpenMP spin count before torch starts)

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"published prompt files not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model():
    from harness.models.tiny import TinyRandomSD

    return TinyRandomSD().load(torch.device("cpu"), torch.float32)
