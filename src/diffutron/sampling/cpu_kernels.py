"""CPU versions of the decoding rules in ``policies``, kept because they win on CPU (measured).

On CPU a full-width pass over [N, 256k] float32 logits costs a trip to memory, ``exp()`` of
arguments below ~-87 runs ~50x slower (subnormal results) and a full sort costs ~0.5 s for 32 rows.
These kernels read the columns once in L2-sized chunks, clamp exp() arguments at ``EXP_FLOOR``,
search block maxima before one block, and sort only the best ids of a nucleus. On GPUs they lose
to the plain versions (3.5-20x on an H200; issue 15), so ``policies`` runs them on CPU only. Each
is tested equal to its plain version in ``tests/sampling/test_sampler.py``.
"""

from __future__ import annotations

import torch

from .policies import BLOCK, draw, in_blocks, inverse_cdf, top_k_filter

EXP_FLOOR = -87.0  # exp(-87) = 1.6e-38, just above float32's smallest normal number
NUCLEUS_TRIES = (1024, 16384)  # top-p: best ids tried, in turn, before a full sort
SCAN_BYTES = 1 << 20  # scan() works on column chunks of about this size ([N, chunk] float32), which stay in L2


def sum_exp(logits: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """sum(exp(logits - row_max)) over the last dim [N, 1], arguments clamped at EXP_FLOOR."""
    return torch.sub(logits, row_max).clamp_(min=EXP_FLOOR).exp_().sum(-1, keepdim=True)


def block_argmax(logits: torch.Tensor, chunk: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of [N, V], ``argmax(-1)`` (the first index among equal maxima) [N] and the maximum
    [N, 1], several times faster on CPU than torch.argmax for a 256k vocabulary: block maxima pick
    the first block holding the row's maximum, then one ``chunk``-wide block is searched. Rows with
    NaN fall back to ``torch.argmax`` (their maximum is NaN)."""
    n, v = logits.shape
    if v <= chunk:
        return logits.argmax(-1), logits.amax(-1, keepdim=True)
    blocks = in_blocks(logits, chunk, float("-inf"))
    block_max = blocks.amax(-1)  # [N, nb]
    best = block_max.amax(-1, keepdim=True)  # [N, 1]
    b = (block_max == best).byte().argmax(-1)  # first block with the maximum  [N]
    inner = blocks[torch.arange(n, device=logits.device), b]  # [N, chunk]
    out = b * chunk + (inner == best).byte().argmax(-1)
    nan = best.squeeze(-1).isnan()
    if bool(nan.any()):
        out[nan] = logits[nan].argmax(-1)
    return out, best


def top2_values(logits: torch.Tensor, chunk: int = BLOCK) -> torch.Tensor:
    """The two largest values of each row of [N, V] (the largest twice when it occurs twice) [N, 2],
    from block maxima like ``block_argmax`` (torch.topk(2) over 256k columns is several times slower)."""
    n, v = logits.shape
    if v <= chunk:
        return logits.topk(2, dim=-1).values
    blocks = in_blocks(logits, chunk, float("-inf"))
    block_max = blocks.amax(-1)  # [N, nb]
    b = block_max.argmax(-1)  # a block holding the row's maximum
    rows = torch.arange(n, device=logits.device)
    inner = blocks[rows, b].topk(2, dim=-1).values  # [N, 2]: that block's best two
    block_max[rows, b] = float("-inf")
    return torch.cat([inner, block_max.amax(-1, keepdim=True)], -1).topk(2, dim=-1).values


def sampling_weights(logits: torch.Tensor, row_max: torch.Tensor, temperature: float) -> torch.Tensor:
    """Unnormalised exp((logits - max) / T) of [N, C] logits, arguments clamped at EXP_FLOOR (one
    new tensor: -max/T + logits/T in one pass)."""
    w = torch.add(row_max * (-1.0 / temperature), logits, alpha=1.0 / temperature)
    return w.clamp_(min=EXP_FLOOR).exp_()


def scan(logits: torch.Tensor, row_max: torch.Tensor, temperature: float = 0.0, forbid: int | None = None, *,
         moment: bool = False, chunk: int = BLOCK, weight_max: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Everything a step needs from all V columns of [N, V] logits, in one pass over L2-sized column
    chunks (each full-width pass over 32 x 256k floats costs a trip to memory; these stay in cache):

    - ``z`` [N, 1]: sum exp(l - max), softmax's normaliser (arguments clamped as in ``sum_exp``);
    - ``block_sums`` [N, ceil(V / chunk)]: sums of ``sampling_weights`` (centred on ``weight_max``,
      default ``row_max``) over ``chunk``-wide blocks, the ``forbid`` id weighing 0 (None at
      temperature 0);
    - with ``moment``, sum exp(l - max) * (l - max) [N, 1] (for the entropy), else None.
    """
    n, v = logits.shape
    weight_max = row_max if weight_max is None else weight_max
    width = max(chunk, SCAN_BYTES // (4 * max(n, 1)) // chunk * chunk)  # a multiple of the block width
    z = torch.zeros(n, 1, device=logits.device)
    m1 = torch.zeros(n, 1, device=logits.device) if moment else None
    sums = [] if temperature > 0 else None
    for c0 in range(0, v, width):
        part = logits[:, c0 : c0 + width]
        centred = torch.sub(part, row_max).clamp_(min=EXP_FLOOR)
        e = centred.exp()
        z += e.sum(-1, keepdim=True)
        if moment:
            m1 += (e * centred).sum(-1, keepdim=True)
        if temperature > 0:
            w = sampling_weights(part, weight_max, temperature)
            if forbid is not None and c0 <= forbid < c0 + w.shape[1]:
                w[:, forbid - c0] = 0.0
            sums.append(in_blocks(w, chunk, 0.0).sum(-1))
    return z, (torch.cat(sums, -1) if sums is not None else None), m1


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``policies.top_p_filter`` from partial sorts: the nucleus lies in the k best ids once their
    mass reaches top_p (a trained model at a low temperature: within 1,024), so only those are
    sorted; a full sort of 256k columns costs ~500 ms for 32 rows here, topk(1,024) ~25 ms."""
    row_max = logits.amax(-1, keepdim=True)
    lse = row_max + sum_exp(logits, row_max).log_()
    for k in (*NUCLEUS_TRIES, logits.shape[-1]):
        k = min(k, logits.shape[-1])
        top, order = (logits.topk(k, dim=-1) if k < logits.shape[-1]
                      else torch.sort(logits, dim=-1, descending=True))  # [N, k], descending
        probs = (top - lse).exp()
        cum = probs.cumsum(-1)
        if k == logits.shape[-1] or bool((cum[:, -1] >= top_p).all()):
            break
    keep = cum - probs < top_p  # mass before this token still < p (the best is always kept)
    out = torch.full_like(logits, float("-inf"))
    return out.scatter_(-1, order, top.masked_fill(~keep, float("-inf")))


def penalize_rows(logits: torch.Tensor, present: torch.Tensor, rows: torch.Tensor, penalty: float) -> torch.Tensor:
    """``policies.penalize`` touching only the columns of ids present on each row's canvas (a few
    hundred of 256k), in place; ``present`` is bool [n_rows, V], ``rows`` [N] maps logits to rows."""
    for r in rows.unique().tolist():
        ids = present[r].nonzero().squeeze(-1)  # [k]
        if ids.numel() == 0:
            continue
        sel = (rows == r).nonzero()  # [n_r, 1]
        block = logits[sel, ids]  # [n_r, k]
        logits[sel, ids] = torch.where(block > 0, block / penalty, block * penalty)
    return logits


def propose(logits: torch.Tensor, u: torch.Tensor | None, u_order: torch.Tensor | None, *, temperature: float,
            top_k: int, top_p: float, remasking: str, forbid: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``policies.propose`` on CPU. Weights are computed from exp() arguments clamped at EXP_FLOOR:
    tokens far below the best get weight 1.6e-38 instead of a subnormal or 0 (all of them together
    under 5e-33 of the mass); filtered tokens stay at 0."""
    n, v = logits.shape
    filtered = temperature > 0 and bool(top_k or top_p < 1.0)
    if temperature == 0:
        x0, row_max = block_argmax(logits)  # [N], [N, 1]
        if forbid is not None and bool((x0 == forbid).any()):
            bad = x0 == forbid
            x0[bad] = logits[bad].topk(2, dim=-1).indices[:, 1]
    else:
        row_max = logits.amax(-1, keepdim=True)
    # sampling weights are centred on the best allowed id: where the forbidden one leads, centring on
    # it would clamp every other weight to the floor
    weight_max = row_max
    if temperature > 0 and forbid is not None:
        lead = (logits[:, forbid] >= row_max.squeeze(-1)).nonzero().squeeze(-1)
        if lead.numel():
            others = logits[lead].index_fill_(1, torch.tensor([forbid]), float("-inf"))
            weight_max = row_max.clone()
            weight_max[lead] = others.amax(-1, keepdim=True)
    # one pass over the columns for softmax's normaliser and the unfiltered sampling weights' block sums
    z = sums = m1 = None
    if remasking != "random" or (temperature > 0 and not filtered):
        z, sums, m1 = scan(logits, row_max, 0.0 if filtered else temperature, forbid, moment=remasking == "entropy",
                           weight_max=weight_max)
    if temperature > 0:
        if filtered:  # weights exp((filtered - max) / T) [N, V], 0 outside the kept set
            scaled = logits / temperature
            if forbid is not None:
                scaled[:, forbid] = float("-inf")
            if top_k:
                scaled = top_k_filter(scaled, top_k)
            kept = top_p_filter(scaled, top_p) if top_p < 1.0 else scaled
            weights = (kept - kept.amax(-1, keepdim=True)).clamp_(min=EXP_FLOOR).exp_()
            weights.masked_fill_(kept == float("-inf"), 0.0)
            x0 = inverse_cdf(weights, u)
        else:  # the drawn block's weights, computed again from its logits (never [N, V] of them)
            def block_weights(b: torch.Tensor) -> torch.Tensor:
                cols = b[:, None] * BLOCK + torch.arange(BLOCK, device=logits.device)  # [N, BLOCK]
                w = sampling_weights(logits.gather(1, cols.clamp(max=v - 1)), weight_max, temperature)
                off = cols >= v if forbid is None else (cols >= v) | (cols == forbid)
                return w.masked_fill_(off, 0.0)

            x0 = draw(sums, block_weights, u)
    if remasking == "low_confidence":  # p(x0) = exp(l_x0 - max) / sum exp(l - max)
        conf = ((logits.gather(-1, x0[:, None]) - row_max).exp() / z).squeeze(-1)
    elif remasking == "margin":  # p1 - p2 of the two most likely ids
        top2 = top2_values(logits) - row_max  # [N, 2]
        conf = (top2[:, 0].exp() - top2[:, 1].exp()) / z.squeeze(-1)
    elif remasking == "entropy":  # -H = sum p log p = sum e (l - max) / z - log z
        conf = (m1 / z - z.log()).squeeze(-1)
    else:  # random
        conf = u_order.to(logits.dtype)
    return x0, conf
