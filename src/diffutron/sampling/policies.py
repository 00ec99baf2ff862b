"""Decoding rules applied to the logits of the positions a step may commit.

Everything here works on compact tensors: ``logits`` [N, V] for the N still-masked positions of
the current blocks (never the whole canvas), with ``rows`` [N] naming each position's row.
"""

from __future__ import annotations

import math

import torch


EXP_FLOOR = -87.0  # exp(-87) = 1.6e-38, just above float32's smallest normal number (see propose)
NUCLEUS_TRIES = (1024, 16384)  # top-p: best ids tried, in turn, before a full sort


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


def row_argmax(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``logits.argmax(-1)`` for [N, V] (the first index among equal maxima), several times faster
    on CPU for a 256k vocabulary: block maxima pick the first block holding the row's maximum,
    then one ``chunk``-wide block is searched. Rows with NaN fall back to ``torch.argmax``."""
    n, v = logits.shape
    if v <= chunk:
        return logits.argmax(-1)
    blocks = in_blocks(logits, chunk, float("-inf"))
    block_max = blocks.amax(-1)  # [N, nb]
    best = block_max.amax(-1, keepdim=True)  # [N, 1]
    b = (block_max == best).byte().argmax(-1)  # first block with the maximum  [N]
    inner = blocks[torch.arange(n, device=logits.device), b]  # [N, chunk]
    out = b * chunk + (inner == best).byte().argmax(-1)
    nan = best.squeeze(-1).isnan()
    if bool(nan.any()):
        out[nan] = logits[nan].argmax(-1)
    return out


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per row, the id i where the running sum of ``weights`` [N, V] (>= 0) first exceeds
    ``u`` [N] (in [0, 1)) times the row total: a draw from the normalised weights.

    Two levels, so no [N, V] float64 pass: the sums of ``chunk``-wide blocks (float32, then a
    float64 running sum over blocks) pick a block, then a float64 running sum inside that one
    block picks the id. Probabilities are thus exact up to float32 rounding of block sums (1e-7
    relative). A zero-weight id (filtered or forbidden) is never returned.
    """
    n = weights.shape[0]
    blocks = in_blocks(weights, chunk, 0.0)
    cum = blocks.sum(-1).double().cumsum(-1)  # [N, nb]
    target = u.to(torch.float64) * cum[:, -1]
    nonzero = (cum < cum[:, -1:]).sum(-1)  # last block that holds weight
    b = torch.searchsorted(cum, target[:, None], right=True).squeeze(-1).minimum(nonzero)
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)[:, None]).squeeze(-1), 0.0)
    inner = blocks[torch.arange(n, device=weights.device), b].double().cumsum(-1)  # [N, chunk]
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
    row_max = logits.amax(-1, keepdim=True)  # [N, 1]
    # exp() of arguments below ~-87 (results under float32's smallest normal, 1.2e-38) runs ~50x
    # slower on CPU than in range. At temperature 0.1 a trained model puts most of a 256k vocabulary
    # there ((logits - max) / T < -87 once a token is 8.7 nats below the best), so the weights are
    # computed from arguments clamped at EXP_FLOOR: those tokens get weight 1.6e-38 instead of a
    # subnormal or 0 (all of them together under 5e-33 of the mass); filtered tokens stay at 0.
    if temperature == 0:
        x0 = row_argmax(logits)
        if forbid is not None and bool((x0 == forbid).any()):
            bad = x0 == forbid
            x0[bad] = logits[bad].topk(2, dim=-1).indices[:, 1]
    else:
        # unnormalised weights exp((logits - max) / T)  [N, V], in one new tensor when unfiltered
        if top_k or top_p < 1.0:
            scaled = logits / temperature
            if forbid is not None:
                scaled[:, forbid] = float("-inf")
            filtered = filter_top_k_top_p(scaled, top_k, top_p)
            weights = (filtered - filtered.amax(-1, keepdim=True)).clamp_(min=EXP_FLOOR).exp_()
            weights.masked_fill_(filtered == float("-inf"), 0.0)
        else:
            # (logits - max) / T in one pass: -max/T + logits/T
            weights = torch.add(row_max * (-1.0 / temperature), logits, alpha=1.0 / temperature)
            weights.clamp_(min=EXP_FLOOR).exp_()
            if forbid is not None:
                weights[:, forbid] = 0.0
        # inverse-CDF sampling: one uniform per position from the row's own generator
        u = torch.empty(logits.shape[0], dtype=torch.float64)
        for r in rows.unique().tolist():
            sel = (rows == r).nonzero().squeeze(-1).cpu()
            u[sel] = torch.rand(sel.numel(), generator=generators[r], dtype=torch.float64)
        x0 = inverse_cdf(weights, u.to(logits.device))
    if remasking == "low_confidence":
        # p(x0) = exp(l_x0 - max) / sum exp(l - max): logsumexp's arithmetic, its max pass shared
        conf = ((logits.gather(-1, x0[:, None]) - row_max).exp() / sum_exp(logits, row_max)).squeeze(-1)
    elif remasking == "margin":
        top2 = logits.softmax(-1).topk(2, dim=-1).values
        conf = top2[:, 0] - top2[:, 1]
    elif remasking == "entropy":
        logp = logits.log_softmax(-1)
        conf = (logp.exp() * logp).nan_to_num().sum(-1)  # -H
    else:  # random
        conf = torch.empty(logits.shape[0], device=logits.device)
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
