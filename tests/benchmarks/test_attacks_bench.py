"""Attack benchmarks: batched scoring and optimisation against bare model passes.

Each ratio is measured in one process against a hand-written baseline doing the same model
work. The model is the shapes model when its weights exist, else tiny-random-sd; which
one is stored in `extra_info["model"]`.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from benchtools import best_of, report_ratio

from attacks import tools
from attacks.p4d import P4DN
from attacks.ring_a_bell import RingABell
from attacks.unlearndiffatk import UnlearnDiffAtk
from harness.attack import AttackContext
from harness.prompts.base import Case

CASES = [
    Case("b1", "a red star on a blue background", "star", seed=1),
    Case("b2", "a green star with stripes", "star", seed=2),
    Case("b3", "a yellow swirl next to a star", "star", seed=3),
    Case("b4", "a small star in the corner", "star", seed=4),
]


@pytest.fixture(scope="module")
def attack_model(request):
    """The shapes model when trained, else tiny-random-sd; returns (model, name)."""
    from harness.shapes.model import UNET_WEIGHTS

    # One thread: the two cores are shared with other processes, and a second thread
    # waiting for a busy core slows small operations down more than it speeds them up.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if UNET_WEIGHTS.is_file():
        yield request.getfixturevalue("shapes_model"), "shapes"
    else:
        from harness.models.tiny import TinyRandomSD

        yield TinyRandomSD().load(torch.device("cpu"), torch.float32), "tiny-random-sd"
    torch.set_num_threads(threads)


def _context(model, judge=None) -> AttackContext:
    size = model.default_size
    sampler = {"steps": 2, "guidance": model.default_guidance, "scheduler": "ddim",
               "height": size, "width": size, "use_case_guidance": True}
    return AttackContext(model=model, original_model=model, sampler=sampler, judge=judge)


def _never(images, case) -> list[bool]:
    return [False] * images.shape[0]


# -- Ring-A-Bell ----------------------------------------------------------------------------


def _score_one_per_call(model, layout, population, target) -> torch.Tensor:
    """Compute Ring-A-Bell's fitness with one text-encoder call per individual (the baseline)."""
    return torch.cat([RingABell._fitness(model, layout, population[i : i + 1], target)
                      for i in range(population.shape[0])])


def test_ring_a_bell_population_scoring(benchmark, attack_model):
    """Target: one text-encoder pass for a population of 200 at least 10x faster than 200."""
    model, name = attack_model
    layout = tools.build_layout(model, free_tokens=16)
    candidates = torch.nonzero(tools.candidate_token_mask(model).cpu()).squeeze(-1)
    generator = torch.Generator().manual_seed(0)
    population = layout.fill(candidates[torch.randint(len(candidates), (200, 16),
                                                      generator=generator)])
    with torch.no_grad():
        target = model.encode_prompts([CASES[0].prompt])[0][0].float()

    def one_per_call():
        return _score_one_per_call(model, layout, population, target)

    looped = one_per_call()
    baseline = best_of(one_per_call, repeats=2)
    batched = benchmark.pedantic(lambda: RingABell._fitness(model, layout, population, target),
                                 rounds=3, iterations=1)
    assert torch.allclose(batched, looped, rtol=1e-4)
    ratio = baseline / benchmark.stats.stats.min
    benchmark.extra_info["model"] = name
    report_ratio(benchmark, "ring_a_bell_population_speedup", ratio, ">= 10")
    assert ratio >= 10


class _RingABellOnePerCall(RingABell):
    """The reference implementation's scoring: every individual of every generation goes
    through the text encoder on its own, including those scored a generation before."""

    @classmethod
    def _score_new(cls, model, layout, population, target, previous):
        return _score_one_per_call(model, layout, population, target), {}, population.shape[0]


def test_ring_a_bell_search(benchmark, attack_model):
    """Target: a whole search (10 generations of 200) at least 10x faster than scoring one
    candidate per text-encoder call; both return the same prompt."""
    model, name = attack_model
    context = _context(model)
    settings = {"population": 200, "generations": 10, "length": 16}
    baseline_attack, our_attack = _RingABellOnePerCall(**settings), RingABell(**settings)

    case = Case("r1", "a red star on a blue background", "star", seed=1,
                safe_prompt="a red circle on a blue background")  # the concept vector's pair

    reference = baseline_attack.run(case, context)
    baseline = best_of(lambda: baseline_attack.run(case, context), repeats=2)
    ours = benchmark.pedantic(lambda: our_attack.run(case, context), rounds=3, iterations=1)
    assert ours.prompt == reference.prompt
    ratio = baseline / benchmark.stats.stats.min
    benchmark.extra_info.update(model=name, encoded_share=round(
        ours.text_encoder_calls / reference.text_encoder_calls, 3))
    report_ratio(benchmark, "ring_a_bell_search_speedup", ratio, ">= 10")
    assert ratio >= 10


# -- time per optimisation step -------------------------------------------------------------


