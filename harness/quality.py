"""Image quality metrics for benign fidelity: CLIP score, SSIM, PSNR, FID and LPIPS.

These are functions, not evaluators: they compare images with prompts or with reference
images instead of judging a concept. Each follows the convention of the implementation it is
named after, stated in its docstring. Numbers computed under other conventions (another CLIP
backbone, another Inception, another scale) are not comparable.

Weights come from local files only, except a CLIP hub id the caller allows to download.
Missing files raise `MissingWeightsError` naming them. The optional packages (`lpips`) are
imported only when used; install them with the `quality` extra.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from harness.evaluators.imaging import to_uint8_rgb
from harness.evaluators.pretrained import (
    CLIP_TOKENIZER,
    CONFIG,
    IMAGE_PROCESSOR,
    WEIGHTS,
    MissingWeightsError,
    load_image_processor,
    load_pretrained_model,
    missing_files,
    pixel_values,
    resolve_source,
)

log = logging.getLogger(__name__)

# --- CLIP score --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipScore:
    """CLIP score of image-prompt pairs: the mean, each pair's score, and the model used."""

    mean: float
    scores: tuple[float, ...]
    model: str


def clip_score(
    images: torch.Tensor,
    prompts: Sequence[str],
    model_path: str | Path,
    *,
    allow_download: bool = False,
    batch_size: int = 32,
) -> ClipScore:
    """Score how well each image (B, 3, H, W) in [0, 1] matches its prompt.

    Convention of torchmetrics `CLIPScore`: max(100 * cosine(image, text), 0) per pair,
    averaged over pairs, with prompts truncated to CLIP's context length. `model_path` is a
    `CLIPModel.save_pretrained` folder, or a hub id when `allow_download` is true.
    """
    if images.shape[0] != len(prompts):
        raise ValueError(f"clip_score got {images.shape[0]} images but {len(prompts)} prompts")
    if images.shape[0] == 0:
        raise ValueError("clip_score needs at least one image")
    model, image_processor, tokenizer = _load_clip(str(model_path), allow_download)
    model.to(images.device)
    max_length = model.config.text_config.max_position_embeddings

    scores = []
    for start in range(0, images.shape[0], batch_size):
        pixels = pixel_values(image_processor, images[start : start + batch_size])
        tokens = tokenizer(
            list(prompts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(images.device)
        with torch.no_grad():
            vision = model.vision_model(pixel_values=pixels.to(images.device))
            text = model.text_model(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
            image_embeddings = model.visual_projection(vision.pooler_output)
            text_embeddings = model.text_projection(text.pooler_output)
        cosine = F.cosine_similarity(image_embeddings.float(), text_embeddings.float(), dim=-1)
        scores.append((100.0 * cosine).clamp(min=0.0).cpu())

    per_pair = torch.cat(scores)
    return ClipScore(float(per_pair.mean()), tuple(per_pair.tolist()), str(model_path))


@functools.lru_cache(maxsize=2)
def _load_clip(model_path: str, allow_download: bool) -> tuple[Any, Any, Any]:
    # Cached because benchmark code scores one batch at a time with the same model.
    from transformers import AutoTokenizer, CLIPModel

    source = resolve_source(model_path, allow_download, None, "model_path")
    if source.is_local:
        required = (CONFIG, WEIGHTS, IMAGE_PROCESSOR, CLIP_TOKENIZER)
        missing = missing_files(source.name_or_path, required)
        if missing:
            raise MissingWeightsError(
                "CLIP score model",
                missing,
                "Save a CLIPModel with its CLIPProcessor there using save_pretrained.",
            )
    model = load_pretrained_model(CLIPModel, source)
    tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, local_files_only=source.is_local)
    return model, load_image_processor(source), tokenizer


# --- SSIM and PSNR -----------------------------------------------------------------------


def _check_pair(
    a: torch.Tensor, b: torch.Tensor, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the pair as (B, C, H, W) batches; ValueError on unequal or unsupported shapes."""
    if a.shape != b.shape:
        shapes = f"{tuple(a.shape)} and {tuple(b.shape)}"
        raise ValueError(f"{metric} needs images of equal shape, got {shapes}")
    if a.ndim not in (3, 4):
        raise ValueError(f"{metric} needs (C, H, W) or (B, C, H, W) images, got {tuple(a.shape)}")
    if a.ndim == 3:
        return a.unsqueeze(0), b.unsqueeze(0)
    return a, b


def _gaussian_blur_valid(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Filter every channel with the separable window, keeping only fully covered pixels."""
    channels = x.shape[1]
    size = window.numel()
    rows = window.view(1, 1, size, 1).expand(channels, 1, size, 1)
    columns = window.view(1, 1, 1, size).expand(channels, 1, 1, size)
    return F.conv2d(F.conv2d(x, rows, groups=channels), columns, groups=channels)


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity of image pairs (B, C, H, W) or (C, H, W); returns (B,) or a scalar.

    Wang et al., "Image Quality Assessment: From Error Visibility to Structural Similarity"
    (IEEE TIP 2004): local statistics under an 11x11 Gaussian window (sigma 1.5) with
    constants C1 = (0.01 L)^2 and C2 = (0.03 L)^2, L = `data_range`. The SSIM map covers the
    pixels where the window fits inside the image, and its mean over pixels and channels is
    the score. This equals scikit-image's `structural_similarity` with `gaussian_weights=True`
    and `use_sample_covariance=False`. Computed in float64.
    """
    squeeze = a.ndim == 3
    x, y = _check_pair(a, b, "ssim")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"ssim needs images of at least {window_size}x{window_size} pixels")
    x, y = x.double(), y.double()

    offsets = torch.arange(window_size, dtype=torch.float64, device=x.device)
    offsets = offsets - (window_size - 1) / 2
    window = torch.exp(-(offsets**2) / (2 * sigma**2))
    window = window / window.sum()
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2

    mean_x = _gaussian_blur_valid(x, window)
    mean_y = _gaussian_blur_valid(y, window)
    variance_x = _gaussian_blur_valid(x * x, window) - mean_x**2
    variance_y = _gaussian_blur_valid(y * y, window) - mean_y**2
    covariance = _gaussian_blur_valid(x * y, window) - mean_x * mean_y

    luminance = (2 * mean_x * mean_y + c1) / (mean_x**2 + mean_y**2 + c1)
    structure = (2 * covariance + c2) / (variance_x + variance_y + c2)
    values = (luminance * structure).mean(dim=(1, 2, 3))
    return values[0] if squeeze else values


def psnr(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, 10 log10(L^2 / MSE), per image pair; returns (B,) or a
    scalar. Identical images have MSE 0 and PSNR +inf."""
    squeeze = a.ndim == 3
    x, y = _check_pair(a, b, "psnr")
    mse = ((x.double() - y.double()) ** 2).mean(dim=(1, 2, 3))
    values = 10.0 * torch.log10(data_range**2 / mse)
    return values[0] if squeeze else values


# --- FID ---------------------------------------------------------------------------------


def fid(real_features: Any, fake_features: Any) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D), as in FID.

    Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium" (NeurIPS 2017): |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with sample
    covariances (N - 1 in the denominator). The trace of (S1 S2)^(1/2) is the sum of square
    roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a symmetric matrix, which avoids the
    complex round-off of a general matrix square root. The value is FID only when the
    features come from the standard Inception (see `CleanFidInception`).
    """
    real = np.asarray(real_features, dtype=np.float64)
    fake = np.asarray(fake_features, dtype=np.float64)
    for name, features in (("real", real), ("fake", fake)):
        if features.ndim != 2 or features.shape[0] < 2:
            shape = features.shape
            raise ValueError(f"fid needs {name} features of shape (N >= 2, D), got {shape}")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"fid feature sizes differ: {real.shape[1]} and {fake.shape[1]}")

    mean_difference = real.mean(axis=0) - fake.mean(axis=0)
    covariance_real = np.atleast_2d(np.cov(real, rowvar=False))
    covariance_fake = np.atleast_2d(np.cov(fake, rowvar=False))

    # Covariances are positive semi-definite; eigenvalues below 0 are round-off.
    eigenvalues, eigenvectors = np.linalg.eigh(covariance_real)
    root_real = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
    middle = root_real @ covariance_fake @ root_real
    middle_eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_root = np.sqrt(np.clip(middle_eigenvalues, 0.0, None)).sum()

    distance = (
        mean_difference @ mean_difference
        + np.trace(covariance_real)
        + np.trace(covariance_fake)
        - 2.0 * trace_root
    )
    return float(distance)


class CleanFidInception:
    """clean-fid's Inception-V3 features in its "clean" mode, from a local torchscript file.

    clean-fid (Parmar et al., "On Aliased Resizing and Surprising Subtleties in GAN
    Evaluation", CVPR 2022) uses NVIDIA's TorchScript port of the TF Inception
    (`inception-2015-12-05.pt`). Its "clean" mode quantises each image to uint8, resizes each
    channel to 299x299 with PIL bicubic in float32, maps [0, 255] to [-1, 1] and returns the
    2048 pool features. The file is never downloaded; pass the path of a copy (clean-fid
    saves it to /tmp/inception-2015-12-05.pt on first use).

    NOTE: `torch.jit.load` is neither safetensors nor `torch.load(weights_only=True)`; a
    TorchScript archive runs its own TorchScript code, so load only a trusted copy.
    """

    FILE_NAME = "inception-2015-12-05.pt"
    SIZE = 299

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        path = Path(path)
        if not path.is_file():
            raise MissingWeightsError(
                "clean-fid Inception",
                [str(path)],
                f"Put clean-fid's {self.FILE_NAME} (NVIDIA's StyleGAN2-ADA metrics Inception) "
                "there; it is never downloaded.",
            )
        self.device = torch.device(device)
        self.module = torch.jit.load(str(path), map_location=self.device).eval()
        if not hasattr(self.module, "layers"):
            raise ValueError(f"{path} is not clean-fid's Inception: it has no 'layers' module")
        self.path = path

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Compute features (B, D) of a batch (B, 3, H, W) in [0, 1]."""
        resized = [_resize_clean(image, self.SIZE) for image in to_uint8_rgb(images)]
        batch = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).to(self.device)
        inputs = (batch - 128.0) / 128.0
        with torch.no_grad():
            features = self.module.layers(inputs)
        return features.reshape(images.shape[0], -1)


def _resize_clean(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 (H, W, 3) image to float32 (size, size, 3) channel by channel with PIL
    bicubic in float mode, clean-fid's anti-aliased resize without re-quantising."""
    channels = []
    for channel in range(3):
        plane = Image.fromarray(image[:, :, channel].astype(np.float32))
        channels.append(np.asarray(plane.resize((size, size), resample=Image.BICUBIC)))
    return np.stack(channels, axis=-1).astype(np.float32)


def inception_features(
    images: torch.Tensor | Iterable[torch.Tensor],
    extractor: Callable[[torch.Tensor], torch.Tensor] | str | Path,
    *,
    batch_size: int = 32,
) -> np.ndarray:
    """Compute features (N, D) of images for `fid`.

    `images` is one (N, 3, H, W) tensor in [0, 1], split into batches of `batch_size`, or an
    iterable of such batches. `extractor` maps a batch to (B, D) features; a path loads
    `CleanFidInception` from that torchscript file, the standard FID feature extractor.
    """
    if isinstance(extractor, (str, Path)):
        extractor = CleanFidInception(extractor)
    if isinstance(images, torch.Tensor):
        batches: Iterable[torch.Tensor] = images.split(batch_size)
    else:
        batches = images

    features = []
    for batch in batches:
        with torch.no_grad():
            output = extractor(batch)
        features.append(output.detach().double().cpu().numpy().reshape(batch.shape[0], -1))
    if not features:
        raise ValueError("inception_features got no images")
    return np.concatenate(features)


# --- LPIPS -------------------------------------------------------------------------------

# File names under which torchvision saves the ImageNet weights of LPIPS's backbones.
TORCHVISION_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def lpips_backbone_state(
    lpips_keys: Iterable[str], torchvision_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename torchvision backbone weights to the keys of an LPIPS network.

    LPIPS keeps torchvision's `features` layers under their original indices, split into
    slices: `slice2.3.weight` is torchvision's `features.3.weight`.
    """
    state = {}
    for key in lpips_keys:
        _slice, rest = key.split(".", 1)
        source = f"features.{rest}"
        if source not in torchvision_state:
            raise ValueError(f"backbone weights have no {source!r}, needed for LPIPS {key!r}")
        state[key] = torchvision_state[source]
    return state


def lpips_distance(
    a: torch.Tensor, b: torch.Tensor, net_path: str | Path, *, net: str = "alex"
) -> torch.Tensor:
    """Compute the LPIPS distance (B,) between image pairs (B, 3, H, W) in [0, 1].

    LPIPS: Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual
    Metric", CVPR 2018.

    Needs the `lpips` package (its wheel ships the linear heads) and torchvision's ImageNet
    weights of the backbone at `net_path` (e.g. alexnet-owt-7be5be79.pth for `net="alex"`),
    loaded with `weights_only=True`. Nothing is downloaded.
    """
    if net not in TORCHVISION_BACKBONE_FILES:
        valid = ", ".join(TORCHVISION_BACKBONE_FILES)
        raise ValueError(f"unknown LPIPS net {net!r}; valid: {valid}")
    if not Path(net_path).is_file():
        raise MissingWeightsError(
            f"LPIPS {net}",
            [str(net_path)],
            f"Put torchvision's ImageNet weights {TORCHVISION_BACKBONE_FILES[net]} there "
            "(torchvision keeps them in ~/.cache/torch/hub/checkpoints/).",
        )
    x, y = _check_pair(a, b, "lpips_distance")
    model = _load_lpips(net, str(net_path)).to(x.device)
    with torch.no_grad():
        distances = model(x.float(), y.float(), normalize=True)
    return distances.reshape(x.shape[0]).cpu()


@functools.lru_cache(maxsize=2)
def _load_lpips(net: str, net_path: str) -> torch.nn.Module:
    # NOTE: not run in this project's tests: `lpips` imports torchvision, which is not
    # installed beside the pinned torch here.
    try:
        import lpips
    except ImportError as error:
        raise ImportError(
            "lpips_distance needs the 'lpips' package and torchvision: "
            "pip install 'erasure-arena[quality]' with a torchvision that matches your torch"
        ) from error

    # pnet_rand builds the backbone without fetching ImageNet weights, which load next. lpips
    # reads its bundled linear heads with a plain torch.load, weights-only from torch 2.6 on.
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    torchvision_state = torch.load(net_path, map_location="cpu", weights_only=True)
    model.net.load_state_dict(lpips_backbone_state(model.net.state_dict(), torchvision_state))
    log.info("loaded LPIPS %s with backbone weights %s", net, net_path)
    return model.eval()
