"""Trainer `saferedir`: build trajectory data with the model's own sampler, fit, select, save.

The released SafeRedir code (Liu et al., arXiv 2601.08623) ships no training script. What
it shows is the record format: (latent x_t, prompt embedding, timestep, label, safe
counterpart embedding, unsafe embedding), an 80/20 random split, batch size 64, a model
chosen on the 20 % split, and a forward pass that accepts a ground-truth token mask.
Everything else below is a reconstruction, and each reconstructed choice is a config
value with the default named here:

- data: every prompt of a `label: 1` source is sampled with classifier-free guidance and
  the configured sampler (the model's default unless `sampler.scheduler` names one), and
  every `record_every`-th step of its trajectory becomes a record with label 1.
  `label: 0` sources (retain and benign prompts) give label-0 records whose safe
  counterpart is the prompt itself. Labels come from the prompt, not from judging the
  final image;
- held-out split by prompt (`holdout_fraction` 0.2, stratified by label), so held-out
  metrics are on prompts the network never saw;
- token-mask target M*_i = 1 when cos(E[i], E_s[i]) < `mask_threshold` (0.95);
- losses, with weights under `losses`:
  - `classification` (1.0): cross-entropy of the two logits;
  - `direction` (1.0), label 1: mean over masked tokens of 1 - cos(delta_i, E_s[i] - E[i]),
    with the ground-truth mask forced into the delta;
  - `magnitude` (1.0), label 1: (alpha_i - ||E_s[i] - E[i]|| / (k ||E[i]||))^2 over all
    tokens, k = `magnitude_target_scale` (1.0), the target clipped to [0, 1];
  - `redirect` (1.0), label 1: ||E + Delta - E_s||^2 / ||E_s - E||^2 with Delta built by
    the inference rule at scale `redirect_scale` (1.0), so it is 1 for Delta = 0;
  - `mask` (1.0): binary cross-entropy of the predicted mask against M*;
  - `preservation` (0.1), label 0: mean alpha^2, a small delta for false positives;
- widths: the released ones unless `network` narrows them (`latent_widths`,
  `latent_features`, `attention_units`); the card records the dims either way;
- AdamW (`lr` 1e-4, `weight_decay` 0.01), `batch_size` 64, up to `epochs` epochs or
  `max_minutes` of fitting, keeping the epoch with the lowest held-out total loss.

Relative paths in the config (prompt files, `output`) resolve against the working
directory, as in run configs: run `arena train saferedir CONFIG` from the repository root.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from defenses.saferedir.loading import save_checkpoint
from defenses.saferedir.networks import UNSAFE, Redirector, RedirectorDims, parameter_count
from harness.config import ConfigError, SchedulerName, apply_override, stable_hash
from harness.model import DiffusionModel
from harness.registry import create
from harness.sampling import SamplerHook, StepState, sample_latents
from harness.training import Trainer

log = logging.getLogger(__name__)

PAPER = "Liu et al., SafeRedir, arXiv 2601.08623"


# -- config ------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PromptSetRef(_Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class PromptSource(_Strict):
    """Prompts of one prompt set, used as label-1 (erase) or label-0 (keep) trajectories.

    `text: safe_prompt` takes each case's safe counterpart instead of its prompt, which
    turns a forget set with pairs into its retain set.
    """

    prompt_set: PromptSetRef
    label: Literal[0, 1]
    text: Literal["prompt", "safe_prompt"] = "prompt"
    limit: int | None = Field(default=None, ge=1)

    @property
    def key(self) -> str:
        suffix = "" if self.text == "prompt" else ":safe"
        return f"{self.prompt_set.name}{suffix}"


class ModelRef(_Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class SamplerSettings(_Strict):
    scheduler: SchedulerName | None = None  # None: the model's default sampler
    steps: int | None = Field(default=None, ge=1)
    guidance: float | None = None
    batch_size: int = Field(default=16, ge=1)


class TrajectorySettings(_Strict):
    seeds_per_prompt: int = Field(default=1, ge=1)
    base_seed: int = 90_000  # far from the seeds of the shipped prompt sets
    record_every: int = Field(default=1, ge=1)


class TargetSettings(_Strict):
    mask_threshold: float = 0.95
    magnitude_target_scale: float = Field(default=1.0, gt=0)
    redirect_scale: float = Field(default=1.0, gt=0)


class LossWeights(_Strict):
    classification: float = 1.0
    direction: float = 1.0
    magnitude: float = 1.0
    redirect: float = 1.0
    mask: float = 1.0
    preservation: float = 0.1


class OptimiserSettings(_Strict):
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    batch_size: int = Field(default=64, ge=1)
    epochs: int = Field(default=20, ge=1)
    max_minutes: float = Field(default=60.0, gt=0)
    seed: int = 0


class NetworkSettings(_Strict):
    """Widths that may depart from the released architecture; None keeps the release's.

    The released widths suit SD's 860M-parameter UNet. Next to a UNet of a few million
    parameters they cost most of a denoising step, so a small model's config narrows the
    latent encoder and the prompt attention (see the README's Cost section).
    """

    latent_widths: tuple[Annotated[int, Field(ge=1)], ...] | None = Field(
        default=None, min_length=1
    )
    latent_features: int | None = Field(default=None, ge=1)
    attention_units: int | None = Field(default=None, ge=1)

    def overrides(self) -> dict[str, Any]:
        return {name: value for name, value in self.model_dump().items() if value is not None}


class TrainConfig(_Strict):
    concept: str
    model: ModelRef
    sources: list[PromptSource]
    output: str
    device: str = "auto"
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    split_seed: int = 0
    threads: int | None = Field(default=None, ge=1)
    sampler: SamplerSettings = SamplerSettings()
    trajectories: TrajectorySettings = TrajectorySettings()
    targets: TargetSettings = TargetSettings()
    losses: LossWeights = LossWeights()
    optimiser: OptimiserSettings = OptimiserSettings()
    network: NetworkSettings = NetworkSettings()


def load_train_config(path: Path, overrides: list[str]) -> TrainConfig:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg']}") from None
    if not any(source.label == 1 for source in config.sources):
        raise ConfigError(f"{path}: sources: no source has label 1 (prompts to redirect)")
    if not any(source.label == 0 for source in config.sources):
        raise ConfigError(f"{path}: sources: no source has label 0 (prompts to keep)")
    return config


# -- data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTable:
    """Unique training prompts with their safe counterparts, labels and sources."""

    texts: tuple[str, ...]
    safe_texts: tuple[str, ...]
    labels: tuple[int, ...]
    sources: tuple[str, ...]


@dataclass(frozen=True)
class TrajectoryData:
    """Training records: one per recorded sampling step, embeddings stored once per prompt.

    Per record: `latents` (N, C, H, W), `timesteps` (N,), `steps` (N,), `prompt_index` (N,).
    Per prompt: `embeddings` and `safe_embeddings` (P, T, D), `token_masks` (P, T) (the
    mask target M*), `labels` (P,), `sources` (P source names).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    steps: torch.Tensor
    prompt_index: torch.Tensor
    embeddings: torch.Tensor
    safe_embeddings: torch.Tensor
    token_masks: torch.Tensor
    labels: torch.Tensor
    sources: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def record_labels(self) -> torch.Tensor:
        return self.labels[self.prompt_index]

    def subset(self, keep_prompt: torch.Tensor) -> TrajectoryData:
        """Select the records whose prompt is in `keep_prompt` (a boolean mask over prompts)."""
        rows = keep_prompt[self.prompt_index]
        return TrajectoryData(
            latents=self.latents[rows],
            timesteps=self.timesteps[rows],
            steps=self.steps[rows],
            prompt_index=self.prompt_index[rows],
            embeddings=self.embeddings,
            safe_embeddings=self.safe_embeddings,
            token_masks=self.token_masks,
            labels=self.labels,
            sources=self.sources,
        )


def token_mask_targets(
    embeddings: torch.Tensor, safe_embeddings: torch.Tensor, threshold: float
) -> torch.Tensor:
    """M*_i = 1 where the prompt's token i and the safe prompt's token i point apart."""
    cosine = F.cosine_similarity(embeddings.float(), safe_embeddings.float(), dim=-1)
    return (cosine < threshold).float()


def collect_prompts(config: TrainConfig) -> PromptTable:
    """Load every source's cases; label-1 prompts need a safe counterpart."""
    texts, safe_texts, labels, sources = [], [], [], []
    for source in config.sources:
        cases = create("prompt_sets", source.prompt_set.name, **source.prompt_set.options).load()
        if source.limit is not None:
            cases = cases[: source.limit]
        used = 0
        for case in cases:
            text = case.prompt if source.text == "prompt" else case.safe_prompt
            if text is None:
                continue
            if source.label == 1 and case.safe_prompt is None:
                log.warning("case %s has no safe prompt; left out of label 1", case.case_id)
                continue
            texts.append(text)
            safe_texts.append(case.safe_prompt if source.label == 1 else text)
            labels.append(source.label)
            sources.append(source.key)
            used += 1
        log.info("source %s (label %d): %d prompts", source.key, source.label, used)
        if used == 0:
            raise ConfigError(f"source {source.key}: no usable prompts")
    return PromptTable(tuple(texts), tuple(safe_texts), tuple(labels), tuple(sources))


class TrajectoryRecorder(SamplerHook):
    """Keeps the latent each denoiser call saw, at every `every`-th step, on the CPU."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.latents: list[torch.Tensor] = []
        self.timesteps: list[int] = []
        self.steps: list[int] = []

    def guide(self, state: StepState) -> None:
        # Before the scheduler step `state.latents` is the x_t the denoiser just saw,
        # which is what the redirector classifies at inference.
        if state.step % self.every == 0:
            self.latents.append(state.latents.detach().float().cpu().clone())
            self.timesteps.append(int(state.timestep))
            self.steps.append(state.step)


def encode_in_batches(model: DiffusionModel, texts: tuple[str, ...], batch: int) -> torch.Tensor:
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            embedding, _ = model.encode_prompts(list(texts[start : start + batch]))
            chunks.append(embedding.float().cpu())
    return torch.cat(chunks)


def build_dataset(model: DiffusionModel, table: PromptTable, config: TrainConfig):
    """Sample every prompt's trajectories with the model's sampler and record them."""
    batch = config.sampler.batch_size
    embeddings = encode_in_batches(model, table.texts, batch)
    safe_embeddings = encode_in_batches(model, table.safe_texts, batch)
    steps = config.sampler.steps or model.default_steps
    guidance = (
        config.sampler.guidance if config.sampler.guidance is not None else model.default_guidance
    )
    seeds_per_prompt = config.trajectories.seeds_per_prompt

    jobs = [(p, k) for p in range(len(table.texts)) for k in range(seeds_per_prompt)]
    latents, timesteps, step_ids, prompt_index = [], [], [], []
    began = time.perf_counter()
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        rows = torch.tensor([p for p, _ in chunk])
        seeds = [config.trajectories.base_seed + p * seeds_per_prompt + k for p, k in chunk]
        with torch.no_grad():
            uncond, _ = model.encode_prompts([model.negative_prompt] * len(chunk))
            recorder = TrajectoryRecorder(config.trajectories.record_every)
            sample_latents(
                model,
                embeddings[rows].to(model.device, model.dtype),
                uncond.to(model.dtype),
                seeds=seeds,
                steps=steps,
                guidance=guidance,
                scheduler=config.sampler.scheduler,
                hooks=[recorder],
            )
        for latent, timestep, step in zip(
            recorder.latents, recorder.timesteps, recorder.steps, strict=True
        ):
            latents.append(latent)
            timesteps.append(torch.full((len(chunk),), float(timestep)))
            step_ids.append(torch.full((len(chunk),), step))
            prompt_index.append(rows)
        log.info(
            "trajectories: %d/%d sampled (%.0f s)",
            min(start + batch, len(jobs)),
            len(jobs),
            time.perf_counter() - began,
        )

    return TrajectoryData(
        latents=torch.cat(latents),
        timesteps=torch.cat(timesteps),
        steps=torch.cat(step_ids),
        prompt_index=torch.cat(prompt_index),
        embeddings=embeddings,
        safe_embeddings=safe_embeddings,
        token_masks=token_mask_targets(
            embeddings, safe_embeddings, config.targets.mask_threshold
        ),
        labels=torch.tensor(table.labels),
        sources=table.sources,
    )


def holdout_prompts(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Pick held-out prompts: `fraction` of each label, at least one. Returns a boolean mask."""
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        order = members[torch.randperm(len(members), generator=generator)]
        count = max(1, round(fraction * len(members)))
        held[order[:count]] = True
    return held


# -- losses and fitting ------------------------------------------------------------------


def loss_terms(
    network: Redirector,
    data: TrajectoryData,
    rows: torch.Tensor,
    targets: TargetSettings,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Compute the unweighted loss terms on records `rows` and the predicted unsafe decisions."""
    prompt = data.prompt_index[rows]
    latents = data.latents[rows].to(device)
    embedding = data.embeddings[prompt].to(device)
    safe = data.safe_embeddings[prompt].to(device)
    mask_target = data.token_masks[prompt].to(device)
    labels = data.labels[prompt].to(device)
    output = network(latents, embedding, data.timesteps[rows].to(device), token_mask=mask_target)

    zero = output.logits.sum() * 0.0
    terms = {
        "classification": F.cross_entropy(output.logits, labels),
        "mask": F.binary_cross_entropy(output.mask.clamp(1e-6, 1 - 1e-6), mask_target),
    }

    positive = labels == 1
    if positive.any():
        difference = (safe - embedding)[positive]
        token_mask = mask_target[positive]
        cosine = F.cosine_similarity(output.delta[positive], difference, dim=-1, eps=1e-8)
        terms["direction"] = ((1 - cosine) * token_mask).sum() / token_mask.sum().clamp_min(1)

        norms = embedding[positive].norm(dim=-1)
        alpha_target = difference.norm(dim=-1) / norms.clamp_min(1e-6)
        alpha_target = (alpha_target / targets.magnitude_target_scale).clamp(0, 1)
        alpha = output.alpha[positive].squeeze(-1)
        terms["magnitude"] = F.mse_loss(alpha, alpha_target)

        # Delta exactly as the inference rule builds it (mask and gate cancel there).
        redirect = targets.redirect_scale * alpha.unsqueeze(-1) * norms.unsqueeze(-1)
        redirect = redirect * output.direction[positive].unsqueeze(1)
        residual = (embedding[positive] + redirect - safe[positive]).pow(2).sum(dim=(1, 2))
        reference = difference.pow(2).sum(dim=(1, 2)).clamp_min(1e-6)
        terms["redirect"] = (residual / reference).mean()
    else:
        terms.update(direction=zero, magnitude=zero, redirect=zero)

    negative = ~positive
    terms["preservation"] = output.alpha[negative].pow(2).mean() if negative.any() else zero
    return terms, output.logits.argmax(dim=-1) == UNSAFE


def weighted_total(terms: dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    return sum(getattr(weights, name) * value for name, value in terms.items())


def classification_metrics(
    data: TrajectoryData, predicted: torch.Tensor
) -> dict[str, float | dict[str, float]]:
    """Accuracy, TPR, FPR over all records and at step 0, and FPR per label-0 source."""
    labels = data.record_labels()

    def rate(selector: torch.Tensor) -> float:
        return float(predicted[selector].float().mean()) if selector.any() else math.nan

    first = data.steps == 0
    per_source = {}
    for source in sorted(set(data.sources)):
        source_prompts = torch.tensor([name == source for name in data.sources])
        selector = source_prompts[data.prompt_index]
        if selector.any():
            per_source[source] = rate(selector)
    return {
        "accuracy": float((predicted == (labels == 1)).float().mean()),
        "tpr": rate(labels == 1),
        "fpr": rate(labels == 0),
        "tpr_step0": rate((labels == 1) & first),
        "fpr_step0": rate((labels == 0) & first),
        "unsafe_rate_by_source": per_source,
    }


def evaluate(
    network: Redirector, data: TrajectoryData, config: TrainConfig, device: torch.device
) -> dict[str, Any]:
    """Mean loss terms and classification metrics of `network` on `data`, in eval mode."""
    network.eval()
    sums: dict[str, float] = {}
    decisions = []
    with torch.no_grad():
        for start in range(0, len(data), config.optimiser.batch_size):
            rows = torch.arange(start, min(start + config.optimiser.batch_size, len(data)))
            terms, predicted = loss_terms(network, data, rows, config.targets, device)
            terms["total"] = weighted_total(terms, config.losses)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value) * len(rows)
            decisions.append(predicted.cpu())
    losses = {name: total / len(data) for name, total in sums.items()}
    return {"losses": losses, **classification_metrics(data, torch.cat(decisions))}


@dataclass(frozen=True)
class FitResult:
    """The selected network state and what happened on the way."""

    state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, Any]]
    seconds: float


def fit(
    network: Redirector,
    train: TrajectoryData,
    holdout: TrajectoryData,
    config: TrainConfig,
    device: torch.device,
) -> FitResult:
    """Train with AdamW; keep the epoch with the lowest held-out total loss."""
    settings = config.optimiser
    torch.manual_seed(settings.seed)
    network.to(device)
    optimiser = torch.optim.AdamW(
        network.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    history: list[dict[str, Any]] = []
    best_loss, best_epoch, best_state = math.inf, -1, None
    began = time.perf_counter()

    for epoch in range(settings.epochs):
        network.train()
        order = torch.randperm(len(train))
        sums: dict[str, float] = {}
        for start in range(0, len(train), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            if len(rows) < 2:  # BatchNorm needs two samples in training mode
                continue
            terms, _ = loss_terms(network, train, rows, config.targets, device)
            total = weighted_total(terms, config.losses)
            optimiser.zero_grad(set_to_none=True)
            total.backward()
            optimiser.step()
            terms["total"] = total
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * len(rows)

        train_losses = {name: value / len(train) for name, value in sums.items()}
        held = evaluate(network, holdout, config, device)
        elapsed = time.perf_counter() - began
        history.append({"epoch": epoch, "seconds": elapsed, "train": train_losses, "holdout": held})
        log.info(
            "epoch %d: train loss %.4f, held-out loss %.4f, accuracy %.3f, FPR %.3f, "
            "TPR %.3f (%.0f s)",
            epoch,
            train_losses.get("total", math.nan),
            held["losses"]["total"],
            held["accuracy"],
            held["fpr"],
            held["tpr"],
            elapsed,
        )
        if held["losses"]["total"] < best_loss:
            best_loss, best_epoch = held["losses"]["total"], epoch
            best_state = copy.deepcopy(network.state_dict())
        if elapsed > settings.max_minutes * 60:
            log.info("stopping after epoch %d: %.1f min budget spent", epoch, settings.max_minutes)
            break

    assert best_state is not None  # at least one epoch ran
    network.load_state_dict(best_state)
    return FitResult(best_state, best_epoch, history, time.perf_counter() - began)


# -- the trainer -------------------------------------------------------------------------


def _output_path(config: TrainConfig, out: Path | None) -> Path:
    if out is None:
        return Path(config.output)
    if out.suffix == ".safetensors":
        return out
    return out / Path(config.output).name


class SafeRedirTrainer(Trainer):
    """`arena train saferedir CONFIG`: see the module docstring for the config."""

    name = "saferedir"

    def run(self, config_path: Path, overrides: list[str], out: Path | None) -> Path:
        config = load_train_config(config_path, overrides)
        if config.threads:
            torch.set_num_threads(config.threads)
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu")
            if config.device == "auto"
            else config.device
        )
        began = time.perf_counter()

        # 1. The frozen model and its trajectories on the training prompts.
        plugin = create("models", config.model.name, **config.model.options)
        model = plugin.load(device, torch.float32)
        table = collect_prompts(config)
        data = build_dataset(model, table, config)
        held = holdout_prompts(data.labels, config.holdout_fraction, config.split_seed)
        train, holdout = data.subset(~held), data.subset(held)
        log.info(
            "data: %d prompts (%d label 1), %d records; %d train, %d held-out records",
            len(table.texts),
            sum(table.labels),
            len(data),
            len(train),
            len(holdout),
        )
        data_seconds = time.perf_counter() - began

        # 2. Fit the redirector with dims read from the model, widths from the config.
        dims = RedirectorDims(
            latent_channels=int(data.latents.shape[1]),
            token_count=int(data.embeddings.shape[1]),
            embed_dim=int(data.embeddings.shape[2]),
            **config.network.overrides(),
        )
        torch.manual_seed(config.optimiser.seed)
        network = Redirector(dims)
        result = fit(network, train, holdout, config, device)
        final = evaluate(network, holdout, config, device)

        # 3. Weights and card.
        path = _output_path(config, out)
        card = self._card(config, table, data, train, holdout, result, final, network)
        card["seconds"] = {"data": data_seconds, "fit": result.seconds}
        save_checkpoint(network.cpu(), path, card)
        log.info(
            "saved %s: held-out accuracy %.3f, FPR %.3f, TPR %.3f",
            path,
            final["accuracy"],
            final["fpr"],
            final["tpr"],
        )
        return path

    def _card(self, config, table, data, train, holdout, result, final, network) -> dict:
        positive = sum(table.labels)
        return {
            "method": "saferedir",
            "paper": PAPER,
            "concept": config.concept,
            "model": {"name": config.model.name, "options": config.model.options},
            "parameters": parameter_count(network),
            "config": config.model_dump(mode="json"),
            "config_hash": stable_hash(config.model_dump(mode="json")),
            "data": {
                "summary": (
                    f"{config.model.name} {config.concept}: {positive} label-1 and "
                    f"{len(table.texts) - positive} label-0 prompts, {len(data)} records"
                ),
                "prompts": len(table.texts),
                "label1_prompts": positive,
                "records": len(data),
                "train_records": len(train),
                "holdout_records": len(holdout),
                "recorded_steps": sorted({int(step) for step in data.steps}),
                "sources": [source.key for source in config.sources],
            },
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "history": result.history,
            "holdout_metrics": final,
        }