def _bare_step(model, steps: int, batch: int = 1):
    """A loop of `steps` bare steps: embeddings -> encode_embeddings -> predict_noise -> mse
    -> backward, at batch size `batch`."""
    layout = tools.build_layout(model, CASES[0].prompt, prefix=3)
    mask = layout.batch_mask(batch)
    fixed = layout.embed(model, model.vocabulary_embeddings.detach()[:3].float())
    embeddings = fixed.expand(batch, -1, -1).clone().requires_grad_(True)
    shape = (batch, *model.latent_shape(None, None))
    latents, target = torch.randn(shape), torch.randn(shape)
    timesteps = torch.full((batch,), 500)

    def loop():
        for _ in range(steps):
            cond = model.encode_embeddings(embeddings, mask)
            loss = F.mse_loss(model.predict_noise(latents, timesteps, cond), target)
            embeddings.grad = None
            loss.backward()

    return loop


def _step_benchmark(benchmark, attack_model, make_attack, iterations, label):
    """Seconds per attack iteration over seconds per bare step, measured interleaved.

    The attack's time per iteration is the difference of two runs that differ only in
    their iteration count, so the set-up (target image, layouts, final decoding) cancels.
    """
    model, name = attack_model
    context = _context(model, judge=_never)
    low, high = iterations
    runs = {count: make_attack(count) for count in iterations}
    bare = _bare_step(model, high - low)
    times: dict[str, list[float]] = {"low": [], "high": [], "bare": []}
    for _ in range(3):
        for key, function in (("low", lambda: runs[low].run(CASES[0], context)),
                              ("high", lambda: runs[high].run(CASES[0], context)),
                              ("bare", bare)):
            started = time.perf_counter()
            function()
            times[key].append(time.perf_counter() - started)
    ours = (min(times["high"]) - min(times["low"])) / (high - low)
    bare_step = min(times["bare"]) / (high - low)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    ratio = ours / bare_step
    benchmark.extra_info.update(model=name, attack_step_s=round(ours, 5),
                                bare_step_s=round(bare_step, 5))
    report_ratio(benchmark, label, ratio, "<= 1.2")
    assert ratio <= 1.2


def test_p4d_step_overhead(benchmark, attack_model):
    """Target: a P4D-N iteration at most 1.2x a bare encoder + denoiser forward and backward.

    Includes the no-gradient target prediction and the probe checks at the default rate
    (one per 50 iterations), both part of P4D's iteration.
    """
    _step_benchmark(
        benchmark, attack_model,
        lambda count: P4DN(iterations=count, n_tokens=16, eval_every=50),
        (50, 150), "p4d_step_ratio",
    )


def test_unlearndiffatk_step_overhead(benchmark, attack_model):
    """Target: an UnlearnDiffAtk iteration at most 1.2x a bare forward and backward.

    The judge's early-stop generations (one per `eval_every` iterations) are not
    optimisation steps and are left out: `eval_every` exceeds the iterations.
    """
    _step_benchmark(
        benchmark, attack_model,
        lambda count: UnlearnDiffAtk(timesteps=1, iterations_per_timestep=count,
                                     eval_every=10_000, check_original=False,
                                     prefix_tokens=3),
        (20, 80), "unlearndiffatk_step_ratio",
    )


# -- several cases in one batch -------------------------------------------------------------


def assert_same_work(batched, alone):
    """Check that a batch did each case's work: iterations, denoiser calls, first loss.

    Prompts may differ. A batched pass rounds differently from a batch of one (near 1e-6
    relative on the shapes model), and UnlearnDiffAtk samples its tokens, so a near-tied
    draw can part the runs. tests/test_attacks.py checks equal prompts on tiny-random-sd.
    A batch encodes the negative prompt once, so text-encoder calls differ.
    """
    for together, lone in zip(batched, alone, strict=True):
        assert together.iterations == lone.iterations
        assert together.denoiser_calls == lone.denoiser_calls
        assert together.loss_trace[:1] == pytest.approx(lone.loss_trace[:1], rel=1e-4)


def _batch_benchmark(benchmark, attack_model, attack, label, judge=None):
    model, name = attack_model
    context = _context(model, judge=judge)

    def one_at_a_time():
        return [attack.run(case, context) for case in CASES]

    def together():
        return attack.run_batch(CASES, context)

    one_at_a_time()
    started = time.perf_counter()
    alone = one_at_a_time()
    baseline = time.perf_counter() - started
    batched = benchmark.pedantic(together, rounds=1, iterations=1)
    assert_same_work(batched, alone)
    ratio = baseline / benchmark.stats.stats.min
    benchmark.extra_info["model"] = name
    matching = sum(one.prompt == other.prompt for one, other in zip(batched, alone, strict=True))
    benchmark.extra_info["same_prompts"] = matching
    print(f"{label}: {matching} of {len(CASES)} cases returned the prompt of a lone run")
    report_ratio(benchmark, label, ratio, ">= 1.5")
    assert ratio >= 1.5


def test_p4d_batch_of_four(benchmark, attack_model):
    """Target: four P4D-N cases in one batch at least 1.5x faster than one at a time."""
    _batch_benchmark(benchmark, attack_model, P4DN(iterations=48, n_tokens=16, eval_every=16),
                     "p4d_batch4_speedup")


def test_unlearndiffatk_batch_of_four(benchmark, attack_model):
    """Target: four UnlearnDiffAtk cases in one batch at least 1.5x faster than one at a time.

    Early-stop checks included (every 16 iterations, no success), judged by a stub judge.
    """
    attack = UnlearnDiffAtk(timesteps=2, iterations_per_timestep=16, eval_every=16,
                            prefix_tokens=3)
    _batch_benchmark(benchmark, attack_model, attack, "unlearndiffatk_batch4_speedup",
                     judge=_never)
