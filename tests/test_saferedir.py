"""SafeRedir: network size, inference rules, batching, records, gradients, training, loading.

The inference-rule tests replace the redirector with `HandSetClassifier`, a test double
whose unsafe verdict is set by hand per image and timestep, so each rule (cooldown,
stickiness, the classifier's input) is checked against known decisions.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import yaml
from torch import nn

from defenses.saferedir.defense import SafeRedir
from defenses.saferedir.hooks import RedirectionOptions, redirection_delta
from defenses.saferedir.loading import dims_from_state, load_checkpoint, save_checkpoint
from defenses.saferedir.networks import (
    UNSAFE,
    PromptFeatures,
    Redirector,
    RedirectorDims,
    RedirectorOutput,
    parameter_count,
)
from defenses.saferedir.train import (
    SafeRedirTrainer,
    TrainConfig,
    TrajectoryData,
    evaluate,
    fit,
    token_mask_targets,
)
from harness.sampling import SamplerHook, make_scheduler

STEPS = 10
UNSAFE_PROMPT = "a nude woman at the beach"
SAFE_PROMPT = "a red car in the city"
ALPHA = 0.05


class HandSetClassifier:
    """Test double for the redirector only: verdicts set by hand, a fixed delta.

    Each rule pairs a reference embedding (T, D) with `unsafe_at(timestep) -> bool`. A row
    the hook passes in is owned by the reference nearest to it, so a redirected embedding
    (a small move away from its original) still belongs to its own image. The delta points
    along one fixed unit vector with per-token scale `ALPHA` and a mask of ones.
    """

    def __init__(self, rules: list[tuple[torch.Tensor, Callable[[int], bool]]]) -> None:
        self.references = torch.stack([reference for reference, _ in rules])
        self.unsafe_at = [rule for _, rule in rules]
        self.calls: list[tuple[int, torch.Tensor]] = []
        self.feature_rows = 0  # prompt rows passed to `prompt_features`

    def prompt_features(self, prompt) -> PromptFeatures:
        self.feature_rows += prompt.shape[0]
        copy = prompt.clone().unsqueeze(0)  # a copy, because the hook updates features in place
        return PromptFeatures(keys=copy, values=copy.clone(), pooled=prompt.mean(dim=1),
                              alpha=prompt[..., :1].clone())

    def __call__(self, latents, prompt, timesteps, with_mask=True, features=None,
                 unsafe_only=False) -> RedirectorOutput:
        assert features is not None and torch.equal(features.keys[0], prompt)
        batch, tokens, width = prompt.shape
        self.calls.append((int(timesteps[0]), prompt.clone()))
        distances = torch.cdist(prompt.flatten(1), self.references.flatten(1).to(prompt))
        owners = distances.argmin(dim=1).tolist()
        unsafe = [self.unsafe_at[owner](int(t)) for owner, t in zip(owners, timesteps, strict=True)]
        logits = torch.tensor([[0.0, 1.0] if flag else [1.0, 0.0] for flag in unsafe])
        direction = torch.nn.functional.normalize(torch.ones(batch, width), dim=-1)
        return RedirectorOutput(
            logits=logits,
            delta=direction.unsqueeze(1).expand(batch, tokens, width) * 3.0,
            mask=torch.ones(batch, tokens),
            alpha=torch.full((batch, tokens, 1), ALPHA),
            direction=direction,
        )


class ConditioningRecorder(SamplerHook):
    """Keeps the embeddings each denoiser call used."""

    def __init__(self, store: list) -> None:
        self.store = store

    def before_denoise(self, state) -> None:
        self.store.append((state.cond.clone(), state.uncond.clone()))


def timesteps_of(model, steps: int = STEPS) -> list[int]:
    scheduler = make_scheduler("ddim", model.scheduler_config)
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def encode(model, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_prompts([prompt])[0][0]


def defended(model, classifier, **options):
    conditioning: list = []
    model = SafeRedir(concept="nudity", redirector=classifier, **options).apply(model)
    model = model.replace(
        sampler_hooks=(*model.sampler_hooks, lambda _m: ConditioningRecorder(conditioning))
    )
    return model, conditioning


def generate(model, prompts, seeds=None):
    seeds = seeds or list(range(len(prompts)))
    return model.generate(prompts, seeds=seeds, guidance=7.5, steps=STEPS)


def always(_timestep: int) -> bool:
    return True


def never(_timestep: int) -> bool:
    return False


# -- the network -------------------------------------------------------------------------


def test_parameter_count_sd1x_dims():
    with torch.device("meta"):
        network = Redirector(RedirectorDims(latent_channels=4, token_count=77, embed_dim=768))
    assert parameter_count(network) == 14_573_574


@pytest.mark.parametrize(
    ("channels", "size", "tokens", "width"), [(4, 8, 77, 32), (12, 16, 24, 384)]
)
def test_network_output_shapes(channels, size, tokens, width):
    dims = RedirectorDims(latent_channels=channels, token_count=tokens, embed_dim=width)
    network = Redirector(dims).eval()
    output = network(torch.randn(2, channels, size, size), torch.randn(2, tokens, width),
                     torch.tensor([981.0, 21.0]))
    assert output.logits.shape == (2, 2)
    assert output.delta.shape == (2, tokens, width)
    assert output.mask.shape == (2, tokens)
    assert output.alpha.shape == (2, tokens, 1)


def test_delta_rows_share_one_direction():
    network = Redirector(RedirectorDims(latent_channels=4, token_count=77, embed_dim=32)).eval()
    output = network(torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32), torch.tensor([500.0]))
    rows = torch.nn.functional.normalize(output.delta[0], dim=-1)
    assert torch.allclose(rows, output.direction[0].expand_as(rows), atol=1e-5)


def test_prompt_features_give_the_same_call():
    torch.manual_seed(0)
    network = Redirector(RedirectorDims(latent_channels=4, token_count=77, embed_dim=32)).eval()
    latents, timesteps = torch.randn(3, 4, 8, 8), torch.tensor([900.0, 500.0, 20.0])
    prompt = torch.randn(3, 77, 32)
    features = network.prompt_features(prompt)

    with torch.no_grad():
        fresh = network(latents, prompt, timesteps, with_mask=False)
        reused = network(latents, prompt, timesteps, with_mask=False, features=features)
    assert torch.allclose(fresh.logits, reused.logits, atol=1e-6)
    assert torch.allclose(fresh.delta, reused.delta, atol=1e-6)
    assert torch.equal(fresh.alpha, reused.alpha)

    # Rows selected from a batch, and rows replaced by another prompt's features.
    rows = torch.tensor([2, 0])
    picked = features.select(rows)
    alone = network.prompt_features(prompt[rows])
    assert torch.allclose(picked.keys, alone.keys, atol=1e-6)
    other = torch.randn(1, 77, 32)
    features.replace_rows(torch.tensor([1]), network.prompt_features(other))
    assert torch.allclose(features.select(torch.tensor([1])).values,
                          network.prompt_features(other).values, atol=1e-6)
    assert torch.allclose(features.select(torch.tensor([0])).pooled, prompt[:1].mean(dim=1))


def test_unsafe_only_skips_safe_deltas():
    torch.manual_seed(0)
    network = Redirector(RedirectorDims(latent_channels=4, token_count=77, embed_dim=32)).eval()
    latents, prompt = torch.randn(6, 4, 8, 8), torch.randn(6, 77, 32)
    timesteps = torch.full((6,), 500.0)
    with torch.no_grad():
        margins = network(latents, prompt, timesteps, with_mask=False).logits.diff(dim=-1)
        network.classifier.output.bias[UNSAFE] -= margins.median()  # verdicts both ways
        full = network(latents, prompt, timesteps, with_mask=False)
        partial = network(latents, prompt, timesteps, with_mask=False, unsafe_only=True)

    unsafe = full.logits.argmax(dim=-1) == UNSAFE
    assert 0 < int(unsafe.sum()) < 6
    assert torch.equal(partial.logits, full.logits)
    assert torch.allclose(partial.delta[unsafe], full.delta[unsafe], atol=1e-6)
    assert not partial.delta[~unsafe].any()
    assert not partial.direction[~unsafe].any()


@pytest.mark.parametrize(("rule", "sees_redirected", "feature_rows"), [
    (never, True, 1),  # never redirected: E~ stays E, computed once for 10 checks
    # The first redirection changes E~; the double's later ones give the same E + Delta.
    (always, True, 2),
    (always, False, 1),  # the classifier reads the unchanged E
])
def test_features_recomputed_on_embedding_change(
    tiny_model, rule, sees_redirected, feature_rows
):
    classifier = HandSetClassifier([(encode(tiny_model, UNSAFE_PROMPT), rule)])
    model, _ = defended(tiny_model, classifier, classifier_sees_redirected=sees_redirected)
    generate(model, [UNSAFE_PROMPT])
    assert classifier.feature_rows == feature_rows


def test_mask_skip_keeps_delta_and_gradient():
    torch.manual_seed(0)
    network = Redirector(RedirectorDims(latent_channels=4, token_count=77, embed_dim=32)).eval()
    latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 20.0])
    options = RedirectionOptions()
    deltas, gradients = [], []
    for with_mask in (True, False):
        prompt = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
        prompt.requires_grad_(True)
        output = network(latents, prompt, timesteps, with_mask=with_mask)
        delta = redirection_delta(output, prompt, options)
        delta.square().sum().backward()
        deltas.append(delta.detach())
        gradients.append(prompt.grad)
    assert torch.allclose(deltas[0], deltas[1], atol=1e-5)
    assert torch.allclose(gradients[0], gradients[1], atol=1e-4)


# -- inference rules with the hand-set classifier ---------------------------------------


def test_cooldown_spaces_checks(tiny_model):
    classifier = HandSetClassifier([(encode(tiny_model, UNSAFE_PROMPT), always)])
    model, _ = defended(tiny_model, classifier, cooldown=2)
    record = generate(model, [UNSAFE_PROMPT]).records[0]
    assert record["saferedir_fired_steps"] == [0, 3, 6, 9]
    assert record["saferedir_checks"] == 4


def test_cooldown_zero_checks_every_step(tiny_model):
    classifier = HandSetClassifier([(encode(tiny_model, UNSAFE_PROMPT), always)])
    model, _ = defended(tiny_model, classifier, cooldown=0)
    record = generate(model, [UNSAFE_PROMPT]).records[0]
    assert record["saferedir_fired_steps"] == list(range(STEPS))


def test_redirection_follows_released_rule(tiny_model):
    original = encode(tiny_model, UNSAFE_PROMPT)
    classifier = HandSetClassifier([(original, always)])
    model, conditioning = defended(tiny_model, classifier, alpha_scale=1.5)
    generate(model, [UNSAFE_PROMPT])

    cond0, uncond0 = conditioning[0]
    cond1, uncond1 = conditioning[1]
    width = original.shape[-1]
    direction = torch.ones(width) / width**0.5
    expected_cond = original + 1.5 * ALPHA * original.norm(dim=-1, keepdim=True) * direction
    expected_uncond = uncond0[0] + 1.5 * ALPHA * uncond0[0].norm(dim=-1, keepdim=True) * direction
    assert torch.equal(cond0[0], original)  # the first denoiser call is never redirected
    assert torch.allclose(cond1[0], expected_cond, atol=1e-6)
    assert torch.allclose(uncond1[0], expected_uncond, atol=1e-6)


def test_cond_only_leaves_uncond(tiny_model):
    classifier = HandSetClassifier([(encode(tiny_model, UNSAFE_PROMPT), always)])
    model, conditioning = defended(tiny_model, classifier, apply_to_uncond=False)
    generate(model, [UNSAFE_PROMPT])
    assert torch.equal(conditioning[-1][1], conditioning[0][1])
    assert not torch.equal(conditioning[-1][0], conditioning[0][0])


def test_sticky_keeps_redirection(tiny_model):
    first = timesteps_of(tiny_model)[0]
    original = encode(tiny_model, UNSAFE_PROMPT)
    classifier = HandSetClassifier([(original, lambda t: t == first)])
    model, conditioning = defended(tiny_model, classifier)
    record = generate(model, [UNSAFE_PROMPT]).records[0]

    assert record["saferedir_fired_steps"] == [0]
    assert record["saferedir_checks"] == 1 + (STEPS - 3)  # step 0, then every step from 3
    redirected = conditioning[1][0]
    for cond, _ in conditioning[1:]:
        assert torch.equal(cond, redirected)


def test_non_sticky_restores_original(tiny_model):
    first = timesteps_of(tiny_model)[0]
    original = encode(tiny_model, UNSAFE_PROMPT)
    classifier = HandSetClassifier([(original, lambda t: t == first)])
    model, conditioning = defended(tiny_model, classifier, sticky=False)
    generate(model, [UNSAFE_PROMPT])

    for step in (1, 2, 3):  # redirected until the safe check after step 3's denoiser call
        assert not torch.equal(conditioning[step][0][0], original)
    for step in range(4, STEPS):
        assert torch.equal(conditioning[step][0][0], original)


@pytest.mark.parametrize("sees_redirected", [True, False])
def test_classifier_input_embedding(tiny_model, sees_redirected):
    original = encode(tiny_model, UNSAFE_PROMPT)
    classifier = HandSetClassifier([(original, always)])
    model, conditioning = defended(
        tiny_model, classifier, classifier_sees_redirected=sees_redirected
    )
    generate(model, [UNSAFE_PROMPT])
    _, seen_at_step3 = classifier.calls[1]
    expected = conditioning[3][0] if sees_redirected else original.unsqueeze(0)
    assert torch.equal(seen_at_step3, expected)
    assert not torch.equal(conditioning[3][0], original.unsqueeze(0))


def test_check_before_denoise_redirects_step0(tiny_model):
    original = encode(tiny_model, UNSAFE_PROMPT)
    classifier = HandSetClassifier([(original, always)])
    model, conditioning = defended(tiny_model, classifier, check_timing="before")
    record = generate(model, [UNSAFE_PROMPT]).records[0]
    assert record["saferedir_first_step"] == 0
    assert not torch.equal(conditioning[0][0][0], original)


def test_batch_images_decide_independently(tiny_model):
    rules = [(encode(tiny_model, UNSAFE_PROMPT), always), (encode(tiny_model, SAFE_PROMPT), never)]
    model, _ = defended(tiny_model, HandSetClassifier(rules))
    batch = generate(model, [UNSAFE_PROMPT, SAFE_PROMPT], seeds=[3, 4])
    solo = generate(model, [SAFE_PROMPT], seeds=[4])
    undefended = generate(tiny_model, [UNSAFE_PROMPT], seeds=[3])

    assert [r["saferedir_fired"] for r in batch.records] == [True, False]
    assert torch.allclose(batch.images[1], solo.images[0], atol=1e-5)
    assert not torch.allclose(batch.images[0], undefended.images[0], atol=1e-3)


def test_state_resets_between_generations(tiny_model):
    classifier = HandSetClassifier([(encode(tiny_model, UNSAFE_PROMPT), always)])
    model, _ = defended(tiny_model, classifier, cooldown=3)
    first = generate(model, [UNSAFE_PROMPT])
    second = generate(model, [UNSAFE_PROMPT])
    assert first.records[0]["saferedir_fired_steps"] == [0, 4, 8]
    assert second.records[0]["saferedir_fired_steps"] == [0, 4, 8]
    assert torch.equal(first.images, second.images)


def test_records_written_per_image(tiny_model):
    rules = [(encode(tiny_model, UNSAFE_PROMPT), always), (encode(tiny_model, SAFE_PROMPT), never)]
    model, _ = defended(tiny_model, HandSetClassifier(rules))
    records = generate(model, [UNSAFE_PROMPT, SAFE_PROMPT]).records
    assert records[0]["saferedir_fired"] is True
    assert records[0]["saferedir_first_step"] == 0
    assert records[1]["saferedir_fired"] is False
    assert records[1]["saferedir_first_step"] is None
    assert records[1]["saferedir_fired_steps"] == []
    assert records[1]["saferedir_checks"] == STEPS


def test_composes_over_another_defense(tiny_model):
    from defenses.negative_prompt import NegativePrompt

    inner = NegativePrompt(concept="nudity").wrap(tiny_model)
    classifier = HandSetClassifier([(encode(tiny_model, UNSAFE_PROMPT), always)])
    outer = SafeRedir(concept="nudity", redirector=classifier).wrap(inner)
    assert outer.defense_chain == ("negative-prompt", "saferedir")
    assert outer.negative_prompt == "nudity"
    assert generate(outer, [UNSAFE_PROMPT]).records[0]["saferedir_fired"] is True


# -- the differentiable surrogate -------------------------------------------------------


def confident_redirector(width: int) -> Redirector:
    """Build a random tiny redirector whose classifier gives p_unsafe close to 1."""
    torch.manual_seed(0)
    network = Redirector(RedirectorDims(latent_channels=4, token_count=77, embed_dim=width))
    with torch.no_grad():
        network.classifier.output.bias.copy_(torch.tensor([0.0, 4.0]))
    return network.eval()


@pytest.mark.parametrize("estimator", ["soft", "straight-through"])
def test_differentiable_path_carries_gradients(tiny_model, estimator):
    network = confident_redirector(32)
    conditioning: list = []
    model = SafeRedir(
        concept="nudity", redirector=network, differentiable_estimator=estimator
    ).apply(tiny_model)
    model = model.replace(
        sampler_hooks=(*model.sampler_hooks, lambda _m: ConditioningRecorder(conditioning))
    )
    cond = encode(tiny_model, UNSAFE_PROMPT).unsqueeze(0).requires_grad_(True)
    latents = torch.randn(1, 4, 8, 8, requires_grad=True)
    timestep = torch.tensor(500)

    noise = model.noise_under_defense(latents, timestep, cond, guidance=7.5)
    noise.square().sum().backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    assert latents.grad is not None and latents.grad.abs().sum() > 0

    with torch.no_grad():
        output = network(latents, cond, timestep.float().reshape(1))
        p_unsafe = torch.softmax(output.logits, dim=-1)[0, 1]
        delta = redirection_delta(output, cond, RedirectionOptions())
    weight = p_unsafe if estimator == "soft" else 1.0
    used = conditioning[0][0].detach()
    assert torch.allclose(used, cond.detach() + weight * delta, atol=1e-5)


# -- training --------------------------------------------------------------------------


def synthetic_data(prompts: int = 16, records_per_prompt: int = 6) -> TrajectoryData:
    """Label-1 prompts carry a marker token; their safe twins move tokens 2-4 one way."""
    generator = torch.Generator().manual_seed(0)
    tokens, width = 8, 16
    embeddings = torch.randn(prompts, tokens, width, generator=generator)
    labels = torch.tensor([index % 2 for index in range(prompts)])
    embeddings[labels == 1, 1] += 3.0
    safe = embeddings.clone()
    safe[labels == 1, 2:5] += torch.linspace(-1, 1, width) * 2.0
    count = prompts * records_per_prompt
    return TrajectoryData(
        latents=torch.randn(count, 4, 4, 4, generator=generator),
        timesteps=torch.randint(0, 1000, (count,), generator=generator).float(),
        steps=torch.arange(count) % records_per_prompt,
        prompt_index=torch.arange(prompts).repeat_interleave(records_per_prompt),
        embeddings=embeddings,
        safe_embeddings=safe,
        token_masks=token_mask_targets(embeddings, safe, 0.95),
        labels=labels,
        sources=tuple("forget" if label else "retain" for label in labels.tolist()),
    )


def synthetic_config(**optimiser) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "concept": "synthetic",
            "model": {"name": "none"},
            "sources": [],
            "output": "unused.safetensors",
            "optimiser": {"lr": 1e-3, "batch_size": 32, "epochs": 12, **optimiser},
        }
    )


def test_training_reduces_losses():
    data = synthetic_data()
    config = synthetic_config()
    torch.manual_seed(0)
    network = Redirector(
        RedirectorDims(
            latent_channels=4, token_count=8, embed_dim=16, latent_widths=(8, 8, 8),
            latent_features=32, classifier_hidden=32, token_hidden=32, alpha_hidden=16,
            mask_hidden=16,
        )
    )
    before = evaluate(network, data, config, torch.device("cpu"))
    fit(network, data, data, config, torch.device("cpu"))
    after = evaluate(network, data, config, torch.device("cpu"))

    for term in ("total", "classification", "redirect", "mask", "magnitude"):
        assert after["losses"][term] < before["losses"][term], term
    assert after["accuracy"] == 1.0


def test_trainer_end_to_end_on_tiny_model(tmp_path, monkeypatch):
    pairs = [
        {"prompt": "a nude woman at the beach", "safe_prompt": "a woman at the beach"},
        {"prompt": "a naked man in the city", "safe_prompt": "a man in the city"},
        {"prompt": "a nude girl in a museum", "safe_prompt": "a girl in a museum"},
    ]
    forget = {"name": "inline", "options": {"concept": "nudity", "prompts": pairs}}
    config = {
        "concept": "nudity",
        "model": {"name": "tiny-random-sd"},
        "device": "cpu",
        "output": str(tmp_path / "tiny-nudity.safetensors"),
        "sources": [
            {"prompt_set": forget, "label": 1},
            {"prompt_set": forget, "label": 0, "text": "safe_prompt"},
        ],
        "holdout_fraction": 0.34,
        "sampler": {"steps": 3, "batch_size": 6},
        "optimiser": {"epochs": 2, "batch_size": 4},
        "network": {"latent_widths": [8, 16], "attention_units": 1},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))

    written = SafeRedirTrainer().run(path, ["optimiser.lr=0.001"], None)
    network, card = load_checkpoint(written)
    assert card["concept"] == "nudity"
    assert card["data"]["records"] == 6 * 3
    assert card["epochs_run"] == 2
    assert 0.0 <= card["holdout_metrics"]["fpr"] <= 1.0
    assert network.dims.embed_dim == 32
    assert network.dims.latent_widths == (8, 16)
    assert network.dims.attention_units == 1
    assert card["dims"]["latent_widths"] == [8, 16]


# -- loading ---------------------------------------------------------------------------


def test_dims_read_off_a_narrowed_state_dict():
    dims = RedirectorDims(latent_channels=12, token_count=24, embed_dim=384,
                          latent_widths=(16, 32, 32), latent_features=128, attention_units=1)
    assert dims_from_state(Redirector(dims).state_dict()) == dims


class _ReleasedBlock(nn.Module):
    """The released residual block's layout: `conv` (Sequential) and `downsample`."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(),
            nn.Conv2d(outputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs),
        )
        self.downsample = nn.Conv2d(inputs, outputs, 1) if inputs != outputs else nn.Identity()


