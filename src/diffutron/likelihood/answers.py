"""Log-likelihood of an answer given its context: exact for one token, the ELBO otherwise."""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..backbone import context_length, logits_at, pad_token_id, right_pad
from ..errors import DiffutronError
from ._common import _check_int, _device, _progress

METHODS = ("empty", "exact", "enumerated", "monte_carlo")


@dataclass(frozen=True)
class Score:
    """log p(continuation | context) in nats, with how it was obtained.

    Attributes:
        value: the exact log-likelihood for a one-token continuation (``method="exact"``); for
            longer ones the ELBO, a lower bound, computed exactly over every mask pattern
            (``"enumerated"``, when there are at most ``mc_samples`` of them) or estimated by
            Monte Carlo (``"monte_carlo"``); 0 for an empty continuation (``"empty"``).
        stderr: the Monte Carlo standard error of ``value`` (0 when nothing was sampled).
        is_greedy: whether greedy decoding of the masked continuation (one token per step, the
            most confident first, as the sampler at temperature 0) reproduces it exactly;
            ``None`` when not checked (``check_greedy=False`` and more than one token).
        tokens: the continuation's length in tokens.
        truncated: context tokens dropped from the left so that the sequence fits the model.
        method: one of ``empty``, ``exact``, ``enumerated``, ``monte_carlo``.
    """

    value: float
    stderr: float
    is_greedy: bool | None
    tokens: int = 0
    truncated: int = 0
    method: str = "exact"


