"""The Stable Diffusion configs validate their whole plan with --dry-run, judges included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from harness.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _run_from_repo(shared_data):
    # The configs name the published prompt files relative to the repository root.
    previous = os.getcwd()
    os.chdir(REPO)
    yield
    os.chdir(previous)


def _save_tiny_vit(folder: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = ["claude-monet", "vincent-van-gogh"]
    config = ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=2,
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)


def _save_tiny_resnet(folder: Path) -> None:
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic", num_labels=1000
    )
    torch.manual_seed(0)
    ResNetForImageClassification(config).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 16}).save_pretrained(folder)


def test_nudity_config_dry_run(capsys):
    assert main(["run", "configs/sd14-nudity.yaml", "--dry-run"]) == 0
    output = capsys.readouterr().out
    assert "concept nudity: 142 cases" in output
    assert "estimated GPU time" in output


@pytest.mark.parametrize(
    ("config", "saver", "cases"),
    [("sd14-vangogh", _save_tiny_vit, 50), ("sd14-church", _save_tiny_resnet, 50)],
)
def test_judge_configs_need_and_accept_weights(config, saver, cases, tmp_path, capsys):
    assert main(["run", f"configs/{config}.yaml", "--dry-run"]) == 2
    assert "is missing" in capsys.readouterr().err

    saver(tmp_path / "judge")
    path_override = f"concepts.0.evaluator.options.path={tmp_path / 'judge'}"
    assert main(["run", f"configs/{config}.yaml", "--dry-run", "--set", path_override]) == 0
    assert f"{cases} cases" in capsys.readouterr().out


@pytest.mark.parametrize(
    "config",
    ["quickstart", "quickstart-shapes-smoke", "smoke", "attacks-shapes", "baselines-shapes",
     "saferedir-shapes"],
)
def test_shipped_configs_validate(config, capsys):
    assert main(["run", f"configs/{config}.yaml", "--dry-run"]) == 0
    assert "cells" in capsys.readouterr().out
