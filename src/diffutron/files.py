"""Files on disk, for every layer: ``file_sha256``, the digest that pins a download (corpus
sources), records a local file a result was read from (CETVEL data) and checks published files."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of the file at ``path``, read in 1 MiB blocks (any size, flat memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