class _ReleasedHead(nn.Module):
    def __init__(self, joint: int, width: int) -> None:
        super().__init__()
        self.query, self.key, self.value = (
            nn.Linear(joint, width), nn.Linear(width, width), nn.Linear(width, width)
        )
        self.norm = nn.LayerNorm(width)


class ReleasedLayout(nn.Module):
    """Modules named and nested as in the authors' released state dict (no forward)."""

    def __init__(self, channels: int = 4, tokens: int = 77, width: int = 32) -> None:
        super().__init__()
        self.latent_encoder = nn.Sequential(
            _ReleasedBlock(channels, 64), _ReleasedBlock(64, 128), _ReleasedBlock(128, 256),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 512), nn.ReLU(), nn.Dropout(),
        )
        self.t_encoder = nn.Sequential(nn.Linear(320, 64), nn.SiLU(), nn.LayerNorm(64))
        self.cross_attn = nn.Module()
        self.cross_attn.heads = nn.ModuleList(_ReleasedHead(576, width) for _ in range(4))
        self.cross_attn.fuse = nn.Sequential(nn.Linear(4 * width, width), nn.LayerNorm(width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, width))
        self.classifier = nn.Sequential(
            nn.Linear(576 + 2 * width, 256), nn.ReLU(), nn.Dropout(), nn.Linear(256, 2)
        )
        self.token_proj = nn.Sequential(nn.Linear(576 + width, 512), nn.ReLU(),
                                        nn.Linear(512, width))
        self.delta_head = nn.Module()
        self.delta_head.down = nn.Linear(width, 16, bias=False)
        self.delta_head.up = nn.Linear(16, width, bias=False)
        self.delta_head.scale = nn.Parameter(torch.tensor(0.7))
        self.gate_linear = nn.Linear(width, 1)
        self.mask_predictor = nn.Module()
        self.mask_predictor.attn = nn.MultiheadAttention(width, 4, batch_first=True)
        self.mask_predictor.predictor = nn.Sequential(
            nn.Linear(width, 128), nn.ReLU(), nn.LayerNorm(128), nn.Linear(128, 1)
        )
        self.alpha_predictor = nn.Module()
        self.alpha_predictor.net = nn.Sequential(
            nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, 1), nn.Sigmoid()
        )


