"""Reading and writing redirector weights: our safetensors files and the released pickle.

Our checkpoints are a safetensors file plus a JSON card beside it (same stem, `.json`)
that records the dims, the concept and how the weights were trained.

The authors' released checkpoint (`ckpt/Nudity/best_model.pt` in the SafeRedir repository)
is a pickled state dict. It loads with `torch.load(weights_only=True)`, which refuses
anything but tensors and plain containers, and its keys are renamed by `RELEASED_KEY_MAP`:

| released prefix                      | here                                |
|--------------------------------------|-------------------------------------|
| latent_encoder.{k}.conv.0 / .1       | latent_encoder.blocks.{k}.conv1 / .norm1 |
| latent_encoder.{k}.conv.3 / .4       | latent_encoder.blocks.{k}.conv2 / .norm2 |
| latent_encoder.{k}.downsample        | latent_encoder.blocks.{k}.shortcut  |
| latent_encoder.5                     | latent_encoder.project              |
| t_encoder.0 / t_encoder.2            | timestep_encoder.project / .norm    |
| cross_attn.heads.{h}                 | prompt_attention.units.{h}          |
| cross_attn.fuse.0 / .1               | prompt_attention.fuse / .fuse_norm  |
| classifier.0 / classifier.3          | classifier.hidden / .output         |
| token_proj.0 / token_proj.2          | token_projection.hidden / .output   |
| delta_head                           | low_rank_delta                      |
| gate_linear                          | gate                                |
| pos_embed                            | positional_embedding                |
| mask_predictor.attn                  | mask_predictor.attention            |
| mask_predictor.predictor.0 / .2 / .3 | mask_predictor.hidden / .norm / .output |
| alpha_predictor.net.0 / .net.2       | alpha_predictor.hidden / .output    |

Dims are read off the tensor shapes, so a released state dict for another latent width or
embedding width would load too.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from defenses.saferedir.networks import Redirector, RedirectorDims

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"

# (pattern on a released key, replacement); the first pattern that matches wins.
RELEASED_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^latent_encoder\.(\d+)\.conv\.0\.", r"latent_encoder.blocks.\1.conv1."),
    (r"^latent_encoder\.(\d+)\.conv\.1\.", r"latent_encoder.blocks.\1.norm1."),
    (r"^latent_encoder\.(\d+)\.conv\.3\.", r"latent_encoder.blocks.\1.conv2."),
    (r"^latent_encoder\.(\d+)\.conv\.4\.", r"latent_encoder.blocks.\1.norm2."),
    (r"^latent_encoder\.(\d+)\.downsample\.", r"latent_encoder.blocks.\1.shortcut."),
    (r"^latent_encoder\.5\.", "latent_encoder.project."),
    (r"^t_encoder\.0\.", "timestep_encoder.project."),
    (r"^t_encoder\.2\.", "timestep_encoder.norm."),
    (r"^cross_attn\.heads\.", "prompt_attention.units."),
    (r"^cross_attn\.fuse\.0\.", "prompt_attention.fuse."),
    (r"^cross_attn\.fuse\.1\.", "prompt_attention.fuse_norm."),
    (r"^classifier\.0\.", "classifier.hidden."),
    (r"^classifier\.3\.", "classifier.output."),
    (r"^token_proj\.0\.", "token_projection.hidden."),
    (r"^token_proj\.2\.", "token_projection.output."),
    (r"^delta_head\.", "low_rank_delta."),
    (r"^gate_linear\.", "gate."),
    (r"^pos_embed$", "positional_embedding"),
    (r"^mask_predictor\.attn\.", "mask_predictor.attention."),
    (r"^mask_predictor\.predictor\.0\.", "mask_predictor.hidden."),
    (r"^mask_predictor\.predictor\.2\.", "mask_predictor.norm."),
    (r"^mask_predictor\.predictor\.3\.", "mask_predictor.output."),
    (r"^alpha_predictor\.net\.0\.", "alpha_predictor.hidden."),
    (r"^alpha_predictor\.net\.2\.", "alpha_predictor.output."),
)

# Containers a training script may wrap a state dict in.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


class CheckpointError(FileNotFoundError, ValueError):
    """A checkpoint that is missing, unreadable or does not fit the redirector."""


def map_released_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of a released state dict to this implementation's module names.

    Raises `CheckpointError` naming the keys no rule matches.
    """
    mapped, unknown = {}, []
    for key, tensor in state.items():
        key = key.removeprefix("module.")  # saved from nn.DataParallel
        for pattern, replacement in RELEASED_KEY_MAP:
            new_key, count = re.subn(pattern, replacement, key)
            if count:
                mapped[new_key] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} key(s) of the released checkpoint match no rule of the key map: "
            f"{', '.join(unknown[:8])}"
        )
    return mapped


