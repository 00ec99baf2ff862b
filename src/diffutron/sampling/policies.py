"""Decoding rules applied to the logits of the positions a step may commit.

Every rule is written here once, in plain torch, top to bottom: the version GPUs run and the
reference the tests hold the CPU kernels to. On CPU, ``cpu_kernels`` has faster versions of the
costly rules (measured there); ``uses_cpu_kernels`` is the one place that chooses between them
(``cpu_kernels`` builds on this module, which imports it only where it dispatches).

Shapes: ``logits`` [N, V] for the N positions a step may commit (never the whole canvas);
``rows`` [N] names each position's canvas row; ``u`` [N] float64 uniforms for token draws and
``u_order`` [N] for random remasking (from ``noise.block_noise``, so a draw depends only on the
row's seed, its block, the step and the position, never on the device or the batch).
"""

from __future__ import annotations

import math

import numpy as np
import torch

BLOCK = 1024  # inverse_cdf searches a row in two levels: blocks of this width, then one block


def uses_cpu_kernels(device: torch.device, plain: bool = False) -> bool:
    """CPU kernels on CPU; plain torch on GPUs (where they are 3.5-20x faster) and under torch.compile."""
    return device.type == "cpu" and not plain


# --------------------------------------------------------------------------------------------- schedule
def block_schedule(masks: int, steps: int) -> list[int]:
    """Tokens to reveal at each step of a block of ``masks`` masks and ``steps`` steps, as the
    reference computes them (dLLM's ``get_num_transfer_tokens`` with the linear schedule); steps
    that reveal nothing are dropped, so the list holds only the steps that cost a forward.

    Step j: q = (1 - alpha(s)) / (1 - alpha(t)) in float32 with alpha(x) = 1 - x, s = (S-j-1)/S,
    t = (S-j)/S (Python floats rounded to float32), taken out as a Python float; the step reveals
    round(m * (1 - q)) in float64, half to even, at most m (m = masks left). So 4 masks in 3 steps
    reveal [1, 1, 2] (exactly m / (S - j) would give [1, 2, 1]), 32 in 32 steps one per step, 32
    in 64 steps one per kept step (every other step reveals 0 and is dropped). The last step
    (s = 0) reveals what is left.
    """
    one = np.float32(1.0)
    out, left = [], masks
    for j in range(steps):
        if left <= 0:
            break
        s, t = np.float32((steps - j - 1) / steps), np.float32((steps - j) / steps)
        q = float((one - (one - s)) / (one - (one - t)))  # float32 arithmetic, as the reference's scheduler
        k = min(left, round(left * (1.0 - q)))  # float64 product, rounded half to even
        if k > 0:
            out.append(k)
            left -= k
    return out


def blocks_of(start: int, end: int, block_length: int) -> list[tuple[int, int]]:
    """Split the span [start, end) into left-to-right blocks of ``block_length``."""
    return [(s, min(s + block_length, end)) for s in range(start, end, block_length)]


def steps_per_block(steps: int, num_blocks: int) -> int:
    return max(1, math.ceil(steps / max(1, num_blocks)))


