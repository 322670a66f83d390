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
- The initial tokens and the projection use the tokenizer's candidate ids (see
  `attacks.tools.candidate_token_mask`), not the whole vocabulary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from attacks import tools
from harness.attack import NEEDS_ORIGINAL_MODEL, Attack, AttackContext, AttackResult
from harness.model import DENOISER_GRADIENTS, TEXT_ENCODER, DiffusionModel
from harness.prompts.base import Case

log = logging.getLogger(__name__)

# The target noise (no gradient) of this many iterations is computed in one denoiser pass:
# the draws are the same as one iteration at a time, and large batches use the device better.
TARGET_CHUNK = 16

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

    def depends_on_defense(self) -> bool:
        # Transfer mode optimises and selects on the undefended model only.
        return self.settings["mode"] != tools.TRANSFER

    def describe(self) -> dict[str, Any]:
        return {"attack": self.name, **self.settings}

    def estimated_denoiser_passes(self, steps: int) -> int:
        # Per iteration: the defended model under the adversarial prompt and the target
        # under the original one; plus generating the target image once.
        return 2 * self.settings["iterations"] + 2 * steps

    def layout(self, model: DiffusionModel, case: Case) -> tools.SlotLayout:
        raise NotImplementedError

    def run(self, case: Case, context: AttackContext) -> AttackResult:
        return self.run_batch([case], context)[0]

    def run_batch(self, cases: Sequence[Case], context: AttackContext) -> list[AttackResult]:
        """Optimise the cases together: one text-encoder and denoiser pass per iteration.

        Case i keeps its own learnable tokens, random generator, loss, best prompt and
        budget, so its result equals the one `run` returns for it alone up to float
        rounding: the loss of the batch is the sum of the per-case losses, whose gradients
        reach only their own case's tokens, and AdamW updates every element independently.
        Wall time is split evenly between the cases.
        """
        cases = list(cases)
        if not cases:
            return []
        began = time.perf_counter()
        settings = self.settings
        original = context.original_model
        if original is None:
            raise RuntimeError(f"attack {self.name!r} needs the undefended model")
        model = tools.loss_model(context, settings["mode"])
        count = len(cases)
        budgets = [tools.Budget() for _ in cases]
        generators = [tools.case_generator(settings["seed"], case) for case in cases]

        # 1. Targets: the undefended model's image for each original prompt, and its noise
        #    predictions under the original prompt (conditional only, as P4D does).
        z0 = tools.target_latents_batch(context, cases, budgets)
        with torch.no_grad():
            target_cond, _ = original.encode_prompts([case.prompt for case in cases])
        for budget in budgets:
            budget.text_encoder_calls += 1

        # 2. Each case's adversarial sequence and continuous slot embeddings, initialised
        #    from the rows of random vocabulary tokens. Cases may differ in slot count (P4D-K).
        layouts = [self.layout(model, case) for case in cases]
        sizes = [len(layout.slots) for layout in layouts]
        mask = torch.stack([layout.attention_mask for layout in layouts])
        allowed = tools.candidate_token_mask(model)
        vocabulary = model.vocabulary_embeddings.detach()
        candidates = torch.nonzero(allowed.cpu()).squeeze(-1)
        starts = [
            candidates[torch.randint(len(candidates), (size,), generator=generator)]
            for size, generator in zip(sizes, generators, strict=True)
        ]
        embeddings = [
            vocabulary[start.to(vocabulary.device)].float().clone().requires_grad_(True)
            for start in starts
        ]
        optimizer = torch.optim.AdamW(
            embeddings, lr=settings["lr"], weight_decay=settings["weight_decay"]
        )

        # 3. The defended side: guided when the defense acts at guidance time.
        defended_noise = tools.noise_path(
            context, settings["mode"], settings["guided"], cases, budgets
        )
        calls_per_step = defended_noise.calls_per_sample
        num_train = int(original.scheduler_config.get("num_train_timesteps", 1000))

        # 4. Fixed probes (timesteps and noises, per case) on which candidate prompts are
        #    compared; rows are case-major.
        probes = settings["probe_timesteps"]
        probe_t = torch.linspace(0, num_train - 1, probes + 2)[1:-1]
        probe_t = probe_t.round().long().to(z0.device).repeat(count)
        probe_case = torch.arange(count).repeat_interleave(probes)
        probe_noise = torch.cat([
            torch.randn((probes, *z0.shape[1:]), generator=generator)
            for generator in generators
        ]).to(z0.device, z0.dtype)
        probe_latents = original.add_noise(z0[probe_case], probe_noise, probe_t)
        with torch.no_grad():
            probe_target = original.predict_noise(
                probe_latents, probe_t, target_cond[probe_case]
            ).float()
        for budget in budgets:
            budget.denoiser_calls += probes

        def probe_losses(slot_ids: list[torch.Tensor]) -> list[float]:
            ids = torch.cat([layout.fill(ids) for layout, ids in zip(layouts, slot_ids,
                                                                      strict=True)])
            with torch.no_grad():
                cond = model.encode(ids, mask)
                predicted = defended_noise(probe_latents, probe_t, cond[probe_case], probe_case)
            for budget in budgets:
                budget.text_encoder_calls += 1
                budget.denoiser_calls += calls_per_step * probes
            errors = (predicted.float() - probe_target) ** 2
            return errors.reshape(count, -1).mean(dim=1).tolist()

        # 5. The projected optimisation loop (PEZ), all cases in one pass per iteration.
        vocabulary_index = tools.VocabularyIndex.build(vocabulary, allowed)
        loss_traces: list[list[float]] = [[] for _ in cases]
        checks: list[list[dict[str, Any]]] = [[] for _ in cases]
        bests = [{"loss": float("inf"), "slot_ids": start, "iteration": -1} for start in starts]
        iterations = settings["iterations"]
        for iteration in range(iterations):
            if iteration % TARGET_CHUNK == 0:
                chunk = self._draw_targets(
                    original, z0, target_cond, generators, num_train,
                    min(TARGET_CHUNK, iterations - iteration),
                )
            rows = slice((iteration % TARGET_CHUNK) * count, (iteration % TARGET_CHUNK + 1) * count)
            timesteps, latents, target = (part[rows] for part in chunk)

            projected, slot_ids = tools.project_to_vocabulary(
                torch.cat(embeddings), vocabulary, index=vocabulary_index
            )
            if iteration % settings["eval_every"] == 0:
                self._check(probe_losses, slot_ids.split(sizes), iteration, bests, checks)

            token_embeddings = torch.cat([
                layout.embed(model, part.to(model.dtype))
                for layout, part in zip(layouts, projected.split(sizes), strict=True)
            ])
            cond = model.encode_embeddings(token_embeddings, mask)
            errors = (defended_noise(latents, timesteps, cond).float() - target) ** 2
            losses = errors.flatten(1).mean(dim=1)
            optimizer.zero_grad()
            losses.sum().backward()
            optimizer.step()

            for trace, budget, value in zip(loss_traces, budgets, losses.tolist(), strict=True):
                trace.append(value)
                budget.iterations += 1
                budget.text_encoder_calls += 1
                budget.denoiser_calls += 1 + calls_per_step
            if context.progress is not None:
                context.progress(iteration)

        _, final_ids = tools.project_to_vocabulary(
            torch.cat([e.detach() for e in embeddings]), vocabulary, index=vocabulary_index
        )
        self._check(probe_losses, final_ids.split(sizes), iterations, bests, checks)

        # 6. Each case's best prompt as text, re-tokenized as the runner will evaluate it.
        wall_seconds = (time.perf_counter() - began) / count
        results = []
        for index, case in enumerate(cases):
            best, layout = bests[index], layouts[index]
            trip = tools.round_trip(model, layout.fill(best["slot_ids"])[0])
            log.info(
                "%s case %s: best probe loss %.4f at iteration %d, drift %.2f: %r",
                self.name, case.case_id, best["loss"], best["iteration"], trip.drift,
                trip.text,
            )
            extra = {
                "mode": settings["mode"],
                "guided": defended_noise.guidance is not None,
                "guidance": defended_noise.case_guidance(index),
                "slots": sizes[index],
                "dropped_prompt_tokens": layout.dropped_tokens,
                "best_probe_loss": best["loss"],
                "best_iteration": best["iteration"],
                "checks": checks[index],
                "ids_before": trip.ids_before,
                "ids_after": trip.ids_after,
                "drift": trip.drift,
                "target_seed": tools.case_seed(case),
                "batch_size": count,
            }
            results.append(budgets[index].result(
                trip.text, loss_traces[index], trip.ids_after, extra, wall_seconds
            ))
        return results

    @staticmethod
    def _draw_targets(
        original: DiffusionModel, z0: torch.Tensor, target_cond: torch.Tensor,
        generators: list[torch.Generator], num_train: int, iterations: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Timesteps, noisy latents and target noise for the next `iterations` iterations.

        Rows are iteration-major, then case. Each case draws its timestep, then its noise,
        from its own generator in iteration order, exactly as one iteration at a time would;
        the targets (no gradient) then take one denoiser pass for the whole chunk.
        """
        count = len(generators)
        timesteps, noises = [], []
        for _ in range(iterations):
            for generator in generators:
                timesteps.append(torch.randint(num_train, (1,), generator=generator))
                noises.append(torch.randn((1, *z0.shape[1:]), generator=generator))
        timesteps = torch.cat(timesteps).to(z0.device)
        noise = torch.cat(noises).to(z0.device, z0.dtype)
        cases = torch.arange(count).repeat(iterations)
        latents = original.add_noise(z0[cases], noise, timesteps)
        with torch.no_grad():
            target = original.predict_noise(latents, timesteps, target_cond[cases]).float()
        return timesteps, latents, target

    @staticmethod
    def _check(probe_losses, slot_ids, iteration, bests, checks) -> None:
        values = probe_losses(list(slot_ids))
        for index, value in enumerate(values):
            checks[index].append({"iteration": iteration, "probe_loss": value})
            if value < bests[index]["loss"]:
                bests[index].update(
                    loss=value, slot_ids=slot_ids[index].detach().clone(), iteration=iteration
                )


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
