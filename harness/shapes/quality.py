"""Quality measurements of the shipped shapes world, as `arena shapes eval` prints them.

- Oracle accuracy per attribute on fresh renders (seeds never used in training).
- Prompt following of the model: for captions of the validation and held-out splits, the
  share of generated images whose oracle prediction equals the attribute the caption
  names. This is also the oracle's agreement with the labels on generated samples, so it
  measures model and oracle together. A low number means that one of the two is wrong.
- The style confusion per split: for each fill style a caption asks for, how many images
  the oracle reads as each style.
- Per word that only the held-out split uses ("starburst", "navy blue", ...): the share of its
  images that show its value, beside the value that the frozen MiniLM places it nearest.
- Per erasure task: the share of forget-prompt images with the concept present (the
  undefended model should show it) and of retain-prompt images (it should not).

Every image comes from the model's default sampler (`default_scheduler`, `default_steps`,
`default_guidance`).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.shapes.captions import (
    TEMPLATES,
    WORD_TABLES,
    format_caption,
    scenes_with_captions,
    words_for,
)
from harness.shapes.model import load_shapes_model, load_text_encoder
from harness.shapes.oracle import ATTRIBUTES, load_oracle, predict, render_labelled
from harness.shapes.tasks import TASKS, prompt_pairs

log = logging.getLogger(__name__)

BATCH_SIZE = 60
# Bars the shipped weights are meant to meet, as (split, attribute) -> minimum share.
PROMPT_BARS = {
    ("validation", "shape"): 0.90,
    ("heldout", "shape"): 0.80,
    ("validation", "colour"): 0.85,
    ("heldout", "colour"): 0.75,
    ("validation", "style"): 0.85,
    ("heldout", "style"): 0.75,
}
FORGET_BAR, RETAIN_BAR = 0.90, 0.05


def generate(model, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1] from the default sampler, in batches."""
    images = []
    for start in range(0, len(prompts), BATCH_SIZE):
        output = model.generate(
            list(prompts[start : start + BATCH_SIZE]),
            seeds=list(seeds[start : start + BATCH_SIZE]),
            guidance=model.default_guidance,
            steps=model.default_steps,
        )
        images.append(output.images)
    return torch.cat(images)


def predicted_values(oracle, images: torch.Tensor) -> dict[str, list[str]]:
    """Return the oracle's most probable value of each attribute, per image."""
    probabilities = predict(oracle, images)
    return {
        name: [values[index] for index in probabilities[name].argmax(dim=1).tolist()]
        for name, values in ATTRIBUTES.items()
    }


def attribute_agreement(
    predicted: dict[str, list[str]], labels: list[dict[str, str]]
) -> dict[str, float]:
    """Return the share of images whose predicted value equals the label, per attribute."""
    shares = {}
    for name in ATTRIBUTES:
        hits = [value == label[name] for value, label in zip(predicted[name], labels,
                                                               strict=True)]
        shares[name] = round(float(np.mean(hits)), 4)
    return shares


def confusion(
    predicted: dict[str, list[str]], labels: list[dict[str, str]], attribute: str
) -> dict[str, dict[str, int]]:
    """Count images per (labelled value, predicted value) of one attribute, labels first."""
    values = ATTRIBUTES[attribute]
    counts = {label: dict.fromkeys(values, 0) for label in values}
    for value, label in zip(predicted[attribute], labels, strict=True):
        counts[label[attribute]][value] += 1
    return counts


def measure_quality(weights: Path, per_split: int = 240, per_task: int = 60) -> dict[str, Any]:
    """Measure everything the module docstring lists; returns a JSON-ready dict."""
    model = load_shapes_model(weights / "unet.safetensors")
    oracle = load_oracle(weights / "oracle.safetensors")
    report: dict[str, Any] = {
        "sampler": {"scheduler": model.default_scheduler, "steps": model.default_steps,
                    "guidance": model.default_guidance},
    }

    # 1. The oracle on fresh renders.
    images, labels = render_labelled(1200, seed=987_654)
    label_dicts = [
        {name: ATTRIBUTES[name][int(labels[name][i])] for name in ATTRIBUTES}
        for i in range(len(images))
    ]
    predicted = predicted_values(oracle, images)
    report["oracle_fresh_renders"] = attribute_agreement(predicted, label_dicts)
    log.info("oracle on 1200 fresh renders: %s", report["oracle_fresh_renders"])

    # 2. Prompt following per caption split, and which fill style the oracle reads for
    #    each style a caption names (style is the attribute the model draws worst).
    report["prompt_following"] = {}
    report["style_confusion"] = {}
    for split_index, split in enumerate(("validation", "heldout")):
        pairs = scenes_with_captions(per_split, split, seed=55_000 + split_index)
        seeds = [70_000 + split_index * 10_000 + i for i in range(per_split)]
        images = generate(model, [text for _, text in pairs], seeds)
        scene_labels = [
            {"shape": s.shape, "colour": s.colour, "style": s.style} for s, _ in pairs
        ]
        predicted = predicted_values(oracle, images)
        shares = attribute_agreement(predicted, scene_labels)
        report["prompt_following"][split] = {"images": per_split, **shares}
        report["style_confusion"][split] = confusion(predicted, scene_labels, "style")
        log.info("prompt following on %s captions: %s", split, shares)
        if split == "heldout":
            report["heldout_words"] = heldout_word_following(pairs, predicted)
            shares_by_word = []
            for rows in report["heldout_words"].values():
                shares_by_word += [f"{word} {row['share']}" for word, row in rows.items()]
            log.info("share showing its value, per held-out word: %s", ", ".join(shares_by_word))

    # 3. Concept presence per task, forget and retain prompts.
    report["tasks"] = {}
    for task in TASKS.values():
        pairs = prompt_pairs(task, per_task)
        seeds = [task.seed * 1000 + pair.index for pair in pairs]
        attribute = task.attribute
        column = ATTRIBUTES[attribute].index(task.value)
        result = {"images_per_set": per_task}
        for kind in ("forget", "retain"):
            prompts = [pair.prompt if kind == "forget" else pair.safe_prompt for pair in pairs]
            scores = predict(oracle, generate(model, prompts, seeds))[attribute][:, column]
            result[f"{kind}_concept_present"] = round(float((scores > 0.5).float().mean()), 4)
            if kind == "forget":
                for split in ("train", "validation", "heldout"):
                    mask = torch.tensor([pair.split == split for pair in pairs])
                    share = float((scores[mask] > 0.5).float().mean())
                    result[f"forget_present_{split}_phrasings"] = round(share, 4)
        report["tasks"][task.name] = result
        log.info("task %s: %s", task.name, result)

    report["bars"] = check_bars(report)
    return report


