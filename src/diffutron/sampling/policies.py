"""Decoding rules applied to the logits of the positions a step may commit.

Everything here works on compact tensors: ``logits`` [N, V] for the N still-masked positions of
the current blocks (never the whole canvas), with ``rows`` [N] naming each position's row.
"""

from __future__ import annotations

import math

import torch


EXP_FLOOR = -87.0  # exp(-87) = 1.6e-38, just above float32's smallest normal number (see propose)
NUCLEUS_TRIES = (1024, 16384)  # top-p: best ids tried, in turn, before a full sort
BLOCK = 1024  # block_argmax and inverse_cdf search a row in two levels: blocks of this width, then one block
SCAN_BYTES = 1 << 20  # scan() works on column chunks of about this size ([N, chunk] float32), which stay in L2


def sum_exp(logits: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """sum(exp(logits - row_max)) over the last dim [N, 1], arguments clamped at EXP_FLOOR, where
    exp() stays in float32's normal range (and fast on CPU; see propose)."""
    return torch.sub(logits, row_max).clamp_(min=EXP_FLOOR).exp_().sum(-1, keepdim=True)


def block_schedule(masks: int, steps: int) -> list[int]:
    """Tokens to reveal at each step of a block: step j reveals round(m / (S - j)), m = masks left.

    Rounds half to even (as torch.round / Python's round), so 32 masks in 64 steps reveal
    0, 1, 0, 1, ...; the last step always reveals what is left.
    """
    out, left = [], masks
    for j in range(steps):
        k = min(left, int(round(left / (steps - j))))
        out.append(k)
        left -= k
    return out


def blocks_of(start: int, end: int, block_length: int) -> list[tuple[int, int]]:
    """Split the span [start, end) into left-to-right blocks of ``block_length``."""
    return [(s, min(s + block_length, end)) for s in range(start, end, block_length)]


def steps_per_block(steps: int, num_blocks: int) -> int:
    return max(1, math.ceil(steps / max(1, num_blocks)))


def apply_repetition_penalty(
    logits: torch.Tensor, present: torch.Tensor, rows: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Penalise token ids on each row's canvas: positive logits / p, negative logits * p.

    ``present`` is bool [n_rows, V]; ``rows`` maps each of the N logit rows to its canvas row.
    Only the columns of ids that are present are touched (a few hundred of 256k), in place.
    """
    if penalty == 1.0:
        return logits
    for r in rows.unique().tolist():
        ids = present[r].nonzero().squeeze(-1)  # [k]
        if ids.numel() == 0:
            continue
        sel = (rows == r).nonzero()  # [n_r, 1]
        block = logits[sel, ids]  # [n_r, k]
        logits[sel, ids] = torch.where(block > 0, block / penalty, block * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top k / the nucleus of mass top_p to -inf (always keeps the best)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # the nucleus lies in the k best ids once their mass reaches top_p (a trained model at a low
        # temperature: within 1,024): sort only those; a full sort of 256k columns costs ~500 ms for
        # 32 rows here, topk(1,024) ~25 ms, topk(16,384) ~75 ms
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
        logits = out.scatter_(-1, order, top.masked_fill(~keep, float("-inf")))
    return logits


def in_blocks(x: torch.Tensor, chunk: int, fill: float) -> torch.Tensor:
    """[N, V] as [N, ceil(V / chunk), chunk], the last block padded with ``fill``."""
    pad = (-x.shape[-1]) % chunk
    return (torch.nn.functional.pad(x, (0, pad), value=fill) if pad else x).view(x.shape[0], -1, chunk)


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
         moment: bool = False, chunk: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Everything a step needs from all V columns of [N, V] logits, in one pass over L2-sized column
    chunks (each full-width pass over 32 x 256k floats costs a trip to memory; these stay in cache):

    - ``z`` [N, 1]: sum exp(l - max), softmax's normaliser (arguments clamped as in ``sum_exp``);
    - ``block_sums`` [N, ceil(V / chunk)]: sums of ``sampling_weights`` over ``chunk``-wide blocks,
      the ``forbid`` id weighing 0 (None at temperature 0);
    - with ``moment``, sum exp(l - max) * (l - max) [N, 1] (for the entropy), else None.
    """
    n, v = logits.shape
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
            w = sampling_weights(part, row_max, temperature)
            if forbid is not None and c0 <= forbid < c0 + w.shape[1]:
                w[:, forbid - c0] = 0.0
            sums.append(in_blocks(w, chunk, 0.0).sum(-1))
    return z, (torch.cat(sums, -1) if sums is not None else None), m1


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor, chunk: int = BLOCK) -> torch.Tensor:
    """Per row, the id i where the running sum of ``weights`` [N, V] (>= 0) first exceeds
    ``u`` [N] (in [0, 1)) times the row total: a draw from the normalised weights (see ``draw``)."""
    blocks = in_blocks(weights, chunk, 0.0)
    rows = torch.arange(weights.shape[0], device=weights.device)
    return draw(blocks.sum(-1), lambda b: blocks[rows, b], u, chunk)


def draw(block_sums: torch.Tensor, block_weights, u: torch.Tensor, chunk: int = BLOCK) -> torch.Tensor:
    """Inverse-CDF draw in two levels, so no [N, V] float64 pass: ``block_sums`` [N, nb] (float32
    sums of ``chunk``-wide blocks of the weights; a float64 running sum over them) pick a block,
    then a float64 running sum inside that one block, ``block_weights(b)`` [N, chunk], picks the
    id. Probabilities are thus exact up to float32 rounding of block sums (1e-7 relative). A
    zero-weight id (filtered or forbidden) is never returned."""
    cum = block_sums.double().cumsum(-1)  # [N, nb]
    target = u.to(torch.float64) * cum[:, -1]
    nonzero = (cum < cum[:, -1:]).sum(-1)  # last block that holds weight
    b = torch.searchsorted(cum, target[:, None], right=True).squeeze(-1).minimum(nonzero)
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)[:, None]).squeeze(-1), 0.0)
    inner = block_weights(b).double().cumsum(-1)  # [N, chunk]
    last = (inner < inner[:, -1:]).sum(-1)  # the block's last id with weight
    j = torch.searchsorted(inner, (target - before)[:, None], right=True).squeeze(-1).minimum(last)
    return b * chunk + j


