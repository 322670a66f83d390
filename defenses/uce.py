"""Defense `uce`: Unified Concept Editing, a closed-form edit of cross-attention.

Gandikota, Orgad, Belinkov, Materzyńska and Bau, "Unified Concept Editing in Diffusion
Models", WACV 2024.

The text reaches the denoiser only through the key and value projections of its
cross-attention layers. UCE edits every such projection W (each `attn2.to_k` and
`attn2.to_v`) so that the text-encoder outputs c_i of the erased concept map to what the
projection gave a guide concept, v*_i = W g_i, while the outputs c_j of preserved
concepts keep their old image W c_j:

    W' = (r W + e sum_i v*_i c_i^T + p sum_j W c_j c_j^T)
         (r I + e sum_i c_i c_i^T + p sum_j c_j c_j^T)^-1

with erase scale e, preserve scale p and a ridge term r that pulls W' towards W in every
direction (it keeps the system invertible with few concepts). W' is the least-squares
solution of the stacked system {sqrt(e) c_i -> v*_i, sqrt(p) c_j -> W c_j,
sqrt(r) basis_k -> W basis_k}; the test suite checks it against `torch.linalg.lstsq`.

Which token states (following the authors' erasing script): for an erased concept, the
text-encoder outputs from the concept's last word token to the end of the sequence (its
end-of-text and padding states, which carry the whole prompt through causal attention),
aligned from the end with the guide prompt's states; for the empty guide, the concept's
last word pairs with the start token. A preserved concept contributes all its positions.

Defaults, from the authors' erasing script for SD 1.4: erase scale 1, preserve scale 0.1,
ridge 0.5, guide the empty prompt, keys and values both edited, and the empty prompt as
the one preserved concept when no preserve list is given. Options: `guide`, `preserve`
(list of prompts), `erase` (list of prompts; default the run's concept), `erase_scale`,
`preserve_scale`, `regularization`, `edit_keys` (default true). The edit is fitted when
the defense is applied: one text-encoder pass and a D x D solve per projection.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.defense import Defense
from harness.model import DiffusionModel

log = logging.getLogger(__name__)

OPTIONS = (
    "guide",
    "preserve",
    "erase",
    "erase_scale",
    "preserve_scale",
    "regularization",
    "edit_keys",
)


def uce_closed_form(
    weight: torch.Tensor,
    erase_inputs: torch.Tensor,
    erase_targets: torch.Tensor,
    preserve_inputs: torch.Tensor,
    *,
    erase_scale: float,
    preserve_scale: float,
    regularization: float,
) -> torch.Tensor:
    """Solve UCE's normal equations for one projection; returns W' with W's shape and dtype.

    `weight` is (out, in); `erase_inputs` (N, in) with `erase_targets` (N, out);
    `preserve_inputs` (M, in). Computed in float64, since the Gram matrices of
    text states can be badly conditioned.
    """
    w = weight.double()
    c_erase, v_erase, c_keep = (
        erase_inputs.double(),
        erase_targets.double(),
        preserve_inputs.double(),
    )
    eye = torch.eye(w.shape[1], dtype=torch.float64, device=w.device)

    numerator = regularization * w + erase_scale * v_erase.T @ c_erase
    gram = regularization * eye + erase_scale * c_erase.T @ c_erase
    if c_keep.shape[0]:
        numerator = numerator + preserve_scale * (w @ c_keep.T) @ c_keep
        gram = gram + preserve_scale * c_keep.T @ c_keep

    # W' gram = numerator, and gram is symmetric: solve gram W'^T = numerator^T.
    solution = torch.linalg.solve(gram, numerator.T).T
    return solution.to(weight.dtype)


def erase_guide_states(
    model: DiffusionModel, erase: str, guide: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode an erased prompt and its guide; return their aligned (K, D) token states."""
    states, tokens = model.encode_prompts([erase, guide])
    length = states.shape[1]
    last_erase = int(tokens.attention_mask[0].sum()) - 2
    last_guide = int(tokens.attention_mask[1].sum()) - 2
    farthest = max(last_erase, last_guide)
    erase_rows = states[0, last_erase : length - (farthest - last_erase)]
    guide_rows = states[1, last_guide : length - (farthest - last_guide)]
    return erase_rows, guide_rows


