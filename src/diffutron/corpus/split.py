"""The corpus's splits: their names (``SPLITS``) and the deterministic split by document.

``split_documents`` orders each domain's documents by a salted hash of their ids and cuts
validation and test shares off the front, so the split depends only on the set of ids.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

from ..errors import DiffutronError
from .extractors import Document

__all__ = ["SPLITS", "split_documents"]

SPLITS = ("train", "validation", "test")
_SPLIT_SALT = "diffutron-corpus-split-v1"


def split_documents(docs: Iterable[Document], validation_fraction: float = 0.1,
                    test_fraction: float = 0.1) -> dict[str, list[Document]]:
    """Deterministic split by document, stratified by domain.

    Within each domain, documents are ordered by ``sha256(salt + id)``; the first
    ``round(n * validation_fraction)`` go to validation, the next ``round(n * test_fraction)``
    to test, the rest to train (a domain with at least 3 documents gets at least one
    held-out document of each kind). The result depends only on the set of document ids.
    """
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise DiffutronError(f"{name} must be in [0, 1), got {value}")
    if validation_fraction + test_fraction >= 1.0:
        raise DiffutronError(f"validation_fraction + test_fraction must be < 1, got "
                             f"{validation_fraction + test_fraction}")
    by_domain: dict[str, list[Document]] = {}
    for doc in docs:
        by_domain.setdefault(doc.domain, []).append(doc)
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for domain in sorted(by_domain):
        ordered = sorted(by_domain[domain], key=lambda d: hashlib.sha256(f"{_SPLIT_SALT}:{d.id}".encode()).digest())
        n = len(ordered)
        n_val, n_test = round(n * validation_fraction), round(n * test_fraction)
        if n >= 3:
            n_val = max(n_val, 1 if validation_fraction > 0 else 0)
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
        out["validation"] += ordered[:n_val]
        out["test"] += ordered[n_val : n_val + n_test]
        out["train"] += ordered[n_val + n_test :]
    for split in SPLITS:
        out[split].sort(key=lambda d: d.id)
    return out