# ---------------------------------------------------------------------------------------------
# tokenization


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text: ``([CLS], [SEP])`` for
    BERT-like tokenizers, ``([], [])`` for plain ones. Found by encoding a probe both ways."""
    for probe in ("a", "x", "0", "Merhaba", "."):
        plain = tokenizer.encode(probe, add_special_tokens=False)
        if not plain:
            continue
        full = tokenizer.encode(probe, add_special_tokens=True)
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                return list(full[:i]), list(full[i + len(plain):])
    return [], []


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a pair, WITHOUT special tokens, split as lm-eval does for causal models.

    Trailing whitespace of the context moves to the continuation; the whole string is encoded
    once and the continuation is what follows the separately encoded context. Special tokens
    are added later, once, around the whole sequence.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False) if context else []
    return list(ctx), list(whole[len(ctx):])


# ---------------------------------------------------------------------------------------------
# loglikelihood


def loglikelihood(
    lm,
    pairs: Sequence[tuple[str, str]],
    *,
    mc_samples: int = 64,
    batch_size: int = 32,
    deterministic: bool = False,
    seed: int = 0,
    check_greedy: bool = True,
    max_masked_per_forward: int = 4096,
    progress: bool | str = False,
) -> list[Score]:
    """log p(continuation | context) of each ``(context, continuation)`` pair.

    Context and continuation are tokenized without special tokens (:func:`encode_pair`); the
    tokenizer's special tokens are added once around the whole sequence
    (``[CLS] context continuation [SEP]`` on BERT-like tokenizers). Only continuation tokens
    are ever masked. A one-token continuation is scored exactly (log-softmax at its masked
    position, one forward pass shared by every pair with the same context). Longer ones get the
    ELBO: exactly, over all 2^T - 1 mask patterns, when that is at most ``mc_samples`` rows;
    otherwise ``mc_samples`` Monte Carlo draws with mask counts k stratified over 1..T (the
    reference's scheme, with a random offset so every draw is unbiased). A context too long
    for the model is cut from the left (counted in ``Score.truncated``).

    Args:
        lm: anything with ``.model`` (a Hugging Face masked LM) and ``.tokenizer``.
        pairs: (context, continuation) strings; lm-eval's continuations start with a space.
        mc_samples: Monte Carlo draws (rows) per multi-token continuation.
        batch_size: rows per forward pass; rows of all pairs are batched together. The values
            do not depend on it (up to float rounding of padded batches).
        deterministic: draw each pair's masks from a generator keyed on its token ids and
            ``seed``, so a pair gets the same value whatever else is scored with it, in any
            order (lm-eval reorders requests). Otherwise one stream seeded by ``seed`` is
            consumed in the order of ``pairs``.
        seed: the Monte Carlo seed.
        check_greedy: compute ``is_greedy`` for multi-token continuations too (up to T extra
            forwards per batch of pairs); one-token continuations always get it for free.
        max_masked_per_forward: cap on masked positions per forward (bounds the memory of the
            [N, vocab] logits).
        progress: show a progress bar (a string sets its label).

    Returns:
        one :class:`Score` per pair, in order.

    Raises:
        DiffutronError: bad settings, or a continuation that alone does not fit the model.
    """
    tokenizer = lm.tokenizer
    id_pairs = [encode_pair(tokenizer, c, x) for c, x in pairs]
    return loglikelihood_ids(
        lm, id_pairs, mc_samples=mc_samples, batch_size=batch_size, deterministic=deterministic, seed=seed,
        check_greedy=check_greedy, max_masked_per_forward=max_masked_per_forward, progress=progress,
    )


@dataclass
class _Pair:
    tokens: int
    truncated: int = 0
    method: str = "empty"
    value: float = 0.0
    draws: list[tuple[int, float]] = field(default_factory=list)  # (k, T/k * sum log p) per MC draw
    is_greedy: bool | None = None
    seq: list[int] = field(default_factory=list)
    start: int = 0


@dataclass
class _Canvas:
    ids: list[int]
    masked: list[int]  # ascending positions
    reads: list[tuple[int, float, int, list[int]]] = field(default_factory=list)  # (pair, weight, k, targets)


def loglikelihood_ids(
    lm,
    id_pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    mc_samples: int = 64,
    batch_size: int = 32,
    deterministic: bool = False,
    seed: int = 0,
    check_greedy: bool = True,
    max_masked_per_forward: int = 4096,
    progress: bool | str = False,
) -> list[Score]:
    """:func:`loglikelihood` on pairs of token ids made WITHOUT special tokens."""
    _check_int("mc_samples", mc_samples, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("max_masked_per_forward", max_masked_per_forward, 1)
    if not isinstance(seed, int) or seed < 0:
        raise DiffutronError(f"invalid seed={seed!r}: must be an integer >= 0")
    model, tokenizer = lm.model, lm.tokenizer
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise DiffutronError("the tokenizer has no mask token; a masked diffusion LM needs one")
    prefix, suffix = special_affixes(tokenizer)
    limit = context_length(model, tokenizer)

    # 1. the rows to run: one canvas per distinct (masked sequence), each read by >= 1 pair
    pairs, canvases = _plan(id_pairs, prefix=prefix, suffix=suffix, limit=limit, mask_id=mask_id,
                            mc_samples=mc_samples, deterministic=deterministic, seed=seed)

    # 2. forward passes, logits only at masked positions
    pad_id = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            chunks = _chunks(sorted(canvases.values(), key=lambda c: len(c.ids)), batch_size, max_masked_per_forward)
            for chunk in _progress(chunks, progress, "scoring"):
                _score_chunk(model, chunk, pairs, pad_id=pad_id)
            if check_greedy:
                todo = [i for i, p in enumerate(pairs) if p.is_greedy is None and p.tokens > 1]
                _greedy_check(model, [pairs[i] for i in todo], mask_id=mask_id, pad_id=pad_id,
                              batch_size=batch_size)
    finally:
        model.train(was_training)

    # 3. values and standard errors
    scores = []
    for state in pairs:
        scores.append(Score(
            value=float(state.value), stderr=_stderr(state.draws), is_greedy=state.is_greedy,
            tokens=state.tokens, truncated=state.truncated, method=state.method,
        ))
    return scores


def _plan(id_pairs, *, prefix: list[int], suffix: list[int], limit: int, mask_id: int, mc_samples: int,
          deterministic: bool, seed: int) -> tuple[list[_Pair], dict[tuple, _Canvas]]:
    """Each pair's state (its sequence, cut to ``limit``, and method) and the canvases to run:
    one per distinct (masked sequence, masked positions), with the reads of every pair that needs it."""
    stream = torch.Generator().manual_seed(seed)
    pairs: list[_Pair] = []
    canvases: dict[tuple, _Canvas] = {}
    for i, (ctx, cont) in enumerate(id_pairs):
        ctx, cont = list(ctx), list(cont)
        state = _Pair(tokens=len(cont))
        pairs.append(state)
        if not cont:
            state.is_greedy = True
            continue
        room = limit - len(prefix) - len(suffix) - len(cont)
        if room < 0:
            raise DiffutronError(
                f"a continuation of {len(cont)} tokens does not fit the model's context of {limit} tokens "
                "(with its special tokens): shorten it"
            )
        state.truncated = max(0, len(ctx) - room)
        ctx = ctx[state.truncated:]
        seq = prefix + ctx + cont + suffix
        start = len(prefix) + len(ctx)
        state.seq, state.start = seq, start
        gen = _keyed_generator(seed, ctx, cont) if deterministic else stream
        state.method, plan = _draw_plan(len(cont), mc_samples, gen)
        for subset, weight, k in plan:
            positions = [start + j for j in subset]
            noisy = list(seq)
            for p in positions:
                noisy[p] = mask_id
            key = (tuple(noisy), tuple(positions))
            canvas = canvases.get(key)
            if canvas is None:
                canvas = canvases[key] = _Canvas(noisy, positions)
            canvas.reads.append((i, weight, k, [seq[p] for p in positions]))
    return pairs, canvases


def _draw_plan(T: int, n: int, gen: torch.Generator) -> tuple[str, list[tuple[tuple[int, ...], float, int]]]:
    """``(method, [(answer positions to mask, weight, k)])``; the value is sum(weight * sum log p)."""
    if T == 1:
        return "exact", [((0,), 1.0, 1)]
    if T < 31 and 2**T - 1 <= n:
        # E_k E_{|S|=k} [T/k sum] = sum_k 1/T * T/k * 1/C(T,k) * sum_{|S|=k} sum
        plan = []
        for k in range(1, T + 1):
            weight = 1.0 / (k * math.comb(T, k))
            plan += [(subset, weight, k) for subset in itertools.combinations(range(T), k)]
        return "enumerated", plan
    # mask counts stratified over 1..T with a random offset (each draw's k is uniform), then a
    # uniformly random subset of that size
    offset = int(torch.randint(T, (1,), generator=gen))
    order = torch.rand(n, T, generator=gen).argsort(dim=1)
    plan = []
    for j in range(n):
        k = (offset + (j * T) // n) % T + 1
        plan.append((tuple(sorted(order[j, :k].tolist())), T / (k * n), k))
    return "monte_carlo", plan


def _keyed_generator(seed: int, ctx: Sequence[int], cont: Sequence[int]) -> torch.Generator:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{seed}|{','.join(map(str, ctx))}|{','.join(map(str, cont))}".encode())
    return torch.Generator().manual_seed(int.from_bytes(h.digest(), "little") & (2**63 - 1))


def _chunks(canvases: list[_Canvas], batch_size: int, max_masked: int) -> list[list[_Canvas]]:
    chunks, current, masked = [], [], 0
    for c in canvases:
        if current and (len(current) == batch_size or masked + len(c.masked) > max_masked):
            chunks.append(current)
            current, masked = [], 0
        current.append(c)
        masked += len(c.masked)
    if current:
        chunks.append(current)
    return chunks


def _score_chunk(model, chunk: list[_Canvas], pairs: list[_Pair], *, pad_id: int) -> None:
    device = _device(model)
    # 1. the canvases, right-padded  [b, L]; the masked positions  [b, L]
    ids, att = right_pad([c.ids for c in chunk], pad_id, device)
    positions = torch.zeros_like(ids, dtype=torch.bool)
    for r, c in enumerate(chunk):
        positions[r, c.masked] = True
    # 2. logits at masked positions only  [N, V]; log-normaliser  [N]
    logits = logits_at(model, ids, positions, att).float()
    lse = torch.logsumexp(logits, dim=-1)
    # 3. every read's summed log-probability, gathered at once
    rows, targets, segment, reads = [], [], [], []
    offset = 0
    for c in chunk:
        for read in c.reads:
            rows += range(offset, offset + len(c.masked))
            targets += read[3]
            segment += [len(reads)] * len(c.masked)
            reads.append((read, offset))
        offset += len(c.masked)
    rows_t = torch.tensor(rows, device=logits.device)
    targets_t = torch.tensor(targets, device=logits.device)
    logp = logits[rows_t, targets_t] - lse[rows_t]
    sums = torch.zeros(len(reads), dtype=torch.float64, device=logits.device)
    sums.index_add_(0, torch.tensor(segment, device=logits.device), logp.double())
    sums = sums.tolist()
    argmax = None
    for n, ((pair_i, weight, k, tgt), row) in enumerate(reads):
        state = pairs[pair_i]
        state.value += weight * sums[n]
        if state.method == "monte_carlo":
            state.draws.append((k, state.tokens / k * sums[n]))
        elif state.method == "exact":
            if argmax is None:
                argmax = logits.argmax(dim=-1).tolist()
            state.is_greedy = argmax[row] == tgt[0]


def _greedy_check(model, states: list[_Pair], *, mask_id: int, pad_id: int, batch_size: int) -> None:
    """Greedy decoding of each masked continuation: one token per step, the most confident
    position first (the sampler at temperature 0); a row stops as soon as it deviates."""
    device = _device(model)
    for lo in range(0, len(states), batch_size):
        group = states[lo : lo + batch_size]
        canvases = []
        remaining = []
        for s in group:
            canvas = list(s.seq)
            for p in range(s.start, s.start + s.tokens):
                canvas[p] = mask_id
            canvases.append(canvas)
            remaining.append(list(range(s.start, s.start + s.tokens)))
        active = list(range(len(group)))
        while active:
            ids, att = right_pad([canvases[r] for r in active], pad_id, device)
            positions = torch.zeros_like(ids, dtype=torch.bool)
            for b, r in enumerate(active):
                positions[b, remaining[r]] = True
            logits = logits_at(model, ids, positions, att).float()
            conf, best = (logits.max(dim=-1).values - torch.logsumexp(logits, dim=-1)), logits.argmax(dim=-1)
            conf, best = conf.tolist(), best.tolist()
            offset, still = 0, []
            for r in active:
                n = len(remaining[r])
                j = max(range(n), key=lambda q: conf[offset + q])  # first of equals, as torch.sort
                pos, token = remaining[r][j], best[offset + j]
                offset += n
                s = group[r]
                if token != s.seq[pos]:
                    s.is_greedy = False
                    continue
                canvases[r][pos] = token
                remaining[r].pop(j)
                if remaining[r]:
                    still.append(r)
                else:
                    s.is_greedy = True
            active = still


def _stderr(draws: list[tuple[int, float]]) -> float:
    """Standard error of the mean of the draws' values, as if they were independent: exact for
    independent draws and on the safe side for counts stratified over 1..T (measured on tiny
    random models it matches the spread of the estimate across seeds within a few percent)."""
    n = len(draws)
    if n < 2:
        return 0.0
    mean = sum(y for _, y in draws) / n
    var = sum((y - mean) ** 2 for _, y in draws) / (n - 1)
    return math.sqrt(var / n)
