"""Small helpers shared by the likelihood modules."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import DiffutronError


def _batch(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        att[r, : len(row)] = 1
    return ids.to(device), att.to(device)


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise DiffutronError(f"invalid {name}={value!r}: must be an integer >= {low}")


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _progress(items, progress: bool | str, default: str):
    """``items`` wrapped in a tqdm bar (or a manual bar when ``items`` is None) when asked."""
    if not progress:
        return items
    from tqdm.auto import tqdm

    label = progress if isinstance(progress, str) else default
    if items is None:
        return tqdm(desc=label, unit="seq", leave=False)
    return tqdm(items, desc=label, unit="batch", leave=False)