def cross_attention_projections(unet: nn.Module, edit_keys: bool) -> dict[str, nn.Linear]:
    """Collect every cross-attention value (and key) projection, by parameter-name prefix."""
    projections: dict[str, nn.Linear] = {}
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            projections[f"{name}.to_v"] = module.to_v
            if edit_keys:
                projections[f"{name}.to_k"] = module.to_k
    if not projections:
        raise ValueError("defense 'uce': the denoiser has no cross-attention (attn2) layers")
    return projections


@dataclass(frozen=True)
class UceEdit:
    """The fitted edit: new weights per projection and how far each moved."""

    weights: dict[str, torch.Tensor]
    relative_change: dict[str, float]
    seconds: float


class UnifiedConceptEditing(Defense):
    name = "uce"

    def __init__(self, concept: str | None = None, **options: Any) -> None:
        super().__init__(concept=concept, **options)
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise ValueError(
                f"defense 'uce': unknown options {sorted(unknown)}; valid: {', '.join(OPTIONS)}"
            )
        erase = options.get("erase") or ([concept] if concept else [])
        if not erase:
            raise ValueError("defense 'uce' needs a concept or an 'erase' list of prompts")
        self.erase = [str(text) for text in erase]
        self.guide = str(options.get("guide", ""))
        preserve = options.get("preserve")
        self.preserve = [""] if preserve is None else [str(text) for text in preserve]
        self.erase_scale = float(options.get("erase_scale", 1.0))
        self.preserve_scale = float(options.get("preserve_scale", 0.1))
        self.regularization = float(options.get("regularization", 0.5))
        self.edit_keys = bool(options.get("edit_keys", True))

    def fit(self, model: DiffusionModel) -> UceEdit:
        started = time.perf_counter()
        with torch.no_grad():
            pairs = [erase_guide_states(model, text, self.guide) for text in self.erase]
            c_erase = torch.cat([erase for erase, _ in pairs])
            c_guide = torch.cat([guide for _, guide in pairs])
            if self.preserve:
                keep, _ = model.encode_prompts(self.preserve)
                c_keep = keep.reshape(-1, keep.shape[-1])
            else:
                c_keep = c_erase[:0]

            weights, change = {}, {}
            for name, projection in cross_attention_projections(model.unet, self.edit_keys).items():
                old = projection.weight
                targets = c_guide.to(old.dtype) @ old.T  # v* = W g
                new = uce_closed_form(
                    old,
                    c_erase.to(old.dtype),
                    targets,
                    c_keep.to(old.dtype),
                    erase_scale=self.erase_scale,
                    preserve_scale=self.preserve_scale,
                    regularization=self.regularization,
                )
                weights[f"{name}.weight"] = new
                change[name] = float((new - old).norm() / old.norm())
        edit = UceEdit(
            weights=weights, relative_change=change, seconds=time.perf_counter() - started
        )
        log.info(
            "uce: edited %d projections for %s -> %r (%d erase and %d preserve states) in %.2f s;"
            " mean relative weight change %.4f",
            len(weights),
            self.erase,
            self.guide,
            c_erase.shape[0],
            c_keep.shape[0],
            edit.seconds,
            sum(change.values()) / len(change),
        )
        return edit

    def apply(self, model: DiffusionModel) -> DiffusionModel:
        edit = self.fit(model)
        unet = copy.deepcopy(model.unet)
        missing, unexpected = unet.load_state_dict(edit.weights, strict=False)
        if unexpected:
            raise RuntimeError(f"uce produced keys the denoiser lacks: {unexpected[:3]}")
        return model.replace(unet=unet)

    def describe(self) -> dict[str, Any]:
        return {
            "defense": self.name,
            "erase": self.erase,
            "guide": self.guide,
            "preserve": self.preserve,
            "erase_scale": self.erase_scale,
            "preserve_scale": self.preserve_scale,
            "regularization": self.regularization,
            "edit_keys": self.edit_keys,
        }
