"""A replay of the reference lm-eval adapter's log-likelihood (dLLM's BERT pipeline, the one the
Diffutron authors' fork used), to compare with :func:`diffutron.likelihood.loglikelihood`.

Do not use it for scores. It reproduces, on purpose:

- the split on ids made WITH special tokens: ``prefix = tok(context)`` and
  ``target = tok(context + continuation)[len(prefix):]``. On a ``[CLS] ... [SEP]`` tokenizer the
  prefix ends with ``[SEP]`` and the target is ``continuation[1:] + [SEP]``: every one-token
  choice (" A", " B", ...) becomes the same target ``[SEP]``, all choices tie and the first
  one wins, which puts single-token-choice tasks at chance;
- the Monte Carlo scheme: ``mc_samples / batch_size`` forwards per pair of ``batch_size`` copies,
  mask counts k stratified within each batch, ``T/k``-weighted cross-entropy, even for a
  one-token target (where one forward would be exact);
- full logits over every position and no attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..backbone import context_length, full_logits
from ..errors import DiffutronError
from ..likelihood import Score


def reference_split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The reference's ``_encode_pair``: trailing spaces move, ids WITH special tokens, sliced."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation)["input_ids"]
    prefix = tokenizer(context)["input_ids"]
    return list(prefix), list(whole[len(prefix):])


def reference_loglikelihood(
    lm,
    pairs: Sequence[tuple[str, str]],
    *,
    mc_samples: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool | str = False,
) -> list[Score]:
    """Score pairs the way the reference adapter does (see the module docstring).

    ``mc_samples`` must be a multiple of ``batch_size`` (as the reference asserts). Draws come
    from a generator seeded by ``seed`` (the reference uses the global RNG). A sequence longer
    than the model's context has its prefix cut from the left (the reference would fail).
    """
    if batch_size < 1 or mc_samples < batch_size or mc_samples % batch_size:
        raise DiffutronError(f"the reference scheme needs mc_samples ({mc_samples}) to be a multiple of "
                             f"batch_size ({batch_size})")
    model, tokenizer = lm.model, lm.tokenizer
    mask_id = tokenizer.mask_token_id
    limit = context_length(model, tokenizer)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    items = pairs
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(pairs, desc=progress if isinstance(progress, str) else "reference scheme", leave=False)
    scores = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for context, continuation in items:
                prefix, target = reference_split(tokenizer, context, continuation)
                cut = max(0, len(prefix) + len(target) - limit)
                prefix = prefix[cut:]
                if not target:
                    scores.append(Score(0.0, 0.0, False, 0, cut, "empty"))
                    continue
                seq = torch.tensor(prefix + target, device=device)[None].repeat(batch_size, 1)
                losses = [_one_batch(model, seq, len(prefix), mask_id, gen) for _ in range(mc_samples // batch_size)]
                value = -sum(losses) / len(losses)
                n = len(losses)
                stderr = (sum((x - sum(losses) / n) ** 2 for x in losses) / (n - 1) / n) ** 0.5 if n > 1 else 0.0
                scores.append(Score(value, stderr, False, len(target), cut, "monte_carlo"))
    finally:
        model.train(was_training)
    return scores


def _one_batch(model, seq: torch.Tensor, prompt_len: int, mask_id: int, gen: torch.Generator) -> float:
    """The reference's ``_forward_process`` + loss for one batch of copies."""
    b, length = seq.shape
    target_len = length - prompt_len
    k = int(torch.randint(1, target_len + 1, (), generator=gen))
    x = torch.round(torch.linspace(float(k), k + (b - 1) * (target_len / b), steps=b)).long()
    x = ((x - 1) % target_len) + 1
    indices = torch.arange(target_len).repeat(b, 1)
    is_mask = indices < x.unsqueeze(1)
    for i in range(b):
        is_mask[i] = is_mask[i][torch.randperm(target_len, generator=gen)]
    is_mask = torch.cat([torch.zeros(b, prompt_len, dtype=torch.bool), is_mask], dim=1).to(seq.device)
    noisy = torch.where(is_mask, torch.full_like(seq, mask_id), seq)
    p_mask = (x / target_len).unsqueeze(1).repeat(1, length).to(seq.device)
    logits = full_logits(model, noisy)  # [b, L, V]: every position, as the reference
    loss = F.cross_entropy(logits[is_mask].float(), seq[is_mask], reduction="none") / p_mask[is_mask]
    return float(loss.sum() / b)
