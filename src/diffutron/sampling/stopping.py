"""Where an answer ends, found on token ids (never by decoding and re-encoding text)."""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(
    tokens: Sequence[int],
    *,
    eos_token_id: int | None,
    stop_sequences: Sequence[Sequence[int]] = (),
    mask_token_id: int | None = None,
) -> tuple[int, int] | None:
    """First end of the answer in ``tokens``: ``(cut, end)`` or None.

    ``cut`` is where the answer's text ends (the start of the EOS token or stop sequence),
    ``end`` is just after it. Only the decided prefix counts: scanning stops at the first mask.
    """
    tokens = list(tokens)
    limit = len(tokens)
    if mask_token_id is not None and mask_token_id in tokens:
        limit = tokens.index(mask_token_id)
    best: tuple[int, int] | None = None
    if eos_token_id is not None and eos_token_id in tokens[:limit]:
        i = tokens.index(eos_token_id)
        best = (i, i + 1)
    for seq in stop_sequences:
        n = len(seq)
        if n == 0:
            continue
        seq = list(seq)
        upto = best[0] if best else limit
        for i in range(0, min(upto, limit - n + 1)):
            if tokens[i : i + n] == seq:
                if best is None or i < best[0]:
                    best = (i, i + n)
                break
    return best


def partial_stop_len(tokens: Sequence[int], stop_sequences: Sequence[Sequence[int]] = ()) -> int:
    """How many trailing tokens could be the start of a stop sequence (to hold back when streaming)."""
    tokens = list(tokens)
    keep = 0
    for seq in stop_sequences:
        for n in range(min(len(seq) - 1, len(tokens)), 0, -1):
            if tokens[-n:] == list(seq[:n]):
                keep = max(keep, n)
                break
    return keep
