"""The MDLM training objective (continuous time, Diffutron's reference normalisation).

For a batch of b sequences::

    loss = 1/b * sum_i  sum_{j masked in i}  w(t_i) * CE(logits_ij, x_ij) / N_i

with t_i ~ U(eps, 1), each maskable token masked with probability 1 - alpha(t_i), the ELBO
weight w(t) = -alpha'(t) / (1 - alpha(t)) (= 1/t for the linear schedule) and N_i the number of
maskable tokens of sequence i. Logits are computed only at masked positions.

``weighting="flat"`` replaces w(t_i) / N_i by 1 / N, N the masked tokens of the batch (of each
process's share of it in distributed training): every masked token weighs the same, as in BERT's
masked-LM loss. That is not a bound on the likelihood; it is a training option. On a synthetic
task that needs context, tiny models learned it far faster with it (benchmarks/loss_weighting.py).

Two variants share one body (times, masks, noisy canvas, each masked token's weight from
:func:`token_weights`) and differ only in how they reach sum_j weight_j * CE_j.
:func:`mdlm_loss` takes the cross-entropy of the [N, V] logits at the masked positions: with
mmBERT's 256,000-entry vocabulary that, its log-softmax and two [N, V] gradients in backward are
most of a training step's memory (N = 4,096 masked tokens: 4 GB per [N, V] float tensor).
:func:`fused_mdlm_loss` computes the output layer's forward and its gradients together, chunk by
chunk of rows, inside the forward pass: one [chunk, V] block at a time, the gradients kept for
backward (scaled there by the incoming one). Same loss and gradients (tests pin them to each
other), far less memory. The output layer is swapped for one forward call of the model itself, so
DDP/FSDP/peft wrappers see one ordinary forward; a model whose output layer is not a plain
``nn.Linear`` (e.g. a LoRA-adapted one) takes ``mdlm_loss``'s path.

Fused implementations (``impl``; ``auto`` picks per device from ``AUTO_IMPL``):

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
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import encoder_of, logits_at, unwrap
from .errors import DiffutronError
from .schedules import get_schedule, sample_t

WEIGHTINGS = ("elbo", "flat")



def draw_noise(
    maskable: torch.Tensor,
    t: torch.Tensor,
    *,
    schedule: str = "linear",
    generator: torch.Generator | None = None,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool [B, L]: each maskable token is masked independently with probability 1 - alpha(t_i),
    i.e. where its uniform draw u_ij < 1 - alpha(t_i). ``u`` [B, L]: the uniforms, when the caller
    draws them its own way (training: one generator per sample); drawn from ``generator`` when None."""
    p_mask = get_schedule(schedule).mask_prob(t.float())  # [B]
    if u is None:
        u = torch.rand(maskable.shape, generator=generator)
    return (u.to(maskable.device) < p_mask[:, None].to(maskable.device)) & maskable


def token_weights(
    t: torch.Tensor,
    noise_mask: torch.Tensor,
    maskable: torch.Tensor,
    *,
    schedule: str = "linear",
    target_weight: torch.Tensor | None = None,
    weighting: str = "elbo",
) -> torch.Tensor:
    """Each masked token's share of the batch loss, w(t_i) / N_i / b (``elbo``) or 1 / N (``flat``,
    N masked tokens in the batch), times its target weight: [N] in the row-major order of
    ``noise_mask``. The loss is ``sum_j token_weights_j * CE_j``."""
    if weighting not in WEIGHTINGS:
        raise DiffutronError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    rows = noise_mask.nonzero()[:, 0]
    if weighting == "flat":
        weights = torch.ones(rows.shape[0], device=noise_mask.device) / max(rows.shape[0], 1)
    else:
        n_maskable = maskable.sum(dim=1).clamp(min=1).float()
        weights = get_schedule(schedule).weight(t.float())[rows] / n_maskable[rows] / noise_mask.shape[0]
    if target_weight is not None:
        weights = weights * target_weight.float()[noise_mask]
    return weights


