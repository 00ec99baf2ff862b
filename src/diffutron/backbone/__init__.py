"""The encoder behind a diffusion LM: the forward helper, and the one place to import the
backbone's pieces from.

Everything model-specific lives here or beside it, so the objective, the sampler, the likelihood
estimator and the server share one forward helper, :func:`logits_at`, which runs the encoder over
the whole canvas but the (256k-wide) MLM head only at the positions that will be read (on CPU
through the oneDNN-packed output layer, :func:`packed_head`), and one rule each for the
end-of-text id, the pad id and right-padding ragged rows (:func:`end_of_text_id`,
:func:`pad_token_id`, :func:`right_pad`).

Beside it: ``backbone/tokenizer.py`` (chat template, special ids, padding, stop sequences) and
``backbone/loading.py`` (devices, dtypes, ``load_backbone``, ``make_fast``), both re-exported
here; ``backbone/modernbert.py`` (ModernBERT's masks and head for the cache and the engine), which
builds on this module.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from .loading import (
    FAST_MODES,
    HEAD_INT8_ENGINE,
    check_device,
    fast_defaults,
    load_backbone,
    make_fast,
    resolve_device,
    resolve_dtype,
)
from .tokenizer import (
    CHAT_TEMPLATE,
    END_OF_TURN,
    ROLES,
    check_tokenizer,
    choose_pad_id,
    end_of_text_id,
    install_chat_template,
    pad_token_id,
    right_pad,
    stop_token_sequences,
)

__all__ = [
    "CHAT_TEMPLATE", "END_OF_TURN", "FAST_MODES", "HEAD_INT8_ENGINE", "PACKED_HEAD", "ROLES", "check_device",
    "check_tokenizer", "choose_pad_id", "context_length", "encoder_of", "end_of_text_id", "fast_defaults",
    "full_logits", "install_chat_template", "load_backbone", "logits_at", "make_fast", "packed_head",
    "pad_token_id", "resolve_device", "resolve_dtype", "right_pad", "stop_token_sequences", "unwrap",
]


def context_length(model, tokenizer) -> int:
    """Positions the model can attend to: its position limit, or the tokenizer's if smaller."""
    config = unwrap(model).config
    limit = getattr(config, "max_position_embeddings", None) or 512
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < limit:
        limit = tok_max
    return int(limit)


# ---------------------------------------------------------------------------------------------
# the forward helper


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face masked-LM module inside DDP/FSDP, torch.compile and peft wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        else:
            return model


def encoder_of(model: nn.Module) -> nn.Module | None:
    """The encoder whose output the MLM head reads (``model.model`` for ModernBERT, ``.bert``...)."""
    inner = unwrap(model)
    encoder = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    return encoder if isinstance(encoder, nn.Module) and encoder is not inner else None


@contextlib.contextmanager
def _gather_hidden(encoder: nn.Module, flat_index: torch.Tensor):
    """Within the block, the encoder returns its hidden states at ``flat_index`` only, [N, H]."""

    def hook(module, args, output):
        hidden = output[0]
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_index)
        if isinstance(output, tuple):
            return (picked,) + tuple(output[1:])
        output["last_hidden_state"] = picked
        return output

    handle = encoder.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# CPU inference in float32 runs the output layer through oneDNN with a prepacked copy of its weight:
# at the 1-32 rows a sampler step reads, that is ~1.3-2x faster than the plain addmm for a 256k
# vocabulary, at the cost of a second copy of the output matrix while a generation runs (+0.8 GB
# for mmBERT-base). DIFFUTRON_PACKED_HEAD=0 turns it off.
PACKED_HEAD = os.environ.get("DIFFUTRON_PACKED_HEAD", "1") != "0"
_PACK_ROWS = 32  # the row count oneDNN lays the packed weight out for (a sampler block's width)


def _can_pack(layer) -> bool:
    return (PACKED_HEAD and isinstance(layer, nn.Linear) and not torch.is_grad_enabled()
            and "forward" not in vars(layer)  # already swapped (the fused training loss, an outer call)
            and layer.weight.device.type == "cpu" and layer.weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@contextlib.contextmanager
def packed_head(model: nn.Module):
    """Within the block, the model's output layer multiplies by a copy of its weight that oneDNN
    packed on entry (CPU, float32, no autograd; otherwise nothing changes). The values are those
    of the plain layer up to float rounding. The weights must not change inside the block: the
    sampler holds it for one generation."""
    get = getattr(unwrap(model), "get_output_embeddings", None)
    layer = get() if callable(get) else None
    if not _can_pack(layer):
        yield
        return
    packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), _PACK_ROWS)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):  # e.g. evaluation inside a bf16 run
            return torch.nn.functional.linear(x, layer.weight, layer.bias)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(flat, packed, layer.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])

    layer.forward = forward  # an instance attribute: the class's forward is untouched
    try:
        yield
    finally:
        layer.__dict__.pop("forward", None)


def logits_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor | dict | None = None,
) -> torch.Tensor:
    """Logits [N, V] at the ``True`` entries of ``positions`` (bool [B, L]), in row-major order,
    or at ``positions`` given as a flat index into [B * L] (a fixed N: no host read, as CUDA
    graphs need).

    The encoder runs over the whole canvas; the MLM head (the costly 256k-wide matmul for mmBERT)
    runs only at the N chosen positions. The gather happens inside the model's own forward
    (a hook on its encoder), so DDP/FSDP/peft wrappers see one ordinary forward call.
    ``attention_mask``: [B, L] (1 = real token), or ModernBERT's prepared per-layer-type masks
    (``backbone.modernbert.modernbert_masks``).
    """
    flat_index = positions if positions.dtype != torch.bool else positions.reshape(-1).nonzero().squeeze(-1)
    encoder = encoder_of(model)
    if encoder is None:  # unknown layout: full logits, then pick
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits.reshape(-1, logits.shape[-1]).index_select(0, flat_index)
    with _gather_hidden(encoder, flat_index):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def full_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, L, V] at every position (what the research code computes; for references)."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits
