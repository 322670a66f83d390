"""Shared token-optimisation tools of the attack plugins, each in one place.

- `project_to_vocabulary`: nearest vocabulary row by cosine similarity, with a
  straight-through gradient (PEZ, Wen et al., NeurIPS 2023; used by P4D), over a
  `VocabularyIndex` of the allowed rows normalised once.
- `project_simplex`: Euclidean projection onto the probability simplex (Duchi et al.,
  "Efficient projections onto the l1-ball", ICML 2008), by Michelot's support iteration
  (used by UnlearnDiffAtk).
- `sample_one_hot`: straight-through one-hot sampling from per-token distributions, with
  the backward gradient clipped to [-1, 1] as UnlearnDiffAtk does.
- Genetic-algorithm operators over token ids (Ring-A-Bell): selection, single-point
  crossover and mutation that change only learnable slots, so special tokens stay fixed.
- `round_trip`: decode optimised ids to text and re-tokenize it, measuring the drift.
- `SlotLayout`: a token sequence with learnable slots (free tokens, a prefix, or one slot
  every K prompt tokens) inside the model's `max_length`, with the BOS/EOS/pad convention
  of the model's own tokenizer (CLIP: BOS..EOS then EOS padding; BERT: [CLS]..[SEP] then
  [PAD], with the attention mask).
- `Budget` and the generation helpers every attack uses to count its cost.

Everything goes through the `DiffusionModel` interface, so the tools work for CLIP-based
(SD, tiny-random-sd) and BERT-based (shapes, MiniLM) text encoders alike.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.attack import AttackContext, AttackResult
from harness.model import DiffusionModel
from harness.prompts.base import Case

log = logging.getLogger(__name__)

ADAPTIVE = "adaptive"
TRANSFER = "transfer"
MODES = (ADAPTIVE, TRANSFER)

# Vocabulary entries that are markup rather than words: BERT's [unused17], [MASK], CLIP's
# <|startoftext|>. Optimisers never place them, because they do not survive decoding.
_MARKUP_TOKEN = re.compile(r"^(\[[^\]]*\]|<\|[^|]*\|>)$")


# -- projection onto the vocabulary ---------------------------------------------------------


class _StraightThrough(torch.autograd.Function):
    """Forward returns `projected` unchanged; backward hands the gradient to `continuous`."""

    @staticmethod
    def forward(ctx, continuous: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        return projected.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


# Below this many rows, `products_with_rows` puts the table on the left.
FEW_ROWS = 12


def products_with_rows(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Compute `rows @ table.T`, of shape `rows.shape[:-1] + (V,)`, for a (V, D) `table`.

    With fewer than `FEW_ROWS` rows it computes `(table @ rows.T).T`, the same numbers up
    to rounding. We timed a 24,000 x 384 table on one thread of an AMD EPYC machine.
    There `rows @ table.T` took 12.0 ms for 3 rows against 2.6 ms, and 6.3 ms for 8 rows
    against 4.3 ms. From 12 to 18 rows it was as fast or faster, so larger products keep it.
    NOTE: the threshold was measured on that machine only. Another BLAS may place it
    elsewhere.
    """
    flat = rows.reshape(-1, rows.shape[-1])
    if flat.shape[0] < FEW_ROWS:
        products = (table @ flat.T).T
    else:
        products = flat @ table.T
    return products.reshape(*rows.shape[:-1], table.shape[0])


# Re-rank at most this many (row, candidate) pairs at once, to bound memory when many
# candidates tie (a zero embedding is equally near every row).
RERANK_CHUNK = 4096


def bfloat16_error(dimension: int) -> float:
    """Bound on |bfloat16 cosine - float32 cosine| of two unit vectors of `dimension` entries.

    bfloat16 keeps 8 significant bits, so rounding to nearest moves a value by at most
    u = 2^-8 of itself. Rounding both inputs moves each product q_i e_i by at most
    (2u + u^2) |q_i e_i|, and sum_i |q_i e_i| <= |q| |e| = 1 (Cauchy-Schwarz), so the sum
    moves by at most 2u + u^2. The result, at most 1 + 2u + u^2, is rounded to bfloat16
    once more: u of it. Float32 sums of the exact products in the bfloat16 pass, and of
    float32-rounded products in the re-ranking pass, add at most (dimension + 1) * 2^-24
    each, up to a factor below 1.1 for dimensions under a million. The 2^-12 term covers
    the u^2 terms and the rounding of the threshold. The bound assumes that the product
    accumulates in float32 and converts to bfloat16 by rounding to nearest.
    """
    u = 2.0**-8
    accumulation = 2 * 1.1 * (dimension + 1) * 2.0**-24
    return 3 * u + 2.0**-12 + accumulation


