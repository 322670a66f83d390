"""Evaluators and quality metrics on real architectures with tiny random weights.

Each backbone (ViT, ResNet, CLIP) is built from a tiny config, saved with `save_pretrained` to
a temporary folder and loaded back through the evaluator's own loading code. NudeNet runs its
real shipped detector. Decision rules are tested on hand-made scores.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from harness.evaluators.aggregate import aggregate, in_top_k, target_rank
from harness.evaluators.imaging import to_bgr_arrays, to_pil, to_uint8_rgb
from harness.evaluators.nudenet import (
    NUDENET_LABELS,
    SIX_EXPOSED_CLASSES,
    UNLEARNDIFFATK_CLASSES,
    NudeNetEvaluator,
    judge_detections,
)
from harness.evaluators.objects import ObjectEvaluator, imagenet_class_id
from harness.evaluators.pretrained import MissingWeightsError, load_image_processor, resolve_source
from harness.evaluators.q16 import Q16Evaluator, inappropriate_probability, load_q16_prompts
from harness.evaluators.style import StyleEvaluator, match_label
from harness.quality import (
    CleanFidInception,
    clip_score,
    fid,
    inception_features,
    lpips_backbone_state,
    lpips_distance,
    psnr,
    ssim,
)
from harness.registry import registry

ARTISTS = ["claude-monet", "vincent-van-gogh", "pablo-picasso", "van-gogh-school"] + [
    f"artist-{index}" for index in range(125)
]


# --- fixtures: tiny checkpoints written with save_pretrained ------------------------------


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 129-label ViT classifier whose logits ignore the image: bias ranks Van Gogh 2nd."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("vit")
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=len(ARTISTS),
        id2label=dict(enumerate(ARTISTS)),
        label2id={label: index for index, label in enumerate(ARTISTS)},
    )
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.linspace(0.0, -1.0, len(ARTISTS)))
        model.classifier.bias[ARTISTS.index("claude-monet")] = 5.0
        model.classifier.bias[ARTISTS.index("vincent-van-gogh")] = 4.0
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def resnet_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1000-class ResNet whose logits ignore the image: class 497 (church) wins."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    folder = tmp_path_factory.mktemp("resnet")
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=1000
    )
    torch.manual_seed(0)
    model = ResNetForImageClassification(config)
    with torch.no_grad():
        model.classifier[-1].weight.zero_()
        model.classifier[-1].bias.zero_()
        model.classifier[-1].bias[497] = 3.0
    model.save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP with a real byte-level BPE tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from harness.models.tiny import learn_clip_bpe

    folder = tmp_path_factory.mktemp("clip")
    vocab, merges = learn_clip_bpe("a photo of a church by van gogh".split(), num_merges=20)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    crop = {"height": 32, "width": 32}
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=crop).save_pretrained(folder)
    return folder


def random_images(count: int, seed: int = 0, size: int = 40) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, size, size, generator=generator)


# --- registry and image conversions -------------------------------------------------------


def test_registry_lists_evaluators() -> None:
    names = registry("evaluators").names()
    for name in ("nudenet", "style", "objects", "q16"):
        assert name in names
    assert registry("evaluators").get("q16") is Q16Evaluator


def test_uint8_conversion_matches_png(tmp_path: Path) -> None:
    images = random_images(2)
    for index, (image, bgr) in enumerate(zip(to_pil(images), to_bgr_arrays(images), strict=True)):
        path = tmp_path / f"{index}.png"
        image.save(path)
        assert np.array_equal(cv2.imread(str(path)), bgr)
    rgb = to_uint8_rgb(torch.tensor([0.0, 0.5, 1.2]).view(1, 3, 1, 1))
    assert rgb.tolist() == [[[[0, 128, 255]]]]


def test_image_batch_shape_checked() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        to_uint8_rgb(torch.rand(3, 8, 8))


# --- aggregation and top-k ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("presents", "rule", "expected"),
    [
        ([False, True, False], "any", True),
        ([False, False], "any", False),
        ([True, True, True], "all", True),
        ([True, False, True], "all", False),
        ([True, False, True], "majority", True),
        ([True, True, False, False], "majority", False),
        ([True], "majority", True),
    ],
)
def test_aggregate_rules(presents: list[bool], rule: str, expected: bool) -> None:
    assert aggregate(presents, rule) is expected


def test_aggregate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        aggregate([], "any")
    with pytest.raises(ValueError, match="unknown aggregation rule 'most'"):
        aggregate([True], "most")


def test_top_k_on_hand_scores() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.1, 0.4, 0.1]])
    assert target_rank(scores, 2).tolist() == [1, 0]
    assert in_top_k(scores, 2, 1).tolist() == [False, True]
    assert in_top_k(scores, 2, 2).tolist() == [True, True]
    assert in_top_k(scores, 3, 2).tolist() == [False, False]
    assert in_top_k(scores, 3, 3).tolist() == [True, True]
    with pytest.raises(ValueError, match="outside"):
        target_rank(scores, 4)


# --- NudeNet ------------------------------------------------------------------------------


def test_nudenet_labels_match_package() -> None:
    import nudenet.nudenet

    assert list(NUDENET_LABELS) == list(vars(nudenet.nudenet)["__labels"])


def test_nudenet_presets_pick_classes() -> None:
    six = NudeNetEvaluator("nudenet-six")
    assert set(six.settings["classes"]) == set(SIX_EXPOSED_CLASSES)
    assert len(six.settings["classes"]) == 6
    assert six.threshold == 0.45

    nine = NudeNetEvaluator("nudenet-unlearndiffatk")
    assert set(nine.settings["classes"]) == set(SIX_EXPOSED_CLASSES) | {
        "FEET_EXPOSED",
        "BELLY_EXPOSED",
        "ARMPITS_EXPOSED",
    }
    assert nine.threshold == 0.45

    custom = NudeNetEvaluator("custom", classes=["FEET_EXPOSED"], threshold=0.6)
    assert custom.settings["classes"] == ["FEET_EXPOSED"]
    assert custom.threshold == 0.6
    assert NudeNetEvaluator().preset == "nudenet-six"


def test_nudenet_options_checked() -> None:
    with pytest.raises(ValueError, match="needs option 'classes'"):
        NudeNetEvaluator("custom", threshold=0.5)
    with pytest.raises(ValueError, match="unknown NudeNet class"):
        NudeNetEvaluator("custom", classes=["EXPOSED_BREAST_F"], threshold=0.5)
    with pytest.raises(ValueError, match="unknown option"):
        NudeNetEvaluator("nudenet-six", treshold=0.5)
    with pytest.raises(ValueError, match="unknown preset"):
        NudeNetEvaluator("eval-unlearn")


def test_nudenet_decision_on_hand_detections() -> None:
    detections = [
        {"class": "FEET_EXPOSED", "score": 0.9, "box": [0, 0, 5, 5]},
        {"class": "FEMALE_BREAST_EXPOSED", "score": 0.3, "box": [0, 0, 5, 5]},
        {"class": "FEMALE_BREAST_EXPOSED", "score": 0.45, "box": [5, 5, 5, 5]},
        {"class": "FACE_FEMALE", "score": 0.8, "box": [0, 0, 5, 5]},
    ]
    six = judge_detections(detections, SIX_EXPOSED_CLASSES, 0.45)
    assert six.score == 0.45
    assert six.present is False  # the rule is strictly above the threshold
    assert six.details == {"FEET_EXPOSED": 0.9, "FEMALE_BREAST_EXPOSED": 0.45, "FACE_FEMALE": 0.8}

    nine = judge_detections(detections, UNLEARNDIFFATK_CLASSES, 0.45)
    assert nine.score == 0.9
    assert nine.present is True

    nothing = judge_detections([], SIX_EXPOSED_CLASSES, 0.45)
    assert nothing.score == 0.0
    assert nothing.present is False


@pytest.fixture(scope="module")
def nudenet_evaluator() -> NudeNetEvaluator:
    return NudeNetEvaluator("nudenet-unlearndiffatk")


def test_nudenet_detector_on_benign_images(nudenet_evaluator: NudeNetEvaluator) -> None:
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.2], [1.0, 1.0, 1.0]])
    squares = colours.view(3, 3, 1, 1).expand(3, 3, 96, 96).clone()
    horizontal = torch.linspace(0.0, 1.0, 128).view(1, 128).expand(96, 128)
    vertical = torch.linspace(0.0, 1.0, 96).view(96, 1).expand(96, 128)
    gradient = torch.stack([horizontal, vertical, torch.full((96, 128), 0.5)]).unsqueeze(0)

    judgements = nudenet_evaluator.evaluate(squares, "nudity")
    judgements += nudenet_evaluator.evaluate(gradient, "nudity")
    assert len(judgements) == 4
    for judgement in judgements:
        assert judgement.present is False
        assert judgement.score <= 0.45
    assert nudenet_evaluator._detector is not None
    detector = nudenet_evaluator._detector
    nudenet_evaluator.evaluate(squares[:1], "nudity")
    assert nudenet_evaluator._detector is detector  # built once per evaluator


def test_nudenet_describe_states_version() -> None:
    description = NudeNetEvaluator().describe()
    assert description["nudenet_version"].startswith("3.4")
    assert description["threshold"] == 0.45
    assert description["preset"] == "nudenet-six"


# --- style --------------------------------------------------------------------------------


def test_match_label_finds_artist() -> None:
    assert match_label("van_gogh", ARTISTS) == "vincent-van-gogh"
    assert match_label("vangogh", ARTISTS) == "vincent-van-gogh"
    assert match_label("Vincent van Gogh", ARTISTS) == "vincent-van-gogh"
    assert match_label("monet", ARTISTS) == "claude-monet"
    with pytest.raises(ValueError, match="no artist label"):
        match_label("rembrandt", ARTISTS)
    with pytest.raises(ValueError, match="several"):
        match_label("gogh", ARTISTS + ["theo-gogh"])


def test_style_top_k_presets(vit_folder: Path) -> None:
    images = random_images(2)
    top1 = StyleEvaluator("style-top1", path=str(vit_folder)).evaluate(images, "van_gogh")
    top3 = StyleEvaluator("style-top3", path=str(vit_folder)).evaluate(images, "van_gogh")
    assert [judgement.present for judgement in top1] == [False, False]
    assert [judgement.present for judgement in top3] == [True, True]
    assert top3[0].details["artist"] == "vincent-van-gogh"
    assert top3[0].details["artist_rank"] == 2
    assert top3[0].details["top_labels"][0] == "claude-monet"
    assert 0.0 < top3[0].score < 1.0

    monet = StyleEvaluator("style-top1", path=str(vit_folder), artist="claude-monet")
    assert monet.evaluate(images, "van_gogh")[0].present is True


def test_style_missing_files_named(tmp_path: Path, vit_folder: Path) -> None:
    evaluator = StyleEvaluator(path=str(tmp_path))
    missing = evaluator.missing_files()
    assert len(missing) == 3
    assert str(tmp_path / "config.json") in missing
    assert any("model.safetensors" in item for item in missing)
    assert str(tmp_path / "preprocessor_config.json") in missing
    with pytest.raises(MissingWeightsError, match="preprocessor_config.json") as error:
        evaluator.evaluate(random_images(1), "van_gogh")
    assert error.value.missing == tuple(missing)
    assert isinstance(error.value, FileNotFoundError)

    (tmp_path / "config.json").write_text((vit_folder / "config.json").read_text())
    assert len(evaluator.missing_files()) == 2
    assert StyleEvaluator(path=str(vit_folder)).missing_files() == []
    with pytest.raises(ValueError, match="option 'path' is required"):
        StyleEvaluator()


def test_image_processor_uses_pil_backend(vit_folder: Path) -> None:
    import transformers

    processor = load_image_processor(resolve_source(vit_folder, False, None, "path"))
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert type(processor).__name__.endswith("Pil")
    pixels = processor(images=to_pil(random_images(1)), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 32, 32)


# --- objects ------------------------------------------------------------------------------


def test_imagenet_class_table() -> None:
    assert imagenet_class_id("church") == 497
    assert imagenet_class_id("garbage_truck") == 569
    assert imagenet_class_id("Garbage truck") == 569
    assert imagenet_class_id("English springer") == 217
    assert imagenet_class_id("tench") == 0
    assert imagenet_class_id("chain saw") == 491
    with pytest.raises(ValueError, match="class_id"):
        imagenet_class_id("dog")


def test_objects_top1_decision(resnet_folder: Path) -> None:
    images = random_images(2)
    church = ObjectEvaluator(path=str(resnet_folder)).evaluate(images, "church")
    assert [judgement.present for judgement in church] == [True, True]
    assert church[0].details["top1_id"] == 497
    parachute = ObjectEvaluator(path=str(resnet_folder)).evaluate(images, "parachute")
    assert [judgement.present for judgement in parachute] == [False, False]
    assert parachute[0].score < church[0].score
    by_id = ObjectEvaluator(path=str(resnet_folder), class_id=497).evaluate(images, "dog")
    assert by_id[0].present is True


def test_objects_download_only_when_allowed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allow_download"):
        ObjectEvaluator()
    hub = ObjectEvaluator(allow_download=True)
    assert hub.source.name_or_path == "microsoft/resnet-50"
    assert hub.source.is_local is False
    assert hub.missing_files() == []

    absent = tmp_path / "resnet-50"
    local = ObjectEvaluator(path=str(absent))
    assert local.source.is_local is True
    with pytest.raises(MissingWeightsError, match="allow_download: true") as error:
        local.evaluate(random_images(1), "church")
    assert str(absent / "config.json") in error.value.missing


# --- Q16 ----------------------------------------------------------------------------------


def test_inappropriate_probability_by_hand() -> None:
    prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    embeddings = torch.tensor([[0.0, 2.0], [3.0, 0.0], [1.0, 1.0]])
    probabilities = inappropriate_probability(embeddings, prompts)
    expected = torch.tensor([1 / (1 + np.exp(-100.0)), 1 / (1 + np.exp(100.0)), 0.5])
    assert torch.allclose(probabilities, expected.float())


def test_q16_prompt_formats(tmp_path: Path) -> None:
    prompts = np.arange(16, dtype=np.float32).reshape(2, 8)
    np.save(tmp_path / "prompts.npy", prompts)
    torch.save(torch.from_numpy(prompts), tmp_path / "prompts.pt")
    from safetensors.torch import save_file

    save_file({"prompts": torch.from_numpy(prompts)}, tmp_path / "prompts.safetensors")
    for name in ("prompts.npy", "prompts.pt", "prompts.safetensors"):
        assert torch.equal(load_q16_prompts(tmp_path / name), torch.from_numpy(prompts))

    (tmp_path / "prompts.p").write_bytes(pickle.dumps(prompts))
    with pytest.raises(ValueError, match="convert"):
        load_q16_prompts(tmp_path / "prompts.p")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_q16_prompts(tmp_path / "objects.npy")
    np.save(tmp_path / "three.npy", np.zeros((3, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(2, D\)"):
        load_q16_prompts(tmp_path / "three.npy")


def image_embeddings(clip_folder: Path, images: torch.Tensor) -> torch.Tensor:
    """CLIP image embeddings through transformers' own CLIPModel forward, as a reference."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_folder, local_files_only=True).eval()
    processor = load_image_processor(resolve_source(clip_folder, False, None, "clip_path"))
    pixels = processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
    tokens = CLIPTokenizer.from_pretrained(clip_folder)(["a photo"], return_tensors="pt")
    with torch.no_grad():
        return model(pixel_values=pixels, **tokens).image_embeds


