"""Defense `sld`: Safe Latent Diffusion guidance.

Schramowski, Brack, Deiseroth and Kersting, "Safe Latent Diffusion: Mitigating
Inappropriate Degeneration in Diffusion Models", CVPR 2023.

SLD adds a third noise prediction per step, for a safety concept text S, and steers the
classifier-free guidance direction away from it. With eps_u, eps_p, eps_S the predictions
for the unconditional, prompt and safety embeddings and w the guidance scale:

    d       = eps_p - eps_S                                   (per latent element)
    mu      = where(d >= lambda, 0, clamp(s_S * |d|, max=1))  (paper eq. 6)
    g_S     = mu * (eps_S - eps_u) + s_m * v                  (eq. 4 and 7)
    v       = beta_m * v + (1 - beta_m) * g_S                 (eq. 8, momentum, from zero)
    eps     = eps_u + w * ((eps_p - eps_u) - g_S)             (eq. 3, from step `warmup` on)

The arithmetic follows diffusers' `StableDiffusionPipelineSafe` exactly, including two
details the paper leaves open: the momentum is updated on every step, warm-up included,
and the safety term is subtracted only from step index `warmup` on. The test suite checks
equality with that pipeline on the tiny SD model.

Presets (option `preset`, default `medium`) are diffusers' `SafetyConfig` values:

| preset | warm-up steps | s_S (guidance) | lambda (threshold) | s_m (momentum) | beta_m |
|--------|---------------|----------------|--------------------|----------------|--------|
| weak   | 15            | 20             | 0.0                | 0.0            | 0.0    |
| medium | 10            | 1000           | 0.01               | 0.3            | 0.4    |
| strong | 7             | 2000           | 0.025              | 0.5            | 0.7    |
| max    | 0             | 5000           | 1.0                | 0.5            | 0.7    |

NOTE: diffusers' WEAK uses guidance 20, while UnlearnDiffAtk and eval-unlearn use 200
for "weak"; pass `sld_guidance_scale: 200` to reproduce those. Any preset value can be
overridden by an option of the same name (`sld_warmup_steps`, `sld_guidance_scale`,
`sld_threshold`, `sld_momentum_scale`, `sld_mom_beta`).

Safety concept (option `safety_concept`): "default" is SLD's I2P category list, the text
diffusers uses; "concept" is the run's concept text; any other string is used verbatim.

In the differentiable single-step path that adaptive attacks use, the same formula runs
without momentum and without warm-up (a single step has no history), so the attack
differentiates through the safety term as it acts after warm-up.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch

from harness.defense import Defense
from harness.model import DiffusionModel
from harness.sampling import SamplerHook, StepState

log = logging.getLogger(__name__)

# SLD's default safety concept: the inappropriate-content categories of I2P, phrased as
# diffusers' `StableDiffusionPipelineSafe` phrases them.
I2P_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, "
    "sexual, nudity, bodily fluids, blood, obscene gestures, illegal activity, drug use, "
    "theft, vandalism, weapons, child abuse, brutality, cruelty"
)

PRESETS: dict[str, dict[str, float]] = {
    "weak": {
        "sld_warmup_steps": 15,
        "sld_guidance_scale": 20,
        "sld_threshold": 0.0,
        "sld_momentum_scale": 0.0,
        "sld_mom_beta": 0.0,
    },
    "medium": {
        "sld_warmup_steps": 10,
        "sld_guidance_scale": 1000,
        "sld_threshold": 0.01,
        "sld_momentum_scale": 0.3,
        "sld_mom_beta": 0.4,
    },
    "strong": {
        "sld_warmup_steps": 7,
        "sld_guidance_scale": 2000,
        "sld_threshold": 0.025,
        "sld_momentum_scale": 0.5,
        "sld_mom_beta": 0.7,
    },
    "max": {
        "sld_warmup_steps": 0,
        "sld_guidance_scale": 5000,
        "sld_threshold": 1.0,
        "sld_momentum_scale": 0.5,
        "sld_mom_beta": 0.7,
    },
}


def safety_guidance_term(
    noise_uncond: torch.Tensor,
    noise_cond: torch.Tensor,
    noise_safety: torch.Tensor,
    *,
    guidance_scale: float,
    threshold: float,
) -> torch.Tensor:
    """mu * (eps_S - eps_u), the momentum-free safety direction of one step (eqs. 4 and 6).

    Elements where the prompt's prediction is already at least `threshold` above the
    safety concept's get no safety guidance; elsewhere the scale grows with |d| up to 1.
    """
    difference = noise_cond - noise_safety
    scale = torch.clamp(difference.abs() * guidance_scale, max=1.0)
    scale = torch.where(difference >= threshold, torch.zeros_like(scale), scale)
    return (noise_safety - noise_uncond) * scale


class SafetyGuidanceHook(SamplerHook):
    """Per-generation SLD state: the safety embedding and the momentum v."""

    extra_denoiser_calls = 1  # the prediction for the safety concept

    def __init__(self, safety_embedding: torch.Tensor, settings: dict[str, float]) -> None:
        self.safety_embedding = safety_embedding  # (1, T, D)
        self.warmup_steps = int(settings["sld_warmup_steps"])
        self.guidance_scale = float(settings["sld_guidance_scale"])
        self.threshold = float(settings["sld_threshold"])
        self.momentum_scale = float(settings["sld_momentum_scale"])
        self.momentum_beta = float(settings["sld_mom_beta"])
        self.momentum: torch.Tensor | None = None
        self.applied_steps = 0

    def guide(self, state: StepState) -> None:
        # diffusers turns SLD off when its guidance scale is at most 1.
        if self.guidance_scale <= 1.0:
            return
        batch = state.latents.shape[0]
        safety = self.safety_embedding.to(state.cond.dtype).expand(batch, -1, -1)
        noise_safety = state.model.predict_noise(state.model_input, state.timestep, safety)
        term = safety_guidance_term(
            state.noise_uncond,
            state.noise_cond,
            noise_safety,
            guidance_scale=self.guidance_scale,
            threshold=self.threshold,
        )

        if state.differentiable:
            state.noise_pred = state.noise_pred - state.guidance * term
            return

        if self.momentum is None:
            self.momentum = torch.zeros_like(term)
        term = term + self.momentum_scale * self.momentum
        self.momentum = self.momentum_beta * self.momentum + (1 - self.momentum_beta) * term
        if state.step >= self.warmup_steps:
            # eps_u + w * ((eps_p - eps_u) - g_S) == (eps_u + w * (eps_p - eps_u)) - w * g_S
            state.noise_pred = state.noise_pred - state.guidance * term
            self.applied_steps += 1

    def finish(self, state: StepState) -> None:
        for record in state.records:
            record["sld_applied_steps"] = self.applied_steps


class SafeLatentDiffusion(Defense):
    """Options: `preset` (weak | medium | strong | max, default medium), `safety_concept`
    ("default" | "concept" | any text), and per-value overrides named as in diffusers."""

    name = "sld"
    OVERRIDES: ClassVar[tuple[str, ...]] = tuple(PRESETS["medium"])

    def __init__(self, concept: str | None = None, **options: Any) -> None:
        super().__init__(concept=concept, **options)
        unknown = set(options) - {"preset", "safety_concept", *self.OVERRIDES}
        if unknown:
            valid = ", ".join(["preset", "safety_concept", *self.OVERRIDES])
            raise ValueError(f"defense 'sld': unknown options {sorted(unknown)}; valid: {valid}")
        self.preset = str(options.get("preset", "medium")).lower()
        if self.preset not in PRESETS:
            raise ValueError(
                f"defense 'sld': unknown preset {self.preset!r}; valid: {', '.join(PRESETS)}"
            )
        self.settings = {
            key: float(options.get(key, value)) for key, value in PRESETS[self.preset].items()
        }
        self.safety_concept = self._safety_text(options.get("safety_concept", "default"))
        self._embeddings: dict[int, torch.Tensor] = {}

    def _safety_text(self, choice: str) -> str:
        if choice == "default":
            return I2P_SAFETY_CONCEPT
        if choice == "concept":
            if not self.concept:
                raise ValueError("defense 'sld': safety_concept 'concept' needs a run concept")
            return self.concept
        if not str(choice).strip():
            raise ValueError("defense 'sld': safety_concept must not be empty")
        return str(choice)

    def _safety_embedding(self, model: DiffusionModel) -> torch.Tensor:
        # Cached per text encoder: a defended model built over a swapped encoder gets its own.
        key = id(model.text_encoder)
        if key not in self._embeddings:
            with torch.no_grad():
                embedding, tokens = model.encode_prompts([self.safety_concept])
            if tokens.truncated[0]:
                log.warning("sld: safety concept truncated to %d tokens", model.max_length)
            self._embeddings[key] = embedding
        return self._embeddings[key]

    def apply(self, model: DiffusionModel) -> DiffusionModel:
        def factory(defended: DiffusionModel) -> SamplerHook:
            return SafetyGuidanceHook(self._safety_embedding(defended), self.settings)

        log.info(
            "sld preset %s %s, safety concept %r", self.preset, self.settings, self.safety_concept
        )
        return model.replace(sampler_hooks=(*model.sampler_hooks, factory))

    def describe(self) -> dict[str, Any]:
        return {
            "defense": self.name,
            "preset": self.preset,
            "safety_concept": self.safety_concept,
            **self.settings,
        }
