"""The model interface every attack, defense and the runner go through.

A `DiffusionModel` is a tokenizer, a text encoder, a denoiser (a diffusers
`UNet2DConditionModel`), a latent codec and a scheduler config. Stable Diffusion 1.x and
2.x folders, the tiny random SD pipeline and the embedded shapes model are all instances
of this one class, so nothing downstream special-cases a model family.

A defended model is again a `DiffusionModel`: defenses return `model.replace(...)` with an
edited denoiser, a different text encoder, a default negative prompt or extra sampler hooks.
The original stays untouched, so the runner can time both in one process.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from harness.sampling import HookFactory, StepState, sample_latents
from harness.text_encoders import text_path_for

log = logging.getLogger(__name__)

# Capabilities a model offers attacks. Attacks declare which of these they need, and the
# runner rejects a pairing before any work when the defended model does not offer one.
TEXT_ENCODER = "text_encoder"  # run the text encoder on ids and token embeddings
DENOISER_GRADIENTS = "denoiser_gradients"  # differentiate through the denoiser
ALL_CAPABILITIES = frozenset({TEXT_ENCODER, DENOISER_GRADIENTS})


class LatentCodec(Protocol):
    """Maps images in [0, 1] of shape (B, 3, H, W) to latents and back."""

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]: ...


class VaeCodec:
    """The SD autoencoder: latents are the posterior mean times the VAE's scaling factor."""

    def __init__(self, vae: nn.Module) -> None:
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(images * 2 - 1).latent_dist
        return posterior.mean * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents / self.scaling_factor).sample
        return ((images + 1) / 2).clamp(0, 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        channels = int(self.vae.config.latent_channels)
        return channels, height // self.downsample, width // self.downsample

    def modules(self) -> list[nn.Module]:
        return [self.vae]


@dataclass(frozen=True)
class TokenBatch:
    """Token ids of shape (B, T), their attention mask, and which prompts were truncated."""

    ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: tuple[bool, ...]


@dataclass
class GenerationOutput:
    images: torch.Tensor  # (B, 3, H, W), float in [0, 1], on the CPU
    records: list[dict[str, Any]]  # per image, written by sampler hooks


@dataclass
class DiffusionModel:
    """A text-to-image latent diffusion model behind the harness's one interface.

    `max_length` is the fixed token length every prompt is padded or truncated to.
    `default_*` are the sampler settings a run uses when its config gives none.
    """

    name: str
    tokenizer: Any
    text_encoder: nn.Module
    unet: nn.Module
    codec: Any
    scheduler_config: dict[str, Any]
    max_length: int
    default_size: int
    default_steps: int = 50
    default_guidance: float = 7.5
    default_scheduler: str = "ddim"
    negative_prompt: str = ""
    sampler_hooks: tuple[HookFactory, ...] = ()
    capabilities: frozenset[str] = ALL_CAPABILITIES
    defense_chain: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.text_path = text_path_for(self.text_encoder)

    @property
    def denoiser_calls_per_step(self) -> int:
        """Denoiser evaluations per image in one guided sampling step: the conditional and
        unconditional predictions, plus what the defense hooks add (SLD's safety concept)."""
        hooks = [factory(self) for factory in self.sampler_hooks]
        return 2 + sum(hook.extra_denoiser_calls for hook in hooks)

    # -- devices -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def modules(self) -> list[nn.Module]:
        codec_modules = self.codec.modules() if hasattr(self.codec, "modules") else []
        return [self.text_encoder, self.unet, *codec_modules]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DiffusionModel:
        # Each module is checked on its own: comparing with `self.dtype` would stop casting
        # once the UNet (which `self.dtype` reads) is converted, leaving the VAE behind.
        # Casting only where the dtype differs keeps diffusers from warning on a no-op cast.
        for module in self.modules():
            current = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
            if dtype is None or current == dtype:
                module.to(device=device)
            else:
                module.to(device=device, dtype=dtype)
        return self

    def eval(self) -> DiffusionModel:
        for module in self.modules():
            module.eval()
            module.requires_grad_(False)
        return self

    def replace(self, **changes: Any) -> DiffusionModel:
        """Return a shallow copy with some fields changed; the original is not modified."""
        clone = copy.copy(self)
        for key, value in changes.items():
            if not hasattr(clone, key):
                raise AttributeError(f"DiffusionModel has no field {key!r}")
            setattr(clone, key, value)
        clone.text_path = text_path_for(clone.text_encoder)
        clone.__dict__.pop("training_scheduler", None)
        return clone

    # -- text ----------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> TokenBatch:
        """Pad or truncate every prompt to `max_length` tokens; flag truncated prompts."""
        encoded = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        full_lengths = [
            len(ids) for ids in self.tokenizer(list(prompts), verbose=False)["input_ids"]
        ]
        truncated = tuple(length > self.max_length for length in full_lengths)
        return TokenBatch(
            ids=encoded["input_ids"].to(self.device),
            attention_mask=encoded["attention_mask"].to(self.device),
            truncated=truncated,
        )

    @property
    def vocabulary_embeddings(self) -> torch.Tensor:
        """The token embedding matrix, shape (V, D_token)."""
        return self.text_path.token_embedding.weight

    @property
    def special_ids(self) -> dict[str, int | None]:
        tok = self.tokenizer
        return {
            "bos": tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id,
            "eos": tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id,
            "pad": tok.pad_token_id,
        }

    def decode_ids(self, ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)

    def encode(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text-encoder hidden states for token ids, shape (B, T, D)."""
        return self.text_path.encode_ids(ids, attention_mask)

    def encode_embeddings(
        self, token_embeddings: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Differentiable twin of `encode`: equal to it when the rows are real token rows."""
        return self.text_path.encode_embeddings(token_embeddings, attention_mask)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, TokenBatch]:
        tokens = self.tokenize(prompts)
        return self.encode(tokens.ids, tokens.attention_mask), tokens

    # -- denoiser and latents ------------------------------------------------------------

    def predict_noise(
        self, latents: torch.Tensor, timestep: torch.Tensor | int, conditioning: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(latents, timestep, encoder_hidden_states=conditioning).sample

    def add_noise(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Forward diffusion q(x_t | x_0) with the model's training noise schedule."""
        return self.training_scheduler.add_noise(latents, noise, timesteps.to(latents.device))

    @functools.cached_property
    def training_scheduler(self):
        """A DDPM scheduler with the model's noise schedule, built once (attacks call
        `add_noise` every optimisation step)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(images.to(self.device, self.dtype))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)

    def latent_shape(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        return self.codec.latent_shape(height or self.default_size, width or self.default_size)

    def noise_under_defense(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | int,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        guidance: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One denoiser step as the defended model takes it, differentiable end to end.

        This is the path adaptive white-box attacks optimise through. Sampler hooks run in
        their `differentiable` mode. Without `guidance` the result is the conditional
        noise prediction after the hooks' conditioning changes; with it, the guided
        prediction after the hooks' guidance changes (SLD acts only there).
        """
        batch = cond.shape[0]
        if uncond is None:
            negative, _ = self.encode_prompts([self.negative_prompt] * batch)
            uncond = negative.to(cond.dtype)
        timestep = torch.as_tensor(timestep, device=self.device)
        scale = torch.as_tensor(1.0 if guidance is None else guidance, dtype=latents.dtype)
        state = StepState(
            model=self,
            step=0,
            num_steps=1,
            timestep=timestep,
            latents=latents,
            cond=cond,
            uncond=uncond,
            guidance=scale.to(latents.device).reshape(-1, 1, 1, 1).expand(batch, 1, 1, 1),
            original_cond=cond,
            original_uncond=uncond,
            records=[{} for _ in range(batch)],
            differentiable=True,
        )
        hooks = [factory(self) for factory in self.sampler_hooks]
        for hook in hooks:
            hook.before_denoise(state)
        if guidance is None:
            return self.predict_noise(state.latents, timestep, state.cond)

        state.model_input = state.latents
        # One timestep per row (a batch of attacked cases) must cover both halves.
        both_halves = timestep if timestep.numel() == 1 else torch.cat([timestep, timestep])
        noise = self.predict_noise(
            torch.cat([state.latents, state.latents]),
            both_halves,
            torch.cat([state.uncond, state.cond]),
        )
        state.noise_uncond, state.noise_cond = noise.chunk(2)
        state.noise_pred = state.noise_uncond + state.guidance * (
            state.noise_cond - state.noise_uncond
        )
        for hook in hooks:
            hook.guide(state)
        return state.noise_pred

    # -- generation ----------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int],
        guidance: float | Sequence[float],
        steps: int,
        scheduler: str | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        prompt_embeddings: torch.Tensor | None = None,
    ) -> GenerationOutput:
        """Generate one image per prompt, with this model's defense hooks active.

        `prompt_embeddings` (B, T, D), when given, replaces the encoded prompts; attacks
        that produce embeddings rather than text use it. `scheduler` None means
        `default_scheduler`.
        """
        negative = self.negative_prompt if negative_prompt is None else negative_prompt
        with torch.no_grad():
            if prompt_embeddings is None:
                cond, _ = self.encode_prompts(prompts)
            else:
                cond = prompt_embeddings.to(self.device, self.dtype)
            uncond, _ = self.encode_prompts([negative] * len(prompts))
            hooks = [factory(self) for factory in self.sampler_hooks]
            result = sample_latents(
                self,
                cond.to(self.dtype),
                uncond.to(self.dtype),
                seeds=seeds,
                steps=steps,
                guidance=guidance,
                scheduler=scheduler,
                height=height,
                width=width,
                hooks=hooks,
            )
            images = self.decode(result.latents).float().cpu()
        return GenerationOutput(images=images, records=result.records)


class ModelPlugin:
    """A model registry entry: builds a `DiffusionModel` from config options.

    `default_steps` and `estimated_pass_seconds` serve `arena run --dry-run`, which plans
    without loading weights.
    """

    name: ClassVar[str] = ""
    default_steps: ClassVar[int] = 50

    def __init__(self, **options: Any) -> None:
        self.options = options

    def load(self, device: torch.device, dtype: torch.dtype) -> DiffusionModel:
        raise NotImplementedError(f"model plugin {self.name!r} does not implement load()")

    @classmethod
    def estimated_pass_seconds(cls, height: int | None, width: int | None) -> float:
        """Estimated GPU seconds of one guided denoiser pass (batch 1, both CFG halves)."""
        return 0.0


def load_diffusers_model(
    source: str | Path,
    *,
    name: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    local_files_only: bool | None = None,
) -> DiffusionModel:
    """Load an SD 1.x or 2.x diffusers folder or hub id through `from_pretrained`.

    Each component is loaded on its own rather than through a pipeline class, so a folder
    saved by any SD pipeline (with or without a safety checker) loads the same way.
    Weights load from safetensors when present; diffusers and transformers read a `.bin`
    fallback with `torch.load(weights_only=True)`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = str(source)
    kwargs: dict[str, Any] = {}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    log.info("loading diffusers model from %s", source)

    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs)
    scheduler_config = _load_scheduler_config(source, kwargs)

    codec = VaeCodec(vae)
    sample_size = int(unet.config.sample_size) * codec.downsample
    model = DiffusionModel(
        name=name or Path(source).name,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        codec=codec,
        scheduler_config=scheduler_config,
        max_length=int(tokenizer.model_max_length),
        default_size=sample_size,
        info={"source": source},
    )
    return model.to(device, dtype).eval()


def _load_scheduler_config(source: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    from diffusers import DDIMScheduler

    config = DDIMScheduler.load_config(source, subfolder="scheduler", **kwargs)
    return dict(config)


class DiffusersModelPlugin(ModelPlugin):
    """Model `diffusers`: any SD 1.x/2.x folder or hub id (`path` option)."""

    name = "diffusers"

    # NOTE: an estimate, not a measurement here: SD 1.x at 512x512 in fp16 runs about
    # 20 guided steps per second on an A100-class GPU. Time a probe on your own GPU.
    SECONDS_PER_PASS_512 = 0.05

    @classmethod
    def estimated_pass_seconds(cls, height: int | None, width: int | None) -> float:
        pixels = (height or 512) * (width or 512)
        return cls.SECONDS_PER_PASS_512 * pixels / (512 * 512)

    def load(self, device: torch.device, dtype: torch.dtype) -> DiffusionModel:
        path = self.options.get("path")
        if not path:
            raise ValueError("model 'diffusers' needs a 'path': a diffusers folder or hub id")
        return load_diffusers_model(
            path, name=self.options.get("label"), device=device, dtype=dtype
        )
