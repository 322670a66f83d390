"""Defense `checkpoint`: swap in a published unlearned denoiser or text encoder.

Most erasure papers release weights rather than code that runs here: ESD and UCE as UNet
state dicts, AdvUnlearn as a `CLIPTextModel` folder. This defense loads such weights
into a copy of the model's denoiser (option `unet`) or text encoder (option
`text_encoder`); either or both may be given. Each option is a path to:

- a diffusers / transformers folder, loaded with `from_pretrained` (offline) and checked
  against the model's module for matching parameter names and shapes;
- a `.safetensors` file holding a full or partial state dict;
- a pickle checkpoint (`.pt`, `.bin`, `.ckpt`), read only with
  `torch.load(weights_only=True)`, which refuses arbitrary objects. A `state_dict` or
  `model` entry wrapping the tensors is unwrapped.

A partial state dict replaces only the tensors it names; the log reports how many of the
module's tensors it covered. Keys the module lacks and shape mismatches are errors, so
weights of another architecture never load silently. Original Stable Diffusion (CompVis)
checkpoints name the UNet `model.diffusion_model.*` and the text encoder
`cond_stage_model.*`. Those are not diffusers names, so they are rejected with a pointer
to diffusers' conversion script. A `unet.` / `text_encoder.` prefix on every key (a whole
pipeline's state dict) is stripped.

The original model is never modified: weights load into a deep copy.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.defense import Defense
from harness.model import DiffusionModel

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")
COMPVIS_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "first_stage_model.")
CONVERT_SCRIPT = "scripts/convert_original_stable_diffusion_to_diffusers.py"


class CheckpointError(ValueError):
    """Weights that cannot be loaded into the model; the message explains why."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or pickle checkpoint file (pickles with weights_only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in PICKLE_SUFFIXES:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
                loaded = loaded[wrapper]
        if not isinstance(loaded, dict) or not all(
            isinstance(value, torch.Tensor) for value in loaded.values()
        ):
            raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
        return loaded
    raise CheckpointError(
        f"{path}: unsupported weights file; expected a folder, .safetensors or one of "
        f"{', '.join(PICKLE_SUFFIXES)}"
    )


def normalise_keys(
    state: dict[str, torch.Tensor], component: str, source: Path
) -> dict[str, torch.Tensor]:
    """Reject CompVis-style keys and strip a whole-pipeline `<component>.` prefix."""
    compvis = [key for key in state if key.startswith(COMPVIS_PREFIXES)]
    if compvis:
        raise CheckpointError(
            f"{source}: keys like {compvis[0]!r} are original Stable Diffusion (CompVis) names,"
            f" not diffusers names; convert the checkpoint with diffusers' {CONVERT_SCRIPT}"
            " and pass the converted folder"
        )
    prefix = f"{component}."
    if state and all(key.startswith(prefix) for key in state):
        state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def load_partial_state_dict(
    module: nn.Module, state: dict[str, torch.Tensor], source: str
) -> tuple[nn.Module, list[str]]:
    """Deep-copy `module` and load `state` into the copy; returns it with the missing keys.

    Raises `CheckpointError` on keys the module does not have and on shape mismatches,
    before anything is copied.
    """
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} keys the module does not have, e.g. {unexpected[:3]}"
        )
    mismatched = [
        f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}"
        for key, value in state.items()
        if value.shape != own[key].shape
    ]
    if mismatched:
        raise CheckpointError(
            f"{source}: {len(mismatched)} shape mismatches (file vs model), e.g. {mismatched[:2]}"
        )
    missing = sorted(set(own) - set(state))
    copied = copy.deepcopy(module)
    copied.load_state_dict(state, strict=False)
    log.info(
        "loaded %d of %d tensors from %s (%d kept from the base model)",
        len(state),
        len(own),
        source,
        len(missing),
    )
    return copied, missing


def load_component(
    module: nn.Module, path: str | Path, component: str
) -> tuple[nn.Module, dict[str, Any]]:
    """Load weights for `component` ("unet" or "text_encoder") from `path` into a copy."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"defense 'checkpoint': {component} weights not found: {path}")
    if path.is_dir() and (path / component / "config.json").is_file():
        path = path / component  # a whole pipeline folder
    if path.is_dir():
        loaded = type(module).from_pretrained(str(path), local_files_only=True)
        state = loaded.state_dict()
    else:
        state = normalise_keys(read_state_dict(path), component, path)
    copied, missing = load_partial_state_dict(module, state, str(path))
    copied.to(device=next(module.parameters()).device, dtype=next(module.parameters()).dtype)
    copied.eval().requires_grad_(False)
    return copied, {"path": str(path), "tensors_loaded": len(state), "tensors_kept": len(missing)}


class CheckpointDefense(Defense):
    """Options: `unet` and/or `text_encoder`, each a folder or a weights file."""

    name = "checkpoint"

    def __init__(self, concept: str | None = None, **options: Any) -> None:
        super().__init__(concept=concept, **options)
        unknown = set(options) - {"unet", "text_encoder"}
        if unknown:
            raise ValueError(
                f"defense 'checkpoint': unknown options {sorted(unknown)};"
                " valid: unet, text_encoder"
            )
        if not options.get("unet") and not options.get("text_encoder"):
            raise ValueError("defense 'checkpoint' needs a 'unet' or a 'text_encoder' path")
        self.loaded: dict[str, Any] = {}

    def apply(self, model: DiffusionModel) -> DiffusionModel:
        changes: dict[str, nn.Module] = {}
        for component in ("unet", "text_encoder"):
            if self.options.get(component):
                module, report = load_component(
                    getattr(model, component), self.options[component], component
                )
                changes[component] = module
                self.loaded[component] = report
        return model.replace(**changes)

    def describe(self) -> dict[str, Any]:
        return {"defense": self.name, **self.options, "loaded": self.loaded}
