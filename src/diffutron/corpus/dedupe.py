"""De-duplication of the cleaned documents: exact duplicates, then MinHash near-duplicates.

``deduplicate`` keeps the first document of each group of exact duplicates (equal after
Turkish case-folding and whitespace collapsing) and of near duplicates (word 5-gram Jaccard
similarity at or above a threshold, candidates found by MinHash with LSH banding).
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

from ..text import tr_casefold, words

__all__ = ["deduplicate"]


def _shingles(text: str, n: int = 5) -> set[int]:
    """64-bit hashes (two CRC-32s, deterministic across runs) of the word ``n``-grams."""
    toks = words(tr_casefold(text))
    grams = [" ".join(toks[i : i + n]).encode() for i in range(max(1, len(toks) - n + 1))]
    return {(zlib.crc32(g) << 32) | zlib.crc32(g, 0x9E3779B9) for g in grams if g}


def deduplicate(texts: Sequence[str], threshold: float = 0.8, num_perm: int = 64,
                bands: int = 16) -> tuple[list[int], int, int]:
    """Indices of ``texts`` to keep: first of each exact or near-duplicate group.

    Exact: equal after Turkish case-folding and whitespace collapsing. Near: MinHash
    signatures over word 5-grams bucketed by LSH (``bands`` x ``num_perm // bands`` rows),
    each candidate pair confirmed by the true Jaccard similarity >= ``threshold``.

    Returns:
        (kept indices in input order, number of exact duplicates, number of near duplicates)
    """
    rng = np.random.default_rng(20240521)
    salts = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    mults = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
    rows = num_perm // bands
    exact_seen: set[str] = set()
    buckets: dict[tuple[int, bytes], list[int]] = {}
    kept_shingles: dict[int, set[int]] = {}
    kept: list[int] = []
    n_exact = n_near = 0
    for i, text in enumerate(texts):
        key = " ".join(tr_casefold(text).split())
        if key in exact_seen:
            n_exact += 1
            continue
        exact_seen.add(key)
        sh = _shingles(text)
        if not sh:
            kept.append(i)
            continue
        h = np.fromiter(sh, dtype=np.uint64, count=len(sh))
        with np.errstate(over="ignore"):
            sig = ((h[:, None] ^ salts[None, :]) * mults[None, :]).min(axis=0)
        band_keys = [(b, sig[b * rows : (b + 1) * rows].tobytes()) for b in range(bands)]
        candidates = {j for k in band_keys for j in buckets.get(k, ())}
        if any(len(sh & kept_shingles[j]) / len(sh | kept_shingles[j]) >= threshold for j in candidates):
            n_near += 1
            continue
        kept.append(i)
        kept_shingles[i] = sh
        for k in band_keys:
            buckets.setdefault(k, []).append(i)
    return kept, n_exact, n_near