def bfloat16_products_are_fast(device: torch.device) -> bool:
    """Return whether `device` is a CPU that multiplies bfloat16 matrices in hardware (AVX-512
    BF16 or AMX units). Other CPUs convert bfloat16 in software, likely slower than float32
    (not measured). On a GPU the float32 path is kept (not measured either)."""
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    # Private helpers of torch.cpu. Without them, assume no BF16 units.
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@dataclass(frozen=True)
class VocabularyIndex:
    """The vocabulary rows a projection may choose, normalised once.

    Invariant: `table[i]` is the unit vector of vocabulary row `ids[i]`, in vocabulary
    order, and `nearest` returns the lowest allowed id among the cosine-nearest rows in
    float32, as a masked argmax over the whole vocabulary would give (up to float32
    rounding, which may differ in the last bit).
    P4D projects at every iteration. Normalising MiniLM's 30,522 x 384 table each time
    took longer than the similarity itself. On a CPU with BF16 units, a bfloat16 copy of
    the table (`coarse`) finds the few candidates to re-rank in float32 in about half the
    time of the float32 product with the whole table.
    """

    table: torch.Tensor  # (V', D) float32 unit rows
    ids: torch.Tensor  # (V',) their vocabulary ids
    coarse: torch.Tensor | None = None  # (V', D) bfloat16 copy of `table`, or None

    @classmethod
    def build(cls, vocabulary: torch.Tensor, allowed: torch.Tensor | None = None,
              bfloat16_pass: bool | None = None) -> VocabularyIndex:
        """Build the index of `vocabulary`'s rows that `allowed` (a boolean mask of shape
        (V,), or None for all) lets a projection choose. `bfloat16_pass` adds the bfloat16
        first pass; by default where `bfloat16_products_are_fast`."""
        ids = torch.arange(vocabulary.shape[0], device=vocabulary.device)
        if allowed is not None:
            ids = ids[allowed.to(vocabulary.device)]
        table = torch.nn.functional.normalize(vocabulary.detach()[ids].float(), dim=-1)
        if bfloat16_pass is None:
            bfloat16_pass = bfloat16_products_are_fast(table.device)
        return cls(table=table, ids=ids, coarse=table.bfloat16() if bfloat16_pass else None)

    def nearest(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Return the ids of the cosine-nearest allowed rows, of shape `embeddings.shape[:-1]`.

        Raises ValueError when a cosine is NaN or infinite (from the embeddings or the
        vocabulary), where the nearest row is undefined."""
        queries = torch.nn.functional.normalize(embeddings.detach().float(), dim=-1)
        queries = queries.reshape(-1, queries.shape[-1])
        shape = embeddings.shape[:-1]
        if queries.shape[0] == 0:
            return self.ids[:0].reshape(shape)

        # 1. Cosines with every allowed row: in float32, or approximately in bfloat16.
        if self.coarse is None:
            products = products_with_rows(queries, self.table)
            _check_finite(products.amax(dim=-1))
            return self.ids[products.argmax(dim=-1)].reshape(shape)
        approximate = (queries.bfloat16() @ self.coarse.T).float()
        best = approximate.amax(dim=-1, keepdim=True)
        _check_finite(best)

        # 2. Candidates: with every approximation within e of its float32 value r, the
        #    float32 maximum m satisfies approx(m) >= r(m) - e >= r(v) - e >= approx(v) - 2e
        #    for every v, so it lies within 2e of the best approximation.
        error = bfloat16_error(queries.shape[-1])
        rows, columns = torch.nonzero(approximate >= best - 2 * error, as_tuple=True)

        # 3. Re-rank the candidates in float32 and keep, per query, the lowest column among
        #    the maxima: the lowest id, as the table is in vocabulary order.
        reranked = torch.cat([
            (queries[rows[start:start + RERANK_CHUNK]]
             * self.table[columns[start:start + RERANK_CHUNK]]).sum(dim=-1)
            for start in range(0, len(rows), RERANK_CHUNK)
        ])
        count = queries.shape[0]
        top = reranked.new_full((count,), float("-inf")).scatter_reduce(0, rows, reranked, "amax")
        winners = reranked == top[rows]
        chosen = columns.new_full((count,), len(self.ids)).scatter_reduce(
            0, rows[winners], columns[winners], "amin"
        )
        return self.ids[chosen].reshape(shape)


def _check_finite(best_cosines: torch.Tensor) -> None:
    if not bool(best_cosines.isfinite().all()):
        raise ValueError(
            "invalid projection input: a cosine is NaN or infinite. Check the embeddings "
            "and the vocabulary for NaN or infinite entries"
        )


def project_to_vocabulary(
    embeddings: torch.Tensor,
    vocabulary: torch.Tensor,
    allowed: torch.Tensor | None = None,
    index: VocabularyIndex | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project each row of `embeddings` (..., D) onto its cosine-nearest vocabulary row.

    Returns `(projected, ids)`. `projected` equals `vocabulary[ids]` exactly in the forward
    pass; in the backward pass its gradient flows unchanged to `embeddings`, so an optimiser
    computes the loss at the projected point and steps the continuous one (PEZ).
    A loop that projects many times passes an `index` built once from `vocabulary` and
    `allowed`; `allowed` is then not read again.
    """
    index = index or VocabularyIndex.build(vocabulary, allowed)
    ids = index.nearest(embeddings)
    projected = vocabulary.detach()[ids].to(embeddings.dtype)
    return _StraightThrough.apply(embeddings, projected), ids


# -- the probability simplex ----------------------------------------------------------------


def project_simplex(values: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row (last dimension) onto {p : p >= 0, sum(p) = 1}.

    The projection is p = max(v - theta, 0) with theta the threshold at which p sums to 1
    (Duchi et al., 2008). theta is found by Michelot's support iteration ("A finite
    algorithm for finding the projection of a point onto the canonical simplex of R^n",
    JOTA 1986): start with every index in the support S, set theta = (sum_S v - 1) / |S|,
    drop the indices with v <= theta, and repeat until S no longer changes. theta only
    grows and S only shrinks, so the loop ends after at most n rounds, in practice a few;
    each round is one pass over the row, cheaper than the sort of the sort-based method
    on vocabulary-sized rows. The box bound p <= 1 follows from the two constraints.
    """
    shape = values.shape
    flat = values.reshape(-1, shape[-1])
    support = torch.ones_like(flat, dtype=torch.bool)
    for _ in range(shape[-1]):
        kept = support.to(flat.dtype)
        theta = ((flat * kept).sum(dim=-1, keepdim=True) - 1) / kept.sum(dim=-1, keepdim=True)
        shrunk = support & (flat > theta)
        if torch.equal(shrunk, support):
            break
        support = shrunk
    return (flat - theta).clamp_min(0).reshape(shape)


class _OneHotStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, probabilities: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
        return one_hot.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.clamp(-1.0, 1.0), None


def sample_one_hot(
    probabilities: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of `probabilities` (N, V); return `(one_hot, ids)`.

    Forward: an exact one-hot row per sample. Backward: the gradient w.r.t. the one-hot is
    passed to `probabilities` clipped to [-1, 1] (UnlearnDiffAtk's straight-through rule).
    Sampling inverts each row's cumulative distribution at one uniform draw from
    `generator`; unlike `torch.multinomial` it takes one pass over the vocabulary.
    """
    weights = probabilities.detach().float().clamp_min(0).cpu()
    cumulative = weights.cumsum(dim=-1)
    total = cumulative[:, -1:]
    draws = torch.rand((weights.shape[0], 1), generator=generator) * total
    # The draw must stay below the total, which rounding of rand * total could reach. With
    # `right=True` the chosen id is the first whose cumulative sum exceeds the draw, so an
    # id of zero weight (equal sums) is never chosen.
    draws = torch.minimum(draws, torch.nextafter(total, torch.zeros_like(total)))
    ids = torch.searchsorted(cumulative, draws, right=True).squeeze(-1).to(probabilities.device)
    one_hot = torch.zeros_like(probabilities, memory_format=torch.contiguous_format)
    one_hot.scatter_(-1, ids[:, None], 1.0)
    return _OneHotStraightThrough.apply(probabilities, one_hot.detach()), ids


class _OneHotRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, one_hot: torch.Tensor, ids: torch.Tensor, table: torch.Tensor):
        ctx.save_for_backward(table)
        return table[ids]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (table,) = ctx.saved_tensors
        return products_with_rows(grad, table.to(grad.dtype)), None, None