def dims_from_state(state: dict[str, torch.Tensor]) -> RedirectorDims:
    """Read the model-dependent dims off the tensor shapes of a state dict (our key names)."""
    try:
        first_conv = state["latent_encoder.blocks.0.conv1.weight"]
        positional = state["positional_embedding"]
        widths = []
        block = 0
        while f"latent_encoder.blocks.{block}.conv1.weight" in state:
            widths.append(int(state[f"latent_encoder.blocks.{block}.conv1.weight"].shape[0]))
            block += 1
        rank = int(state["low_rank_delta.down.weight"].shape[0])
        latent_features = int(state["latent_encoder.project.weight"].shape[0])
        units = len({k.split(".")[2] for k in state if k.startswith("prompt_attention.units.")})
    except KeyError as error:
        raise CheckpointError(f"the state dict has no tensor {error.args[0]!r}") from None
    return RedirectorDims(
        latent_channels=int(first_conv.shape[1]),
        token_count=int(positional.shape[1]),
        embed_dim=int(positional.shape[2]),
        latent_widths=tuple(widths),
        latent_features=latent_features,
        lora_rank=rank,
        attention_units=units,
    )


def build_from_state(state: dict[str, torch.Tensor], dims: RedirectorDims | None = None):
    """Build a `Redirector` and load `state` strictly. Dims come from the shapes unless given."""
    dims = dims or dims_from_state(state)
    network = Redirector(dims)
    result = network.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"the state dict does not fit a redirector with {dims}: missing "
            f"{result.missing_keys[:6]}, unexpected {result.unexpected_keys[:6]}"
        )
    return network.eval()


def load_released(path: str | Path) -> Redirector:
    """Load the authors' pickled state dict with `torch.load(weights_only=True)`."""
    try:
        state: Any = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as error:  # unpickling errors have no common base class
        raise CheckpointError(f"cannot read {path} as a weights-only checkpoint: {error}") from None
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} contains a {type(state).__name__}, expected a state dict")
    network = build_from_state(map_released_keys(state))
    log.info("loaded released SafeRedir weights from %s (%s)", path, network.dims)
    return network


def card_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def save_checkpoint(network: Redirector, path: str | Path, card: dict[str, Any]) -> Path:
    """Write the weights as safetensors and `card` (with the dims added) beside them.

    Floating-point tensors are stored in float16, which halves the shipped files; loading
    casts them back to float32.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in network.state_dict().items():
        value = value.detach().cpu()
        state[key] = (value.half() if value.is_floating_point() else value).contiguous()
    save_file(state, str(path))
    full_card = {**card, "dims": network.dims.to_json(), "weights": path.name}
    card_path(path).write_text(json.dumps(full_card, indent=2) + "\n", encoding="utf-8")
    return path


def load_checkpoint(path: str | Path) -> tuple[Redirector, dict[str, Any]]:
    """Load a redirector from our safetensors file or from a released `.pt`/`.pth` pickle.

    Returns the network in eval mode and its card (empty for a released checkpoint).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return load_released(path), {}
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path}: unknown checkpoint type; expected .safetensors (ours) or .pt (released)"
        )

    from safetensors.torch import load_file

    state = {
        key: value.float() if value.is_floating_point() else value
        for key, value in load_file(str(path)).items()
    }
    card: dict[str, Any] = {}
    if card_path(path).is_file():
        card = json.loads(card_path(path).read_text(encoding="utf-8"))
    dims = RedirectorDims.from_json(card["dims"]) if "dims" in card else None
    network = build_from_state(state, dims)
    log.info("loaded SafeRedir weights from %s (%s)", path, network.dims)
    return network, card


def shipped_checkpoints() -> list[Path]:
    return sorted(WEIGHTS_DIR.glob("*.safetensors"))


def find_shipped(concept: str, dims: RedirectorDims) -> Path:
    """Find the shipped checkpoint whose card names `concept` and whose dims fit the model."""
    candidates = []
    for weights in shipped_checkpoints():
        card_file = card_path(weights)
        if not card_file.is_file():
            continue
        card = json.loads(card_file.read_text(encoding="utf-8"))
        fits = all(
            card.get("dims", {}).get(key) == getattr(dims, key)
            for key in ("latent_channels", "token_count", "embed_dim")
        )
        candidates.append(weights.name)
        if card.get("concept") == concept and fits:
            return weights
    raise CheckpointError(
        f"no shipped SafeRedir checkpoint for concept {concept!r} with latent channels "
        f"{dims.latent_channels}, {dims.token_count} tokens of width {dims.embed_dim} (shipped: "
        f"{', '.join(candidates) or 'none'}); train one with `arena train saferedir CONFIG` "
        "(for the shapes tasks: configs/train-saferedir-shapes-<task>.yaml) and set the "
        "defense option `checkpoint`"
    )
