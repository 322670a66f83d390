"""The explicit sampling loop with classifier-free guidance and per-step hooks.

Every image in the harness comes from `sample_latents`. Inference-time defenses (SLD,
SafeRedir) act through `SamplerHook`s at three points of each step, so none of them patches
diffusers. The loop, for step i with timestep t (Ho & Salimans, 2022, for the guidance):

1. hooks may replace the conditional and unconditional embeddings (`before_denoise`);
2. the denoiser predicts noise for both halves in one batch;
3. guidance: eps = eps_uncond + w * (eps_cond - eps_uncond), with w per image;
4. hooks may replace the guided prediction (`guide`), for example SLD's safety term;
5. the scheduler takes its step; hooks see the result (`after_denoise`).

Seeds: each image's starting noise comes from its own CPU `torch.Generator`, so CPU and
GPU runs, and batched and single-image runs, start from the same latent. Ancestral
samplers (`ddpm`, `euler-ancestral`) add fresh noise at every step. They draw it from the
same per-image generator, after the starting noise, so their images do not depend on the
batch either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)

if TYPE_CHECKING:
    from harness.model import DiffusionModel

# A config names these samplers through `harness.config.SchedulerName`, and a test keeps the
# two lists equal.
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpm-solver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "euler": (EulerDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    # Ancestral samplers: the DDPM posterior step of Ho et al. (2020) on the sampling
    # timesteps, and Euler with ancestral noise (Karras et al., 2022).
    "ddpm": (DDPMScheduler, {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
}
# Samplers whose step draws noise. They get the per-image generators.
ANCESTRAL = frozenset({"ddpm", "euler-ancestral"})


def make_scheduler(name: str, scheduler_config: dict[str, Any]):
    """Build a fresh scheduler of kind `name` from a model's scheduler config.

    A new instance per generation matters: multistep schedulers (LMS, DPM-Solver++) keep
    past model outputs, which would leak between batches if shared.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(scheduler_config, **overrides)


@dataclass
class StepState:
    """What hooks see and may change during one generation of a batch.

    `cond` and `uncond` are the embeddings used from the next denoiser call on;
    `noise_cond`, `noise_uncond` and `noise_pred` are set after the denoiser call;
    `model_input` is the latent as the denoiser saw it (after the scheduler's input
    scaling), so a hook that makes an extra denoiser call (SLD) feeds it the same input.
    `records` holds one dict per image; hooks write what the ledger should keep there
    (for example the step at which a defense fired). `differentiable` is true in the
    single-step path that adaptive attacks differentiate through: hooks must then use
    soft, gradient-carrying decisions instead of hard thresholds and cooldown state.
    """

    model: DiffusionModel
    step: int
    num_steps: int
    timestep: torch.Tensor
    latents: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    guidance: torch.Tensor
    original_cond: torch.Tensor
    original_uncond: torch.Tensor
    differentiable: bool = False
    noise_cond: torch.Tensor | None = None
    noise_uncond: torch.Tensor | None = None
    noise_pred: torch.Tensor | None = None
    model_input: torch.Tensor | None = None
    records: list[dict[str, Any]] = field(default_factory=list)


class SamplerHook:
    """Base class for per-generation hooks. A new hook is built for every generation,
    so a hook may keep per-batch state without leaking it into the next batch."""

    # Denoiser evaluations per image per guided step that the hook adds (SLD: 1), so
    # attack budgets count what a defended step really costs.
    extra_denoiser_calls: int = 0

    def before_denoise(self, state: StepState) -> None:
        """Called before the denoiser call of each step."""

    def guide(self, state: StepState) -> None:
        """Called after classifier-free guidance; may replace `state.noise_pred`."""

    def after_denoise(self, state: StepState) -> None:
        """Called after the scheduler step; `state.latents` is already the new latent."""

    def finish(self, state: StepState) -> None:
        """Called once at the end; writes per-image results into `state.records`."""


HookFactory = Callable[["DiffusionModel"], SamplerHook]


