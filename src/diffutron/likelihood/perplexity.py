"""The held-out ELBO perplexity bound: the training objective's weighted masked cross-entropy,
summed over a data set and divided by its number of maskable tokens."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from ..backbone import logits_at, right_pad
from ..errors import DiffutronError
from ..objective import draw_noise
from ..schedules import get_schedule, sample_t
from ._common import _check_int, _device, _progress

@dataclass(frozen=True)
class PerplexityResult:
    """A held-out ELBO perplexity bound.

    Attributes:
        loss: the bound on the negative log-likelihood per maskable token, in nats: the summed
            weighted masked cross-entropy w(t) * CE over all sequences (averaged over the
            ``mc_samples`` draws of each) divided by ``tokens``.
        ppl: exp(loss), an upper bound (in expectation) on the per-token perplexity.
        stderr: Monte Carlo standard error of ``loss`` (``nan`` with one draw per sequence).
        tokens: maskable tokens scored.
        sequences: sequences scored.
        mc_samples: draws (t and masks) per sequence.
        seed: the seed the draws came from.
        words: words in the text, when given; then the same sum per word:
        loss_per_word, ppl_per_word, stderr_per_word.
    """

    loss: float
    ppl: float
    stderr: float
    tokens: int
    sequences: int
    mc_samples: int
    seed: int
    words: int | None = None
    loss_per_word: float | None = None
    ppl_per_word: float | None = None
    stderr_per_word: float | None = None

    @property
    def ppl_interval(self) -> tuple[float, float]:
        """A 95% Monte Carlo interval for ``ppl``: exp(loss -/+ 1.96 stderr)."""
        if math.isnan(self.stderr):
            return (float("nan"), float("nan"))
        return (_exp(self.loss - 1.96 * self.stderr), _exp(self.loss + 1.96 * self.stderr))

    @classmethod
    def combine(cls, parts: Sequence["PerplexityResult"]) -> "PerplexityResult":
        """One result from the results of disjoint shards (e.g. one per rank, each computed with
        its ``first_index``): sums and variances add up."""
        if not parts:
            raise DiffutronError("no results to combine")
        tokens = sum(p.tokens for p in parts)
        total = sum(p.loss * p.tokens for p in parts)
        var = sum((p.stderr * p.tokens) ** 2 for p in parts)
        words = sum(p.words or 0 for p in parts) if all(p.words for p in parts) else None
        first = parts[0]
        per_word = {}
        if words:
            per_word = dict(loss_per_word=total / words, ppl_per_word=_exp(total / words),
                            stderr_per_word=math.sqrt(var) / words)
        return cls(loss=total / tokens, ppl=_exp(total / tokens), stderr=math.sqrt(var) / tokens, tokens=tokens,
                   sequences=sum(p.sequences for p in parts), mc_samples=first.mc_samples, seed=first.seed,
                   words=words, **per_word)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ppl_interval"] = list(self.ppl_interval)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

    def summary(self) -> str:
        se = "n/a" if math.isnan(self.stderr) else f"{self.stderr:.4f}"
        text = (f"ELBO perplexity <= {self.ppl:.3f} per token (loss {self.loss:.4f} nats, MC stderr {se}; "
                f"{self.tokens} tokens, {self.sequences} sequence{'s' if self.sequences != 1 else ''}, "
                f"{self.mc_samples} draws each, seed {self.seed})")
        if self.words:
            text += f"; per word <= {self.ppl_per_word:.3f} ({self.words} words)"
        return text


def elbo_perplexity(
    model,
    data,
    *,
    mask_token_id: int,
    seed: int = 0,
    mc_samples: int = 4,
    batch_size: int = 16,
    words: int | None = None,
    schedule: str = "linear",
    eps: float = 1e-3,
    t_sampling: str = "iid",
    pad_token_id: int | None = None,
    max_masked_per_forward: int = 4096,
    max_sequences: int | None = None,
    first_index: int = 0,
    progress: bool | str = False,
) -> PerplexityResult:
    """The held-out ELBO perplexity bound of ``model`` on tokenized ``data``.

    For every sequence i (in order) and draw d < ``mc_samples``: t ~ U(eps, 1) and masks with
    probability 1 - alpha(t) over its maskable tokens, exactly as the training objective draws
    them (``schedules.sample_t``, ``objective.draw_noise``), from a generator seeded by
    ``(seed, i)`` alone, so the result depends neither on batching nor on the global RNG.
    L_i = mean over draws of sum_masked w(t) * CE; loss = sum_i L_i / sum_i N_i (N_i = the
    maskable tokens of i) and ppl = exp(loss). The standard error comes from the spread of the
    draws of each sequence (mc_samples >= 2).

    Args:
        model: a Hugging Face masked LM (peft/DDP/compile wrappers are fine); left in the
            training mode it came in.
        data: tokenized sequences, in any of these forms: a LongTensor [N, L]; a list of id
            lists (ragged); a dataset with a ``batch(indices)`` method and ``len`` (the
            pre-training ``PackedDataset``); an iterable of batches (dicts or objects) with
            ``input_ids`` [B, L] and optionally ``attention_mask`` (0 = padding), ``maskable``
            (bool) or ``labels`` (-100 = not maskable); or an iterable of such rows with 1-D
            ``input_ids`` (a Hugging Face ``Dataset``). Default: every attended token is maskable.
        mask_token_id: the tokenizer's mask id.
        seed: the draws' seed; the same seed gives the same number.
        mc_samples: draws per sequence (more draws, smaller stderr).
        batch_size: rows (sequence x draw) per forward pass; does not change the result.
        words: the number of words in the text, for the per-word figures.
        schedule, eps, t_sampling: as in the training objective (``t_sampling`` spreads the t of
            one sequence's draws: ``iid``, ``antithetic`` or ``stratified``; the last two lower
            the error but make the reported stderr conservative).
        pad_token_id: filler for padded rows (any id; padding is masked out of attention).
        max_sequences: score only the first this many sequences.
        first_index: the number of the first sequence (its draws are seeded by
            ``(seed, first_index + i)``): a shard of a data set passes its offset, and
            :meth:`PerplexityResult.combine` of the shards equals the whole run.
        progress: show a progress bar (a string sets its label).

    Under DDP, call it on every rank with its shard (and combine), or on one rank with the inner
    module (``model.module``): a DDP forward on one rank alone may wait for the others.

    Returns:
        a :class:`PerplexityResult`.

    Raises:
        DiffutronError: bad settings, or data with no maskable token.
    """
    _check_args(mc_samples=mc_samples, batch_size=batch_size, max_sequences=max_sequences,
                first_index=first_index, words=words)
    pad = mask_token_id if pad_token_id is None else pad_token_id
    draws = dict(seed=seed, mc_samples=mc_samples, schedule=schedule, eps=eps, t_sampling=t_sampling)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            sums, tokens = _score(model, data, draws, mask_token_id=mask_token_id, pad_id=pad, batch_size=batch_size,
                                  max_masked=max_masked_per_forward, max_sequences=max_sequences,
                                  first_index=first_index, progress=progress)
    finally:
        model.train(was_training)
    if tokens == 0:
        raise DiffutronError("the data holds no maskable token: nothing to score")
    return _result(sums, tokens, mc_samples=mc_samples, seed=seed, words=words)


def _check_args(*, mc_samples: int, batch_size: int, max_sequences: int | None, first_index: int,
                words: int | None) -> None:
    _check_int("mc_samples", mc_samples, 1)
    _check_int("batch_size", batch_size, 1)
    if max_sequences is not None:
        _check_int("max_sequences", max_sequences, 1)
    _check_int("first_index", first_index, 0)
    if words is not None and (not isinstance(words, int) or words < 0):
        raise DiffutronError(f"invalid words={words!r}: a count >= 0")


def _score(model, data, draws: dict, *, mask_token_id: int, pad_id: int, batch_size: int, max_masked: int,
           max_sequences: int | None, first_index: int, progress: bool | str) -> tuple[list[list[float]], int]:
    """The weighted masked cross-entropy of every (sequence, draw), as ``sums[sequence][draw]``,
    and the number of maskable tokens; ``draws``: ``sequence_noise``'s settings."""
    sums: list[list[float]] = []  # [sequence][draw]
    tokens = 0
    pending: list[tuple[int, int, list[int], list[int], float, list[int]]] = []
    sched = get_schedule(draws["schedule"])
    bar = _progress(None, progress, "perplexity")
    for i, (ids, maskable) in enumerate(_sequences(data, batch_size)):
        if max_sequences is not None and i >= max_sequences:
            break
        n_mask = int(maskable.sum())
        tokens += n_mask
        sums.append([0.0] * draws["mc_samples"])
        if n_mask == 0:
            continue
        # 1. t and masks of this sequence's draws, as the objective draws them  [m], [m, L]
        t, noise = sequence_noise(maskable, index=first_index + i, **draws)
        pending.extend(_masked_rows(i, ids.tolist(), noise, sched.weight(t).tolist(), mask_token_id))
        # 2. run full chunks of rows
        while len(pending) >= batch_size:
            _ce_rows(model, pending[:batch_size], sums, pad_id, max_masked)
            del pending[:batch_size]
        if bar is not None:
            bar.update(1)
    if pending:
        _ce_rows(model, pending, sums, pad_id, max_masked)
    if bar is not None:
        bar.close()
    return sums, tokens