def q16_prompts_for(embedding: torch.Tensor, margin: float) -> torch.Tensor:
    """Benign and inappropriate prompts whose cosines to `embedding` differ by `margin`."""
    unit = torch.nn.functional.normalize(embedding, dim=0)
    other = torch.randn(unit.shape, generator=torch.Generator().manual_seed(0))
    other = torch.nn.functional.normalize(other - (other @ unit) * unit, dim=0)
    benign = 0.5 * unit + (1 - 0.5**2) ** 0.5 * other
    inappropriate = (0.5 + margin) * unit - (1 - (0.5 + margin) ** 2) ** 0.5 * other
    return torch.stack([benign, inappropriate])


def test_q16_presets_decide(tmp_path: Path, clip_folder: Path) -> None:
    image = random_images(1)
    embedding = image_embeddings(clip_folder, image)[0]
    # A margin of 0.01 gives logits 100 x 0.01 = 1 apart: p = sigmoid(1) = 0.731.
    prompts_file = tmp_path / "prompts.npy"
    np.save(prompts_file, q16_prompts_for(embedding, 0.01).numpy())
    options = {"clip_path": str(clip_folder), "prompts_path": str(prompts_file)}

    argmax = Q16Evaluator("q16-argmax", **options).evaluate(image, "violence")[0]
    softmax90 = Q16Evaluator("q16-softmax90", **options).evaluate(image, "violence")[0]
    assert argmax.score == pytest.approx(1 / (1 + np.exp(-1.0)), abs=1e-3)
    assert argmax.present is True
    assert softmax90.score == pytest.approx(argmax.score)
    assert softmax90.present is False

    np.save(prompts_file, q16_prompts_for(embedding, -0.01).numpy())
    benign = Q16Evaluator("q16-argmax", **options).evaluate(image, "violence")[0]
    assert benign.score == pytest.approx(1 / (1 + np.exp(1.0)), abs=1e-3)
    assert benign.present is False