# ----------------------------------------------------------------------------------- logit transforms
def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + (scale + 1) (cond - uncond)."""
    return uncond + (scale + 1.0) * (cond - uncond)


def penalize(logits: torch.Tensor, present: torch.Tensor, penalty: float) -> torch.Tensor:
    """Repetition penalty: logits of ids already on the canvas (``present``, bool, broadcast to
    ``logits``) are divided by ``penalty`` when positive and multiplied by it when negative."""
    return torch.where(present, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def apply_repetition_penalty(logits: torch.Tensor, present: torch.Tensor, rows: torch.Tensor,
                             penalty: float, *, plain: bool = False) -> torch.Tensor:
    """``penalize`` with ``present`` bool [n_rows, V] per canvas row and ``rows`` [N] mapping each
    logit row to its canvas row."""
    if penalty == 1.0:
        return logits
    if uses_cpu_kernels(logits.device, plain):
        from . import cpu_kernels

        return cpu_kernels.penalize_rows(logits, present, rows, penalty)
    return penalize(logits, present[rows], penalty)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Logits outside the k best set to -inf (ties with the k-th kept)."""
    if not top_k or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits outside the nucleus set to -inf: the smallest set of best ids whose softmax mass
    reaches ``top_p`` (an id is kept while the mass before it is still < top_p; the best always)."""
    if top_p >= 1.0:
        return logits
    top, order = torch.sort(logits, dim=-1, descending=True)
    probs = top.softmax(-1)
    keep = probs.cumsum(-1) - probs < top_p
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, top.masked_fill(~keep, float("-inf")))


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """top-k, then top-p (the CPU's partial-sort nucleus on CPU)."""
    logits = top_k_filter(logits, top_k)
    if top_p >= 1.0:
        return logits
    if logits.device.type == "cpu":
        from . import cpu_kernels

        return cpu_kernels.top_p_filter(logits, top_p)
    return top_p_filter(logits, top_p)


# ------------------------------------------------------------------------------------------- drawing
def in_blocks(x: torch.Tensor, chunk: int, fill: float) -> torch.Tensor:
    """[N, V] as [N, ceil(V / chunk), chunk], the last block padded with ``fill``."""
    pad = (-x.shape[-1]) % chunk
    return (torch.nn.functional.pad(x, (0, pad), value=fill) if pad else x).view(x.shape[0], -1, chunk)


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor, chunk: int = BLOCK) -> torch.Tensor:
    """Per row, the id where the running sum of ``weights`` [N, V] (>= 0) first exceeds ``u`` [N]
    (in [0, 1)) times the row's total: a draw from the normalised weights. In two levels (``draw``),
    so no [N, V] float64 running sum is made (a 256k-long scan per row, as slow on GPUs as it is
    large); an id of weight 0 is never returned."""
    blocks = in_blocks(weights, chunk, 0.0)
    rows = torch.arange(weights.shape[0], device=weights.device)
    return draw(blocks.sum(-1), lambda b: blocks[rows, b], u, chunk)


def draw(block_sums: torch.Tensor, block_weights, u: torch.Tensor, chunk: int = BLOCK) -> torch.Tensor:
    """Inverse-CDF draw in two levels: ``block_sums`` [N, nb] (float32 sums of ``chunk``-wide blocks
    of the weights; a float64 running sum over them) pick a block, then a float64 running sum inside
    that one block, ``block_weights(b)`` [N, chunk], picks the id. Probabilities are thus exact up
    to float32 rounding of block sums (1e-7 relative). A zero-weight id is never returned."""
    cum = block_sums.double().cumsum(-1)  # [N, nb]
    target = u.to(torch.float64) * cum[:, -1]
    nonzero = (cum < cum[:, -1:]).sum(-1)  # last block that holds weight
    b = torch.searchsorted(cum, target[:, None], right=True).squeeze(-1).minimum(nonzero)
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)[:, None]).squeeze(-1), 0.0)
    inner = block_weights(b).double().cumsum(-1)  # [N, chunk]
    last = (inner < inner[:, -1:]).sum(-1)  # the block's last id with weight
    j = torch.searchsorted(inner, (target - before)[:, None], right=True).squeeze(-1).minimum(last)
    return b * chunk + j


def allowed(logits: torch.Tensor, forbid: int | None) -> torch.Tensor:
    """``logits`` with the ``forbid`` id (the mask token) at -inf, as one elementwise expression
    (under torch.compile it fuses into the reductions that read it; nothing [N, V] is copied)."""
    if forbid is None:
        return logits
    ids = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(ids == forbid, float("-inf"))


def weights_of(logits: torch.Tensor, centre: torch.Tensor, temperature: float) -> torch.Tensor:
    """Unnormalised sampling weights exp((logits - centre) / T); -inf logits weigh 0."""
    return torch.add(centre * (-1.0 / temperature), logits, alpha=1.0 / temperature).exp()


def candidates(logits: torch.Tensor, u: torch.Tensor | None, *, temperature: float, top_k: int, top_p: float,
               forbid: int | None) -> torch.Tensor:
    """x0 [N]: the argmax at temperature 0, else a draw from softmax(filtered logits / T) with one
    uniform per position; the ``forbid`` id (the mask token) is never a candidate.

    Unfiltered draws read the logits in two reductions (the best allowed logit, then the sums of
    the weights over ``BLOCK``-wide blocks) and gather the drawn block's columns again: no [N, V]
    weights are kept (on a GPU each full-width float32 tensor is a trip to memory)."""
    ok = allowed(logits, forbid)
    if temperature == 0:
        return ok.argmax(-1)
    if top_k or top_p < 1.0:
        kept = top_p_filter(top_k_filter(ok / temperature, top_k), top_p)
        return inverse_cdf((kept - kept.amax(-1, keepdim=True)).exp(), u)
    centre = ok.amax(-1, keepdim=True)  # the best allowed logit (the mask id may lead: never centre on it)
    n, v = logits.shape
    sums = in_blocks(weights_of(ok, centre, temperature), BLOCK, 0.0).sum(-1)  # [N, ceil(V / BLOCK)]

    def block_weights(b: torch.Tensor) -> torch.Tensor:  # the drawn block's weights, from its logits
        cols = b[:, None] * BLOCK + torch.arange(BLOCK, device=logits.device)  # [N, BLOCK]
        w = weights_of(ok.gather(1, cols.clamp(max=v - 1)), centre, temperature)
        return w.masked_fill(cols >= v, 0.0)

    return draw(sums, block_weights, u)


