"""The shapes-world oracle: a small CNN that names an image's shape, colour and fill style.

It judges whether an erased concept came back, so it must read the model's samples, not
only clean renders. The samples differ from renders in ways the training augmentation
covers: grain, blur, tinted and blotchy backgrounds, shifted brightness and contrast.
An oracle trained on clean renders alone scored well on renders and put most generated
samples in one class, which is why every augmentation below is there.

Evaluator `shapes-oracle`: one preset per attribute value ("star", "swirl", "red", ...).
A preset pins the attribute, the value and the threshold on P(attribute = value); the
score of an image is that softmax probability.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.evaluators.base import Evaluator, Judgement
from harness.shapes.render import COLOURS, SHAPES, STYLES, Scene, random_scene, render_batch

log = logging.getLogger(__name__)

ORACLE_WEIGHTS = Path(__file__).parent / "weights" / "oracle.safetensors"
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}


class OracleNet(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 pixels), global average pooling, one head per
    attribute. Input: (B, 3, 32, 32) in [0, 1]. Output: logits per attribute."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(
            stage(3, width), stage(width, width * 2), stage(width * 2, width * 4)
        )
        self.heads = nn.ModuleDict(
            {name: nn.Linear(width * 4, len(values)) for name, values in ATTRIBUTES.items()}
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images * 2 - 1).mean(dim=(2, 3))
        return {name: head(features) for name, head in self.heads.items()}


# -- augmentation ----------------------------------------------------------------------------


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own sigma (pixels); sigma 0 leaves an image unchanged."""
    offsets = torch.arange(-2, 3, dtype=images.dtype)
    kernels = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)  # (B, 5)
    batch, channels, height, width = images.shape
    flat = images.reshape(1, batch * channels, height, width)
    weight = kernels.repeat_interleave(channels, dim=0)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"),
                    weight[:, None, None, :], groups=batch * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"),
                    weight[:, None, :, None], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Degrade renders the way diffusion samples are degraded; labels stay valid.

    Colour changes are kept small (gain up to 10% per channel, tint up to 0.12), so no
    augmentation turns one named colour into another.
    """
    batch = images.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, *shape, generator=generator)

    # 1. Blur for half the batch.
    sigma = uniform(0.3, 1.0) * (torch.rand(batch, generator=generator) < 0.5)
    images = _gaussian_blur(images, sigma)

    # 2. Brightness, contrast and per-channel gain.
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * uniform(0.8, 1.2, 1, 1, 1) + mean * uniform(0.85, 1.15, 1, 1, 1)
    images = images * uniform(0.9, 1.1, 3, 1, 1)

    # 3. Low-frequency colour tint (blotches) and pixel grain, each of random strength.
    tint = torch.randn(batch, 3, 4, 4, generator=generator) * uniform(0.0, 0.06, 1, 1, 1)
    images = images + F.interpolate(tint, size=images.shape[-2:], mode="bilinear")
    images = images + torch.randn(images.shape, generator=generator) * uniform(0, 0.1, 1, 1, 1)
    return images.clamp(0, 1)


# -- training --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OracleTrainingConfig:
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 2e-3
    pool_size: int = 20000  # renders drawn once; augmentation makes every batch new
    test_size: int = 1200  # fresh renders (other seeds) for the reported accuracy
    seed: int = 0


@dataclass(frozen=True)
class OracleTrainingResult:
    seconds: float
    accuracy: dict[str, float]  # per attribute, on fresh clean renders
    weights: Path


def _labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    return {
        name: torch.tensor([values.index(getattr(scene, name)) for scene in scenes])
        for name, values in ATTRIBUTES.items()
    }


def render_labelled(count: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`count` random renders (B, 3, 32, 32) with their attribute labels."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    seeds = [int(s) for s in rng.integers(2**31, size=count)]
    return torch.from_numpy(render_batch(scenes, seeds)), _labels(scenes)


@torch.no_grad()
def accuracy(
    net: OracleNet, images: torch.Tensor, labels: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Share of images whose predicted value equals the label, per attribute."""
    net.eval()
    logits = {name: [] for name in ATTRIBUTES}
    for start in range(0, len(images), 256):
        for name, value in net(images[start : start + 256]).items():
            logits[name].append(value)
    return {
        name: round(float((torch.cat(logits[name]).argmax(1) == labels[name]).float().mean()), 4)
        for name in ATTRIBUTES
    }


