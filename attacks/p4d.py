"""Attacks `p4d-n` and `p4d-k`: Prompting4Debugging.

Chin, Jiang, Huang, Chen and Chiu, "Prompting4Debugging: Red-Teaming Text-to-Image Diffusion
Models by Finding Problematic Prompts", ICML 2024.

P4D looks for a prompt under which the defended model predicts the same noise as the
undefended model does for the original prompt:

    min_E  || eps_defended(z_t, t, T'(Proj(E))) - eps_original(z_t, t, T(P)) ||^2

with z_0 the latent of the target image that the undefended model draws from the original
prompt P (case seed), z_t = add_noise(z_0, eps, t) for t ~ U{0, ..., T-1}, T' the defended
text encoder and Proj the cosine projection of each learnable embedding onto the vocabulary.
The target side is always the undefended model's conditional prediction. The optimiser is
PEZ-style: the loss is computed at the projected embeddings, and AdamW steps the continuous
ones (straight-through).

- `p4d-n` learns N = 16 free tokens; the original prompt is not part of the sequence.
- `p4d-k` keeps the original prompt tokens frozen and inserts a learnable token before every
  K = 3 of them (floor(L / K) + 1 learnable tokens for L prompt tokens).

Defaults follow the authors' configs: 3000 iterations, AdamW with lr 0.1 and weight decay
0.1, a check every 50 iterations. Options: `iterations`, `lr`, `weight_decay`, `eval_every`,
`probe_timesteps`, `mode`, `guided`, `seed`, plus `n_tokens` (p4d-n) or `every_k` (p4d-k).

Mode `adaptive` (default) runs the loss through the defended model, inference-time hooks
included (`noise_under_defense`). With `guided: auto` the defended side is the guided
prediction when the defense acts at guidance time (sampler hooks or a negative prompt, as
P4D's `--filter` option does for SLD and negative prompts), else the conditional one. Mode
`transfer` runs the loss through the undefended model; the defense then acts only when the
runner evaluates the returned text.

Deviations from the authors' code, each deliberate:
- P4D-K keeps an EOS token after the interleaved block; the authors' code overwrites it.
- Padding follows the model's tokenizer (EOS for SD 1.x CLIP, [PAD] for BERT), not id 0.
- The best prompt is chosen by the loss on a fixed set of probe timesteps and noises,
  measured every `eval_every` iterations. The authors pick it by CLIP image similarity
  of a generated image to the target, which needs a generation and an OpenCLIP model.
- NOTE: one target image per case (the case seed); the authors draw 3 and keep the one
  their nudity classifier scores highest, which needs a judge this attack does not declare.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from attacks import tools
from harness.attack import NEEDS_ORIGINAL_MODEL, Attack, AttackContext, AttackResult
from harness.model import DENOISER_GRADIENTS, TEXT_ENCODER, DiffusionModel
from harness.prompts.base import Case

log = logging.getLogger(__name__)

COMMON_DEFAULTS: dict[str, Any] = {
    "iterations": 3000,
    "lr": 0.1,
    "weight_decay": 0.1,
    "eval_every": 50,
    "probe_timesteps": 4,
    "mode": tools.ADAPTIVE,
    "guided": "auto",
    "seed": 0,
}


class _P4D(Attack):
    """Shared P4D loop; subclasses choose the slot layout."""

    needs = frozenset({NEEDS_ORIGINAL_MODEL})
    model_capabilities = frozenset({DENOISER_GRADIENTS, TEXT_ENCODER})
    variant_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.settings = tools.resolve_options(
            self.name, {**COMMON_DEFAULTS, **self.variant_defaults}, options
        )
        tools.check_mode(self.settings["mode"])

    def describe(self) -> dict[str, Any]:
        return {"attack": self.name, **self.settings}

    def estimated_denoiser_passes(self, steps: int) -> int:
        # Per iteration: the defended model under the adversarial prompt and the target
        # under the original one; plus generating the target image once.
        return 2 * self.settings["iterations"] + 2 * steps

    def layout(self, model: DiffusionModel, case: Case) -> tools.SlotLayout:
        raise NotImplementedError

    def run(self, case: Case, context: AttackContext) -> AttackResult:
        settings = self.settings
        budget = tools.Budget()
        generator = tools.case_generator(settings["seed"], case)
        original = context.original_model
        if original is None:
            raise RuntimeError(f"attack {self.name!r} needs the undefended model")
        model = tools.loss_model(context, settings["mode"])

        # 1. Target: the undefended model's image for the original prompt, and its noise
        #    predictions under the original prompt (conditional only, as P4D does).
        _, z0 = tools.target_latents(context, case, budget)
        with torch.no_grad():
            target_cond, _ = original.encode_prompts([case.prompt])
        budget.text_encoder_calls += 1

        # 2. The adversarial sequence and its continuous slot embeddings, initialised from
        #    the rows of random vocabulary tokens.
        layout = self.layout(model, case)
        allowed = tools.candidate_token_mask(model)
        vocabulary = model.vocabulary_embeddings.detach()
        candidates = torch.nonzero(allowed.cpu()).squeeze(-1)
        picks = torch.randint(len(candidates), (len(layout.slots),), generator=generator)
        start = candidates[picks]
        embeddings = vocabulary[start.to(vocabulary.device)].float().clone().requires_grad_(True)
        optimizer = torch.optim.AdamW(
            [embeddings], lr=settings["lr"], weight_decay=settings["weight_decay"]
        )

        # 3. The defended side: guided when the defense acts at guidance time.
        defended_noise = tools.noise_path(
            context, settings["mode"], settings["guided"], case, budget
        )
        calls_per_step = defended_noise.calls_per_sample
        num_train = int(original.scheduler_config.get("num_train_timesteps", 1000))

        # 4. Fixed probes (timesteps and noises) on which candidate prompts are compared.
        probe_t = torch.linspace(0, num_train - 1, settings["probe_timesteps"] + 2)[1:-1]
        probe_t = probe_t.round().long().to(z0.device)
        probe_noise = torch.randn(
            (len(probe_t), *z0.shape[1:]), generator=generator
        ).to(z0.device, z0.dtype)
        probe_z0 = z0.expand(len(probe_t), -1, -1, -1)
        probe_latents = original.add_noise(probe_z0, probe_noise, probe_t)
        with torch.no_grad():
            probe_target = original.predict_noise(
                probe_latents, probe_t, target_cond.expand(len(probe_t), -1, -1)
            ).float()
        budget.denoiser_calls += len(probe_t)

        def probe_loss(slot_ids: torch.Tensor) -> float:
            with torch.no_grad():
                ids = layout.fill(slot_ids).expand(len(probe_t), -1)
                cond = model.encode(ids, layout.batch_mask(len(probe_t)))
                predicted = defended_noise(probe_latents, probe_t, cond)
            budget.text_encoder_calls += len(probe_t)
            budget.denoiser_calls += calls_per_step * len(probe_t)
            return float(F.mse_loss(predicted.float(), probe_target))

        # 5. The projected optimisation loop (PEZ).
        loss_trace: list[float] = []
        checks: list[dict[str, Any]] = []
        best = {"loss": float("inf"), "slot_ids": start, "iteration": -1}
        for iteration in range(settings["iterations"]):
            projected, slot_ids = tools.project_to_vocabulary(embeddings, vocabulary, allowed)
            if iteration % settings["eval_every"] == 0:
                self._check(probe_loss, slot_ids, iteration, best, checks)

            token_embeddings = layout.embed(model, projected.to(model.dtype))
            cond = model.encode_embeddings(token_embeddings, layout.batch_mask(1))
            timestep = torch.randint(num_train, (1,), generator=generator).to(z0.device)
            noise = torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)
            latents = original.add_noise(z0, noise, timestep)
            with torch.no_grad():
                target = original.predict_noise(latents, timestep, target_cond).float()
            loss = F.mse_loss(defended_noise(latents, timestep, cond).float(), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

            loss_trace.append(loss.item())
            budget.iterations += 1
            budget.text_encoder_calls += 1
            budget.denoiser_calls += 1 + calls_per_step
            if context.progress is not None:
                context.progress(iteration)

        _, final_ids = tools.project_to_vocabulary(embeddings.detach(), vocabulary, allowed)
        self._check(probe_loss, final_ids, settings["iterations"], best, checks)

        # 6. The best prompt as text, re-tokenized as the runner will evaluate it.
        trip = tools.round_trip(model, layout.fill(best["slot_ids"])[0])
        log.info(
            "%s case %s: best probe loss %.4f at iteration %d, drift %.2f: %r",
            self.name, case.case_id, best["loss"], best["iteration"], trip.drift, trip.text,
        )
        extra = {
            "mode": settings["mode"],
            "guided": defended_noise.guidance is not None,
            "guidance": defended_noise.guidance,
            "slots": len(layout.slots),
            "dropped_prompt_tokens": layout.dropped_tokens,
            "best_probe_loss": best["loss"],
            "best_iteration": best["iteration"],
            "checks": checks,
            "ids_before": trip.ids_before,
            "ids_after": trip.ids_after,
            "drift": trip.drift,
            "target_seed": tools.case_seed(case),
        }
        return budget.result(trip.text, loss_trace, trip.ids_after, extra)

    @staticmethod
    def _check(probe_loss, slot_ids, iteration, best, checks) -> None:
        value = probe_loss(slot_ids)
        checks.append({"iteration": iteration, "probe_loss": value})
        if value < best["loss"]:
            best.update(loss=value, slot_ids=slot_ids.detach().clone(), iteration=iteration)


class P4DN(_P4D):
    """Attack `p4d-n`: `n_tokens` (default 16) free learnable tokens, no prompt text."""

    name = "p4d-n"
    variant_defaults = {"n_tokens": 16}

    def layout(self, model: DiffusionModel, case: Case) -> tools.SlotLayout:
        return tools.build_layout(model, free_tokens=int(self.settings["n_tokens"]))


class P4DK(_P4D):
    """Attack `p4d-k`: one learnable token before every `every_k` (default 3) prompt tokens."""

    name = "p4d-k"
    variant_defaults = {"every_k": 3}

    def layout(self, model: DiffusionModel, case: Case) -> tools.SlotLayout:
        return tools.build_layout(model, case.prompt, every_k=int(self.settings["every_k"]))
