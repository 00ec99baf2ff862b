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


def end_of_block(tokens, start: int, end: int, *, eos_token_id: int | None, stop_sequences: Sequence[Sequence[int]],
                 pad_token_id: int, stop_at_eos: bool, last: bool) -> str | None:
    """After a block (answer columns up to ``end``) is decoded: ``"stop"`` if the answer has ended
    (``tokens`` after its end become padding, in place), ``"length"`` if it was the last block,
    else None. The one rule of the eager loop and the lockstep engine."""
    if stop_at_eos:
        hit = find_stop(tokens[start:end].tolist(), eos_token_id=eos_token_id, stop_sequences=stop_sequences)
        if hit is not None:
            tokens[start + hit[1] :] = pad_token_id
            return "stop"
    return "length" if last else None


def finish_reason(done: str | None, tokens, start: int, *, eos_token_id: int | None,
                  stop_sequences: Sequence[Sequence[int]]) -> str:
    """``"stop"``, ``"length"`` or ``"cancelled"``: a row that ran to its end (``done`` None or
    "length") stopped if its answer holds an end of text or a stop sequence."""
    if done in (None, "length") and find_stop(tokens[start:].tolist(), eos_token_id=eos_token_id,
                                              stop_sequences=stop_sequences) is not None:
        return "stop"
    return done or "length"
