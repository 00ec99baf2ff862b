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

Implementations (``impl``; ``auto`` picks per device from ``AUTO_IMPL``):

- ``v1``: fp32 blocks of ~128 MB (131 rows at a 256k vocabulary): logits copied to fp32, log-sum-exp,
  softmax in place, the weight's gradient accumulated by an fp32 matmul per block.
- ``v2``: ~4x larger, balanced blocks for the matmuls (fewer passes over the 256k x H weight);
  logits stay in the compute dtype (bf16 under autocast); the log-softmax, the loss and the
  softmax minus the one-hot are formed in fp32 over sub-blocks of ~128 MB and written, times each
  row's weight, back into the logits' own buffer in the compute dtype (one rounding, exactly where
  ``mdlm_loss``'s backward rounds); the weight's gradient is one matmul per block accumulated in
  fp32 (fp32 output straight from the bf16 matmul where the device supports it, instead of v1's
  fp32 matmul); the bias gradient an fp32 matrix-vector product.
- ``v2-compiled``: ``v2`` with each block's log-sum-exp, loss and gradient computed by one
  ``torch.compile``d function (two reads of the logits, one write of the gradient; compiled once
  per process, dynamic block size).

``compile_encoder_layers`` (the stage setting ``compile``) compiles the encoder layers for training
steps; it lives here with the other training-step speed work.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

from ..backbone import encoder_of, logits_at, unwrap
from ..errors import DiffutronError
from ..objective import mdlm_loss, token_weights

_CHUNK_ELEMENTS = 1 << 25  # v1: rows per chunk = this / vocab size (32M floats = 128 MB per [chunk, V] block)
# v2: at most this many logits per block (524 rows at 256k: 268 MB of bf16 logits; the matmuls' row count)
_V2_CHUNK_ELEMENTS = 1 << 27
_V2_SUB_ELEMENTS = 1 << 25  # v2 (eager): the fp32 softmax / gradient in sub-blocks of this many logits (128 MB)
IMPLS = ("v1", "v2", "v2-compiled")
# what ``impl="auto"`` (the stage setting ``fused_loss_impl: auto``) runs on each device type; change it
# only on a measurement (benchmarks/train_step.py prints every implementation side by side). H200, bf16,
# 2026-12-04: v2 takes 127.9 ms per LoRA CPT step (16 x 512) and 69.1 ms per full SFT step (16 x 256),
# v1 148.6 and 147.0 ms
AUTO_IMPL = {"cpu": "v1", "cuda": "v2"}
_COMPILE_BACKEND = "inductor"  # tests swap in "aot_eager" (no code generation) where they check wiring only


def _keep_grads(ctx, grad_h, grad_w, grad_b, weight, bias) -> None:
    """Gradients computed in forward, kept for backward (which scales them by the incoming one)."""
    ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b)))
    ctx.present = (grad_h is not None, grad_w is not None, grad_b is not None)
    ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)


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
        _keep_grads(ctx, grad_h, grad_w, grad_b, weight, bias)
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


# ---------------------------------------------------------------------------------------------
# v2: larger blocks, logits in the compute dtype, the gradient written back into their buffer