def initial_noise(
    seeds: Sequence[int], shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Draw one starting latent per seed, each from its own CPU generator.

    `generators`, when given, are those generators, seeded here. An ancestral sampler
    goes on drawing its step noise from them.
    """
    if generators is None:
        generators = [torch.Generator("cpu") for _ in seeds]
    latents = []
    for seed, generator in zip(seeds, generators, strict=True):
        generator.manual_seed(int(seed))
        latents.append(torch.randn(shape, generator=generator, dtype=torch.float32))
    return torch.stack(latents).to(device=device, dtype=dtype)


@dataclass
class SampleResult:
    latents: torch.Tensor
    records: list[dict[str, Any]]


def sample_latents(
    model: DiffusionModel,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    seeds: Sequence[int],
    steps: int,
    guidance: float | Sequence[float] | torch.Tensor,
    scheduler: str | None = None,
    height: int | None = None,
    width: int | None = None,
    hooks: Sequence[SamplerHook] = (),
    start_latents: torch.Tensor | None = None,
) -> SampleResult:
    """Run the full denoising loop for a batch and return the final latents.

    `cond` and `uncond` have shape (B, T, D). `guidance` is the guidance scale, either one
    value or one per image. `scheduler` None means the model's default sampler. Gradients
    flow only when the caller enables them.
    """
    batch = cond.shape[0]
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch} prompts")
    device, dtype = model.device, model.dtype
    scheduler = scheduler or model.default_scheduler
    ancestral = scheduler in ANCESTRAL

    # 1. Starting noise, per-image generators and the timestep schedule.
    noise_scheduler = make_scheduler(scheduler, model.scheduler_config)
    noise_scheduler.set_timesteps(steps, device=device)
    generators = [torch.Generator("cpu") for _ in seeds]
    if start_latents is None:
        shape = model.latent_shape(height, width)
        latents = initial_noise(seeds, shape, device, dtype, generators)
        latents = latents * noise_scheduler.init_noise_sigma
    else:
        if ancestral:
            # Draw and drop the starting noise, so that the step noise comes from the same
            # place in each seed's stream as in a run from noise.
            initial_noise(seeds, tuple(start_latents.shape[1:]), device, dtype, generators)
        latents = start_latents.to(device=device, dtype=dtype)

    guidance_tensor = torch.as_tensor(guidance, dtype=dtype, device=device).reshape(-1)
    guidance_tensor = guidance_tensor.expand(batch).reshape(batch, 1, 1, 1)

    state = StepState(
        model=model,
        step=0,
        num_steps=len(noise_scheduler.timesteps),
        timestep=noise_scheduler.timesteps[0],
        latents=latents,
        cond=cond,
        uncond=uncond,
        guidance=guidance_tensor,
        original_cond=cond,
        original_uncond=uncond,
        records=[{} for _ in range(batch)],
    )

    for step, timestep in enumerate(noise_scheduler.timesteps):
        state.step, state.timestep = step, timestep

        # 2. Hooks may redirect the embeddings for this step.
        for hook in hooks:
            hook.before_denoise(state)

        # 3. One denoiser call for both halves of classifier-free guidance.
        model_input = torch.cat([state.latents, state.latents])
        model_input = noise_scheduler.scale_model_input(model_input, timestep)
        state.model_input = model_input[:batch]
        embeddings = torch.cat([state.uncond, state.cond])
        noise = model.predict_noise(model_input, timestep, embeddings)
        state.noise_uncond, state.noise_cond = noise.chunk(2)
        state.noise_pred = state.noise_uncond + state.guidance * (
            state.noise_cond - state.noise_uncond
        )

        # 4. Hooks may change the guided prediction.
        for hook in hooks:
            hook.guide(state)

        # 5. Scheduler step, then hooks see the new latent.
        if ancestral:
            # In float32, because the scheduler draws its noise in the dtype it is given,
            # and a float16 draw is another random stream than a float32 one.
            state.latents = noise_scheduler.step(
                state.noise_pred.float(), timestep, state.latents.float(), generator=generators
            ).prev_sample.to(dtype)
        else:
            state.latents = noise_scheduler.step(
                state.noise_pred, timestep, state.latents
            ).prev_sample
        for hook in hooks:
            hook.after_denoise(state)

    for hook in hooks:
        hook.finish(state)
    return SampleResult(latents=state.latents, records=state.records)