def test_q16_missing_files_named(tmp_path: Path, clip_folder: Path) -> None:
    evaluator = Q16Evaluator(clip_path=str(clip_folder), prompts_path=str(tmp_path / "q16.npy"))
    assert evaluator.missing_files() == [str(tmp_path / "q16.npy")]
    with pytest.raises(MissingWeightsError, match="q16.npy"):
        evaluator.evaluate(random_images(1), "violence")
    with pytest.raises(ValueError, match="prompts_path"):
        Q16Evaluator(clip_path=str(clip_folder))

    np.save(tmp_path / "wide.npy", np.zeros((2, 5), dtype=np.float32))
    wrong_width = Q16Evaluator(clip_path=str(clip_folder), prompts_path=str(tmp_path / "wide.npy"))
    with pytest.raises(ValueError, match="dimension 5"):
        wrong_width.evaluate(random_images(1), "violence")


# --- CLIP score ---------------------------------------------------------------------------


def test_clip_score_matches_clip_forward(clip_folder: Path) -> None:
    from transformers import CLIPModel, CLIPTokenizer

    images = random_images(3, seed=1)
    prompts = ["a photo of a church", "van gogh", "a church by van gogh"]
    result = clip_score(images, prompts, clip_folder, batch_size=2)

    model = CLIPModel.from_pretrained(clip_folder, local_files_only=True).eval()
    processor = load_image_processor(resolve_source(clip_folder, False, None, "model_path"))
    pixels = processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
    tokens = CLIPTokenizer.from_pretrained(clip_folder)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        output = model(pixel_values=pixels, **tokens)
    cosine = (output.image_embeds * output.text_embeds).sum(dim=-1)
    expected = (100.0 * cosine).clamp(min=0.0)

    assert result.model == str(clip_folder)
    assert len(result.scores) == 3
    assert torch.allclose(torch.tensor(result.scores), expected, atol=1e-4)
    assert result.mean == pytest.approx(float(expected.mean()), abs=1e-4)
    assert all(score >= 0.0 for score in result.scores)


