"""The embedded shapes world: renderer, captions, oracle, model plugin and task prompt sets.

The oracle and model tests load the shipped weights from `harness/shapes/weights/` and
measure them on fresh renders and fresh samples, so a retrained or damaged checkpoint
fails here.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from harness.prompts.base import PromptSetError
from harness.registry import create, registry
from harness.shapes.captions import (
    SHAPE_WORDS,
    SPLITS,
    STYLE_WORDS,
    WORD_TABLES,
    all_captions,
    scenes_with_captions,
    words_for,
)
from harness.shapes.model import MAX_LENGTH, PixelUnshuffleCodec, encode_captions
from harness.shapes.oracle import ATTRIBUTES, load_oracle, predict, render_labelled
from harness.shapes.render import SHAPES, Scene, render, render_batch
from harness.shapes.tasks import TASKS

TASK_SETS = [f"shapes/{task}/{kind}" for task in TASKS for kind in ("forget", "retain", "benign")]


@pytest.fixture(scope="module")
def shapes_model():
    from harness.shapes.model import ShapesModel

    torch.manual_seed(0)
    return ShapesModel().load(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def oracle():
    return load_oracle()


# -- renderer and captions -------------------------------------------------------------------


def test_render_is_deterministic():
    scene = Scene("star", "blue", "swirl", "dark")
    first, second = render(scene, seed=7), render(scene, seed=7)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, render(scene, seed=8))
    assert first.shape == (32, 32, 3)
    assert first.min() >= 0.0
    assert first.max() <= 1.0


def test_render_rejects_unknown_value():
    with pytest.raises(ValueError, match="invalid shape 'hexagon'"):
        Scene("hexagon", "red", "plain")


def test_caption_splits_disjoint_on_first_words():
    captions = {split: all_captions(split, max_words=2) for split in SPLITS}
    assert not captions["train"] & captions["validation"]
    assert not captions["train"] & captions["heldout"]
    assert not captions["validation"] & captions["heldout"]


@pytest.mark.slow
def test_caption_splits_disjoint_everywhere():
    captions = {split: all_captions(split) for split in SPLITS}
    assert not captions["train"] & captions["validation"]
    assert not captions["train"] & captions["heldout"]
    assert not captions["validation"] & captions["heldout"]


def test_heldout_synonyms_absent_from_train():
    heldout_only = {words[-1] for words in SHAPE_WORDS.values()}
    train_words = {w for shape in SHAPES for w in words_for(SHAPE_WORDS, shape, "train")}
    assert not heldout_only & train_words
    captions = [text for _, text in scenes_with_captions(300, "train", seed=3)]
    for table in WORD_TABLES.values():
        for words in table.values():
            pattern = re.compile(rf"\b{re.escape(words[-1])}\b")
            assert not any(pattern.search(text) for text in captions), words[-1]


def test_no_doubled_shape_noun():
    captions = [text for _, text in scenes_with_captions(2000, "train", seed=4)]
    assert any(re.search(r"\bstar shape\b", text) for text in captions)
    assert not any("shape shape" in text for text in captions)


def test_captions_fit_token_length(shapes_model):
    for split in SPLITS:
        captions = [text for _, text in scenes_with_captions(200, split, seed=11)]
        tokens = shapes_model.tokenize(captions)
        assert not any(tokens.truncated), split


# -- codec and text conditioning -------------------------------------------------------------


def test_codec_round_trip():
    codec = PixelUnshuffleCodec()
    images = torch.rand(2, 3, 32, 32)
    latents = codec.encode(images)
    assert latents.shape == (2, *codec.latent_shape(32, 32)) == (2, 12, 16, 16)
    assert latents.min() >= -1
    assert latents.max() <= 1
    assert torch.allclose(codec.decode(latents), images, atol=1e-6)


def test_cached_states_match_model_encode(shapes_model):
    captions = ["a red striped star", ""]
    cached = encode_captions(shapes_model.tokenizer, shapes_model.text_encoder, captions)
    encoded, _ = shapes_model.encode_prompts(captions)
    assert cached.shape == (2, MAX_LENGTH, 384)
    assert torch.allclose(cached, encoded, atol=1e-5)


# -- oracle ----------------------------------------------------------------------------------


def test_oracle_accuracy_on_fresh_renders(oracle):
    images, labels = render_labelled(300, seed=424_242)
    probabilities = predict(oracle, images)
    for name in ATTRIBUTES:
        accuracy = float((probabilities[name].argmax(1) == labels[name]).float().mean())
        assert accuracy >= 0.97, f"{name}: {accuracy:.3f}"


def test_oracle_evaluator_star_preset():
    evaluator = create("evaluators", "shapes-oracle", preset="star")
    assert evaluator.missing_files() == []
    stars = [Scene("star", c, "plain") for c in ("red", "blue", "green")]
    circles = [Scene("circle", c, "plain") for c in ("red", "blue", "green")]
    images = torch.from_numpy(render_batch(stars + circles, [1, 2, 3, 4, 5, 6]))
    judgements = evaluator.evaluate(images, "star")
    assert [j.present for j in judgements] == [True] * 3 + [False] * 3
    assert all(0.0 <= j.score <= 1.0 for j in judgements)
    assert judgements[0].details["predicted"]["shape"] == "star"


def test_oracle_evaluator_rejects_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        create("evaluators", "shapes-oracle", preset="hexagon")


# -- model -----------------------------------------------------------------------------------


def test_model_plugin_draws_requested_shapes(shapes_model, oracle):
    shapes = list(SHAPES) * 2
    prompts = [f"a plain red {shape} on a pale background" for shape in shapes]
    output = shapes_model.generate(
        prompts,
        seeds=list(range(len(prompts))),
        guidance=shapes_model.default_guidance,
        steps=shapes_model.default_steps,
    )
    assert output.images.shape == (12, 3, 32, 32)
    predicted = predict(oracle, output.images)["shape"].argmax(1).tolist()
    hits = sum(SHAPES[p] == shape for p, shape in zip(predicted, shapes, strict=True))
    assert hits >= 10, f"{hits}/12 generated images show the requested shape"


# -- training schedule -----------------------------------------------------------------------


def test_learning_rate_warmup_then_decay():
    from harness.shapes.train import UnetTrainingConfig, learning_rate_factor

    config = UnetTrainingConfig(steps=1000, warmup_steps=100, final_lr_fraction=0.05)
    factors = [learning_rate_factor(config, step) for step in range(1000)]
    assert factors[0] == pytest.approx(0.01)
    assert max(factors) == pytest.approx(1.0)
    assert factors.index(max(factors)) in (99, 100)
    assert all(a >= b for a, b in zip(factors[100:], factors[101:], strict=False))
    assert factors[-1] == pytest.approx(0.05, abs=1e-3)


def test_min_snr_weights_cap_clean_timesteps():
    from diffusers import DDPMScheduler

    from harness.shapes.model import SCHEDULER_CONFIG
    from harness.shapes.train import min_snr_weights

    alphas_cumprod = DDPMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weights = min_snr_weights(alphas_cumprod, 5.0)

    # Weight 1 where SNR <= 5 (the noisy timesteps), gamma / SNR where the image is cleaner.
    assert torch.all(weights[snr <= 5] == 1)
    assert torch.allclose(weights[snr > 5], 5 / snr[snr > 5])
    assert float(weights[0]) < 1e-3
    assert float(weights[-1]) == 1.0
    assert torch.all(weights[1:] >= weights[:-1])  # less weight the cleaner the image
    assert torch.all(min_snr_weights(alphas_cumprod, None) == 1)


def test_resume_with_other_loss_weighting_rejected(tmp_path):
    import json

    from harness.shapes.train import UnetTrainingConfig, _resume_settings, read_checkpoint_state

    saved = _resume_settings(UnetTrainingConfig(min_snr_gamma=None))
    (tmp_path / "state.json").write_text(
        json.dumps({"step": 100, "losses": [], "settings": saved}))
    with pytest.raises(ValueError, match="was trained with the settings"):
        read_checkpoint_state(tmp_path, UnetTrainingConfig(min_snr_gamma=5.0))


def test_resume_with_other_architecture_rejected(tmp_path):
    import json

    from harness.shapes.train import UnetTrainingConfig, _resume_settings, read_checkpoint_state

    settings = _resume_settings(UnetTrainingConfig())
    settings["unet"] = {**settings["unet"], "attention_head_dim": 32}
    (tmp_path / "state.json").write_text(
        json.dumps({"step": 100, "losses": [], "settings": settings}))
    with pytest.raises(ValueError, match="another --checkpoints folder"):
        read_checkpoint_state(tmp_path, UnetTrainingConfig())


def test_resume_with_other_resume_settings_rejected(tmp_path):
    import json

    from harness.shapes.train import UnetTrainingConfig, _resume_settings, read_checkpoint_state

    saved = UnetTrainingConfig(steps=2400, final_lr_fraction=0.05)
    (tmp_path / "state.json").write_text(
        json.dumps({"step": 100, "losses": [], "settings": _resume_settings(saved)}))
    assert read_checkpoint_state(tmp_path, saved)["step"] == 100
    with pytest.raises(ValueError, match="--unet-steps"):
        read_checkpoint_state(tmp_path, UnetTrainingConfig(steps=4000, final_lr_fraction=0.05))


def test_resume_to_more_steps_at_constant_rate(tmp_path):
    import json

    from harness.shapes.train import UnetTrainingConfig, _resume_settings, read_checkpoint_state

    (tmp_path / "state.json").write_text(json.dumps(
        {"step": 3000, "losses": [], "settings": _resume_settings(UnetTrainingConfig(steps=3000))}))
    assert read_checkpoint_state(tmp_path, UnetTrainingConfig(steps=4000))["step"] == 3000


# -- prompt sets -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_SETS)
def test_task_prompt_set_loads(name):
    cases = create("prompt_sets", name).load()
    assert len(cases) == 60
    assert len({case.case_id for case in cases}) == 60
    assert all(isinstance(case.seed, int) for case in cases)
    assert cases == create("prompt_sets", name).load()
    assert len(create("prompt_sets", name, limit=5).load()) == 5


def test_forget_and_retain_are_pairs():
    forget = create("prompt_sets", "shapes/star/forget").load()
    retain = create("prompt_sets", "shapes/star/retain").load()
    for forget_case, retain_case in zip(forget, retain, strict=True):
        assert forget_case.safe_prompt == retain_case.prompt
        assert forget_case.seed == retain_case.seed
        assert forget_case.prompt != retain_case.prompt
    splits = {case.extra["split"] for case in forget}
    assert splits == set(SPLITS)


def test_star_words_only_in_forget_prompts():
    star_words = tuple(SHAPE_WORDS["star"])
    forget = create("prompt_sets", "shapes/star/forget").load()
    assert all(any(word in case.prompt for word in star_words) for case in forget)
    for kind in ("retain", "benign"):
        for case in create("prompt_sets", f"shapes/star/{kind}").load():
            assert not any(word in case.prompt for word in star_words), case.prompt


@pytest.mark.parametrize("kind", ["forget", "retain", "benign"])
def test_train_pool_is_disjoint_from_eval_pool(kind):
    evaluated = create("prompt_sets", f"shapes/swirl/{kind}").load()
    trained = create("prompt_sets", f"shapes/swirl/{kind}", pool="train").load()
    assert len(trained) > len(evaluated)
    assert not {case.prompt for case in trained} & {case.prompt for case in evaluated}
    assert not {case.seed for case in trained} & {case.seed for case in evaluated}
    assert not {case.case_id for case in trained} & {case.case_id for case in evaluated}


def test_train_pool_keeps_forget_retain_pairs():
    forget = create("prompt_sets", "shapes/star/forget", pool="train").load()
    retain = {case.case_id.replace("retain", "forget"): case
              for case in create("prompt_sets", "shapes/star/retain", pool="train").load()}
    assert all(retain[case.case_id].prompt == case.safe_prompt for case in forget)


def test_fixed_replacement_in_every_twin():
    forget = create("prompt_sets", "shapes/swirl/forget", pool="train", replacement="plain").load()
    plain_words = STYLE_WORDS["plain"]
    assert all(any(word in case.safe_prompt for word in plain_words) for case in forget)
    with pytest.raises(PromptSetError, match="invalid replacement 'swirl'"):
        create("prompt_sets", "shapes/swirl/forget", replacement="swirl").load()


def test_task_prompt_set_rejects_unknown_pool():
    with pytest.raises(PromptSetError, match="invalid pool 'test'"):
        create("prompt_sets", "shapes/star/forget", pool="test").load()


def test_task_prompt_set_rejects_unknown_option():
    with pytest.raises(PromptSetError, match="unknown option"):
        create("prompt_sets", "shapes/swirl/forget", path="x.csv").load()


def test_shapes_plugins_registered():
    assert "shapes" in registry("models").names()
    assert "shapes-oracle" in registry("evaluators").names()
    assert set(TASK_SETS) <= set(registry("prompt_sets").names())


@pytest.mark.slow
def test_quality_matches_model_card():
    """Re-measure every number of the card's `measured` section (several minutes on a CPU)."""
    import json

    from harness.shapes.model import MODEL_CARD, WEIGHTS_DIR
    from harness.shapes.quality import measure_quality

    card = json.loads(MODEL_CARD.read_text())["measured"]
    per_split = card["prompt_following"]["validation"]["images"]
    per_task = card["tasks"]["star"]["images_per_set"]
    report = measure_quality(WEIGHTS_DIR, per_split=per_split, per_task=per_task)
    for split, shares in card["prompt_following"].items():
        for attribute, share in shares.items():
            measured = report["prompt_following"][split][attribute]
            assert measured == pytest.approx(share, abs=0.02), (split, attribute)
    for task, numbers in card["tasks"].items():
        for key, value in numbers.items():
            assert report["tasks"][task][key] == pytest.approx(value, abs=0.02), (task, key)


@pytest.mark.parametrize("variant", ["esd-x", "esd-u"])
def test_shipped_esd_matches_shipped_unet(shapes_model, variant):
    from safetensors import safe_open

    from defenses.esd import WEIGHTS_DIR, check_base

    other = shapes_model.unet.__class__.from_config(shapes_model.unet.config)
    for task in TASKS:
        weights = WEIGHTS_DIR / f"{variant}-{task}.safetensors"
        with safe_open(str(weights), "pt") as handle:
            metadata = handle.metadata() or {}
        assert "base_fingerprint" in metadata, weights
        check_base(weights, metadata, shapes_model.unet)
        with pytest.raises(ValueError, match="another base denoiser"):
            check_base(weights, metadata, other)


def test_style_confusion_rows_are_labels():
    from harness.shapes.quality import attribute_agreement, confusion

    labels = [{"shape": "star", "colour": "red", "style": style}
              for style in ("striped", "striped", "dotted")]
    predicted = {"shape": ["star", "heart", "star"], "colour": ["red"] * 3,
                 "style": ["striped", "swirl", "dotted"]}

    counts = confusion(predicted, labels, "style")

    assert counts["striped"] == {"plain": 0, "striped": 1, "dotted": 0, "checkered": 0,
                                 "swirl": 1}
    assert counts["dotted"]["dotted"] == 1
    assert sum(sum(row.values()) for row in counts.values()) == 3
    assert attribute_agreement(predicted, labels) == {"shape": 0.6667, "colour": 1.0,
                                                      "style": 0.6667}


@pytest.mark.parametrize("attribute", ["shape", "colour", "style"])
def test_heldout_words_nearest_own_value(attribute):
    """The rule the held-out words were chosen by: MiniLM places each nearest its value."""
    from harness.shapes.quality import heldout_word_similarities

    own_value = {words[-1]: value for value, words in WORD_TABLES[attribute].items()}

    similarities = heldout_word_similarities(attribute)

    for word, row in similarities.items():
        best_other = max(s for value, s in row.items() if value != own_value[word])
        assert row[own_value[word]] > best_other, (word, row)


def test_heldout_word_following_counts_uses():
    from harness.shapes.quality import heldout_word_following, heldout_word_similarities
    from harness.shapes.render import Scene

    pairs = [
        (Scene("star", "blue", "plain", "any"), "a single starburst, navy blue and plain"),
        (Scene("star", "blue", "plain", "any"), "a single star, navy blue and plain"),
        (Scene("cross", "green", "plain", "any"), "a single cross, green and plain"),
        (Scene("cross", "green", "plain", "any"), "a single cross mark, leafy green and plain"),
    ]
    predicted = {"shape": ["cross", "star", "cross", "circle"],
                 "colour": ["green", "blue", "green", "green"], "style": ["plain"] * 4}

    rows = heldout_word_following(pairs, predicted)

    assert rows["shape"]["starburst"]["images"] == 1
    assert rows["shape"]["starburst"]["share"] == 0.0
    assert rows["colour"]["navy blue"]["images"] == 2
    assert rows["colour"]["navy blue"]["share"] == 0.5
    assert rows["colour"]["navy blue"]["encoder_nearest"] == "blue"
    similarity = heldout_word_similarities("colour")["navy blue"]
    margin = similarity["blue"] - max(s for v, s in similarity.items() if v != "blue")
    assert rows["colour"]["navy blue"]["encoder_own_margin"] == round(margin, 4)
    # Multi-word held-out words count only where the whole phrase appears.
    assert rows["shape"]["cross mark"]["images"] == 1
    assert rows["shape"]["cross mark"]["share"] == 0.0
    assert rows["colour"]["leafy green"]["images"] == 1
    assert rows["shape"]["circular disc"]["images"] == 0
    assert rows["shape"]["circular disc"]["share"] is None