def propose(
    logits: torch.Tensor,
    rows: torch.Tensor,
    generators: list[torch.Generator],
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    remasking: str,
    forbid: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate tokens x0 [N] and their confidence [N] (higher = commit first).

    x0 is the argmax at temperature 0, else a sample from softmax(filtered logits / temperature)
    drawn with the row's own generator (so a row's draws do not depend on its batch); the
    ``forbid`` id (the mask token) is never a candidate, so a committed position is always
    decoded. Confidence is read from softmax(logits) without temperature.
    """
    logits = logits.float()
    n, v = logits.shape
    # exp() of arguments below ~-87 (results under float32's smallest normal, 1.2e-38) runs ~50x
    # slower on CPU than in range. At temperature 0.1 a trained model puts most of a 256k vocabulary
    # there ((logits - max) / T < -87 once a token is 8.7 nats below the best), so the weights are
    # computed from arguments clamped at EXP_FLOOR: those tokens get weight 1.6e-38 instead of a
    # subnormal or 0 (all of them together under 5e-33 of the mass); filtered tokens stay at 0.
    filtered = temperature > 0 and bool(top_k or top_p < 1.0)
    if temperature == 0:
        x0, row_max = block_argmax(logits)  # [N], [N, 1]
        if forbid is not None and bool((x0 == forbid).any()):
            bad = x0 == forbid
            x0[bad] = logits[bad].topk(2, dim=-1).indices[:, 1]
    else:
        row_max = logits.amax(-1, keepdim=True)
    # one pass over the columns for softmax's normaliser and the unfiltered sampling weights' block sums
    z = sums = m1 = None
    if remasking != "random" or (temperature > 0 and not filtered):
        z, sums, m1 = scan(logits, row_max, 0.0 if filtered else temperature, forbid, moment=remasking == "entropy")
    if temperature > 0:
        # inverse-CDF sampling: one uniform per position from the row's own generator
        u = torch.empty(n, dtype=torch.float64)
        for r in rows.unique().tolist():
            sel = (rows == r).nonzero().squeeze(-1).cpu()
            u[sel] = torch.rand(sel.numel(), generator=generators[r], dtype=torch.float64)
        u = u.to(logits.device)
        if filtered:  # weights exp((filtered - max) / T) [N, V], 0 outside the kept set
            scaled = logits / temperature
            if forbid is not None:
                scaled[:, forbid] = float("-inf")
            kept = filter_top_k_top_p(scaled, top_k, top_p)
            weights = (kept - kept.amax(-1, keepdim=True)).clamp_(min=EXP_FLOOR).exp_()
            weights.masked_fill_(kept == float("-inf"), 0.0)
            x0 = inverse_cdf(weights, u)
        else:  # the drawn block's weights, computed again from its logits (never [N, V] of them)
            def block_weights(b: torch.Tensor) -> torch.Tensor:
                cols = b[:, None] * BLOCK + torch.arange(BLOCK, device=logits.device)  # [N, BLOCK]
                w = sampling_weights(logits.gather(1, cols.clamp(max=v - 1)), row_max, temperature)
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
        conf = torch.empty(n, device=logits.device)
        for r in rows.unique().tolist():
            sel = (rows == r).nonzero().squeeze(-1)
            conf[sel] = torch.rand(sel.numel(), generator=generators[r]).to(logits.device)
    return x0, conf


def choose(conf: torch.Tensor, k: int, threshold: float | None) -> torch.Tensor:
    """Indices (into ``conf``) to commit: the k most confident, plus all at or above threshold."""
    n = conf.numel()
    if threshold is not None:
        k = max(k, int((conf >= threshold).sum()))
    k = min(k, n)
    return torch.topk(conf, k).indices
