"""Differentiable text-encoder paths from token embeddings.

White-box attacks (P4D, UnlearnDiffAtk) optimise token embeddings, so they need the text
encoder run on embeddings instead of ids. Each path below rebuilds the encoder's forward
pass from its public submodules and must reproduce `encoder(input_ids)` for real ids; the
test suite checks that equality for both families.
"""

from __future__ import annotations

import torch
from torch import nn


def _causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask of shape (1, 1, L, L): 0 on and below the diagonal, the dtype's min above."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.triu(mask, diagonal=1)[None, None]


def _padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask of shape (B, 1, 1, L) that hides padded keys."""
    hidden = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return hidden


class ClipTextPath:
    """CLIP text transformer (SD 1.x and 2.x) run on token embeddings.

    Steps, matching `CLIPTextModel.forward`: (1) add position embeddings, (2) run the
    encoder layers under a causal mask, (3) apply the final layer norm. SD conditions on
    the whole last hidden state, so the pooled output is not computed.
    """

    def __init__(self, text_encoder: nn.Module) -> None:
        # transformers 4.x wraps the layers in `.text_model`; 5.x puts them on the model.
        self.module = getattr(text_encoder, "text_model", text_encoder)
        self.text_encoder = text_encoder

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.module.embeddings.token_embedding

    def encode_ids(self, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        # SD never passes the padding mask to CLIP: padded positions are EOT tokens that
        # the UNet attends to, so the mask is ignored here on purpose.
        return self.text_encoder(input_ids=ids).last_hidden_state

    def encode_embeddings(
        self, token_embeddings: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        hidden = self.module.embeddings(inputs_embeds=token_embeddings)
        mask = _causal_mask(hidden.shape[1], hidden.dtype, hidden.device)
        hidden = self.module.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
        return self.module.final_layer_norm(hidden)


class BertTextPath:
    """BERT-family encoder (MiniLM in the shapes world) run on token embeddings.

    Steps, matching `BertModel.forward` with token type 0: (1) word embeddings given,
    plus position and token-type embeddings, then layer norm (dropout is off in eval),
    (2) the encoder layers under the padding mask. The conditioning is the whole last
    hidden state, padded positions included, as SD does with CLIP.
    """

    def __init__(self, text_encoder: nn.Module) -> None:
        self.module = text_encoder
        self.text_encoder = text_encoder

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.module.embeddings.word_embeddings

    def encode_ids(self, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.text_encoder(input_ids=ids, attention_mask=attention_mask).last_hidden_state

    def encode_embeddings(
        self, token_embeddings: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, length, _ = token_embeddings.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, device=token_embeddings.device)
        token_type_ids = torch.zeros(
            batch, length, dtype=torch.long, device=token_embeddings.device
        )
        hidden = self.module.embeddings(
            inputs_embeds=token_embeddings, token_type_ids=token_type_ids
        )
        mask = _padding_mask(attention_mask, hidden.dtype)
        return self.module.encoder(hidden, attention_mask=mask).last_hidden_state


def text_path_for(text_encoder: nn.Module) -> ClipTextPath | BertTextPath:
    """Pick the embedding path for a text encoder by its architecture."""
    model_type = getattr(getattr(text_encoder, "config", None), "model_type", "")
    if model_type.startswith("clip"):
        return ClipTextPath(text_encoder)
    if model_type in {"bert", "roberta", "xlm-roberta"}:
        return BertTextPath(text_encoder)
    raise ValueError(
        f"unsupported text encoder type {model_type!r}: expected a CLIP or BERT-family encoder"
    )
