"""The MDLM loss with the output layer and the cross-entropy fused, chunk by chunk.

``objective.mdlm_loss`` already runs the MLM head only at masked positions, but still builds the
[N, V] logits, their log-softmax and, in backward, two more [N, V] gradients: with mmBERT's
256,000-entry vocabulary that is most of a training step's memory (N = 4,096 masked tokens: 4 GB
per [N, V] float tensor). Here the output layer's forward and its gradients are computed together
in chunks of rows inside the forward pass, so only one [chunk, V] block exists at a time; the
gradients wait for backward (scaled there by the incoming gradient). Same arithmetic, same loss
and gradients as ``mdlm_loss`` (tests pin them to each other), far less memory.

The output layer is swapped for the duration of one forward call of the model itself, so
DDP/FSDP/peft wrappers see one ordinary forward. Models whose output layer is not a plain
``nn.Linear`` (e.g. a LoRA-adapted one) fall back to ``mdlm_loss``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..backbone import encoder_of, logits_at, unwrap
from ..objective import mdlm_loss, token_weights

_CHUNK_ELEMENTS = 1 << 25  # rows per chunk = this / vocab size (32M floats = 128 MB per [chunk, V] block)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_j weight_j * CE(h_j W^T + b, target_j); gradients computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, weights, chunk):
        n = h.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else weight.dtype
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if (need_b and b is not None) else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            hc = h[s: s + chunk].to(dtype)  # [c, H]
            logits = (hc @ w.t() if b is None else torch.addmm(b, hc, w.t())).float()  # [c, V]
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            tgt = targets[s: s + chunk]
            wc = weights[s: s + chunk].float()
            total += (wc * (lse - logits.gather(1, tgt[:, None]).squeeze(1))).sum()
            if need_h or need_w or need_b:
                # d CE_j / d logits_j = softmax_j - onehot(target_j), times the row's weight  [c, V]
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(tgt), device=tgt.device), tgt] -= 1.0
                probs.mul_(wc[:, None])
                if need_h:
                    grad_h[s: s + chunk] = (probs.to(dtype) @ w).to(h.dtype)
                if need_w:
                    grad_w.addmm_(probs.t(), hc.float())
                if grad_b is not None:
                    grad_b += probs.sum(0)
                del probs
            del logits
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b)))
        ctx.present = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors  # used once: scaled in place, no second [V, H] copy
        gh, gw, gb = (t.mul_(grad_out) if present else None for t, present in zip(saved, ctx.present))
        if gw is not None:
            gw = gw.to(ctx.dtypes[0])
        if gb is not None:
            gb = gb.to(ctx.dtypes[1])
        return gh.to(saved[0].dtype) if gh is not None else None, gw, gb, None, None, None


def output_layer(model: nn.Module) -> nn.Linear | None:
    """The model's output layer when the fused loss can replace it (a plain ``nn.Linear``)."""
    inner = unwrap(model)
    get = getattr(inner, "get_output_embeddings", None)
    layer = get() if callable(get) else None
    if type(layer) is nn.Linear and encoder_of(model) is not None:
        return layer
    return None


@contextlib.contextmanager
def _fused_output(layer: nn.Linear, targets: torch.Tensor, weights: torch.Tensor):
    chunk = max(1, _CHUNK_ELEMENTS // layer.out_features)

    def forward(hidden):
        h = hidden.reshape(-1, hidden.shape[-1])
        return _LinearCrossEntropy.apply(h, layer.weight, layer.bias, targets, weights, chunk)

    layer.forward = forward  # an instance attribute: the class's forward is untouched
    try:
        yield
    finally:
        del layer.forward


def fused_mdlm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    *,
    mask_token_id: int,
    t: torch.Tensor,
    noise_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    schedule: str = "linear",
    target_weight: torch.Tensor | None = None,
    weighting: str = "elbo",
) -> torch.Tensor:
    """``objective.mdlm_loss`` for given ``t`` and ``noise_mask``, with the output layer and the
    cross-entropy fused (see the module docstring); falls back to ``mdlm_loss`` for models whose
    output layer is not a plain linear layer."""
    layer = output_layer(model)
    if layer is None:
        return mdlm_loss(model, input_ids, maskable, mask_token_id=mask_token_id, attention_mask=attention_mask,
                         t=t, noise_mask=noise_mask, schedule=schedule, target_weight=target_weight,
                         weighting=weighting)
    maskable = maskable.bool()
    noise_mask = noise_mask.bool() & maskable
    t = t.to(input_ids.device).float()
    # 1. the noisy canvas  [B, L]
    noisy = torch.where(noise_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    # 2. each masked token's weight, exactly as mdlm_loss normalises  [N]
    weights = token_weights(t, noise_mask, maskable, schedule=schedule, target_weight=target_weight,
                            weighting=weighting)
    # 3. one forward of the model; its output layer returns the weighted CE sum  []
    with _fused_output(layer, input_ids[noise_mask], weights):
        return logits_at(model, noisy, noise_mask, attention_mask)
