"""ModernBERT written out for the sampler's cache and the lockstep engine: ``is_modernbert``,
the attention masks per layer type built from tensors alone (``modernbert_masks``), logits at a
flat index without hooks (``modernbert_logits_at``, so torch.compile traces it whole) and the MLM
head on hidden states (``modernbert_head``).
"""

from __future__ import annotations

import torch
from torch import nn

from . import unwrap


def is_modernbert(model: nn.Module) -> bool:
    return type(unwrap(model)).__name__ == "ModernBertForMaskedLM"


def modernbert_masks(q_pos: torch.Tensor, keys_att: torch.Tensor, half_window: int) -> dict[str, torch.Tensor]:
    """ModernBERT's boolean attention masks [b, 1, n, L] per layer type (True = attend), for queries
    at positions ``q_pos`` [b, n] over keys ``keys_att`` [b, L] (True = a real token): every real
    key for global layers, real keys within ``half_window`` of the query for sliding ones (the
    model's ``local_attention // 2``). Built from tensors alone (no host read)."""
    k_pos = torch.arange(keys_att.shape[1], device=q_pos.device)
    full = keys_att[:, None, None, :].expand(-1, 1, q_pos.shape[1], -1)
    near = (q_pos[:, :, None] - k_pos[None, None, :]).abs() <= half_window  # [b, n, L]
    return {"full_attention": full, "sliding_attention": full & near[:, None]}


def modernbert_logits_at(model: nn.Module, input_ids: torch.Tensor, flat_index: torch.Tensor,
                         masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """``logits_at`` for ModernBERT inference with prepared ``modernbert_masks`` and a flat index,
    written as plain calls of the model's modules (no hook: torch.compile traces it whole)."""
    inner = unwrap(model)
    hidden = inner.model(input_ids=input_ids, attention_mask=masks).last_hidden_state
    return modernbert_head(inner, hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_index))


def modernbert_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """ModernBERT's MLM head (prediction head, then the output layer) on hidden states [..., H]."""
    inner = unwrap(model)
    return inner.decoder(inner.head(hidden))