def _ce_block(logits: torch.Tensor, tgt: torch.Tensor, wc: torch.Tensor, need_grad: bool, need_b: bool):
    """Loss sum, gradient (in ``logits``' own buffer and dtype) and bias gradient of one block.

    ``logits`` [c, V] in the compute dtype, ``tgt`` [c] targets, ``wc`` [c] fp32 row weights.
    The gradient row j is ``wc_j * (softmax_j - onehot(tgt_j))``, formed in fp32 and rounded once.
    The fp32 work runs over sub-blocks of ``_V2_SUB_ELEMENTS`` logits, so its temporaries stay small
    while the matmuls see the whole block.
    """
    rows = max(1, _V2_SUB_ELEMENTS // max(logits.shape[1], 1))
    loss = torch.zeros((), dtype=torch.float32, device=logits.device)
    gb = torch.zeros(logits.shape[1], dtype=torch.float32, device=logits.device) if need_b and need_grad else None
    for s in range(0, logits.shape[0], rows):
        part, t, w = logits[s: s + rows], tgt[s: s + rows], wc[s: s + rows]
        logp = torch.log_softmax(part, dim=-1, dtype=torch.float32)  # [r, V] fp32
        loss -= (w * logp.gather(1, t[:, None]).squeeze(1)).sum()
        if not need_grad:
            continue
        p = logp.exp_()  # softmax, in place
        p.scatter_add_(1, t[:, None], torch.full_like(w[:, None], -1.0))  # minus the one-hot (fp32, exact)
        if gb is not None:
            gb.addmv_(p.t(), w)
        torch.mul(p, w[:, None], out=part)  # times the row weight, rounded once into the logits' buffer
        del logp, p
    return loss, (logits if need_grad else None), gb


def _ce_block_body(logits: torch.Tensor, tgt: torch.Tensor, wc: torch.Tensor, need_b: bool):
    """``_ce_block`` as one traceable function (for ``torch.compile``): a fresh gradient buffer."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)  # [c]
    loss = (wc * (lse - x.gather(1, tgt[:, None]).squeeze(1))).sum()
    hit = torch.arange(x.shape[1], device=x.device)[None, :] == tgt[:, None]
    p = torch.exp(x - lse[:, None])
    g = torch.where(hit, p - 1.0, p) * wc[:, None]
    return loss, g.to(logits.dtype), (g.sum(0) if need_b else None)


_compiled_body: dict[str, Callable] = {}


def _block_fn(impl: str) -> Callable | None:
    """The compiled block function of ``v2-compiled`` (built once per process and backend), else None."""
    if impl != "v2-compiled":
        return None
    fn = _compiled_body.get(_COMPILE_BACKEND)
    if fn is None:
        fn = torch.compile(_ce_block_body, backend=_COMPILE_BACKEND, dynamic=True)
        _compiled_body[_COMPILE_BACKEND] = fn
    return fn


_dtype_mm: dict[str, bool] = {}


def _fp32_out_addmm(device: torch.device) -> bool:
    """Whether ``torch.addmm(fp32, bf16, bf16, out_dtype=float32, out=fp32)`` works (and is right) here:
    CUDA's cuBLAS accumulates a bf16 product straight into an fp32 matrix; CPU has no such kernel."""
    key = device.type
    if key not in _dtype_mm:
        ok = False
        if device.type == "cuda":
            try:
                g = torch.Generator(device=device).manual_seed(0)
                a = torch.randn(96, 64, device=device, generator=g).to(torch.bfloat16)
                b = torch.randn(96, 32, device=device, generator=g).to(torch.bfloat16)
                c = torch.randn(64, 32, device=device, generator=g)
                want = c + a.float().t() @ b.float()
                torch.addmm(c, a.t(), b, out_dtype=torch.float32, out=c)
                ok = c.dtype == torch.float32 and torch.allclose(c, want, atol=1e-3, rtol=1e-3)
            except Exception:  # an older torch or another backend: bf16 product + fp32 add instead
                ok = False
        _dtype_mm[key] = ok
    return _dtype_mm[key]


def _accumulate_grad_w(grad_w: torch.Tensor, grad: torch.Tensor, hc: torch.Tensor) -> None:
    """grad_w (fp32 [V, H]) += grad^T [V, c] @ hc [c, H], one matmul."""
    if grad.dtype == torch.float32:
        grad_w.addmm_(grad.t(), hc.float())
    elif _fp32_out_addmm(grad_w.device):
        torch.addmm(grad_w, grad.t(), hc, out_dtype=torch.float32, out=grad_w)
    else:
        grad_w += grad.t() @ hc  # the product rounded to the compute dtype once per block, summed in fp32


class _LinearCrossEntropyV2(torch.autograd.Function):
    """``_LinearCrossEntropy`` with larger blocks kept in the compute dtype (see the module docstring)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, weights, chunk, body):
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.needs_input_grad[2] and bias is not None
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        with torch.autocast(device, enabled=False):  # every dtype below is explicit
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
            need_grad = need_h or need_w or need_b
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, n, chunk):
                hc = h[s: s + chunk].to(dtype)  # [c, H]
                tgt = targets[s: s + chunk]
                wc = weights[s: s + chunk].float()
                logits = hc @ w.t() if b is None else torch.addmm(b, hc, w.t())  # [c, V] compute dtype
                if body is not None and need_grad:
                    loss, grad, gb = body(logits, tgt, wc, need_b)
                    del logits
                else:
                    loss, grad, gb = _ce_block(logits, tgt, wc, need_grad, need_b)
                total += loss
                if need_h:
                    grad_h[s: s + chunk] = grad @ w
                if need_w:
                    _accumulate_grad_w(grad_w, grad, hc)
                if need_b:
                    grad_b += gb
                del grad
        _keep_grads(ctx, grad_h, grad_w, grad_b, weight, bias)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        return _LinearCrossEntropy.backward(ctx, grad_out) + (None,)


def resolve_impl(impl: str | None, device: torch.device | str) -> str:
    """The fused loss implementation ``impl`` names (``None`` / ``auto``: ``AUTO_IMPL`` for the device)."""
    if impl in (None, "auto"):
        return AUTO_IMPL.get(torch.device(device).type, "v1")
    if impl not in IMPLS:
        raise DiffutronError(f"unknown fused loss implementation {impl!r}; choose auto or one of {', '.join(IMPLS)}")
    return impl


def v2_chunk(n: int, vocab: int) -> int:
    """Rows per v2 block: at most ``_V2_CHUNK_ELEMENTS / vocab``, balanced over ``n`` rows."""
    rows = max(1, _V2_CHUNK_ELEMENTS // max(vocab, 1))
    if n <= rows:
        return max(n, 1)
    return math.ceil(n / math.ceil(n / rows))


def output_layer(model: nn.Module) -> nn.Linear | None:
    """The model's output layer when the fused loss can replace it (a plain ``nn.Linear``)."""
    inner = unwrap(model)
    get = getattr(inner, "get_output_embeddings", None)
    layer = get() if callable(get) else None
    if type(layer) is nn.Linear and encoder_of(model) is not None:
        return layer
    return None


@contextlib.contextmanager
def _fused_output(layer: nn.Linear, targets: torch.Tensor, weights: torch.Tensor, impl: str = "v1"):
    chunk = max(1, _CHUNK_ELEMENTS // layer.out_features)
    body = _block_fn(impl)

    def forward(hidden):
        h = hidden.reshape(-1, hidden.shape[-1])
        if impl == "v1":
            return _LinearCrossEntropy.apply(h, layer.weight, layer.bias, targets, weights, chunk)
        return _LinearCrossEntropyV2.apply(h, layer.weight, layer.bias, targets, weights,
                                           v2_chunk(h.shape[0], layer.out_features), body)

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
    impl: str | None = None,
) -> torch.Tensor:
    """``objective.mdlm_loss`` for given ``t`` and ``noise_mask``, with the output layer and the
    cross-entropy fused (see the module docstring); falls back to ``mdlm_loss`` for models whose
    output layer is not a plain linear layer. ``impl``: ``v1``, ``v2``, ``v2-compiled`` or
    ``auto`` / None (``AUTO_IMPL`` of the input's device)."""
    impl = resolve_impl(impl, input_ids.device)
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
    with _fused_output(layer, input_ids[noise_mask], weights, impl):
        return logits_at(model, noisy, noise_mask, attention_mask)


# ---------------------------------------------------------------------------------------------
# compiled encoder layers for training steps (the stage setting ``compile``)


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder's repeated blocks: ``model.layers`` (ModernBERT) or ``encoder.layer`` (BERT)."""
    encoder = encoder_of(model)
    if encoder is None:
        return []
    layers = getattr(encoder, "layers", None)
    if layers is None:
        layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def compile_encoder_layers(model: nn.Module, *, mode: str | None = None) -> Callable[[], None]:
    """Compile each encoder layer's forward with ``torch.compile`` for training; returns the undo.

    Regional compilation: the layers share one code object, so every layer of one kind (ModernBERT:
    global / sliding attention, the first layer when its input needs no gradient) reuses one
    compiled graph, and the compile cost is that of a few layers, not of the whole stack. The
    embeddings, the MLM head, the masked-position gather and the loss stay eager (their row count
    changes every step). The compiled forward runs only in training mode with gradients on;
    evaluation and sampling inside a stage run the eager layers, so they add no recompilation.
    Parameters, state-dict keys and the peft / accelerate / DDP wrappers are untouched (the layer
    gets an instance ``forward`` that the undo removes; the undo also resets torch.compile's caches,
    so the next stage in this process starts clean).

    Raises:
        DiffutronError: a model whose encoder layers are not found.
    """
    layers = encoder_layers(model)
    if not layers:
        raise DiffutronError(f"compile: the encoder layers of {type(unwrap(model)).__name__} were not found; "
                             "set compile: false")
    for layer in layers:
        eager = layer.forward
        compiled = torch.compile(eager, backend=_COMPILE_BACKEND, mode=mode)

        def forward(*args, _layer=layer, _eager=eager, _compiled=compiled, **kwargs):
            if _layer.training and torch.is_grad_enabled():
                return _compiled(*args, **kwargs)
            return _eager(*args, **kwargs)

        layer.forward = forward  # an instance attribute: the class's forward is untouched

    def undo() -> None:
        for layer in layers:
            if "forward" in vars(layer):
                del layer.forward
        torch._dynamo.reset()

    return undo
