"""How far an ESD edit reaches: its effect on the noise prediction, prompt by prompt.

ESD (Gandikota et al., ICCV 2023) trains on one prompt, the bare concept ("star"). Whether
the edit also changes what the denoiser does for sentences that name the concept decides
the pre-ASR on forget prompts. This module measures it directly. For each prompt p, at
latents x_t sampled along the undefended trajectory and a spread of timesteps:

    concept direction   d(p)  = eps(x_t, t, p) - eps(x_t, t, "")
    edit                e(p)  = eps_esd(x_t, t, p) - eps(x_t, t, p)
    reach               r(p)  = -<e(p), d(p)> / ||d(p)||^2

r = 0 means the edit leaves the prediction for p unchanged along the concept direction;
r = 1 removes the prompt's guidance towards the concept; r = 1 + eta is the ESD target
(negative guidance eta) that training drives the bare concept towards.

    python -m defenses.esd_effect --variant esd-x --task star
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import torch

from defenses.esd import EsdU, EsdX
from harness.model import DiffusionModel

log = logging.getLogger(__name__)


@torch.no_grad()
def reach(
    model: DiffusionModel,
    edited: DiffusionModel,
    prompts: list[str],
    timesteps: tuple[int, ...] = (100, 300, 500, 700, 900),
    seed: int = 0,
) -> list[float]:
    """Compute the reach r(p) of the edit for each prompt, averaged over `timesteps`.

    x_t is the noised version of a sample the undefended model draws for p, so the measure
    looks at latents the sampler actually visits.
    """
    count = len(prompts)
    cond, _ = model.encode_prompts(prompts)
    uncond, _ = model.encode_prompts([""] * count)
    images = model.generate(prompts, seeds=[seed + i for i in range(count)],
                            guidance=model.default_guidance, steps=model.default_steps).images
    clean = model.encode_images(images)
    generator = torch.Generator().manual_seed(seed)

    totals = torch.zeros(count)
    for timestep in timesteps:
        steps = torch.full((count,), timestep, dtype=torch.long)
        noise = torch.randn(clean.shape, generator=generator).to(clean)
        latents = model.add_noise(clean, noise, steps)
        original = model.predict_noise(latents, steps, cond)
        direction = (original - model.predict_noise(latents, steps, uncond)).flatten(1)
        change = (edited.predict_noise(latents, steps, cond) - original).flatten(1)
        totals += -(change * direction).sum(1) / direction.pow(2).sum(1).clamp_min(1e-12)
    return (totals / len(timesteps)).tolist()


def summarise(values: list[float]) -> dict[str, float]:
    tensor = torch.tensor(values)
    return {"mean": round(float(tensor.mean()), 3), "median": round(float(tensor.median()), 3),
            "min": round(float(tensor.min()), 3), "max": round(float(tensor.max()), 3)}


def measure(variant: str, task_name: str, cases: int = 24) -> dict[str, Any]:
    """Measure the reach of the shipped shapes-world ESD weights for one task, per prompt kind."""
    from harness.shapes.model import load_shapes_model
    from harness.shapes.tasks import TASKS, prompt_pairs

    task = TASKS[task_name]
    model = load_shapes_model()
    defense = (EsdX if variant == "esd-x" else EsdU)(concept=task.value)
    edited = defense.apply(model)
    pairs = prompt_pairs(task, cases)
    groups = {
        "bare concept (the training prompt)": [task.value],
        "forget prompts": [pair.prompt for pair in pairs],
        "retain prompts": [pair.safe_prompt for pair in pairs],
    }
    result = {"variant": variant, "task": task_name, "weights": str(defense.weights)}
    for label, prompts in groups.items():
        result[label] = summarise(reach(model, edited, prompts))
        log.info("%s %s, %s: reach %s", variant, task_name, label, result[label])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=("esd-x", "esd-u"), default="esd-x")
    parser.add_argument("--task", default="star")
    parser.add_argument("--cases", type=int, default=24)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(measure(args.variant, args.task, args.cases), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
