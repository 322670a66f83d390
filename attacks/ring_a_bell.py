"""Attack `ring-a-bell`: a concept vector in text-embedding space, then a genetic search.

Tsai, Hsu, Xie, Lin, Chen, Hsu, Chen and Chen, "Ring-A-Bell! How Reliable are Concept
Removal Methods for Diffusion Models?", ICLR 2024.

Ring-A-Bell needs only a text encoder, never the denoiser:

1. Concept vector: c = mean_i [T(p_i+) - T(p_i-)] over prompt pairs with and without the
   concept, T the full sequence of last hidden states (max_length x D, padding included).
2. Target: e~ = T(p) + eta * c for the case prompt p.
3. Prompt discovery: a genetic algorithm over K token ids minimises
   ||T([BOS, s_1..s_K, EOS, padding]) - e~||_F^2. Population 200; each generation scores
   the whole population in one batched text-encoder pass, keeps the best 100, appends the
   children of single-point crossover (rate 0.5) and mutates one random slot of each
   individual with probability 0.25 (survivors included, no elitism). The last generation
   only scores. The output is the best individual's slots decoded to text.

Defaults from the authors' notebook: population 200, 3,000 generations, mutation rate 0.25,
crossover rate 0.5, K = 16 (`length`), eta = 3 (`eta`, the nudity setting).

Options: `pairs` (where the concept pairs come from, below), `eta`, `length`, `population`,
`generations`, `mutation_rate`, `crossover_rate`, `mode`, `seed`.

`pairs` is either one prompt-set entry `{name: ..., options: {...}}` whose cases carry
`safe_prompt` (for SD: `ring-a-bell-pairs` on the published Nudity/NoNudity or Violence
files; for shapes: the task's forget set), or a mapping from concept name to such an entry.
Without it, the pairs are the cases of the batch the runner hands the attack that carry a
`safe_prompt`; set `runner.attack_batch_size` to the case count to use the whole set.

Mode `transfer` (the default, the paper's threat model) uses the undefended model's text
encoder, the public one; mode `adaptive` uses the defended model's text encoder, which
differs only under text-encoder defenses. Either way the denoiser is never touched.

Budget: `text_encoder_calls` counts encoded sequences: at most the individuals of all
generations (about population x generations), because an individual already scored in the
previous generation is not encoded again, plus two per concept pair for the first case of
a concept. `iterations` counts generations.

NOTE: the authors repeat each pair 5 times and drop 19 of their 250 nudity rows whose images
had no detection; the mean here is over the pairs as the prompt set gives them.
NOTE: the authors return the best individual of the last generation. Because mutation can
change survivors, this attack returns the best individual of all generations instead, whose
distance is never larger.
NOTE: the authors draw ids uniformly from 1..49405. This attack draws only from
`tools.candidate_token_mask`, which leaves out special, markup and undecodable byte tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from attacks import tools
from harness.attack import NEEDS_ORIGINAL_MODEL, Attack, AttackContext, AttackResult
from harness.model import TEXT_ENCODER, DiffusionModel
from harness.prompts.base import Case
from harness.registry import create

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "pairs": None,
    "eta": 3.0,
    "length": 16,
    "population": 200,
    "generations": 3000,
    "mutation_rate": 0.25,
    "crossover_rate": 0.5,
    "mode": tools.TRANSFER,
    "seed": 0,
    "encode_batch_size": 256,
}


def encode_texts(
    model: DiffusionModel, prompts: Sequence[str], batch_size: int
) -> torch.Tensor:
    """Full-sequence text states (N, T, D) of `prompts`, in batches, without gradients."""
    states = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            cond, _ = model.encode_prompts(list(prompts[start : start + batch_size]))
            states.append(cond.float())
    return torch.cat(states)


def concept_vector(
    model: DiffusionModel, pairs: Sequence[tuple[str, str]], batch_size: int = 256
) -> torch.Tensor:
    """Mean over pairs of T(with concept) - T(without), shape (T, D)."""
    if not pairs:
        raise ValueError("Ring-A-Bell needs at least one (concept, safe) prompt pair")
    with_concept = encode_texts(model, [pair[0] for pair in pairs], batch_size)
    without = encode_texts(model, [pair[1] for pair in pairs], batch_size)
    return (with_concept - without).mean(dim=0)


class RingABell(Attack):
    name = "ring-a-bell"
    needs = frozenset({NEEDS_ORIGINAL_MODEL})
    model_capabilities = frozenset({TEXT_ENCODER})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.settings = tools.resolve_options(self.name, DEFAULTS, options)
        tools.check_mode(self.settings["mode"])
        if self.settings["population"] < 2:
            raise ValueError(f"attack {self.name!r}: population must be at least 2")
        self._vectors: dict[str, torch.Tensor] = {}

    def depends_on_defense(self) -> bool:
        # Transfer mode searches against the undefended text encoder only.
        return self.settings["mode"] != tools.TRANSFER

    def describe(self) -> dict[str, Any]:
        return {"attack": self.name, **self.settings}

    # -- concept pairs -------------------------------------------------------------------

    def _pair_source(self, concept: str) -> dict[str, Any] | None:
        """Return the prompt-set entry for `concept`, or None to use the batch's own cases."""
        pairs = self.settings["pairs"]
        if pairs is None:
            return None
        if not isinstance(pairs, dict):
            raise ValueError(f"attack {self.name!r}: option pairs must be a mapping")
        if "name" in pairs:
            return pairs
        if concept not in pairs:
            raise ValueError(
                f"attack {self.name!r}: option pairs has no entry for concept {concept!r}; "
                f"it has {', '.join(sorted(pairs))}"
            )
        return pairs[concept]

    def _pairs(self, concept: str, batch: Sequence[Case]) -> tuple[list[tuple[str, str]], str]:
        source = self._pair_source(concept)
        if source is None:
            cases = [case for case in batch if case.safe_prompt]
            origin = "the attacked cases"
        else:
            prompt_set = create("prompt_sets", source["name"], **source.get("options", {}))
            cases = [case for case in prompt_set.load() if case.safe_prompt]
            origin = f"prompt set {source['name']}"
        if not cases:
            raise ValueError(
                f"attack {self.name!r}: no (prompt, safe_prompt) pairs for concept {concept!r} "
                f"in {origin}; set the option pairs to a prompt set whose cases have safe_prompt"
            )
        return [(case.prompt, case.safe_prompt) for case in cases], origin

    def _vector(
        self, model: DiffusionModel, case: Case, batch: Sequence[Case], budget: tools.Budget
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        key = f"{self.settings['mode']}|{case.concept}"
        if self._pair_source(case.concept) is None:
            key += "|" + ",".join(c.case_id for c in batch)
        pairs, origin = self._pairs(case.concept, batch)
        info = {"pairs": len(pairs), "source": origin}
        if key not in self._vectors:
            self._vectors[key] = concept_vector(model, pairs, self.settings["encode_batch_size"])
            budget.text_encoder_calls += 2 * len(pairs)
            log.info("%s: concept vector for %r from %d pairs (%s)", self.name, case.concept,
                     len(pairs), origin)
        return self._vectors[key], info

    # -- the attack ----------------------------------------------------------------------

    def run(self, case: Case, context: AttackContext) -> AttackResult:
        return self.run_batch([case], context)[0]

    def run_batch(self, cases: Sequence[Case], context: AttackContext) -> list[AttackResult]:
        return [self._attack(case, cases, context) for case in cases]

    def _attack(self, case: Case, batch: Sequence[Case], context: AttackContext) -> AttackResult:
        settings = self.settings
        budget = tools.Budget()
        generator = tools.case_generator(settings["seed"], case)
        model = tools.loss_model(context, settings["mode"])

        # 1-2. Concept vector and target embedding.
        vector, vector_info = self._vector(model, case, batch, budget)
        target = encode_texts(model, [case.prompt], 1)[0] + settings["eta"] * vector
        budget.text_encoder_calls += 1

        # 3. The initial population: K random candidate ids between BOS and EOS.
        layout = tools.build_layout(model, free_tokens=int(settings["length"]))
        candidates = torch.nonzero(tools.candidate_token_mask(model).cpu()).squeeze(-1)
        size, keep = int(settings["population"]), int(settings["population"]) // 2
        slot_ids = candidates[torch.randint(len(candidates), (size, len(layout.slots)),
                                            generator=generator)]
        population = layout.fill(slot_ids).cpu()

        # 4. Generations: score all in one batched pass, select, cross over, mutate.
        best_trace: list[float] = []
        best_so_far: list[float] = []
        best = {"fitness": float("inf"), "ids": population[0], "generation": -1}
        scored: dict[tuple[int, ...], float] = {}
        for generation in range(int(settings["generations"])):
            fitness, scored, encoded = self._score_new(model, layout, population, target,
                                                       scored)
            budget.text_encoder_calls += encoded
            budget.iterations += 1
            survivors, survivor_fitness = tools.select_survivors(population, fitness, keep)
            if float(survivor_fitness[0]) < best["fitness"]:
                best.update(fitness=float(survivor_fitness[0]), ids=survivors[0].clone(),
                            generation=generation)
            best_trace.append(float(survivor_fitness[0]))
            best_so_far.append(best["fitness"])
            if context.progress is not None:
                context.progress(generation)
            if generation == settings["generations"] - 1:
                break
            population = tools.crossover(survivors, layout.slots, settings["crossover_rate"],
                                         generator)
            population = tools.mutate(population, layout.slots, settings["mutation_rate"],
                                      candidates, generator)

        # 5. The best individual as text, re-tokenized as the runner will evaluate it.
        trip = tools.round_trip(model, best["ids"])
        log.info("%s case %s: best distance %.4f at generation %d: %r", self.name,
                 case.case_id, best["fitness"], best["generation"], trip.text)
        extra = {
            "mode": settings["mode"],
            "eta": settings["eta"],
            "length": settings["length"],
            "concept_vector": vector_info,
            "best_fitness": best["fitness"],
            "best_generation": best["generation"],
            "best_so_far": best_so_far,
            "population_passes": budget.iterations,
            "ids_before": trip.ids_before,
            "ids_after": trip.ids_after,
            "drift": trip.drift,
        }
        return budget.result(trip.text, best_trace, trip.ids_after, extra)

    @classmethod
    def _score_new(
        cls, model: DiffusionModel, layout: tools.SlotLayout, population: torch.Tensor,
        target: torch.Tensor, previous: dict[tuple[int, ...], float],
    ) -> tuple[torch.Tensor, dict[tuple[int, ...], float], int]:
        """Score every individual, encoding only those the previous generation did not score.

        Returns the fitness, this generation's scores by individual, and how many were encoded.

        Survivors that mutation left alone (three quarters at the default rate) and children
        equal to a parent are read from `previous` instead of being encoded again. Only one
        generation is remembered, so memory stays at one population.
        """
        keys = [tuple(row.tolist()) for row in population]
        new_keys = list(dict.fromkeys(key for key in keys if key not in previous))
        scores = dict(previous)
        if new_keys:
            rows = torch.tensor(new_keys, dtype=population.dtype)
            new_fitness = cls._fitness(model, layout, rows, target).tolist()
            scores.update(zip(new_keys, new_fitness, strict=True))
        fitness = torch.tensor([scores[key] for key in keys])
        return fitness, {key: scores[key] for key in keys}, len(new_keys)

    @staticmethod
    def _fitness(
        model: DiffusionModel, layout: tools.SlotLayout, population: torch.Tensor,
        target: torch.Tensor,
    ) -> torch.Tensor:
        """Squared Frobenius distance of each individual's text states to the target."""
        ids = population.to(layout.ids.device)
        with torch.no_grad():
            states = model.encode(ids, layout.batch_mask(ids.shape[0])).float()
        return ((states - target) ** 2).sum(dim=(1, 2)).cpu()
