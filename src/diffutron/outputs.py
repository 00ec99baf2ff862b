"""Checks on where a command will write, made before any work starts: the path is of the right
kind (a directory or a file) and its directory can be written. Each failure is one line naming
the path and the fix (``DiffutronError``), never an ``OSError`` traceback after minutes of work."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import DiffutronError


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe(directory: Path, flag: str, target: Path) -> None:
    """Create and remove a file in ``directory``: the only test that holds for every user (root
    included), file system (read-only mounts) and platform."""
    try:
        fd, name = tempfile.mkstemp(prefix=".diffutron-probe-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise DiffutronError(f"{flag} {target}: cannot write in {directory} ({err.strerror or err}); choose a "
                             "writable location") from None


def check_output_dir(path: str | os.PathLike, flag: str = "--output") -> Path:
    """``path`` is, or can become, a directory this process can write in."""
    path = Path(os.path.expanduser(str(path)))
    if path.exists() and not path.is_dir():
        raise DiffutronError(f"{flag} {path} is a file, not a directory: name a directory (new or empty)")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise DiffutronError(f"{flag} {path}: {base} is a file, so no directory can be made under it")
    _probe(base, flag, path)
    return path


def check_output_file(path: str | os.PathLike, flag: str = "--output") -> Path:
    """``path`` is, or can become, a file this process can write (its directory made if needed)."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        raise DiffutronError(f"{flag} {path} is a directory: name a file, e.g. {path / 'answers.jsonl'}")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise DiffutronError(f"{flag} {path}: {base} is a file, so {path.parent} cannot be made")
    _probe(base, flag, path)
    return path
