"""What a result needs to be reproduced: the model (path, hash, dtype, device), versions, date."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

from ..backbone import unwrap

_PACKAGES = ("diffutron", "torch", "transformers", "tokenizers", "datasets", "peft", "lm_eval", "numpy")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def model_hash(model) -> tuple[str, str]:
    """``(sha256, what was hashed)``: the ``*.safetensors`` files of the directory the model was
    loaded from, else the parameters in memory (names, dtypes and bytes)."""
    inner = unwrap(model)
    path = getattr(getattr(inner, "config", None), "_name_or_path", None)
    if path and os.path.isdir(os.path.expanduser(str(path))):
        files = sorted(Path(os.path.expanduser(str(path))).glob("*.safetensors"))
        if files:
            h = hashlib.sha256()
            for f in files:
                with f.open("rb") as stream:
                    for block in iter(lambda: stream.read(1 << 22), b""):
                        h.update(block)
            return h.hexdigest(), "+".join(f.name for f in files)
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        t = tensor.detach().to("cpu").contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest(), "parameters in memory"


def provenance(lm, settings: dict) -> dict:
    """Model, settings, package versions, machine and date of a run."""
    model = lm.model
    inner = unwrap(model)
    first = next(model.parameters())
    digest, hashed = model_hash(model)
    return {
        "model": {
            "name": getattr(lm, "name", None),
            "path": getattr(getattr(inner, "config", None), "_name_or_path", None),
            "sha256": digest,
            "hashed": hashed,
            "architecture": type(inner).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(first.dtype).replace("torch.", ""),
            "device": str(first.device),
            "context_length": getattr(lm, "context_length", None),
        },
        "settings": settings,
        "versions": package_versions(),
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
