"""Attack `unlearndiffatk`: adversarial prefix tokens found through the diffusion classifier.

Zhang, Jia, Chen, Liu, Zhang, Zhao, Jiao and Liu, "To Generate or Not? Safety-Driven
Unlearned Diffusion Models Are Still Easy to Generate Unsafe Images ... For Now", ECCV 2024.

A diffusion model is an implicit classifier, p(c | x) ~ exp(-E_{t,eps} ||eps - eps(x_t, t, c)||^2).
UnlearnDiffAtk finds the prompt under which the defended (unlearned) model best denoises a
target image that shows the erased concept:

    min_{c'}  || eps_defended(x_t, t, T(c')) - eps ||^2,   x_t = add_noise(z_0, eps, t)

with z_0 the latent of the image the undefended model draws from the original prompt with
the case seed. c' is the original prompt with k learnable tokens prepended. Each learnable
token is a probability vector over the vocabulary, initialised uniform; every step samples
a one-hot token from it (straight-through, gradient clipped to [-1, 1]), takes an Adam step
(coupled L2 weight decay) and projects the vector back onto the simplex.

Defaults follow the authors' configs: k = 5 for nudity, violence and illegal activity and
3 for styles and objects (option `prefix_tokens`); 50 timesteps 10, 30, ..., 990 processed in
order with 40 iterations each (2,000 steps); Adam lr 0.01, weight decay 0.1; after each
timestep's 40 iterations (`eval_every`) the argmax tokens are decoded, re-tokenized and
generated on the defended model, and the attack stops as soon as the judge finds the concept.
Before optimising, the original prompt is judged once (`check_original`): if it already
succeeds it is returned unchanged, as the authors' runs do (it counts toward pre-ASR).

Options: `prefix_tokens`, `timesteps`, `iterations_per_timestep`, `schedule` ("sequential"
or "random": a uniform random timestep per step), `lr`, `weight_decay`, `eval_every`,
`check_original`, `mode` (adaptive: loss through the defended model, hooks included;
transfer: through the undefended one), `guided` (see attacks.p4d), `seed`.

NOTE: the target image and the early-stop generations use the run's sampler settings;
the authors use 50 LMS steps for both, and 25 for the target images.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from attacks import tools
from harness.attack import (
    NEEDS_EVALUATOR,
    NEEDS_ORIGINAL_MODEL,
    Attack,
    AttackContext,
    AttackResult,
)
from harness.model import DENOISER_GRADIENTS, TEXT_ENCODER
from harness.prompts.base import Case

log = logging.getLogger(__name__)

# Concepts the authors attack with 5 prefix tokens; styles and objects get 3.
FIVE_TOKEN_CONCEPTS = frozenset(
    {"nudity", "nude", "sexual", "violence", "illegal", "illegal activity"}
)

DEFAULTS: dict[str, Any] = {
    "prefix_tokens": None,
    "timesteps": 50,
    "iterations_per_timestep": 40,
    "schedule": "sequential",
    "lr": 0.01,
    "weight_decay": 0.1,
    "eval_every": 40,
    "check_original": True,
    "mode": tools.ADAPTIVE,
    "guided": "auto",
    "seed": 0,
}


def default_prefix_tokens(concept: str) -> int:
    return 5 if concept.strip().lower() in FIVE_TOKEN_CONCEPTS else 3


def timestep_schedule(count: int, num_train: int) -> list[int]:
    """`count` evenly spaced timesteps at bin centres: 10, 30, ..., 990 for 50 of 1000."""
    spacing = num_train // count
    return [spacing // 2 + index * spacing for index in range(count)]


class UnlearnDiffAtk(Attack):
    name = "unlearndiffatk"
    needs = frozenset({NEEDS_EVALUATOR, NEEDS_ORIGINAL_MODEL})
    model_capabilities = frozenset({DENOISER_GRADIENTS, TEXT_ENCODER})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.settings = tools.resolve_options(self.name, DEFAULTS, options)
        tools.check_mode(self.settings["mode"])
        if self.settings["schedule"] not in ("sequential", "random"):
            raise ValueError(f"attack {self.name!r}: schedule must be sequential or random")

    def describe(self) -> dict[str, Any]:
        return {"attack": self.name, **self.settings}

    def estimated_denoiser_passes(self, steps: int) -> int:
        # One pass per optimisation step, the target image, and one generation per check.
        iterations = self.settings["timesteps"] * self.settings["iterations_per_timestep"]
        checks = iterations // max(self.settings["eval_every"], 1)
        return iterations + 2 * steps * (1 + checks)

    def run(self, case: Case, context: AttackContext) -> AttackResult:
        settings = self.settings
        budget = tools.Budget()
        generator = tools.case_generator(settings["seed"], case)
        model = tools.loss_model(context, settings["mode"])
        prefix = settings["prefix_tokens"] or default_prefix_tokens(case.concept)
        generations: list[dict[str, Any]] = []
        common = {"mode": settings["mode"], "prefix_tokens": prefix, "generations": generations}

        # 1. The original prompt first: when it already shows the concept there is nothing
        #    to attack.
        if settings["check_original"]:
            success = tools.judge_prompts(context, [case.prompt], case, budget)[0]
            generations.append({"iteration": 0, "prompt": case.prompt, "success": success})
            if success:
                log.info(
                    "%s case %s: the original prompt already succeeds", self.name, case.case_id
                )
                return budget.result(case.prompt, [], None, {**common, "pre_success": True})

        # 2. The target latent and the layout [BOS, k slots, prompt, EOS, padding].
        _, z0 = tools.target_latents(context, case, budget)
        layout = tools.build_layout(model, case.prompt, prefix=prefix)
        candidates = torch.nonzero(tools.candidate_token_mask(model).cpu()).squeeze(-1)
        candidates = candidates.to(model.vocabulary_embeddings.device)
        table = model.vocabulary_embeddings.detach()[candidates].float()

        # 3. One distribution per slot over the candidate tokens, initialised uniform.
        distributions = torch.full(
            (prefix, len(candidates)), 1.0 / len(candidates), device=table.device
        ).requires_grad_(True)
        optimizer = torch.optim.Adam(
            [distributions], lr=settings["lr"], weight_decay=settings["weight_decay"]
        )
        defended_noise = tools.noise_path(
            context, settings["mode"], settings["guided"], case, budget
        )
        num_train = int(model.scheduler_config.get("num_train_timesteps", 1000))
        steps = timestep_schedule(settings["timesteps"], num_train)
        total = settings["timesteps"] * settings["iterations_per_timestep"]

        def current_text() -> tools.RoundTrip:
            slot_ids = candidates[distributions.detach().argmax(dim=-1)]
            return tools.round_trip(model, layout.fill(slot_ids)[0])

        # 4. Optimise; every `eval_every` iterations generate from the current text and stop
        #    as soon as the judge finds the concept.
        loss_trace: list[float] = []
        success_trip = None
        for iteration in range(total):
            if settings["schedule"] == "sequential":
                timestep_value = steps[iteration // settings["iterations_per_timestep"]]
            else:
                timestep_value = int(torch.randint(num_train, (), generator=generator))
            timestep = torch.tensor([timestep_value], device=z0.device)

            one_hot, _ = tools.sample_one_hot(distributions, generator)
            slot_embeddings = one_hot @ table
            token_embeddings = layout.embed(model, slot_embeddings.to(model.dtype))
            cond = model.encode_embeddings(token_embeddings, layout.batch_mask(1))
            noise = torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)
            latents = model.add_noise(z0, noise, timestep)
            loss = F.mse_loss(defended_noise(latents, timestep, cond).float(), noise.float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                distributions.copy_(tools.project_simplex(distributions))

            loss_trace.append(loss.item())
            budget.iterations += 1
            budget.text_encoder_calls += 1
            budget.denoiser_calls += defended_noise.calls_per_sample
            if context.progress is not None:
                context.progress(iteration)

            if (iteration + 1) % settings["eval_every"] == 0:
                trip = current_text()
                success = tools.judge_prompts(context, [trip.text], case, budget)[0]
                generations.append(
                    {"iteration": iteration + 1, "prompt": trip.text, "success": success,
                     "drift": trip.drift, "loss": loss.item()}
                )
                if success:
                    success_trip = trip
                    break

        # 5. The successful prompt, or the final argmax prompt.
        trip = success_trip or current_text()
        log.info(
            "%s case %s: %s after %d iterations, %d generations: %r",
            self.name, case.case_id, "success" if success_trip else "no success",
            budget.iterations, budget.generations, trip.text,
        )
        extra = {
            **common,
            "pre_success": False if settings["check_original"] else None,
            "early_stopped": success_trip is not None,
            "guided": defended_noise.guidance is not None,
            "guidance": defended_noise.guidance,
            "dropped_prompt_tokens": layout.dropped_tokens,
            "ids_before": trip.ids_before,
            "ids_after": trip.ids_after,
            "drift": trip.drift,
        }
        return budget.result(trip.text, loss_trace, trip.ids_after, extra)