def train_oracle(config: OracleTrainingConfig, output: Path) -> OracleTrainingResult:
    """Train the oracle on augmented renders; write weights to `output` (safetensors)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    log.info("rendering %d training images for the oracle", config.pool_size)
    images, labels = render_labelled(config.pool_size, seed=config.seed)

    net = OracleNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.steps
    )
    net.train()
    for _step in (bar := tqdm(range(config.steps), desc="shapes oracle")):
        index = torch.randint(0, config.pool_size, (config.batch_size,), generator=generator)
        batch = augment(images[index], generator)
        # Left-right flips keep every label, because every shape is symmetric about its
        # vertical axis; up-down flips would turn triangles and hearts upside down.
        if torch.rand(1, generator=generator) < 0.5:
            batch = batch.flip(-1)
        logits = net(batch)
        loss = sum(F.cross_entropy(logits[name], labels[name][index]) for name in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")

    test_images, test_labels = render_labelled(config.test_size, seed=config.seed + 10_000)
    measured = accuracy(net, test_images, test_labels)
    log.info("oracle accuracy on %d fresh renders: %s", config.test_size, measured)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(output))
    return OracleTrainingResult(time.perf_counter() - started, measured, output)


def load_oracle(path: Path | str | None = None) -> OracleNet:
    """Load the trained oracle in eval mode; raise FileNotFoundError when weights are absent."""
    from safetensors.torch import load_file

    path = Path(path) if path else ORACLE_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"shapes oracle weights not found at {path}; train them with "
            "`arena shapes train --part oracle`"
        )
    net = OracleNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def predict(net: OracleNet, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Softmax probabilities per attribute, each (B, number of values), for (B, 3, 32, 32)."""
    images = images.float().cpu()
    if images.shape[-2:] != (32, 32):
        images = F.interpolate(images, size=(32, 32), mode="area")
    return {name: logits.softmax(dim=1) for name, logits in net(images).items()}


# -- the evaluator ---------------------------------------------------------------------------


def _presets() -> dict[str, dict[str, Any]]:
    presets = {}
    for attribute, values in ATTRIBUTES.items():
        for value in values:
            presets[value] = {"attribute": attribute, "value": value, "threshold": 0.5,
                              "weights": "shipped"}
    return presets


class ShapesOracle(Evaluator):
    """Evaluator `shapes-oracle`: is a shapes-world attribute value present in an image.

    The preset fixes the attribute and value (preset "star": shape = star; "swirl": style
    = swirl); `concept` is only recorded, so a run cannot silently judge another concept
    than the one its preset names. Option `weights` overrides the shipped weights file.
    """

    name = "shapes-oracle"
    presets = _presets()
    default_preset = "star"

    def __init__(self, preset: str | None = None, **options: Any) -> None:
        super().__init__(preset, **options)
        self._net: OracleNet | None = None

    def _weights_path(self) -> Path:
        weights = self.settings.get("weights", "shipped")
        return ORACLE_WEIGHTS if weights == "shipped" else Path(weights)

    def missing_files(self) -> list[str]:
        path = self._weights_path()
        return [] if path.is_file() else [str(path)]

    def evaluate(self, images: torch.Tensor, concept: str) -> list[Judgement]:
        if self._net is None:
            self._net = load_oracle(self._weights_path())
        attribute, value = self.settings["attribute"], self.settings["value"]
        threshold = float(self.settings["threshold"])
        probabilities = predict(self._net, images)
        column = ATTRIBUTES[attribute].index(value)

        judgements = []
        for row in range(images.shape[0]):
            score = float(probabilities[attribute][row, column])
            predicted = {
                name: ATTRIBUTES[name][int(probs[row].argmax())]
                for name, probs in probabilities.items()
            }
            details = {
                "concept": concept,
                f"p_{attribute}": {
                    name: round(float(p), 4)
                    for name, p in zip(ATTRIBUTES[attribute], probabilities[attribute][row],
                                       strict=True)
                },
                "predicted": predicted,
            }
            judgements.append(Judgement(score=score, present=score > threshold, details=details))
        return judgements
