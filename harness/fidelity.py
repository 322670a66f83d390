"""Benign fidelity of a defended model, from the run's images.

For every unattacked cell of a defense, each image is paired with the undefended model's
image of the same model, concept, case and seed (defense `none` in the same run). SSIM
and PSNR need nothing else; CLIP score, FID and LPIPS run when the config names their
weights. FID here compares the defended images with the undefended ones on the same
prompts, not with real photographs, so it measures drift from the base model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from harness import quality

log = logging.getLogger(__name__)

FIELDS = (
    "ssim_to_undefended",
    "psnr_to_undefended",
    "lpips_to_undefended",
    "clip_score",
    "fid",
)


def _load(out_dir: Path, row: dict[str, Any]) -> torch.Tensor | None:
    if not row.get("image_path"):
        return None
    path = out_dir / row["image_path"]
    if not path.is_file():
        return None
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def _pairs(out_dir: Path, rows: list[dict], reference_rows: list[dict]):
    reference = {(row["case_id"], row["seed_index"]): row for row in reference_rows}
    defended, undefended, prompts = [], [], []
    for row in rows:
        match = reference.get((row["case_id"], row["seed_index"]))
        if match is None:
            continue
        a, b = _load(out_dir, row), _load(out_dir, match)
        if a is None or b is None:
            continue
        defended.append(a)
        undefended.append(b)
        prompts.append(row["prompt"])
    if not defended:
        return None
    return torch.stack(defended), torch.stack(undefended), prompts


def fidelity_metrics(
    out_dir: Path,
    quality_config: dict[str, Any],
    rows: list[dict[str, Any]],
    reference_rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """Quality fields for one unattacked cell; None where a metric was not configured."""
    result: dict[str, Any] = {field: None for field in FIELDS}
    result["quality_models"] = {}
    pairs = _pairs(out_dir, rows, reference_rows)
    if pairs is None:
        return result
    defended, undefended, prompts = pairs

    if quality_config.get("ssim", True):
        result["ssim_to_undefended"] = float(quality.ssim(defended, undefended).mean())
        psnr = quality.psnr(defended, undefended)
        finite = psnr[torch.isfinite(psnr)]
        # Identical pairs have infinite PSNR; the mean is over the pairs that differ.
        result["psnr_to_undefended"] = float(finite.mean()) if finite.numel() else float("inf")

    if quality_config.get("clip_model"):
        score = quality.clip_score(defended, prompts, quality_config["clip_model"])
        result["clip_score"] = score.mean
        result["quality_models"]["clip_score"] = score.model

    if quality_config.get("fid_inception"):
        extractor = quality.CleanFidInception(quality_config["fid_inception"])
        real = quality.inception_features(undefended, extractor)
        fake = quality.inception_features(defended, extractor)
        result["fid"] = quality.fid(real, fake)
        result["quality_models"]["fid"] = str(quality_config["fid_inception"])

    if quality_config.get("lpips_backbone"):
        net = quality_config.get("lpips_net", "alex")
        distances = quality.lpips_distance(
            defended, undefended, quality_config["lpips_backbone"], net=net
        )
        result["lpips_to_undefended"] = float(distances.mean())
        result["quality_models"]["lpips"] = f"lpips-{net}"
    return result
