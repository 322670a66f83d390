"""The SafeRedir redirector: a latent-aware safety classifier and a token-level delta generator.

SafeRedir (R. Liu, K. Chen, H. Qiu, J. Zhang, K.-Y. Lam, T. Zhang, S.-K. Ng, "SafeRedir:
Prompt Embedding Redirection for Robust Unlearning in Image Generation Models", arXiv
2601.08623, 2026) attaches one small network to a frozen text-to-image diffusion model. It
reads the noisy latent x_t, the timestep t and the prompt embedding E (T tokens of width D)
and returns:

- two logits, unsafe versus safe (index 1 is unsafe);
- a raw delta of shape (T, D) whose rows are g_i * m_i * v: one shared direction v (from the
  latent, the timestep and the prompt) times a per-token gate g_i and a per-token mask m_i;
- the predicted token mask m in (0, 1)^T;
- a per-token scale alpha in (0, 1)^(T x 1).

The layer sizes are those of the authors' released model (SD 1.x: 4x64x64 latents, 77x768
embeddings, 14,573,574 parameters). Only the latent channels, the token count and the
embedding width come from the model, so the same network fits the shapes model (12 latent
channels, 24x384) and the tiny test model. With D != 768 one constant of the release
changes meaning: its attention divides by sqrt(768), and here it divides by sqrt(D).

Because every delta row is a positive multiple of v, the delta has rank 1. The inference
rule normalises each row, so g and m cancel there unless the mask is applied again; see
`defenses.saferedir.hooks`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

UNSAFE = 1  # index of the unsafe logit


@dataclass(frozen=True)
class RedirectorDims:
    """The sizes of a redirector.

    `latent_channels`, `token_count` and `embed_dim` come from the diffusion model; the other
    fields are the widths of the released architecture and stay at their defaults unless a
    config changes them on purpose.
    """

    latent_channels: int = 4
    token_count: int = 77
    embed_dim: int = 768
    latent_widths: tuple[int, ...] = (64, 128, 256)
    latent_features: int = 512
    timestep_embedding: int = 320
    timestep_features: int = 64
    attention_units: int = 4
    classifier_hidden: int = 256
    token_hidden: int = 512
    lora_rank: int = 16
    mask_heads: int = 4
    mask_hidden: int = 128
    alpha_hidden: int = 256
    dropout: float = 0.2

    @property
    def joint_features(self) -> int:
        """Width of the joint state vector j = [latent features; timestep features]."""
        return self.latent_features + self.timestep_features

    def to_json(self) -> dict:
        return {**asdict(self), "latent_widths": list(self.latent_widths)}

    @classmethod
    def from_json(cls, data: dict) -> RedirectorDims:
        values = dict(data)
        if "latent_widths" in values:
            values["latent_widths"] = tuple(values["latent_widths"])
        return cls(**values)


@dataclass
class RedirectorOutput:
    """Result of one redirector call for a batch of B images.

    `logits` (B, 2); `delta` (B, T, D), the raw gated and masked delta; `mask` (B, T);
    `alpha` (B, T, 1); `direction` (B, D), the unit vector every delta row is parallel to.
    `mask` is None when the call skipped the mask predictor (`with_mask=False`).
    """

    logits: torch.Tensor
    delta: torch.Tensor
    mask: torch.Tensor | None
    alpha: torch.Tensor
    direction: torch.Tensor

    def select(self, rows: torch.Tensor) -> RedirectorOutput:
        """Select the output of the images that `rows` picks (a boolean mask or index tensor)."""
        mask = None if self.mask is None else self.mask[rows]
        return RedirectorOutput(
            self.logits[rows], self.delta[rows], mask, self.alpha[rows], self.direction[rows]
        )


@dataclass(frozen=True)
class PromptFeatures:
    """The redirector's values that depend on the prompt embedding E alone, for B images.

    `keys` and `values` (U, B, T, D): each attention unit's projections of the tokens;
    `pooled` (B, D): the token mean c; `alpha` (B, T, 1): the per-token scale. None of them
    reads the latent or the timestep, so they stay valid while E is unchanged.
    """

    keys: torch.Tensor
    values: torch.Tensor
    pooled: torch.Tensor
    alpha: torch.Tensor

    def select(self, rows: torch.Tensor) -> PromptFeatures:
        """Return the features of the images that `rows` (an index tensor) picks."""
        return PromptFeatures(
            self.keys[:, rows], self.values[:, rows], self.pooled[rows], self.alpha[rows]
        )

    def replace_rows(self, rows: torch.Tensor, new: PromptFeatures) -> None:
        """Overwrite the features of `rows` in place with `new`, given for those rows."""
        self.keys[:, rows] = new.keys
        self.values[:, rows] = new.values
        self.pooled[rows] = new.pooled
        self.alpha[rows] = new.alpha


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10_000.0):
    """Sinusoidal embedding of timestep values: `dim // 2` sines, then as many cosines.

    Frequencies are exp(-ln(max_period) * k / (dim // 2)) for k = 0 .. dim // 2 - 1.
    An odd `dim` gets one zero column at the end.
    """
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(-math.log(max_period) * steps / half)
    angles = timesteps.float().reshape(-1, 1) * frequencies.reshape(1, -1)
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class ResidualConvBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus a 1x1-conv shortcut when widths differ.

    Stride 1, as released, so every block runs at the latent's full resolution.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class LatentEncoder(nn.Module):
    """Residual conv blocks, global average pooling, Linear -> ReLU -> Dropout."""

    def __init__(self, dims: RedirectorDims) -> None:
        super().__init__()
        widths = (dims.latent_channels, *dims.latent_widths)
        self.blocks = nn.ModuleList(
            ResidualConvBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.project = nn.Linear(widths[-1], dims.latent_features)
        self.dropout = nn.Dropout(dims.dropout)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h = latents
        for block in self.blocks:
            h = block(h)
        pooled = h.mean(dim=(2, 3))
        return self.dropout(F.relu(self.project(pooled)))


class TimestepEncoder(nn.Module):
    """Sinusoidal embedding -> Linear -> SiLU -> LayerNorm."""

    def __init__(self, dims: RedirectorDims) -> None:
        super().__init__()
        self.embedding_dim = dims.timestep_embedding
        self.project = nn.Linear(dims.timestep_embedding, dims.timestep_features)
        self.norm = nn.LayerNorm(dims.timestep_features)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        embedding = timestep_embedding(timesteps, self.embedding_dim)
        return self.norm(F.silu(self.project(embedding)))


class PromptAttentionUnit(nn.Module):
    """One single-query attention of the joint state over the prompt tokens.

    o = LayerNorm(softmax(K q / sqrt(D))^T V + mean_i V_i). No padding mask: the release
    attends to padding and end-of-text tokens too. K and V depend on the prompt alone
    (`project_prompt`), so a sampler can compute them once per generation.
    """

    def __init__(self, joint_features: int, embed_dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(joint_features, embed_dim)
        self.key = nn.Linear(embed_dim, embed_dim)
        self.value = nn.Linear(embed_dim, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.scale = embed_dim**-0.5

    def project_prompt(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the keys and values (B, T, D) of the prompt tokens."""
        return self.key(prompt), self.value(prompt)

    def attend(self, joint: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
               ) -> torch.Tensor:
        query = self.query(joint).unsqueeze(1)  # (B, 1, D)
        weights = torch.softmax(query @ keys.transpose(1, 2) * self.scale, dim=-1)
        attended = (weights @ values).squeeze(1)
        return self.norm(attended + values.mean(dim=1))


class PromptAttention(nn.Module):
    """Independent attention units, concatenated, then Linear -> LayerNorm."""

    def __init__(self, dims: RedirectorDims) -> None:
        super().__init__()
        self.units = nn.ModuleList(
            PromptAttentionUnit(dims.joint_features, dims.embed_dim)
            for _ in range(dims.attention_units)
        )
        self.fuse = nn.Linear(dims.attention_units * dims.embed_dim, dims.embed_dim)
        self.fuse_norm = nn.LayerNorm(dims.embed_dim)

    def forward(self, joint: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
                ) -> torch.Tensor:
        """Attend with each unit over its keys and values (U, B, T, D), then fuse them."""
        outputs = torch.cat([
            unit.attend(joint, unit_keys, unit_values)
            for unit, unit_keys, unit_values in zip(self.units, keys, values, strict=True)
        ], dim=-1)
        return self.fuse_norm(self.fuse(outputs))


class TwoLayerHead(nn.Module):
    """Linear -> ReLU -> (Dropout) -> Linear."""

    def __init__(self, inputs: int, hidden: int, outputs: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.hidden = nn.Linear(inputs, hidden)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.dropout(F.relu(self.hidden(x))))


class LowRankDelta(nn.Module):
    """x -> up(down(x)) * scale, a LoRA-style bottleneck with a learnable scalar (init 1)."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scale


class TokenMaskPredictor(nn.Module):
    """Self-attention over the prompt, then per token Linear -> ReLU -> LayerNorm -> Linear."""

    def __init__(self, dims: RedirectorDims) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dims.embed_dim, dims.mask_heads, batch_first=True)
        self.hidden = nn.Linear(dims.embed_dim, dims.mask_hidden)
        self.norm = nn.LayerNorm(dims.mask_hidden)
        self.output = nn.Linear(dims.mask_hidden, 1)

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(prompt, prompt, prompt, need_weights=False)
        logits = self.output(self.norm(F.relu(self.hidden(attended))))
        return torch.sigmoid(logits.squeeze(-1))


class Redirector(nn.Module):
    """The SafeRedir network. `forward(latents, prompt, timesteps, token_mask=None)`.

    Inputs: latents (B, C, H, W) in the sampler's latent space (unscaled by the scheduler),
    prompt (B, T, D) the conditional embedding, timesteps (B,) or a scalar, as timestep
    values (981, 961, ... for SD's 50 DDIM steps). A ground-truth `token_mask` (B, T)
    replaces the predicted mask in the delta (teacher forcing during training).

    `with_mask=False` skips the token-mask predictor and the gate; the output's `mask` is
    None and each delta row is the shared direction v. The inference rule normalises every
    row, which cancels the gate and mask (positive per-token factors), so for it the two
    calls give the same redirection. That saves 44% of a call's FLOPs with the narrow widths
    of the shipped shapes checkpoints, and 4% with the released widths.

    `features`, from `prompt_features(prompt)` of the same prompt, saves recomputing the
    prompt-only parts; the output is the same up to rounding. The inference rule redirects
    only the images classified unsafe, so `unsafe_only=True` computes the delta and
    direction for those alone and leaves zeros in the other rows.
    """

    def __init__(self, dims: RedirectorDims) -> None:
        super().__init__()
        self.dims = dims
        joint, width = dims.joint_features, dims.embed_dim
        self.latent_encoder = LatentEncoder(dims)
        self.timestep_encoder = TimestepEncoder(dims)
        self.prompt_attention = PromptAttention(dims)
        self.classifier = TwoLayerHead(joint + 2 * width, dims.classifier_hidden, 2, dims.dropout)
        self.token_projection = TwoLayerHead(joint + width, dims.token_hidden, width)
        self.low_rank_delta = LowRankDelta(width, dims.lora_rank)
        self.gate = nn.Linear(width, 1)
        self.positional_embedding = nn.Parameter(torch.randn(1, dims.token_count, width))
        self.mask_predictor = TokenMaskPredictor(dims)
        self.alpha_predictor = TwoLayerHead(width, dims.alpha_hidden, 1)

    def prompt_features(self, prompt: torch.Tensor) -> PromptFeatures:
        """Compute the parts of a call that read only the prompt (B, T, D)."""
        projections = [unit.project_prompt(prompt) for unit in self.prompt_attention.units]
        return PromptFeatures(
            keys=torch.stack([keys for keys, _ in projections]),
            values=torch.stack([values for _, values in projections]),
            pooled=prompt.mean(dim=1),
            alpha=torch.sigmoid(self.alpha_predictor(prompt)),
        )

    def forward(
        self,
        latents: torch.Tensor,
        prompt: torch.Tensor,
        timesteps: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        with_mask: bool = True,
        features: PromptFeatures | None = None,
        unsafe_only: bool = False,
    ) -> RedirectorOutput:
        batch = latents.shape[0]
        timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1)
        timesteps = timesteps.expand(batch)
        if features is None:
            features = self.prompt_features(prompt)

        # The joint state j = [h_z; h_t] and the prompt summary c.
        joint = torch.cat([self.latent_encoder(latents), self.timestep_encoder(timesteps)], 1)
        attended = self.prompt_attention(joint, features.keys, features.values)
        logits = self.classifier(torch.cat([joint, features.pooled, attended], dim=1))

        # One direction v per image: the per-token input [j; c] is the same for all tokens,
        # so it is computed once and broadcast instead of repeated T times. Over a third
        # of the weights a check uses are the token projection's (shapes checkpoints), and
        # a check of a safe image skips it.
        direction_input = torch.cat([joint, attended], dim=1)
        if unsafe_only:
            unsafe = (logits.argmax(dim=-1) == UNSAFE).nonzero().flatten()
            base = joint.new_zeros(batch, prompt.shape[-1])
            if unsafe.numel():
                base[unsafe] = self.low_rank_delta(self.token_projection(direction_input[unsafe]))
        else:
            base = self.low_rank_delta(self.token_projection(direction_input))
        if token_mask is not None and not with_mask:
            raise ValueError("a token_mask needs with_mask=True: without it no mask is applied")
        if with_mask:
            gate = torch.sigmoid(self.gate(prompt + self.positional_embedding))  # (B, T, 1)
            mask = self.mask_predictor(prompt)
            used_mask = mask if token_mask is None else token_mask.to(mask.dtype)
            delta = base.unsqueeze(1) * gate * used_mask.unsqueeze(-1)
        else:
            mask, delta = None, base.unsqueeze(1).expand(-1, prompt.shape[1], -1)

        return RedirectorOutput(
            logits=logits,
            delta=delta,
            mask=mask,
            alpha=features.alpha,
            direction=F.normalize(base, dim=-1),
        )


def parameter_count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def count_flops(
    dims: RedirectorDims, latent_size: tuple[int, int], with_mask: bool = False
) -> int:
    """Floating-point operations of one redirector call for one image (2 per multiply-add).

    The default counts the call the inference rule makes with its released options, which
    skips the mask predictor; `with_mask=True` counts the full forward of training.

    Counted by `torch.utils.flop_counter` on the meta device, so nothing is allocated. It
    counts matrix products and convolutions, not element-wise operations.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        network = Redirector(dims).eval()
        latents = torch.zeros(1, dims.latent_channels, *latent_size)
        prompt = torch.zeros(1, dims.token_count, dims.embed_dim)
        timesteps = torch.zeros(1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network(latents, prompt, timesteps, with_mask=with_mask)
    return int(counter.get_total_flops())