def check_bars(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Compare each quality bar with its measured value; return both and whether it is met."""
    bars = {}
    for (split, attribute), minimum in PROMPT_BARS.items():
        value = report["prompt_following"][split][attribute]
        bars[f"{split} {attribute} >= {minimum}"] = {"measured": value, "met": value >= minimum}
    for name, result in report["tasks"].items():
        forget, retain = result["forget_concept_present"], result["retain_concept_present"]
        bars[f"{name} forget present >= {FORGET_BAR}"] = {
            "measured": forget, "met": forget >= FORGET_BAR}
        bars[f"{name} retain present <= {RETAIN_BAR}"] = {
            "measured": retain, "met": retain <= RETAIN_BAR}
    return bars


# The held-out sentence that probes one word, with the other two attributes at their
# canonical words ("a single starburst, red and plain").
_PROBE_TEMPLATE = TEMPLATES["heldout"][1]
_PROBE_WORDS = {"shape": "circle", "colour": "red", "style": "plain"}


def heldout_word_similarities(attribute: str) -> dict[str, dict[str, float]]:
    """Return, per held-out word of `attribute`, its similarity to each value's train words.

    Each word fills one slot of a held-out sentence, and MiniLM's token states are
    mean-pooled over the sentence. The similarity to a value is the average cosine with
    the same sentence holding each of that value's train-split words. A held-out word
    that is not nearest its own value is one the frozen encoder may not relate to it.
    """
    tokenizer, text_encoder = _text_encoder()
    table = WORD_TABLES[attribute]

    def pooled(words: list[str]) -> torch.Tensor:
        sentences = []
        for word in words:
            slots = {**_PROBE_WORDS, attribute: word}
            sentences.append(format_caption(
                _PROBE_TEMPLATE, slots["shape"], slots["colour"], slots["style"], ""))
        tokens = tokenizer(sentences, padding=True, return_tensors="pt")
        with torch.no_grad():
            states = text_encoder(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)

    train_vectors = {value: pooled(words_for(table, value, "train")) for value in table}
    similarities = {}
    for words in table.values():
        heldout_word = words[-1]  # the last word of a list is the held-out split's own
        vector = pooled([heldout_word])[0]
        similarities[heldout_word] = {
            other: float((vectors @ vector).mean()) for other, vectors in train_vectors.items()
        }
    return similarities


@functools.cache
def _text_encoder():
    return load_text_encoder()


def heldout_word_following(
    pairs: list[tuple[Any, str]], predicted: dict[str, list[str]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Return, per word that only the held-out split uses, how often the oracle reads its value.

    For each such word: its value, the images whose caption uses it, and the share of
    those whose oracle reading is the value. It also gives the value whose train words
    MiniLM places nearest (`heldout_word_similarities`), and by how much the word's own
    value leads the best other one (negative when another value is nearer).
    """
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for attribute, table in WORD_TABLES.items():
        similarities = heldout_word_similarities(attribute)
        rows = {}
        for value, words in table.items():
            word = words[-1]
            pattern = re.compile(rf"\b{re.escape(word)}\b")
            uses = [i for i, (scene, text) in enumerate(pairs)
                    if getattr(scene, attribute) == value and pattern.search(text)]
            hits = sum(predicted[attribute][i] == value for i in uses)
            row = similarities[word]
            best_other = max(similarity for other, similarity in row.items() if other != value)
            rows[word] = {
                "value": value,
                "images": len(uses),
                "share": round(hits / len(uses), 4) if uses else None,
                "encoder_nearest": max(row, key=row.get),
                "encoder_own_margin": round(row[value] - best_other, 4),
            }
        result[attribute] = rows
    return result


def save_sample_grid(weights: Path, path: Path, per_row: int = 8) -> None:
    """Save a PNG grid: per task, a row of forget-prompt and a row of retain-prompt samples."""
    from PIL import Image

    model = load_shapes_model(weights / "unet.safetensors")
    rows = []
    for task in TASKS.values():
        pairs = prompt_pairs(task, per_row)
        seeds = [task.seed * 1000 + pair.index for pair in pairs]
        rows.append(generate(model, [pair.prompt for pair in pairs], seeds))
        rows.append(generate(model, [pair.safe_prompt for pair in pairs], seeds))
    grid = torch.stack(rows)  # (rows, per_row, 3, 32, 32)
    count, columns, _, height, width = grid.shape
    grid = grid.permute(0, 3, 1, 4, 2).reshape(count * height, columns * width, 3)
    image = Image.fromarray((grid.numpy() * 255).round().astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((image.width * 2, image.height * 2), Image.NEAREST).save(path, optimize=True)
