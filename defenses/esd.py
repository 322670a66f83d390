"""ESD: Erased Stable Diffusion, the trainer `esd` and the defenses `esd-x` and `esd-u`.

Gandikota, Materzyńska, Fiotto-Kaufman and Bau, "Erasing Concepts from Diffusion
Models", ICCV 2023.

ESD fine-tunes the denoiser so that its prediction for the concept c follows negative
guidance away from c, computed by a frozen copy of the original denoiser:

    target(x_t, t) = eps*(x_t, t, c0) - eta * (eps*(x_t, t, c) - eps*(x_t, t, c0))
    loss           = || eps_theta(x_t, t, c) - target ||^2

with c0 the empty prompt and eta the negative guidance. Each iteration draws a DDIM step
index k uniformly from [0, ddim_steps), runs k steps of the DDIM sampler from fresh noise
with the concept prompt at guidance `start_guidance`, takes the latent x_t reached and the
timestep t = timesteps[k] of the step it would take next, and makes one Adam step on the
loss at (x_t, t).

Variants (which parameters train; weights and biases of Linear and Conv2d modules, as in
the authors' diffusers code, so normalisation layers stay fixed):

- `esd-x`: the cross-attention modules (`attn2`) only; the paper's choice for styles;
- `esd-u`: every Linear/Conv2d module outside `attn2`; the paper's choice for nudity and
  objects. The time-embedding layers and the output convolution are Linear/Conv2d modules
  and train too, as in the diffusers code; the CompVis script leaves those two fixed and
  trains the normalisation layers instead.

Defaults, from the paper (SD 1.4): eta 1, learning rate 1e-5, 1000 iterations, batch 1,
50 DDIM steps for sampling x_t, start guidance 3. x_t is sampled with the model being
trained, as the CompVis training script behind the paper does (`sample_with: frozen`
samples with the frozen copy instead, as the authors' later diffusers code does).

NOTE: the authors' 2024 diffusers code writes the target as eps(c) - eta (eps(c) - eps(c0))
with default eta 2, which equals the paper's form with eta 1; this file uses the paper's
form. The CompVis training script behind the paper draws the training timestep uniformly
within the 1000 / ddim_steps interval of the DDIM step that x_t was sampled to; this file
uses the DDIM step's own timestep, as the diffusers code does.

`arena train esd CONFIG` writes the trained parameters only, as safetensors, and a JSON
card beside them. The defenses load them into a copy of the denoiser (option `weights`;
default `defenses/weights/<variant>-<concept>.safetensors`, which the trainer configs
`configs/esd-shapes-{star,swirl}.yaml` write for the shapes tasks).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from torch import nn

from defenses.checkpoint import load_partial_state_dict
from harness.config import ConfigError, apply_override
from harness.defense import Defense
from harness.model import DiffusionModel
from harness.registry import create
from harness.sampling import initial_noise, make_scheduler
from harness.training import Trainer

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
VARIANTS = ("esd-x", "esd-u")
TRAINABLE_TYPES = ("Linear", "Conv2d", "LoRACompatibleLinear", "LoRACompatibleConv")


def trainable_parameter_names(unet: nn.Module, variant: str) -> list[str]:
    """List the names of the parameters an ESD variant trains (see the module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ESD variant {variant!r}; valid: {', '.join(VARIANTS)}")
    names = []
    for module_name, module in unet.named_modules():
        if type(module).__name__ not in TRAINABLE_TYPES:
            continue
        in_cross_attention = "attn2" in module_name.split(".")
        if in_cross_attention == (variant == "esd-x"):
            names.extend(f"{module_name}.{name}" for name, _ in module.named_parameters())
    return names


def esd_target(
    frozen: DiffusionModel,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    negative_guidance: float,
) -> torch.Tensor:
    """eps(c0) - eta * (eps(c) - eps(c0)): the frozen model negatively guided away from c."""
    with torch.no_grad():
        noise_uncond = frozen.predict_noise(latents, timestep, uncond)
        noise_concept = frozen.predict_noise(latents, timestep, cond)
    return noise_uncond - negative_guidance * (noise_concept - noise_uncond)


def esd_loss(
    trained: DiffusionModel,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    cond: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """Mean squared error between the trained model's concept prediction and the target."""
    prediction = trained.predict_noise(latents, timestep, cond)
    return torch.nn.functional.mse_loss(prediction, target)


def sample_partway(
    model: DiffusionModel,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    stop_index: int,
    ddim_steps: int,
    guidance: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the first `stop_index` DDIM steps from seeded noise; return (x_t, t).

    t is `timesteps[stop_index]`, the timestep whose noise level x_t has.
    """
    scheduler = make_scheduler("ddim", model.scheduler_config)
    scheduler.set_timesteps(ddim_steps, device=model.device)
    shape = model.latent_shape(None, None)
    latents = initial_noise([seed], shape, model.device, model.dtype) * scheduler.init_noise_sigma
    embeddings = torch.cat([uncond, cond])
    for timestep in scheduler.timesteps[:stop_index]:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
        noise_uncond, noise_cond = model.predict_noise(model_input, timestep, embeddings).chunk(2)
        noise = noise_uncond + guidance * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, timestep, latents).prev_sample
    return latents, scheduler.timesteps[stop_index]


# -- training ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EsdConfig:
    """One ESD training run; field names are the YAML keys of `arena train esd CONFIG`."""

    model: dict[str, Any]  # {name, options}
    concept: str
    variant: str = "esd-x"
    iterations: int = 1000
    lr: float = 1e-5
    negative_guidance: float = 1.0
    ddim_steps: int = 50
    start_guidance: float = 3.0
    sample_with: str = "trained"  # or "frozen"
    seed: int = 0
    device: str = "cpu"
    out: str = ""
    log_every: int = 50
    # Storage precision of the written tensors. float16 halves the file (ESD-u of the shapes
    # UNet: 20 MB -> 10 MB) and the defense casts back to the model's dtype when loading.
    save_dtype: str = "float32"

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> EsdConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"esd config: unknown keys {sorted(unknown)}; valid: {sorted(known)}")
        if "concept" not in data or not str(data["concept"]).strip():
            raise ConfigError("esd config: 'concept' (the prompt to erase) is required")
        model = data.get("model", "shapes")
        model = {"name": model, "options": {}} if isinstance(model, str) else dict(model)
        config = cls(**{**data, "model": model})
        if config.variant not in VARIANTS:
            raise ConfigError(
                f"esd config: variant {config.variant!r}; valid: {', '.join(VARIANTS)}"
            )
        if config.sample_with not in ("trained", "frozen"):
            raise ConfigError("esd config: sample_with must be 'trained' or 'frozen'")
        if config.save_dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError("esd config: save_dtype must be float32, float16 or bfloat16")
        if config.iterations < 1 or config.ddim_steps < 1 or config.lr <= 0:
            raise ConfigError("esd config: iterations, ddim_steps and lr must be positive")
        return config


@dataclass(frozen=True)
class EsdResult:
    weights: dict[str, torch.Tensor]  # trained parameters only, on the CPU
    losses: list[float]
    seconds: float
    parameter_count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def train_esd(model: DiffusionModel, config: EsdConfig) -> EsdResult:
    """Fine-tune a copy of `model.unet` with ESD; `model` itself is not modified."""
    started = time.perf_counter()
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)

    # 1. The frozen original and the trainable copy, with only the variant's parameters free.
    frozen = model
    trained_unet = copy.deepcopy(model.unet).requires_grad_(False)
    names = trainable_parameter_names(trained_unet, config.variant)
    parameters = dict(trained_unet.named_parameters())
    for name in names:
        parameters[name].requires_grad_(True)
    trained = model.replace(unet=trained_unet)
    optimizer = torch.optim.Adam([parameters[name] for name in names], lr=config.lr)
    count = sum(parameters[name].numel() for name in names)
    log.info(
        "esd %s on %r: %d tensors, %d parameters trainable; %d iterations at lr %g, eta %g",
        config.variant,
        config.concept,
        len(names),
        count,
        config.iterations,
        config.lr,
        config.negative_guidance,
    )

    with torch.no_grad():
        cond, _ = model.encode_prompts([config.concept])
        uncond, _ = model.encode_prompts([""])
    sampler = trained if config.sample_with == "trained" else frozen

    # 2. One x_t and one gradient step per iteration.
    losses: list[float] = []
    for iteration in range(config.iterations):
        stop_index = rng.randrange(config.ddim_steps)
        with torch.no_grad():
            latents, timestep = sample_partway(
                sampler,
                cond,
                uncond,
                stop_index=stop_index,
                ddim_steps=config.ddim_steps,
                guidance=config.start_guidance,
                seed=rng.randrange(2**31),
            )
        target = esd_target(frozen, latents, timestep, cond, uncond, config.negative_guidance)

        loss = esd_loss(trained, latents, timestep, cond, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if config.log_every and (iteration + 1) % config.log_every == 0:
            recent = losses[-config.log_every :]
            log.info(
                "esd iteration %d/%d: mean loss %.5f over the last %d",
                iteration + 1,
                config.iterations,
                sum(recent) / len(recent),
                len(recent),
            )

    weights = {name: parameters[name].detach().cpu().contiguous().clone() for name in names}
    return EsdResult(
        weights=weights, losses=losses, seconds=time.perf_counter() - started, parameter_count=count
    )


def loss_summary(losses: list[float], chunks: int = 10) -> dict[str, Any]:
    """Mean loss per tenth of training, plus the first and last values: the card's trace."""
    size = max(1, len(losses) // chunks)
    means = [
        sum(losses[start : start + size]) / len(losses[start : start + size])
        for start in range(0, len(losses), size)
    ]
    return {
        "iterations": len(losses),
        "chunk_size": size,
        "chunk_means": [round(value, 6) for value in means],
        "first": losses[0],
        "last": losses[-1],
        "min": min(losses),
    }


class EsdTrainer(Trainer):
    """`arena train esd CONFIG`: YAML keys are the fields of `EsdConfig`."""

    name = "esd"

    def run(self, config_path: Path, overrides: list[str], out: Path | None) -> Path:
        data = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"esd config {config_path}: expected a mapping")
        for assignment in overrides or []:
            apply_override(data, assignment)
        config = EsdConfig.from_mapping(data)
        target = Path(
            out or config.out or f"{config.variant}-{concept_slug(config.concept)}.safetensors"
        )
        if target.suffix != ".safetensors":
            target = target / f"{config.variant}-{concept_slug(config.concept)}.safetensors"
        # The card records where the weights went, `--out` included.
        config = dataclasses.replace(config, out=str(target))

        device = torch.device(config.device)
        plugin = create("models", config.model["name"], **config.model.get("options", {}))
        model = plugin.load(device, torch.float32)
        result = train_esd(model, config)
        write_weights(target, result, config, model)
        return target


def write_weights(
    target: Path, result: EsdResult, config: EsdConfig, model: DiffusionModel
) -> None:
    """Write the trained tensors (safetensors, with metadata) and the JSON card beside them."""
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "method": "esd",
        "variant": config.variant,
        "concept": config.concept,
        "model": model.name,
        "base_fingerprint": json.dumps(denoiser_fingerprint(model.unet)),
    }
    dtype = getattr(torch, config.save_dtype)
    stored = {name: tensor.to(dtype) for name, tensor in result.weights.items()}
    temporary = target.with_suffix(".tmp")
    save_file(stored, str(temporary), metadata=metadata)
    temporary.replace(target)
    card = {
        **metadata,
        "paper": "Gandikota et al., Erasing Concepts from Diffusion Models, ICCV 2023",
        "config": asdict(config),
        "trained_tensors": len(result.weights),
        "trained_parameters": result.parameter_count,
        "loss": loss_summary(result.losses),
        "wall_seconds": round(result.seconds, 1),
        "sha256": _file_sha256(target),
        "model_info": {key: str(value) for key, value in model.info.items()},
    }
    target.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    log.info("esd: wrote %s (%d tensors) in %.0f s", target, len(result.weights), result.seconds)


def denoiser_fingerprint(unet: nn.Module, every: int = 16, head: int = 4096) -> list[float]:
    """Return a few numbers that identify a denoiser's weights: for every `every`-th tensor
    of its state dict, sorted by name, the mean absolute value of its first `head` entries.

    ESD weights replace part of the denoiser they were trained on, so loading them into
    another one (for example after the shapes UNet is retrained) gives a hybrid of two
    networks. Numbers rather than a digest, so that the same weights held in float16 still
    match within `FINGERPRINT_RTOL`. Two trainings of one architecture differ by more than
    that in many of the numbers.
    NOTE: a lightly fine-tuned copy of the base can pass; only the base it came from is
    checked, not every later change to it.
    """
    state = unet.state_dict()
    names = sorted(state)[::every]
    return [round(float(state[name].detach().flatten()[:head].float().abs().mean()), 6)
            for name in names]


FINGERPRINT_RTOL = 1e-2


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_base(weights: Path, metadata: dict[str, str], unet: nn.Module) -> None:
    """Raise if `weights` were trained on another denoiser than `unet` (see the fingerprint).

    The fingerprint is read from the file's metadata, else from its JSON card: weights
    written before the fingerprint existed carry it in the card only. A card counts only
    when its `sha256` is that of the weights file, so a stale card is never trusted.
    """
    recorded = metadata.get("base_fingerprint")
    card_path = weights.with_suffix(".json")
    if recorded is None and card_path.is_file():
        card = json.loads(card_path.read_text(encoding="utf-8"))
        if isinstance(card, dict) and card.get("sha256") == _file_sha256(weights):
            recorded = card.get("base_fingerprint")
    if recorded is None:
        log.warning("%s records no base fingerprint, so its base denoiser is not checked "
                    "(weights written before the fingerprint existed)", weights)
        return
    trained_on = torch.tensor(json.loads(recorded) if isinstance(recorded, str) else recorded)
    this_base = torch.tensor(denoiser_fingerprint(unet))
    if trained_on.shape != this_base.shape or not torch.allclose(
        trained_on, this_base, rtol=FINGERPRINT_RTOL, atol=1e-6
    ):
        raise ValueError(
            f"{weights} was trained on another base denoiser than the model's: the weight "
            "fingerprints differ. Retrain it on this model with `arena train esd CONFIG`"
        )


# -- the defenses --------------------------------------------------------------------------


def concept_slug(concept: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", concept.lower()).strip("-")


class EsdDefense(Defense):
    """Load ESD-trained denoiser parameters into a copy of the model's denoiser.

    Option `weights`: a safetensors file written by `arena train esd`; default the shipped
    `defenses/weights/<variant>-<concept>.safetensors`.
    """

    variant: ClassVar[str] = ""

    def __init__(self, concept: str | None = None, **options: Any) -> None:
        super().__init__(concept=concept, **options)
        unknown = set(options) - {"weights"}
        if unknown:
            raise ValueError(
                f"defense {self.name!r}: unknown options {sorted(unknown)}; valid: weights"
            )
        if options.get("weights"):
            self.weights = Path(options["weights"]).expanduser()
        elif concept:
            self.weights = WEIGHTS_DIR / f"{self.variant}-{concept_slug(concept)}.safetensors"
        else:
            raise ValueError(f"defense {self.name!r} needs a concept or a 'weights' path")
        if not self.weights.is_file():
            raise FileNotFoundError(
                f"defense {self.name!r}: no ESD weights at {self.weights}; train them with "
                f"`arena train esd CONFIG --out {self.weights}` (for the shapes tasks: "
                f"configs/esd-shapes-<task>.yaml with --set variant={self.variant}) or pass "
                "the option 'weights'"
            )

    def apply(self, model: DiffusionModel) -> DiffusionModel:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(self.weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("variant") not in (None, self.variant):
            raise ValueError(
                f"defense {self.name!r}: {self.weights} holds {metadata['variant']} weights"
            )
        if self.concept and metadata.get("concept") not in (None, self.concept):
            log.warning(
                "%s: weights were trained to erase %r, the run's concept is %r",
                self.name,
                metadata.get("concept"),
                self.concept,
            )
        check_base(self.weights, metadata, model.unet)
        state = load_file(str(self.weights))
        unet, _ = load_partial_state_dict(model.unet, state, str(self.weights))
        return model.replace(unet=unet)

    def describe(self) -> dict[str, Any]:
        # A digest rather than only the path, so runs on other machines can be compared.
        digest = _file_sha256(self.weights)[:16]
        return {"defense": self.name, "weights": self.weights.name, "weights_sha256": digest}


class EsdX(EsdDefense):
    name = "esd-x"
    variant = "esd-x"


class EsdU(EsdDefense):
    name = "esd-u"
    variant = "esd-u"
