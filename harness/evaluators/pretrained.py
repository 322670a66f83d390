"""Hugging Face backbones for evaluators and quality metrics, loaded without the network.

A backbone loads from a `save_pretrained` folder on disk. A hub id is used only when the user
sets `allow_download: true`, so a benchmark run never fetches weights the user did not ask for.
Missing files raise `MissingWeightsError`, which names every missing file with its folder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.evaluators.imaging import to_pil

log = logging.getLogger(__name__)


class MissingWeightsError(FileNotFoundError):
    """Files a judge or metric needs are not on disk. `missing` lists their paths."""

    def __init__(self, component: str, missing: Sequence[str], hint: str) -> None:
        self.missing = tuple(missing)
        super().__init__(f"{component} cannot load, missing: {'; '.join(self.missing)}. {hint}")


@dataclass(frozen=True)
class RequiredFile:
    """A file a checkpoint folder must contain. Any one of `alternatives` satisfies it, and
    an alternative is a group of files that must all be present."""

    alternatives: tuple[tuple[str, ...], ...]

    def present_in(self, folder: Path) -> bool:
        return any(all((folder / name).is_file() for name in group) for group in self.alternatives)

    def describe(self, folder: Path) -> str:
        groups = [" + ".join(str(folder / name) for name in group) for group in self.alternatives]
        first, *others = groups
        return f"{first} (or {', '.join(others)})" if others else first


CONFIG = RequiredFile((("config.json",),))
WEIGHTS = RequiredFile(
    (
        ("model.safetensors",),
        ("model.safetensors.index.json",),
        ("pytorch_model.bin",),
        ("pytorch_model.bin.index.json",),
    )
)
IMAGE_PROCESSOR = RequiredFile((("preprocessor_config.json",),))
CLIP_TOKENIZER = RequiredFile((("tokenizer.json",), ("vocab.json", "merges.txt")))


def missing_files(folder: str | Path, required: Sequence[RequiredFile]) -> list[str]:
    """Describe each requirement that `folder` does not meet, as paths inside the folder."""
    folder = Path(folder)
    return [item.describe(folder) for item in required if not item.present_in(folder)]


@dataclass(frozen=True)
class PretrainedSource:
    """Source of a backbone: a local folder, or a hub id the user allowed to download."""

    name_or_path: str
    is_local: bool


def resolve_source(
    path: str | Path | None, allow_download: bool, default_hub_id: str | None, option: str
) -> PretrainedSource:
    """Decide where a backbone loads from.

    An existing folder always wins. Otherwise `path` (or `default_hub_id` when `path` is unset)
    is a hub id, but only with `allow_download`. Without it a path that does not exist stays a
    local folder, so the missing-file check reports it. ValueError when nothing names a source.
    """
    if path is not None and Path(path).is_dir():
        return PretrainedSource(str(path), is_local=True)
    if allow_download:
        hub_id = str(path) if path is not None else default_hub_id
        if hub_id is None:
            raise ValueError(f"option {option!r} is required: a checkpoint folder or a hub id")
        return PretrainedSource(hub_id, is_local=False)
    if path is None:
        hub_hint = (
            f", or set allow_download: true to fetch {default_hub_id} from the Hugging Face Hub"
            if default_hub_id
            else ""
        )
        raise ValueError(f"option {option!r} is required: a local checkpoint folder{hub_hint}")
    return PretrainedSource(str(path), is_local=True)


def load_image_processor(source: PretrainedSource) -> Any:
    """Load the folder's image processor with its PIL backend.

    Pinning the PIL backend keeps resizing identical whether or not torchvision is installed;
    transformers 5 would otherwise switch to its torchvision backend, whose resize differs.
    """
    import transformers
    from transformers import AutoImageProcessor

    major = int(transformers.__version__.split(".")[0])
    backend = {"backend": "pil"} if major >= 5 else {"use_fast": False}
    return AutoImageProcessor.from_pretrained(
        source.name_or_path, local_files_only=source.is_local, **backend
    )


def load_pretrained_model(model_class: Any, source: PretrainedSource) -> torch.nn.Module:
    """Load `model_class` from `source` in eval mode, float32, on the CPU."""
    model = model_class.from_pretrained(source.name_or_path, local_files_only=source.is_local)
    model = model.float().eval()
    parameters = sum(parameter.numel() for parameter in model.parameters())
    log.info(
        "loaded %s from %s (%.1fM parameters)",
        model_class.__name__,
        source.name_or_path,
        parameters / 1e6,
    )
    return model


def pixel_values(processor: Any, images: torch.Tensor) -> torch.Tensor:
    """Preprocess a (B, 3, H, W) [0, 1] batch through `processor`, via uint8 PIL images."""
    return processor(images=to_pil(images), return_tensors="pt")["pixel_values"]


def class_probabilities(
    model: torch.nn.Module, processor: Any, images: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Softmax class probabilities (B, C), float32 on the CPU, of an image classifier.

    The model runs on the device the images are on, in batches of `batch_size`.
    """
    model.to(images.device)
    batches = []
    for start in range(0, images.shape[0], batch_size):
        inputs = pixel_values(processor, images[start : start + batch_size]).to(images.device)
        with torch.no_grad():
            logits = model(pixel_values=inputs).logits
        batches.append(logits.float().softmax(dim=-1).cpu())
    return torch.cat(batches)
