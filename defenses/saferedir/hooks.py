"""SafeRedir's inference rule as a sampler hook: classify, redirect, cool down.

The released code (SafeRedir, Liu et al., arXiv 2601.08623) runs batch size 1 and patches
a diffusers pipeline. Here the same rule runs in the harness's sampling loop, vectorised
with one decision per image. Per image the hook keeps a cooldown counter. After each
denoiser call at step k, the check reads the latent x_t that the denoiser just read:

1. if its counter is above 0, the counter drops by 1 and nothing else happens;
2. otherwise the redirector classifies (x_t, t, E~), where E~ is the current, possibly
   already redirected, conditional embedding;
3. if unsafe: for each token i and each half r of the guidance pair (conditional, and by
   default unconditional too), Delta_{r,i} = s * alpha_i * ||E_{r,i}|| * delta_i / ||delta_i||
   with E the original embeddings. E~ becomes E + Delta from step k + 1 on (never
   cumulative), and the counter is set to `cooldown`;
4. if safe: nothing changes. Redirection is sticky: a later safe verdict keeps E~.

Because each delta row is normalised, the gate and mask cancel: only alpha, the token norm
and the shared direction act, unless `mask_in_final` multiplies the mask back in. Without
`mask_in_final` the hook therefore asks the redirector to skip its mask predictor, which
changes no output and no gradient. The parts of a check that read only the prompt (the
attention's keys and values, the token mean and alpha) are computed once per image and
again only when its checked embedding E~ has changed, for example after a redirection.

In `state.differentiable` mode (the one-step path adaptive attacks optimise through) the
hard decision and the cooldown have no gradient, so the hook uses a surrogate: the
conditioning is E + p_unsafe * Delta, with p_unsafe the classifier's softmax probability
("soft"), or the hard 0/1 decision forward with the soft gradient backward
("straight-through").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from defenses.saferedir.networks import UNSAFE, PromptFeatures, RedirectorOutput
from harness.sampling import SamplerHook, StepState

RECORD_PREFIX = "saferedir_"


@dataclass(frozen=True)
class RedirectionOptions:
    """Switches of the inference rule. The defaults are the released behaviour.

    - `alpha_scale` s (1.5 is the released command-line default; the demo uses 1.25);
    - `cooldown`: steps skipped after a positive check (the release's `replace_step`, 2);
    - `apply_to_uncond`: Delta also moves the unconditional half (released: yes);
    - `sticky`: a safe verdict keeps an earlier redirection (released: yes); with False it
      restores the original embeddings;
    - `classifier_sees_redirected`: the classifier reads E~ (released) or the original E;
    - `mask_in_final`: multiply the predicted mask into Delta (released: no);
    - `check_timing`: "after" the denoiser call (released, so step 0 always runs on the
      original embedding) or "before" it (the first denoiser call can be redirected);
    - `differentiable_estimator`: "soft" or "straight-through", for `state.differentiable`.
    """

    alpha_scale: float = 1.5
    cooldown: int = 2
    apply_to_uncond: bool = True
    sticky: bool = True
    classifier_sees_redirected: bool = True
    mask_in_final: bool = False
    check_timing: Literal["after", "before"] = "after"
    differentiable_estimator: Literal["soft", "straight-through"] = "soft"

    def __post_init__(self) -> None:
        if self.cooldown < 0:
            raise ValueError(f"saferedir option cooldown must be >= 0, got {self.cooldown}")
        if self.check_timing not in ("after", "before"):
            raise ValueError(
                f"saferedir option check_timing must be 'after' or 'before', got "
                f"{self.check_timing!r}"
            )
        if self.differentiable_estimator not in ("soft", "straight-through"):
            raise ValueError(
                "saferedir option differentiable_estimator must be 'soft' or "
                f"'straight-through', got {self.differentiable_estimator!r}"
            )

    def to_json(self) -> dict:
        return asdict(self)


class RedirectorLike(Protocol):
    """The network interface the hook needs; `Redirector` and test doubles implement it."""

    def __call__(
        self, latents: torch.Tensor, prompt: torch.Tensor, timesteps: torch.Tensor,
        with_mask: bool = True, features: PromptFeatures | None = None,
        unsafe_only: bool = False,
    ) -> RedirectorOutput: ...

    def prompt_features(self, prompt: torch.Tensor) -> PromptFeatures: ...


def redirection_delta(
    output: RedirectorOutput, original: torch.Tensor, options: RedirectionOptions
) -> torch.Tensor:
    """Delta_i = s * alpha_i * ||E_i|| * delta_i / ||delta_i|| (times m_i with `mask_in_final`).

    `original` (B, T, D) is the embedding Delta is added to; its token norms set the
    per-token length. Returns a tensor of the dtype of `original`.
    """
    direction = F.normalize(output.delta.float(), dim=-1)
    strength = output.alpha.float() * original.float().norm(dim=-1, keepdim=True)
    if options.mask_in_final:
        strength = strength * output.mask.float().unsqueeze(-1)
    return (options.alpha_scale * strength * direction).to(original.dtype)


class SafeRedirHook(SamplerHook):
    """Per-generation state of the redirection: cooldowns, decisions and records.

    Built fresh for every generation by the factory that `SafeRedir.apply` adds to the
    model, so no state carries from one batch to the next.
    """

    def __init__(self, redirector: RedirectorLike, options: RedirectionOptions) -> None:
        self.redirector = redirector
        self.options = options
        self.countdown: torch.Tensor | None = None
        self.fired_steps: list[list[int]] = []
        self.checks: list[int] = []
        # The prompt features of every image and the embedding they were computed from.
        self.features: PromptFeatures | None = None
        self.featured_prompt: torch.Tensor | None = None

    # -- sampler hook points -----------------------------------------------------------

    def before_denoise(self, state: StepState) -> None:
        if state.differentiable:
            self._redirect_softly(state)
        elif self.options.check_timing == "before":
            self._check(state)

    def guide(self, state: StepState) -> None:
        # `guide` runs after the denoiser call and before the scheduler step, so
        # `state.latents` is still the x_t the denoiser saw, as in the released check.
        if not state.differentiable and self.options.check_timing == "after":
            self._check(state)

    def finish(self, state: StepState) -> None:
        if self.countdown is None:  # no step ran
            self._start(state.latents.shape[0], state.latents.device)
        for index, record in enumerate(state.records):
            steps = self.fired_steps[index]
            record[f"{RECORD_PREFIX}fired"] = bool(steps)
            record[f"{RECORD_PREFIX}first_step"] = steps[0] if steps else None
            record[f"{RECORD_PREFIX}fired_steps"] = list(steps)
            record[f"{RECORD_PREFIX}checks"] = self.checks[index]

    # -- the released rule, one decision per image -------------------------------------

    def _start(self, batch: int, device: torch.device) -> None:
        self.countdown = torch.zeros(batch, dtype=torch.long, device=device)
        self.fired_steps = [[] for _ in range(batch)]
        self.checks = [0] * batch

    def _check(self, state: StepState) -> None:
        batch = state.latents.shape[0]
        if self.countdown is None:
            self._start(batch, state.latents.device)
        due = self.countdown == 0
        self.countdown = torch.where(due, self.countdown, self.countdown - 1)
        rows = due.nonzero().flatten()
        if rows.numel() == 0:
            return

        seen = state.cond if self.options.classifier_sees_redirected else state.original_cond
        output = self._classify(
            state.latents[rows], seen[rows], state.timestep, self._features(seen, rows)
        )
        unsafe = output.logits.argmax(dim=-1) == UNSAFE
        for row in rows.tolist():
            self.checks[row] += 1

        cond, uncond = state.cond.clone(), state.uncond.clone()
        fire = rows[unsafe]
        if fire.numel():
            fired_output = output.select(unsafe)
            cond[fire] = state.original_cond[fire] + redirection_delta(
                fired_output, state.original_cond[fire], self.options
            )
            if self.options.apply_to_uncond:
                uncond[fire] = state.original_uncond[fire] + redirection_delta(
                    fired_output, state.original_uncond[fire], self.options
                )
            self.countdown[fire] = self.options.cooldown
            for row in fire.tolist():
                self.fired_steps[row].append(state.step)

        clear = rows[~unsafe]
        if not self.options.sticky and clear.numel():
            cond[clear] = state.original_cond[clear]
            uncond[clear] = state.original_uncond[clear]
        state.cond, state.uncond = cond, uncond

    def _features(self, seen: torch.Tensor, rows: torch.Tensor) -> PromptFeatures:
        """Return the prompt features of `rows`, recomputed only where `seen` has changed."""
        seen = seen.detach().float()
        with torch.no_grad():
            if self.features is None:
                self.features = self.redirector.prompt_features(seen)
                self.featured_prompt = seen.clone()
                return self.features.select(rows)

            changed = rows[(self.featured_prompt[rows] != seen[rows]).flatten(1).any(dim=1)]
            if changed.numel():
                self.features.replace_rows(changed, self.redirector.prompt_features(seen[changed]))
                self.featured_prompt[changed] = seen[changed]
        return self.features.select(rows)

    def _classify(
        self, latents: torch.Tensor, prompt: torch.Tensor, timestep: torch.Tensor,
        features: PromptFeatures,
    ) -> RedirectorOutput:
        timesteps = torch.as_tensor(timestep, device=latents.device).float().reshape(-1)
        # At batch 1 PyTorch's reference convolution kernel ran the latent encoder about
        # four times faster on channels-last input (profiled on a 2-core AMD EPYC machine).
        # There it lowered the median defended/undefended time per image from 1.097 to 1.073.
        latents = latents.float().contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return self.redirector(
                latents, prompt.float(), timesteps.expand(latents.shape[0]),
                with_mask=self.options.mask_in_final, features=features, unsafe_only=True,
            )

    # -- the differentiable surrogate --------------------------------------------------

    def _redirect_softly(self, state: StepState) -> None:
        """cond = E + w * Delta with w = p_unsafe (soft) or its straight-through hard twin."""
        batch = state.latents.shape[0]
        timesteps = torch.as_tensor(state.timestep, device=state.latents.device).float()
        output = self.redirector(
            state.latents.float(), state.cond.float(), timesteps.reshape(-1).expand(batch),
            with_mask=self.options.mask_in_final,
        )
        p_unsafe = torch.softmax(output.logits.float(), dim=-1)[:, UNSAFE]
        weight = p_unsafe
        if self.options.differentiable_estimator == "straight-through":
            weight = (p_unsafe > 0.5).float() + p_unsafe - p_unsafe.detach()
        weight = weight.reshape(-1, 1, 1)

        delta_cond = redirection_delta(output, state.original_cond, self.options)
        state.cond = state.original_cond + (weight * delta_cond).to(state.cond.dtype)
        if self.options.apply_to_uncond:
            delta_uncond = redirection_delta(output, state.original_uncond, self.options)
            state.uncond = state.original_uncond + (weight * delta_uncond).to(state.uncond.dtype)
