"""Model `tiny-random-sd`: a seeded Stable Diffusion pipeline with tiny random weights.

Every component is the real class SD uses (`CLIPTokenizer`, `CLIPTextModel`,
`UNet2DConditionModel`, `AutoencoderKL`, `DDIMScheduler`) with small configs, so smoke runs
and tests exercise the same loading, encoding and sampling code as SD 1.4. The tokenizer
is a real byte-level CLIP BPE whose merges are learned at build time from a word list
written here, because no vocabulary file can be downloaded.

The images it draws are noise-like: the model is for plumbing, not for numbers.
"""

from __future__ import annotations

import collections
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from harness.model import DiffusionModel, ModelPlugin, VaeCodec

# Words the tiny BPE learns its merges from: common prompt words, so that prompts split
# into a few tokens each rather than into single characters.
_CORPUS = """
a an the of in on at with and or by for to from photo picture painting image portrait
woman man person people girl boy child nude naked body beach museum sculpture statue
dress clothes shirt red blue green yellow black white purple orange pink star circle
square triangle heart cross church parachute truck fish dog cat car house tree sky sea
style art artist van gogh famous detailed high quality realistic cinematic lighting
standing sitting walking beautiful young old small large city street night day sun
""".split()

BYTE_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def learn_clip_bpe(words: list[str], num_merges: int) -> tuple[dict[str, int], list[str]]:
    """Learn byte-level BPE merges in CLIP's format: words end with '</w>'.

    Returns the vocabulary (bytes, bytes with '</w>', merged symbols, special tokens) and
    the merges as "left right" strings, highest priority first.
    """
    byte_map = _bytes_to_unicode()
    alphabet = list(byte_map.values())
    vocab_list = alphabet + [char + "</w>" for char in alphabet]

    counts = collections.Counter(words)
    splits = {word: [*word[:-1], word[-1] + "</w>"] for word in counts}
    merges: list[str] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, symbols in splits.items():
            for left, right in zip(symbols, symbols[1:], strict=False):
                pairs[(left, right)] += counts[word]
        if not pairs:
            break
        # Ties break on the pair itself so the merges do not depend on dict order.
        (left, right), _count = max(pairs.items(), key=lambda item: (item[1], item[0]))
        merges.append(f"{left} {right}")
        vocab_list.append(left + right)
        for word, symbols in splits.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            splits[word] = merged

    vocab_list.extend(BYTE_SPECIAL)
    return {token: index for index, token in enumerate(vocab_list)}, merges


def build_tiny_components(seed: int = 0, max_length: int = 77) -> dict[str, Any]:
    """Build the tokenizer, text encoder, UNet, VAE and scheduler with seeded weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = learn_clip_bpe(_CORPUS, num_merges=200)
    # Written as vocab.json and merges.txt and read back through `from_pretrained`, the
    # one constructor path that transformers 4.x and 5.x share.
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
        Path(folder, "merges.txt").write_text(merges_text, encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=max_length,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder.eval(),
        "unet": unet.eval(),
        "vae": vae.eval(),
        "scheduler": scheduler,
    }


def save_tiny_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline as a diffusers folder, the layout users' SD folders have."""
    from diffusers import StableDiffusionPipeline

    parts = build_tiny_components(seed)
    pipeline = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)


class TinyRandomSD(ModelPlugin):
    """Model `tiny-random-sd`: options `seed` (weights, default 0)."""

    name = "tiny-random-sd"

    def load(self, device: torch.device, dtype: torch.dtype) -> DiffusionModel:
        parts = build_tiny_components(int(self.options.get("seed", 0)))
        codec = VaeCodec(parts["vae"])
        model = DiffusionModel(
            name=self.options.get("label", self.name),
            tokenizer=parts["tokenizer"],
            text_encoder=parts["text_encoder"],
            unet=parts["unet"],
            codec=codec,
            scheduler_config=dict(parts["scheduler"].config),
            max_length=int(parts["tokenizer"].model_max_length),
            default_size=16,
            default_steps=10,
            default_guidance=7.5,
            info={"source": "built in memory from seed", "seed": self.options.get("seed", 0)},
        )
        return model.to(device, dtype).eval()