def test_released_state_dict_maps_onto_modules(tmp_path):
    torch.manual_seed(1)
    released = ReleasedLayout()
    with torch.no_grad():  # BatchNorm buffers must travel too
        released.latent_encoder[0].conv[1].running_mean.uniform_()
    path = tmp_path / "best_model.pt"
    torch.save(released.state_dict(), path)

    network, card = load_checkpoint(path)
    assert card == {}
    assert network.dims == RedirectorDims(latent_channels=4, token_count=77, embed_dim=32)
    ours = network.state_dict()
    assert len(ours) == len(released.state_dict())
    pairs = {
        "latent_encoder.0.conv.1.running_mean": "latent_encoder.blocks.0.norm1.running_mean",
        "latent_encoder.2.downsample.weight": "latent_encoder.blocks.2.shortcut.weight",
        "latent_encoder.5.weight": "latent_encoder.project.weight",
        "cross_attn.heads.3.value.bias": "prompt_attention.units.3.value.bias",
        "cross_attn.fuse.1.weight": "prompt_attention.fuse_norm.weight",
        "classifier.3.weight": "classifier.output.weight",
        "delta_head.scale": "low_rank_delta.scale",
        "pos_embed": "positional_embedding",
        "mask_predictor.attn.in_proj_weight": "mask_predictor.attention.in_proj_weight",
        "mask_predictor.predictor.2.bias": "mask_predictor.norm.bias",
        "alpha_predictor.net.2.weight": "alpha_predictor.output.weight",
    }
    for released_key, our_key in pairs.items():
        assert torch.equal(ours[our_key], released.state_dict()[released_key]), released_key


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file

    network = Redirector(RedirectorDims(latent_channels=4, token_count=77, embed_dim=32)).eval()
    path = save_checkpoint(network, tmp_path / "w.safetensors", {"concept": "nudity"})
    loaded, card = load_checkpoint(path)
    assert card["concept"] == "nudity"
    assert {value.dtype for value in load_file(str(path)).values()} <= {torch.float16, torch.int64}

    # Stored in float16: the loaded network equals the original with its weights rounded
    # to float16, and computes in float32.
    with torch.no_grad():
        for tensor in network.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    inputs = (torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32), torch.tensor([10.0]))
    assert torch.equal(loaded(*inputs).logits, network(*inputs).logits)