def _masked_rows(i: int, ids_list: list[int], noise: torch.Tensor, w: list[float], mask_token_id: int):
    """One row per draw d of sequence i that masks something: (i, d, noisy ids, masked
    positions, w(t_d), the masked positions' true ids)."""
    for d in range(len(w)):
        positions = noise[d].nonzero().squeeze(-1).tolist()
        if not positions:
            continue
        noisy = list(ids_list)
        for p in positions:
            noisy[p] = mask_token_id
        yield (i, d, noisy, positions, w[d], [ids_list[p] for p in positions])


def _result(sums: list[list[float]], tokens: int, *, mc_samples: int, seed: int, words: int | None) -> PerplexityResult:
    # 3. L_i = mean over draws; loss = sum L_i / tokens; Var = sum Var(L_i) / tokens^2
    total, var = 0.0, 0.0
    for per_draw in sums:
        mean = sum(per_draw) / mc_samples
        total += mean
        if mc_samples > 1:
            var += sum((x - mean) ** 2 for x in per_draw) / (mc_samples - 1) / mc_samples
    loss = total / tokens
    stderr = math.sqrt(var) / tokens if mc_samples > 1 else float("nan")
    per_word = {}
    if words:
        loss_w = total / words
        se_w = math.sqrt(var) / words if mc_samples > 1 else float("nan")
        per_word = dict(loss_per_word=loss_w, ppl_per_word=_exp(loss_w), stderr_per_word=se_w)
    return PerplexityResult(loss=loss, ppl=_exp(loss), stderr=stderr, tokens=tokens, sequences=len(sums),
                            mc_samples=mc_samples, seed=seed, words=words, **per_word)


