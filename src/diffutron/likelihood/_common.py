"""Small helpers shared by the likelihood modules."""

from __future__ import annotations

import torch

from ..errors import DiffutronError


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise DiffutronError(f"invalid {name}={value!r}: must be an integer >= {low}")


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