def mdlm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    *,
    mask_token_id: int,
    attention_mask: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    noise_mask: torch.Tensor | None = None,
    schedule: str = "linear",
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
    t_sampling: str = "iid",
    target_weight: torch.Tensor | None = None,
    weighting: str = "elbo",
) -> torch.Tensor:
    """MDLM loss of a batch (scalar tensor).

    Args:
        model: a Hugging Face masked-LM module (also wrapped by peft, DDP or FSDP).
        input_ids: clean tokens, LongTensor [B, L].
        maskable: bool [B, L], the tokens the loss may mask (never prompt or excluded padding).
        mask_token_id: the tokenizer's mask id.
        attention_mask: 1 for real tokens, 0 for padding the model must not attend to.
        t: diffusion time per sequence [B]; drawn (``t_sampling``, ``eps``) when None.
        noise_mask: bool [B, L], the positions to mask; drawn with ``t`` when None.
        schedule: ``linear`` (default), ``loglinear`` or ``cosine``.
        generator: RNG for t and masks (the default RNG when None).
        target_weight: optional float [B, L] multiplying each token's term (e.g. a weight < 1 on
            padding targets).
        weighting: ``elbo`` (the MDLM bound, the paper) or ``flat`` (every masked token of the
            batch weighs the same; see the module docstring).

    Rows without a maskable token add 0 and still count in the batch mean. When nothing is
    masked the loss is an exact 0 that still depends on every parameter, so distributed
    gradient reduction sees the same graph on every rank.

    Raises:
        DiffutronError: ``maskable`` not shaped as ``input_ids``, an unknown schedule, t sampling or
            weighting.
    """
    return _loss(model, input_ids, maskable, mask_token_id=mask_token_id, attention_mask=attention_mask, t=t,
                 noise_mask=noise_mask, schedule=schedule, generator=generator, eps=eps, t_sampling=t_sampling,
                 target_weight=target_weight, weighting=weighting, impl=None)


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
    """:func:`mdlm_loss` for given ``t`` and ``noise_mask``, with the output layer and the
    cross-entropy fused (see the module docstring); a model whose output layer is not a plain
    linear layer takes ``mdlm_loss``'s path. ``impl``: ``v1``, ``v2``, ``v2-compiled`` or ``auto`` /
    None (``AUTO_IMPL`` of the input's device).

    Raises:
        DiffutronError: an unknown ``impl``, and what ``mdlm_loss`` raises.
    """
    impl = resolve_impl(impl, input_ids.device)
    return _loss(model, input_ids, maskable, mask_token_id=mask_token_id, attention_mask=attention_mask, t=t,
                 noise_mask=noise_mask, schedule=schedule, target_weight=target_weight, weighting=weighting,
                 impl=impl)


def _loss(model, input_ids, maskable, *, mask_token_id, attention_mask, t, noise_mask, schedule, target_weight,
          weighting, impl: str | None, generator=None, eps=1e-3, t_sampling="iid") -> torch.Tensor:
    """The body of both losses; ``impl`` None: logits then cross-entropy, else the fused head."""
    if input_ids.shape != maskable.shape:
        raise DiffutronError(f"maskable has shape {tuple(maskable.shape)}, input_ids {tuple(input_ids.shape)}")
    maskable = maskable.bool()
    b = input_ids.shape[0]
    # 1. one time per sequence  [B]
    if t is None:
        t = sample_t(b, eps=eps, method=t_sampling, generator=generator, device=input_ids.device)
    t = t.to(input_ids.device).float()
    # 2. mask maskable tokens with probability 1 - alpha(t)  [B, L]
    if noise_mask is None:
        noise_mask = draw_noise(maskable, t, schedule=schedule, generator=generator)
    noise_mask = noise_mask.bool() & maskable
    noisy = torch.where(noise_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    # 3. each masked token's weight: w(t_i) / N_i / b (elbo), the per-sequence sum over its maskable
    #    length averaged over the batch, or 1 / N (flat); times its target weight  [N]
    weights = token_weights(t, noise_mask, maskable, schedule=schedule, target_weight=target_weight,
                            weighting=weighting)
    layer = output_layer(model) if impl is not None else None
    if layer is not None:
        # 4. fused: one forward of the model; its output layer returns sum_j weight_j * CE_j  []
        with _fused_output(layer, input_ids[noise_mask], weights, impl):
            return logits_at(model, noisy, noise_mask, attention_mask)
    # 4. logits only where a token was masked  [N, V]
    logits = logits_at(model, noisy, noise_mask, attention_mask)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    # 5. cross-entropy per masked token, weighted  [N] -> []
    ce = F.cross_entropy(logits.float(), input_ids[noise_mask], reduction="none")
    return (weights.to(ce.device) * ce).sum()


# ---------------------------------------------------------------------------------------------
# the fused output layer + cross-entropy (fused_mdlm_loss)

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