def sequence_noise(
    maskable: torch.Tensor,
    *,
    index: int,
    seed: int = 0,
    mc_samples: int = 4,
    schedule: str = "linear",
    eps: float = 1e-3,
    t_sampling: str = "iid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws :func:`elbo_perplexity` makes for sequence number ``index``: times t [m] and
    masks [m, L] over ``maskable`` [L], from a generator seeded by ``(seed, index)`` alone."""
    g = torch.Generator().manual_seed(_mix(seed, index))
    t = sample_t(mc_samples, eps=eps, method=t_sampling, generator=g)
    noise = draw_noise(maskable.bool()[None, :].expand(mc_samples, -1), t, schedule=schedule, generator=g)
    return t, noise


def _ce_rows(model, rows, sums, pad_id: int, max_masked: int) -> None:
    """Weighted masked cross-entropy of each row, added to ``sums[seq][draw]``."""
    # split further when the masked positions would make too large a [N, V] block
    groups, current, n = [], [], 0
    for row in rows:
        if current and n + len(row[3]) > max_masked:
            groups.append(current)
            current, n = [], 0
        current.append(row)
        n += len(row[3])
    groups.append(current)
    device = _device(model)
    for group in groups:
        ids, att = right_pad([r[2] for r in group], pad_id, device)
        positions = torch.zeros_like(ids, dtype=torch.bool)
        for b, r in enumerate(group):
            positions[b, r[3]] = True
        logits = logits_at(model, ids, positions, att).float()  # [N, V]
        targets = torch.tensor([t for r in group for t in r[5]], device=logits.device)
        ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none").double()
        offset = 0
        for i, d, _, pos, w, _ in group:
            sums[i][d] += w * float(ce[offset : offset + len(pos)].sum())
            offset += len(pos)


def _sequences(data, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids [L], maskable [L] bool) of every sequence in ``data``, padding removed."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise DiffutronError(f"input_ids must be [N, L], got shape {tuple(data.shape)}")
        for row in data:
            yield row.long().cpu(), torch.ones(row.shape[0], dtype=torch.bool)
        return
    # the pre-training PackedDataset: len() and batch(indices) (a Hugging Face Dataset's batch()
    # means something else: its rows are read one by one below)
    if callable(getattr(data, "batch", None)) and hasattr(data, "__len__") and not hasattr(data, "column_names"):
        for lo in range(0, len(data), batch_size):
            yield from _batch_rows(data.batch(list(range(lo, min(lo + batch_size, len(data))))))
        return
    if isinstance(data, dict) or hasattr(data, "input_ids"):
        yield from _batch_rows(data)
        return
    for item in data:
        if isinstance(item, (list, tuple)) and (not item or isinstance(item[0], int)):
            yield torch.tensor(item, dtype=torch.long), torch.ones(len(item), dtype=torch.bool)
        elif isinstance(item, torch.Tensor) and item.dim() == 1:
            yield item.long().cpu(), torch.ones(item.shape[0], dtype=torch.bool)
        else:
            ids = _field(item, "input_ids")
            if ids is None:
                raise DiffutronError(f"cannot read sequences from a {type(item).__name__}: give input_ids")
            ids = torch.as_tensor(ids)
            if ids.dim() == 1:
                yield from _batch_rows({k: _unsqueeze(_field(item, k)) for k in
                                        ("input_ids", "attention_mask", "maskable", "labels")})
            else:
                yield from _batch_rows(item)


def _unsqueeze(value):
    return None if value is None else torch.as_tensor(value)[None]


def _field(item, name):
    if isinstance(item, dict):
        return item.get(name)
    return getattr(item, name, None)


def _batch_rows(batch) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    ids = torch.as_tensor(_field(batch, "input_ids")).long().cpu()
    att = _field(batch, "attention_mask")
    att = torch.ones_like(ids, dtype=torch.bool) if att is None else torch.as_tensor(att).bool().cpu()
    maskable = _field(batch, "maskable")
    labels = _field(batch, "labels")
    if maskable is not None:
        maskable = torch.as_tensor(maskable).bool().cpu()
    elif labels is not None:
        maskable = torch.as_tensor(labels).cpu() != -100
    else:
        maskable = att
    maskable = maskable & att
    for r in range(ids.shape[0]):
        keep = att[r]
        yield ids[r][keep], maskable[r][keep]


def _mix(seed: int, i: int) -> int:
    h = hashlib.blake2b(f"{seed}/{i}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")