def one_hot_rows(one_hot: torch.Tensor, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Compute `one_hot @ table` for exact one-hot rows, as `sample_one_hot` returns them
    with their `ids`.

    The forward pass looks the rows up instead of multiplying. The backward pass is the
    product's gradient, `grad @ table^T` (through `products_with_rows`), and `table` gets
    none. The product with a 3 x 24,000 one-hot reads the whole table (37 MB for MiniLM's
    candidates), so the lookup saves one of the two reads per UnlearnDiffAtk iteration.
    """
    return _OneHotRows.apply(one_hot, ids, table.detach())


# -- token candidates and sequences with learnable slots ------------------------------------


def candidate_token_mask(model: DiffusionModel) -> torch.Tensor:
    """Boolean mask (V,) of vocabulary ids an optimiser may place in a slot.

    Excluded: the tokenizer's special ids, markup entries ([unused3], <|endoftext|>),
    byte tokens that decode to no valid text on their own (a lone UTF-8 continuation
    byte) and WordPiece continuations ("##ing"): they fix the sequence layout or cannot
    survive decoding to text. A continuation glues onto the word before it when decoded,
    so re-tokenizing would merge two slots into one and shift every later token.
    CLIP's word-internal BPE pieces (no "</w>") also merge with their neighbour, but BPE
    re-splits the merged word into nearby pieces, so they stay allowed, as in P4D and PEZ.
    """
    vocabulary_size = model.vocabulary_embeddings.shape[0]
    blocked = _blocked_token_ids(model.tokenizer, vocabulary_size)
    blocked += [i for i in model.special_ids.values() if i is not None and i < vocabulary_size]
    allowed = torch.ones(vocabulary_size, dtype=torch.bool)
    allowed[blocked] = False
    return allowed.to(model.vocabulary_embeddings.device)


@functools.lru_cache(maxsize=8)
def _blocked_token_ids(tokenizer: Any, vocabulary_size: int) -> list[int]:
    """List the special, markup, continuation and undecodable ids (cached: SD has 49,408)."""
    blocked = [i for i in getattr(tokenizer, "all_special_ids", []) if i < vocabulary_size]
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocabulary_size)))
    for index, token in enumerate(tokens):
        if token is None or _MARKUP_TOKEN.match(token) or token.startswith("##"):
            blocked.append(index)
        elif "\ufffd" in tokenizer.decode([index]) or not tokenizer.decode([index]).strip():
            blocked.append(index)
    return blocked


def prompt_token_ids(model: DiffusionModel, prompt: str) -> list[int]:
    """The prompt's token ids without BOS, EOS and padding, as `model.tokenize` makes them."""
    tokens = model.tokenize([prompt])
    length = int(tokens.attention_mask[0].sum())
    return tokens.ids[0, 1 : length - 1].tolist()


@dataclass(frozen=True)
class SlotLayout:
    """A full token sequence of length `max_length` with some learnable positions.

    `ids` (T,) holds BOS, the content, EOS and padding; slot positions hold a placeholder
    (the pad id) until an optimiser fills them. `attention_mask` (T,) is 1 on BOS..EOS.
    `slots` holds the learnable positions in order. `dropped_tokens` counts prompt tokens
    cut to make room for the slots within `max_length`.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    slots: torch.Tensor
    dropped_tokens: int = 0

    @property
    def slot_mask(self) -> torch.Tensor:
        mask = torch.zeros_like(self.ids, dtype=torch.bool)
        mask[self.slots] = True
        return mask

    def fill(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """Ids of shape (B, T) with the slots set to `slot_ids` (B, n_slots) or (n_slots,)."""
        slot_ids = slot_ids.reshape(-1, len(self.slots)).to(self.ids.device)
        ids = self.ids.expand(slot_ids.shape[0], -1).clone()
        ids[:, self.slots] = slot_ids
        return ids

    def embed(self, model: DiffusionModel, slot_embeddings: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, D): vocabulary rows, slots replaced by `slot_embeddings`.

        `slot_embeddings` has shape (B, n_slots, D) or (n_slots, D); gradients flow to it.
        """
        if slot_embeddings.dim() == 2:
            slot_embeddings = slot_embeddings[None]
        vocabulary = model.vocabulary_embeddings.detach()
        fixed = vocabulary[self.ids].to(slot_embeddings.dtype)
        embeddings = fixed[None].expand(slot_embeddings.shape[0], -1, -1).clone()
        embeddings[:, self.slots] = slot_embeddings
        return embeddings

    def batch_mask(self, batch: int) -> torch.Tensor:
        return self.attention_mask[None].expand(batch, -1)


def build_layout(
    model: DiffusionModel,
    prompt: str = "",
    *,
    free_tokens: int = 0,
    prefix: int = 0,
    every_k: int = 0,
) -> SlotLayout:
    """Lay out BOS, learnable slots, prompt tokens and EOS, then pad to `model.max_length`.

    Exactly one of the modes is used: `free_tokens` N slots and no prompt (P4D-N,
    Ring-A-Bell); `prefix` k slots before the prompt (UnlearnDiffAtk); or `every_k` with one
    slot before every K prompt tokens, floor(L / K) + 1 slots for L tokens (P4D-K). Prompt
    tokens that do not fit are cut from the end and counted in `dropped_tokens`.
    """
    chosen = [name for name, value in (("free_tokens", free_tokens), ("prefix", prefix),
                                       ("every_k", every_k)) if value]
    if len(chosen) != 1:
        raise ValueError(
            f"build_layout needs exactly one of free_tokens, prefix, every_k; got {chosen}"
        )
    special = model.special_ids
    bos, eos, pad = special["bos"], special["eos"], special["pad"]
    if bos is None or eos is None or pad is None:
        raise ValueError(f"model {model.name!r} has no BOS, EOS or pad id: {special}")
    room = model.max_length - 2

    content = [] if free_tokens else prompt_token_ids(model, prompt)
    if free_tokens:
        if free_tokens > room:
            raise ValueError(f"{free_tokens} free tokens do not fit in {model.max_length} tokens")
        sequence = [None] * free_tokens
        dropped = 0
    elif prefix:
        if prefix > room:
            raise ValueError(f"a prefix of {prefix} tokens does not fit in {model.max_length}")
        kept = content[: room - prefix]
        dropped = len(content) - len(kept)
        sequence = [None] * prefix + kept
    else:
        kept = list(content)
        while kept and len(kept) + len(kept) // every_k + 1 > room:
            kept.pop()
        dropped = len(content) - len(kept)
        sequence = []
        for index, token in enumerate(kept):
            if index % every_k == 0:
                sequence.append(None)
            sequence.append(token)
        if len(kept) % every_k == 0:
            sequence.append(None)

    ids = [bos] + [pad if token is None else token for token in sequence] + [eos]
    slots = [1 + i for i, token in enumerate(sequence) if token is None]
    mask = [1] * len(ids) + [0] * (model.max_length - len(ids))
    ids += [pad] * (model.max_length - len(ids))
    if dropped:
        log.warning("layout: dropped %d prompt token(s) to fit %d slots", dropped, len(slots))
    device = model.vocabulary_embeddings.device
    return SlotLayout(
        ids=torch.tensor(ids, device=device),
        attention_mask=torch.tensor(mask, device=device),
        slots=torch.tensor(slots, device=device, dtype=torch.long),
        dropped_tokens=dropped,
    )


# -- decoding and re-tokenizing -------------------------------------------------------------


@dataclass(frozen=True)
class RoundTrip:
    """Optimised ids, the text they decode to, and the ids that text re-tokenizes to.

    `drift` is the share of positions whose id changed: positions of the longer of the two
    content sequences (BOS, EOS and padding excluded) that differ, divided by its length.
    """

    text: str
    ids_before: list[int]
    ids_after: list[int]
    drift: float


def _content(ids: Sequence[int], special: set[int]) -> list[int]:
    return [int(i) for i in ids if int(i) not in special]


def round_trip(model: DiffusionModel, ids: torch.Tensor) -> RoundTrip:
    """Decode one id sequence (T,) to text, re-tokenize it and measure the drift."""
    special = {i for i in model.special_ids.values() if i is not None}
    special |= set(getattr(model.tokenizer, "all_special_ids", []))
    before = _content(ids.tolist(), special)
    text = model.tokenizer.decode(before, skip_special_tokens=True).strip()
    after_ids = model.tokenize([text]).ids[0].tolist()
    after = _content(after_ids, special)

    longest = max(len(before), len(after), 1)
    same = sum(1 for a, b in zip(before, after, strict=False) if a == b)
    drift = (longest - same) / longest
    if drift > 0:
        log.info("re-tokenizing changed %.0f%% of %d ids: %r", 100 * drift, len(before), text)
    return RoundTrip(text=text, ids_before=before, ids_after=after, drift=drift)


# -- budgets, seeds and generation ----------------------------------------------------------


@dataclass
class Budget:
    """What one case's attack spent, in the units every attack reports.

    `denoiser_calls` counts denoiser evaluations per sample (a guided step counts 2);
    `text_encoder_calls` counts encoded sequences (a population of 200 counts 200), so
    numbers compare across attacks that batch differently. `generations` counts full
    sampling runs made inside the attack (early stops, best-of-N checks, target images).
    """

    iterations: int = 0
    denoiser_calls: int = 0
    text_encoder_calls: int = 0
    generations: int = 0
    started: float = field(default_factory=time.perf_counter)

    def result(self, prompt: str, loss_trace: list[float], token_ids: list[int] | None,
               extra: dict[str, Any], wall_seconds: float | None = None) -> AttackResult:
        """The case's result; `wall_seconds` defaults to the time since the budget began.

        A batch of B cases passes its elapsed time divided by B, since the cases shared it.
        """
        extra = {**extra, "budget": {"generations": self.generations}}
        if wall_seconds is None:
            wall_seconds = time.perf_counter() - self.started
        return AttackResult(
            prompt=prompt,
            iterations=self.iterations,
            denoiser_calls=self.denoiser_calls,
            text_encoder_calls=self.text_encoder_calls,
            wall_seconds=wall_seconds,
            loss_trace=loss_trace,
            token_ids=token_ids,
            extra=extra,
        )


def case_seed(case: Case) -> int:
    """The case's seed, or 0, the runner's default base seed, when the case has none."""
    return int(case.seed) if case.seed is not None else 0


def case_guidance(case: Case, sampler: dict[str, Any]) -> float:
    """The guidance the runner evaluates the case at."""
    if sampler.get("use_case_guidance", True) and case.guidance is not None:
        return float(case.guidance)
    return float(sampler["guidance"])


def generate_images(
    model: DiffusionModel, prompts: Sequence[str], case: Case, sampler: dict[str, Any],
    budget: Budget,
) -> torch.Tensor:
    """Images (B, 3, H, W) for `prompts`, each from the case's seed, as the runner makes them."""
    output = model.generate(
        list(prompts),
        seeds=[case_seed(case)] * len(prompts),
        guidance=case_guidance(case, sampler),
        steps=sampler["steps"],
        scheduler=sampler["scheduler"],
        height=sampler.get("height"),
        width=sampler.get("width"),
    )
    budget.generations += len(prompts)
    budget.denoiser_calls += model.denoiser_calls_per_step * sampler["steps"] * len(prompts)
    budget.text_encoder_calls += 2 * len(prompts)
    return output.images


def generate_case_images(
    model: DiffusionModel, prompts: Sequence[str], cases: Sequence[Case],
    sampler: dict[str, Any], budgets: Sequence[Budget],
) -> torch.Tensor:
    """One image per (prompt, case) pair in one `generate` call, each with its case's seed
    and guidance, so image i is the image `generate_images` makes for `cases[i]` alone.

    Each case's budget is charged for its own image only.
    """
    output = model.generate(
        list(prompts),
        seeds=[case_seed(case) for case in cases],
        guidance=[case_guidance(case, sampler) for case in cases],
        steps=sampler["steps"],
        scheduler=sampler["scheduler"],
        height=sampler.get("height"),
        width=sampler.get("width"),
    )
    calls = model.denoiser_calls_per_step * sampler["steps"]
    for budget in budgets:
        budget.generations += 1
        budget.denoiser_calls += calls
        budget.text_encoder_calls += 2
    return output.images


def judge_cases(
    context: AttackContext, prompts: Sequence[str], cases: Sequence[Case],
    budgets: Sequence[Budget],
) -> list[bool]:
    """Generate prompt i for case i on the defended model in one batch; judge each case."""
    if context.judge is None:
        raise RuntimeError(
            "this attack needs an evaluator in the loop, but the context has no judge"
        )
    images = generate_case_images(context.model, prompts, cases, context.sampler, budgets)
    return [bool(context.judge(images[index : index + 1], case)[0])
            for index, case in enumerate(cases)]


def judge_prompts(
    context: AttackContext, prompts: Sequence[str], case: Case, budget: Budget
) -> list[bool]:
    """Generate each prompt on the defended model and ask the judge whether the concept shows."""
    if context.judge is None:
        raise RuntimeError(
            "this attack needs an evaluator in the loop, but the context has no judge"
        )
    images = generate_images(context.model, prompts, case, context.sampler, budget)
    return [bool(verdict) for verdict in context.judge(images, case)]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"invalid attack mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode


def loss_model(context: AttackContext, mode: str) -> DiffusionModel:
    """The model the loss differentiates through: the defended one (adaptive) or the bare one.

    In transfer mode the attack never sees the defense: text encoder, denoiser and sampler
    hooks are the undefended model's, and the defense acts only when the runner evaluates.
    """
    if mode == ADAPTIVE:
        return context.model
    if context.original_model is None:
        raise RuntimeError("transfer mode needs the undefended model, but the context has none")
    return context.original_model


def guided_by_default(model: DiffusionModel) -> bool:
    """Whether the defended model acts at guidance time (sampler hooks or a negative prompt).

    Such inference-time defenses (SLD, negative prompt) act only on the guided prediction,
    so the loss must use it to see the defense, as P4D's `--filter` option does.
    """
    return bool(model.sampler_hooks) or bool(model.negative_prompt)


def target_latents(
    context: AttackContext, case: Case, budget: Budget
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target image the undefended model draws for the case prompt, and its latent z0."""
    if context.original_model is None:
        raise RuntimeError("this attack needs the undefended model to draw its target image")
    images = generate_images(context.original_model, [case.prompt], case, context.sampler, budget)
    with torch.no_grad():
        latents = context.original_model.encode_images(images)
    return images, latents.detach()


def target_latents_batch(
    context: AttackContext, cases: Sequence[Case], budgets: Sequence[Budget]
) -> torch.Tensor:
    """`target_latents` for several cases in one generation: z0 of shape (B, C, h, w)."""
    if context.original_model is None:
        raise RuntimeError("this attack needs the undefended model to draw its target image")
    images = generate_case_images(
        context.original_model, [case.prompt for case in cases], cases, context.sampler,
        budgets,
    )
    with torch.no_grad():
        latents = context.original_model.encode_images(images)
    return latents.detach()


def resolve_options(name: str, defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The attack's defaults overridden by config options; unknown options raise ValueError."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"attack {name!r}: unknown option(s) {', '.join(unknown)}; "
            f"valid: {', '.join(sorted(defaults))}"
        )
    return {**defaults, **options}


def case_generator(seed: int, case: Case) -> torch.Generator:
    """A CPU generator seeded from the attack's seed and the case's seed, for reproducible runs."""
    return torch.Generator("cpu").manual_seed(int(seed) * 1_000_003 + case_seed(case))


# -- genetic-algorithm operators (token ids, learnable slots only) --------------------------


def select_survivors(
    population: torch.Tensor, fitness: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `keep` individuals (rows) of lowest fitness, best first, with their fitness."""
    order = torch.argsort(fitness.cpu(), stable=True)[:keep]
    return population[order], fitness.cpu()[order]


def crossover(
    survivors: torch.Tensor, slots: torch.Tensor, rate: float, generator: torch.Generator
) -> torch.Tensor:
    """Single-point crossover over the slot positions; returns survivors plus children.

    Every survivor is kept. With probability `rate` it is paired with a random survivor and
    cut at a random position c in [1, K] of the K slots: both children (head of one, tail
    of the other) are appended. Positions outside `slots` are copied unchanged.
    """
    slots = slots.cpu()
    children = []
    count, length = survivors.shape[0], len(slots)
    for index in range(count):
        if torch.rand((), generator=generator).item() >= rate:
            continue
        partner = int(torch.randint(count, (), generator=generator))
        cut = int(torch.randint(1, length + 1, (), generator=generator))
        first, second = survivors[index].clone(), survivors[partner].clone()
        tail = slots[cut:]
        first[tail], second[tail] = survivors[partner][tail], survivors[index][tail]
        children += [first, second]
    if not children:
        return survivors.clone()
    return torch.cat([survivors, torch.stack(children)])


def mutate(
    population: torch.Tensor,
    slots: torch.Tensor,
    rate: float,
    candidate_ids: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """With probability `rate` per individual, set one random slot to a random candidate id."""
    mutated = population.clone()
    slots, candidate_ids = slots.cpu(), candidate_ids.cpu()
    for index in range(mutated.shape[0]):
        if torch.rand((), generator=generator).item() >= rate:
            continue
        position = slots[int(torch.randint(len(slots), (), generator=generator))]
        choice = candidate_ids[int(torch.randint(len(candidate_ids), (), generator=generator))]
        mutated[index, position] = choice
    return mutated


# -- the defended side of a white-box loss --------------------------------------------------


@dataclass
class NoisePath:
    """One differentiable denoiser step of the loss model, guided or conditional.

    `guidance` None means the conditional prediction after the hooks' conditioning changes;
    a tensor (one scale per case of the batch) means the guided prediction after the hooks'
    guidance changes. The negative prompt's embedding is encoded once, since
    `noise_under_defense` would otherwise encode it on every call. `calls_per_sample` is
    the denoiser evaluations one call costs per row, hooks included (SLD adds one to a
    guided call; it does not act on a conditional one).
    """

    model: DiffusionModel
    uncond: torch.Tensor
    guidance: torch.Tensor | None

    @functools.cached_property
    def calls_per_sample(self) -> int:
        # Cached: attacks read it every iteration, and the model builds its hooks to count.
        return 1 if self.guidance is None else self.model.denoiser_calls_per_step

    def case_guidance(self, index: int) -> float | None:
        return None if self.guidance is None else float(self.guidance[index])

    def __call__(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,
        case_of_row: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noise for rows (latents, timesteps, cond); row r belongs to case `case_of_row[r]`
        (default: row r is case r), whose guidance scale it uses."""
        uncond = self.uncond.expand(latents.shape[0], -1, -1)
        guidance = None
        if self.guidance is not None:
            rows = torch.arange(latents.shape[0]) if case_of_row is None else case_of_row
            guidance = self.guidance[rows.cpu()].to(latents.device, latents.dtype)
        return self.model.noise_under_defense(
            latents, timesteps, cond, uncond=uncond, guidance=guidance
        )


def noise_path(
    context: AttackContext, mode: str, guided: str | bool, cases: Sequence[Case],
    budgets: Sequence[Budget],
) -> NoisePath:
    """The loss's denoiser step for `mode` and a batch of cases; `guided` is True, False or
    "auto".

    "auto" uses the guided prediction only in adaptive mode against a defense that acts at
    guidance time (see `guided_by_default`); transfer mode has no defense to see. The
    negative prompt is encoded once for the batch; that one sequence is charged to the
    first case.
    """
    if guided not in ("auto", True, False):
        raise ValueError(f"invalid guided option {guided!r}; expected auto, true or false")
    model = loss_model(context, mode)
    if guided == "auto":
        guided = mode == ADAPTIVE and guided_by_default(context.model)
    with torch.no_grad():
        uncond, _ = model.encode_prompts([model.negative_prompt])
    budgets[0].text_encoder_calls += 1
    guidance = None
    if guided:
        guidance = torch.tensor([case_guidance(case, context.sampler) for case in cases])
    return NoisePath(model=model, uncond=uncond, guidance=guidance)