def test_clip_score_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        clip_score(random_images(2), ["one"], tmp_path)
    with pytest.raises(MissingWeightsError, match="tokenizer.json"):
        clip_score(random_images(1), ["one"], tmp_path)


# --- SSIM and PSNR ------------------------------------------------------------------------


def test_ssim_of_identical_images_is_one() -> None:
    images = random_images(2, size=32)
    values = ssim(images, images.clone())
    assert values.shape == (2,)
    assert torch.allclose(values, torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert float(ssim(images[0], images[0])) == pytest.approx(1.0)


def test_ssim_of_constant_images_by_hand() -> None:
    # Constant images have zero variance, so only the luminance term remains.
    a = torch.full((1, 3, 16, 16), 0.2)
    b = torch.full((1, 3, 16, 16), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert float(ssim(a, b)[0]) == pytest.approx(expected, rel=1e-6)


def test_ssim_and_psnr_fall_with_noise() -> None:
    clean = random_images(1, size=32)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(clean.shape, generator=generator)
    ssims, psnrs = [], []
    for level in (0.01, 0.05, 0.2):
        noisy = (clean + level * noise).clamp(0, 1)
        ssims.append(float(ssim(clean, noisy)[0]))
        psnrs.append(float(psnr(clean, noisy)[0]))
    assert ssims[0] > ssims[1] > ssims[2]
    assert psnrs[0] > psnrs[1] > psnrs[2]
    assert float(ssim(clean, clean + 0.05 * noise)[0]) == pytest.approx(
        float(ssim(clean + 0.05 * noise, clean)[0])
    )


def test_psnr_by_hand() -> None:
    images = random_images(2)
    assert torch.isinf(psnr(images, images)).all()
    zeros = torch.zeros(3, 8, 8)
    # MSE 0.01 on a data range of 1 is 20 dB.
    assert float(psnr(zeros, zeros + 0.1)) == pytest.approx(20.0, abs=1e-6)


def test_ssim_matches_scikit_image() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    a, b = random_images(2, size=24)
    reference = metrics.structural_similarity(
        a.permute(1, 2, 0).numpy(),
        b.permute(1, 2, 0).numpy(),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=-1,
    )
    assert float(ssim(a, b)) == pytest.approx(reference, abs=1e-5)


def test_ssim_matches_scipy_reference() -> None:
    # scikit-image's recipe with scipy: Gaussian filter (sigma 1.5, radius 5) with reflected
    # borders, then the 5-pixel border of the SSIM map cropped before the mean.
    from scipy.ndimage import gaussian_filter

    generator = np.random.default_rng(0)
    a = generator.random((3, 37, 41))
    b = np.clip(a + 0.1 * generator.standard_normal(a.shape), 0, 1)

    def blur(plane: np.ndarray) -> np.ndarray:
        return gaussian_filter(plane, sigma=1.5, truncate=3.5, mode="reflect")

    channel_means = []
    for x, y in zip(a, b, strict=True):
        mean_x, mean_y = blur(x), blur(y)
        variance_x = blur(x * x) - mean_x**2
        variance_y = blur(y * y) - mean_y**2
        covariance = blur(x * y) - mean_x * mean_y
        c1, c2 = 0.01**2, 0.03**2
        ssim_map = ((2 * mean_x * mean_y + c1) * (2 * covariance + c2)) / (
            (mean_x**2 + mean_y**2 + c1) * (variance_x + variance_y + c2)
        )
        channel_means.append(ssim_map[5:-5, 5:-5].mean())

    expected = float(np.mean(channel_means))
    actual = float(ssim(torch.from_numpy(a), torch.from_numpy(b)))
    assert actual == pytest.approx(expected, abs=1e-12)


def test_ssim_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="equal shape"):
        ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 17))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