def confidence(logits: torch.Tensor, x0: torch.Tensor, remasking: str, u_order: torch.Tensor | None) -> torch.Tensor:
    """How sure the model is of each candidate (higher = commit first), from softmax(logits)
    without temperature: p(x0), p1 - p2 of the best two, -entropy, or a uniform draw (random).
    Written as reductions over the logits (the row's max, sum exp(l - max)): no [N, V]
    probabilities are made."""
    if remasking == "random":
        return u_order.to(logits.dtype)
    top = logits.amax(-1, keepdim=True)
    centred = logits - top
    z = centred.exp().sum(-1)  # softmax's normaliser [N]
    if remasking == "low_confidence":
        return centred.gather(-1, x0[:, None]).squeeze(-1).exp() / z
    if remasking == "margin":
        top2 = centred.topk(2, dim=-1).values.exp()
        return (top2[:, 0] - top2[:, 1]) / z
    return (centred.exp() * centred).sum(-1) / z - z.log()  # entropy: sum p log p = -H


def propose(
    logits: torch.Tensor,
    u: torch.Tensor | None,
    u_order: torch.Tensor | None = None,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    remasking: str,
    forbid: int | None = None,
    plain: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate tokens x0 [N] and their confidence [N] (see ``candidates`` and ``confidence``);
    ``plain`` forces the plain versions on CPU (torch.compile, tests)."""
    logits = logits.float()
    if uses_cpu_kernels(logits.device, plain):
        from . import cpu_kernels

        return cpu_kernels.propose(logits, u, u_order, temperature=temperature, top_k=top_k, top_p=top_p,
                                   remasking=remasking, forbid=forbid)
    x0 = candidates(logits, u, temperature=temperature, top_k=top_k, top_p=top_p, forbid=forbid)
    return x0, confidence(logits, x0, remasking, u_order)


def gumbel_candidates(logits: torch.Tensor, u: torch.Tensor, *, temperature: float, top_k: int = 0,
                      top_p: float = 1.0, forbid: int | None = None) -> torch.Tensor:
    """x0 [N] as the reference's Gumbel-max draws it (``rng="reference"``), from float64 uniforms
    ``u`` [N, V]: argmax(exp(logits) / (-log u) ** temperature), all in float64, in the reference's
    order of operations. Filtered ids (top-k / top-p on logits / T) and the ``forbid`` id weigh
    exp(-inf) = 0."""
    ok = allowed(logits.float(), forbid)
    if top_k or top_p < 1.0:
        kept = top_p_filter(top_k_filter(ok / temperature, top_k), top_p)
        ok = ok.masked_fill(kept == float("-inf"), float("-inf"))
    return (ok.to(torch.float64).exp() / (-torch.log(u)) ** temperature).argmax(-1)


def propose_reference(logits: torch.Tensor, u: torch.Tensor | None, u_order: torch.Tensor | None, *,
                      temperature: float, top_k: int, top_p: float, remasking: str,
                      forbid: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``propose`` for ``rng="reference"``: candidates from ``gumbel_candidates`` (the argmax at
    temperature 0), confidences from the logits without noise (plain rules)."""
    logits = logits.float()
    if temperature == 0:
        x0 = allowed(logits, forbid).argmax(-1)
    else:
        x0 = gumbel_candidates(logits, u, temperature=temperature, top_k=top_k, top_p=top_p, forbid=forbid)
    return x0, confidence(logits, x0, remasking, u_order)


# ------------------------------------------------------------------------------------------ choosing
def choose(conf: torch.Tensor, k: int, threshold: float | None) -> torch.Tensor:
    """Indices (into ``conf``) to commit: the k most confident, plus all at or above threshold;
    among equal confidences the earlier position first."""
    if threshold is not None:
        k = max(k, int((conf >= threshold).sum()))
    k = min(k, conf.numel())
    return torch.sort(conf, descending=True, stable=True).indices[:k]
