"""GPU benchmarks on a model with Stable Diffusion 1.4's shapes: batched generation and memory.

Nothing is downloaded: the UNet, VAE and CLIP text encoder are built from SD 1.4's public
configs with random weights (the cost of a call does not depend on the weights), and the
tokenizer is tiny-random-sd's BPE. Run on a CUDA machine with `tox -e bench -- -m gpu`
or `pytest tests/benchmarks/test_gpu_bench.py -o addopts=""`; skipped without CUDA.

- batched generation: images/s of batches of 1, 2, 4, 8 (and more while memory allows)
  against one prompt per `generate` call, in float16, 512x512, DDIM; target >= 2x;
- memory: peak GPU memory of one batch of 8 at 512x512 (text encoder, UNet with
  classifier-free guidance, VAE decode) in float16; target at most 24 GB.
"""

from __future__ import annotations

import pytest
import torch
from benchtools import SD14_UNET, interleaved_best, report_ratio

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SD14_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}
GIB = 1024**3


def sd14_shaped_model(device: torch.device, dtype: torch.dtype):
    """A `DiffusionModel` with SD 1.4's UNet, VAE and text-encoder sizes, random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from harness.model import DiffusionModel, VaeCodec
    from harness.models.tiny import build_tiny_components

    tiny = build_tiny_components(seed=0)
    tokenizer = tiny["tokenizer"]
    vocabulary = tokenizer.get_vocab()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocabulary), hidden_size=768, intermediate_size=3072,
        num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77,
        bos_token_id=vocabulary["<|startoftext|>"], eos_token_id=vocabulary["<|endoftext|>"],
        pad_token_id=vocabulary["<|endoftext|>"],
    ))
    model = DiffusionModel(
        name="sd14-shaped-random",
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        unet=UNet2DConditionModel(**SD14_UNET).eval(),
        codec=VaeCodec(AutoencoderKL(**SD14_VAE).eval()),
        scheduler_config=dict(tiny["scheduler"].config),
        max_length=77,
        default_size=512,
        default_steps=50,
        default_guidance=7.5,
    )
    return model.to(device, dtype).eval()


@pytest.fixture(scope="module")
def sd14_model():
    return sd14_shaped_model(torch.device("cuda"), torch.float16)


def _generate(model, prompts, seeds, steps=20):
    output = model.generate(prompts, seeds=seeds, guidance=7.5, steps=steps)
    torch.cuda.synchronize()
    return output


def test_gpu_batched_generation_speedup(benchmark, sd14_model):
    """Target: batches at least 2x the images/s of one prompt per call (float16, 512x512)."""
    prompts = [f"a photo of a {word}" for word in ("star", "dog", "church", "tree")] * 2
    seeds = list(range(len(prompts)))
    _generate(sd14_model, prompts[:1], seeds[:1], steps=2)  # warm-up: kernels, allocator

    def loop_one_per_call():
        for prompt, seed in zip(prompts, seeds, strict=True):
            _generate(sd14_model, [prompt], [seed])

    def batched():
        _generate(sd14_model, prompts, seeds)

    baseline, ours = interleaved_best(loop_one_per_call, batched, rounds=2)
    benchmark.pedantic(batched, rounds=1, iterations=1)
    ratio = baseline / ours
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), batch=len(prompts))
    report_ratio(benchmark, "gpu_batched_speedup", ratio, ">= 2.0")
    assert ratio >= 2.0

    # Images/s by batch size, up to what memory allows, for docs/performance.md.
    for batch in (1, 2, 4, 8, 16, 32):
        try:
            seconds = interleaved_best(
                lambda batch=batch: _generate(sd14_model, prompts[:1] * batch,
                                              list(range(batch))),
                lambda: None, rounds=1,
            )[0]
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        benchmark.extra_info[f"images_per_s_batch_{batch}"] = round(batch / seconds, 3)
        print(f"batch {batch}: {batch / seconds:.2f} images/s")


def test_gpu_sd14_batch8_memory(benchmark, sd14_model):
    """Target: a batch of 8 at 512x512 in float16 peaks at most at 24 GB of GPU memory."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    prompts = ["a photo of a church"] * 8
    output = _generate(sd14_model, prompts, list(range(8)), steps=4)
    peak = torch.cuda.max_memory_allocated() / GIB

    assert output.images.shape == (8, 3, 512, 512)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(device=torch.cuda.get_device_name(),
                                peak_gib=round(peak, 2))
    report_ratio(benchmark, "sd14_batch8_peak_gib", peak, "<= 24")
    assert peak <= 24