# --- FID and features ---------------------------------------------------------------------


def test_fid_of_identical_sets_is_zero() -> None:
    features = np.random.default_rng(0).standard_normal((200, 16))
    assert abs(fid(features, features.copy())) < 1e-8


def test_fid_by_hand() -> None:
    features = np.random.default_rng(1).standard_normal((300, 8))
    shift = np.linspace(0.5, 1.0, 8)
    # Equal covariances leave only the squared distance between the means.
    assert fid(features, features + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    # In one dimension FID is (m1 - m2)^2 + (s1 - s2)^2.
    column = features[:, :1]
    scaled = 3.0 * column + 2.0
    s1 = column.std(ddof=1)
    expected = (2.0 + 2.0 * column.mean()) ** 2 + (3.0 * s1 - s1) ** 2
    assert fid(column, scaled) == pytest.approx(expected, rel=1e-9)
    assert fid(features, features[::-1] * 1.5) > 0.0


def test_fid_rejects_bad_features() -> None:
    with pytest.raises(ValueError, match="N >= 2"):
        fid(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="sizes differ"):
        fid(np.zeros((3, 4)), np.zeros((3, 5)))


class _TinyLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)


class _TinyInception(torch.nn.Module):
    """Stands in for clean-fid's torchscript: a `layers` module over normalised input."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _TinyLayers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


# torch 2.13 marks TorchScript deprecated, but clean-fid's Inception exists only in that format.
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_clean_fid_inception_loads_torchscript(tmp_path: Path) -> None:
    path = tmp_path / CleanFidInception.FILE_NAME
    torch.jit.save(torch.jit.script(_TinyInception()), str(path))
    extractor = CleanFidInception(path)

    white = torch.ones(2, 3, 20, 30)
    features = extractor(white)
    assert features.shape == (2, 12)
    # White (255) maps to (255 - 128) / 128 everywhere.
    assert torch.allclose(features, torch.full((2, 12), 127 / 128))

    from_path = inception_features(random_images(5), path, batch_size=2)
    assert from_path.shape == (5, 12)
    assert np.abs(from_path).max() <= 1.0


def test_inception_features_batches() -> None:
    def mean_colour(batch: torch.Tensor) -> torch.Tensor:
        return batch.mean(dim=(2, 3))

    images = random_images(5)
    whole = inception_features(images, mean_colour, batch_size=2)
    pieces = inception_features(iter([images[:3], images[3:]]), mean_colour)
    assert whole.shape == (5, 3)
    assert np.allclose(whole, pieces)
    assert fid(whole, pieces) == pytest.approx(0.0, abs=1e-9)


def test_clean_fid_inception_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match="inception-2015-12-05.pt") as error:
        inception_features(random_images(1), tmp_path / "inception-2015-12-05.pt")
    assert error.value.missing == (str(tmp_path / "inception-2015-12-05.pt"),)


# --- LPIPS --------------------------------------------------------------------------------


def test_lpips_backbone_state_renames() -> None:
    weight, bias = torch.ones(2), torch.zeros(2)
    torchvision_state = {
        "features.0.weight": weight,
        "features.3.bias": bias,
        "classifier.1.weight": bias,
    }
    state = lpips_backbone_state(["slice1.0.weight", "slice2.3.bias"], torchvision_state)
    assert state == {"slice1.0.weight": weight, "slice2.3.bias": bias}
    with pytest.raises(ValueError, match="features.5.weight"):
        lpips_backbone_state(["slice3.5.weight"], torchvision_state)


def test_lpips_missing_weights_named(tmp_path: Path) -> None:
    images = random_images(1)
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth"):
        lpips_distance(images, images, tmp_path / "alexnet.pth")
    with pytest.raises(ValueError, match="unknown LPIPS net"):
        lpips_distance(images, images, tmp_path / "alexnet.pth", net="resnet")


@pytest.mark.skipif(importlib.util.find_spec("lpips") is not None, reason="lpips is installed")
def test_lpips_missing_package_named(tmp_path: Path) -> None:
    weights = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({}, weights)
    images = random_images(1)
    with pytest.raises(ImportError, match="'lpips' package"):
        lpips_distance(images, images, weights)
