"""Defense `saferedir`: prompt-embedding redirection during sampling (Liu et al., 2026).

SafeRedir ("SafeRedir: Prompt Embedding Redirection for Robust Unlearning in Image
Generation Models", arXiv 2601.08623) changes no weight of the model. A small network
watches every sampling step; when it judges the generation unsafe it adds a delta to the
prompt embedding. `apply` only appends a sampler-hook factory to the model it is given,
so SafeRedir composes over any other defense (`{name: saferedir, over: esd-x}`).

Options:

- `checkpoint`: our `.safetensors` file (with its `.json` card) or the authors' released
  `.pt` state dict. A relative path resolves against the working directory first, then
  against `defenses/saferedir/weights/`;
- `checkpoints`: a map from concept to checkpoint, for a run config with several concepts;
- without either, the shipped checkpoint whose card names the concept and fits the model;
- the inference switches of `RedirectionOptions` (`alpha_scale`, `cooldown`,
  `apply_to_uncond`, `sticky`, `classifier_sees_redirected`, `mask_in_final`,
  `check_timing`, `differentiable_estimator`).

The redirector runs in float32 on the model's device whatever the model's dtype.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from defenses.saferedir.hooks import RedirectionOptions, RedirectorLike, SafeRedirHook
from defenses.saferedir.loading import WEIGHTS_DIR, CheckpointError, find_shipped, load_checkpoint
from defenses.saferedir.networks import Redirector, RedirectorDims
from harness.defense import Defense
from harness.model import DiffusionModel

log = logging.getLogger(__name__)

_REDIRECTION_KEYS = tuple(field.name for field in dataclasses.fields(RedirectionOptions))
_CHECKPOINT_KEYS = ("checkpoint", "checkpoints")


def model_dims(model: DiffusionModel) -> RedirectorDims:
    """Read the redirector dims that fit `model`: latent channels, token count, embedding width."""
    channels = model.latent_shape(None, None)[0]
    with torch.no_grad():
        embedding, _ = model.encode_prompts([""])
    return RedirectorDims(
        latent_channels=int(channels),
        token_count=int(embedding.shape[1]),
        embed_dim=int(embedding.shape[2]),
    )


def resolve_checkpoint(path: str | Path) -> Path:
    """Find `path` as given, else inside the shipped weights folder."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = WEIGHTS_DIR / path
    if not path.is_absolute() and shipped.is_file():
        return shipped
    raise CheckpointError(f"saferedir checkpoint not found: {path} (nor {shipped})")


class SafeRedir(Defense):
    """Adds SafeRedir's sampler hook; see the module docstring for the options."""

    name = "saferedir"

    def __init__(
        self,
        concept: str | None = None,
        redirector: RedirectorLike | None = None,
        **options: Any,
    ) -> None:
        super().__init__(concept=concept, **options)
        unknown = set(options) - set(_REDIRECTION_KEYS) - set(_CHECKPOINT_KEYS)
        if unknown:
            valid = ", ".join((*_CHECKPOINT_KEYS, *_REDIRECTION_KEYS))
            raise ValueError(
                f"unknown saferedir option(s) {', '.join(sorted(unknown))}; valid: {valid}"
            )
        self.redirection = RedirectionOptions(
            **{key: options[key] for key in _REDIRECTION_KEYS if key in options}
        )
        self.redirector = redirector
        self.checkpoint_path: Path | None = None
        self.card: dict[str, Any] = {}

    def _checkpoint_option(self) -> str | None:
        by_concept = self.options.get("checkpoints") or {}
        if self.concept in by_concept:
            return by_concept[self.concept]
        return self.options.get("checkpoint")

    def load_redirector(self, dims: RedirectorDims) -> Redirector:
        """Load the redirector the options name and check it against the model's dims."""
        option = self._checkpoint_option()
        if option is not None:
            self.checkpoint_path = resolve_checkpoint(option)
        elif self.concept:
            self.checkpoint_path = find_shipped(self.concept, dims)
        else:
            raise CheckpointError("defense 'saferedir' needs a 'checkpoint' or a concept")
        network, self.card = load_checkpoint(self.checkpoint_path)

        fitted = network.dims
        for key in ("latent_channels", "token_count", "embed_dim"):
            if getattr(fitted, key) != getattr(dims, key):
                raise CheckpointError(
                    f"saferedir checkpoint {self.checkpoint_path} has {key}={getattr(fitted, key)}"
                    f" but the model needs {getattr(dims, key)}"
                )
        return network

    def apply(self, model: DiffusionModel) -> DiffusionModel:
        if self.redirector is None:
            self.redirector = self.load_redirector(model_dims(model))
        redirector = self.redirector
        if isinstance(redirector, torch.nn.Module):
            redirector = redirector.to(device=model.device, dtype=torch.float32).eval()
            redirector.requires_grad_(False)
        options = self.redirection

        def make_hook(_model: DiffusionModel) -> SafeRedirHook:
            return SafeRedirHook(redirector, options)

        log.info(
            "saferedir for concept %r: checkpoint %s, %s",
            self.concept,
            self.checkpoint_path or "given in code",
            options,
        )
        return model.replace(sampler_hooks=(*model.sampler_hooks, make_hook))

    def describe(self) -> dict[str, Any]:
        return {
            "defense": self.name,
            "checkpoint": str(self.checkpoint_path) if self.checkpoint_path else None,
            "trained_on": self.card.get("data", {}).get("summary"),
            **self.redirection.to_json(),
        }