def test_defense_loads_checkpoint_option(tmp_path, tiny_model):
    network = Redirector(RedirectorDims(latent_channels=4, token_count=77, embed_dim=32))
    path = save_checkpoint(network, tmp_path / "w.safetensors", {"concept": "nudity"})
    defense = SafeRedir(concept="nudity", checkpoint=str(path), cooldown=1)
    model = defense.wrap(tiny_model)
    assert defense.describe()["checkpoint"] == str(path)
    assert "saferedir_checks" in generate(model, [SAFE_PROMPT]).records[0]


def test_defense_rejects_mismatched_dims(tmp_path, tiny_model):
    network = Redirector(RedirectorDims(latent_channels=4, token_count=77, embed_dim=64))
    path = save_checkpoint(network, tmp_path / "w.safetensors", {"concept": "nudity"})
    with pytest.raises(ValueError, match="embed_dim=64"):
        SafeRedir(concept="nudity", checkpoint=str(path)).apply(tiny_model)


def test_defense_rejects_unknown_option():
    with pytest.raises(ValueError, match="unknown saferedir option"):
        SafeRedir(concept="nudity", alpha=2.0)


def test_batch_matches_solo_with_real_network(tiny_model):
    model = SafeRedir(concept="nudity", redirector=confident_redirector(32)).apply(tiny_model)
    prompts, seeds = [UNSAFE_PROMPT, SAFE_PROMPT], [5, 6]
    batch = generate(model, prompts, seeds=seeds)
    for index in range(2):
        solo = generate(model, [prompts[index]], seeds=[seeds[index]])
        assert batch.records[index] == solo.records[0]
        assert torch.allclose(batch.images[index], solo.images[0], atol=1e-5)
