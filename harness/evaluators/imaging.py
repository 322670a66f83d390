"""Conversions from the runner's image tensors to what judges read.

The runner hands evaluators float tensors (B, 3, H, W), RGB, in [0, 1]. Published evaluations
save PNGs first and judge the files, so every conversion here quantises to uint8 the way a PNG
writer does (clamp to [0, 1], scale by 255, round). Judging the quantised image keeps our
verdicts equal to those of a judge that reads the saved file.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def check_image_batch(images: torch.Tensor) -> None:
    """Raise ValueError unless `images` is a float tensor of shape (B, 3, H, W)."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")


def to_uint8_rgb(images: torch.Tensor) -> np.ndarray:
    """Quantise a batch to uint8 (B, H, W, 3) RGB, the pixels a PNG of each image contains."""
    check_image_batch(images)
    scaled = (images.detach().float().clamp(0.0, 1.0) * 255.0).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Convert a batch to RGB PIL images, one per image."""
    return [Image.fromarray(array) for array in to_uint8_rgb(images)]


def to_bgr_arrays(images: torch.Tensor) -> list[np.ndarray]:
    """Convert a batch to uint8 (H, W, 3) BGR arrays, what `cv2.imread` returns for a PNG."""
    return [np.ascontiguousarray(array[:, :, ::-1]) for array in to_uint8_rgb(images)]
