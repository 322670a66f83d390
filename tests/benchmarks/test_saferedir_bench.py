"""SafeRedir benchmarks: the defense's cost per image and per denoising step.

The time overhead is measured on the shapes model with the shipped `star` checkpoint, or
with a randomly initialised redirector when no shipped shapes checkpoint exists. The
weights set the verdicts, and the verdicts set the cost: an image judged safe skips the
delta generator, and one redirected is checked only every third step. So the two cases
give different ratios. `extra_info["weights"]` says which were used.
"""

from __future__ import annotations

import statistics
import time

import torch
from benchtools import SD14_UNET, report_ratio

from defenses.saferedir.defense import SafeRedir, model_dims
from defenses.saferedir.loading import shipped_checkpoints
from defenses.saferedir.networks import Redirector, RedirectorDims, count_flops

PROMPTS = ["a red star", "a blue swirl", "a green heart", "a yellow circle"]
PAIRS = 24


def test_saferedir_overhead_per_image(benchmark, shapes_model):
    """Target: defended generation at most 1.10x the undefended time, same prompts and seeds
    (median over single-image pairs)."""
    shipped = [path for path in shipped_checkpoints() if "star" in path.name]
    if shipped:
        defense = SafeRedir(concept="star", checkpoint=str(shipped[0]))
        weights = shipped[0].name
    else:
        torch.manual_seed(0)
        defense = SafeRedir(concept="star", redirector=Redirector(model_dims(shapes_model)))
        weights = "random initialisation (no shipped shapes checkpoint)"
    defended = defense.apply(shapes_model)

    def generate(model, index):
        return model.generate([PROMPTS[index % len(PROMPTS)]], seeds=[index],
                              guidance=shapes_model.default_guidance,
                              steps=shapes_model.default_steps)

    for model in (shapes_model, defended):
        generate(model, 0)
    # Pairs of single images in ABBA order, so a slow drift of the machine hits both sides.
    # The ratio is the median of the per-pair ratios. One image takes about half a second,
    # and the ratio of sums over 8 pairs read 1.03 to 1.26 in six runs on an idle machine.
    ratios = []
    for index in range(PAIRS):
        order = [("undefended", shapes_model), ("defended", defended)]
        seconds = {}
        for variant, model in order if index % 2 == 0 else reversed(order):
            started = time.perf_counter()
            generate(model, index)
            seconds[variant] = time.perf_counter() - started
        ratios.append(seconds["defended"] / seconds["undefended"])
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    ratio = statistics.median(ratios)
    benchmark.extra_info.update(pairs=PAIRS, ratio_quartiles=[
        round(q, 3) for q in statistics.quantiles(ratios, n=4)])
    benchmark.extra_info.update(model="shapes", weights=weights)
    report_ratio(benchmark, "saferedir_overhead", ratio, "<= 1.10")
    assert ratio <= 1.10


def sd14_unet_flops_per_step() -> int:
    """FLOPs of one guided SD 1.4 denoising step (UNet on a batch of 2) at 512x512, counted
    on the meta device from the public SD 1.4 UNet config; nothing is downloaded."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET).eval()
        latents = torch.zeros(2, 4, 64, 64)
        text = torch.zeros(2, 77, 768)
        timestep = torch.zeros(2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(latents, timestep, encoder_hidden_states=text)
    return int(counter.get_total_flops())


def test_saferedir_flops_share_sd14(benchmark):
    """Target: one redirector call (classifier and delta generator, one image) at most 2%
    of the SD 1.4 UNet's FLOPs per guided step."""
    redirector = count_flops(RedirectorDims(), (64, 64))
    unet = benchmark.pedantic(sd14_unet_flops_per_step, rounds=1, iterations=1)
    share = redirector / unet
    benchmark.extra_info.update(redirector_gflops=round(redirector / 1e9, 2),
                                unet_gflops_per_step=round(unet / 1e9, 1))
    report_ratio(benchmark, "saferedir_flops_share", share, "<= 0.02")
    assert share <= 0.02
