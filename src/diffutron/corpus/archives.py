"""Reading a downloaded package in place, and the error for a source that cannot be used.

``open_archive`` gives a read-only ``Archive`` view of a wheel (a zip file) or a ``.deb``
(an ``ar`` archive holding ``data.tar.*``; ``.zst`` payloads through ``dpkg-deb``): no
installation, no root. ``SourceError`` is what every step of getting a source's text raises
(download, checksum, archive, extraction), so a build can skip that source and say why.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Callable

from ..errors import DiffutronError

__all__ = ["SourceError", "Archive", "open_archive"]


class SourceError(DiffutronError):
    """A source could not be used: unreachable registry, checksum mismatch, broken archive."""


class Archive:
    """Read-only view of the files in a wheel (zip) or ``.deb`` (ar + data.tar.*)."""

    def __init__(self, files: dict[str, Callable[[], bytes]]):
        self._files = files

    def names(self) -> list[str]:
        return sorted(self._files)

    def read(self, name: str) -> bytes:
        return self._files[name]()

    def glob(self, pattern: str) -> list[str]:
        """Names matching a regular expression (``re.search``), sorted."""
        regex = re.compile(pattern)
        return [n for n in self.names() if regex.search(n)]


def _zip_archive(path: Path) -> Archive:
    z = zipfile.ZipFile(path)
    bad = z.testzip()
    if bad is not None:
        raise SourceError(f"{path.name}: member {bad} is corrupt; delete the file and build again")
    return Archive({i.filename: (lambda n=i.filename: z.read(n)) for i in z.infolist() if not i.is_dir()})


def _ar_members(data: bytes) -> dict[str, bytes]:
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive")
    pos, members = 8, {}
    while pos < len(data):
        header = data[pos : pos + 60]
        if len(header) < 60 or header[58:60] != b"`\n":
            raise ValueError(f"truncated ar header at byte {pos}")
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = data[pos + 60 : pos + 60 + size]
        if len(body) != size:
            raise ValueError(f"truncated ar member {name}")
        members[name] = body
        pos += 60 + size + (size % 2)
    return members


def _deb_archive(path: Path) -> Archive:
    members = _ar_members(path.read_bytes())
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise ValueError("no data.tar.* member")
    payload = members[data_name]
    if data_name.endswith(".zst"):  # the standard library reads zstd only from Python 3.14
        if shutil.which("dpkg-deb") is None:
            raise ValueError("data.tar.zst needs dpkg-deb, which is not installed")
        payload = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(path)], check=True,
                                 capture_output=True).stdout
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
        for member in tar:
            if member.isfile():
                files[member.name.lstrip("./")] = tar.extractfile(member).read()
    return Archive({n: (lambda b=b: b) for n, b in files.items()})


def open_archive(path: str | Path) -> Archive:
    """Open a wheel/zip or ``.deb`` file; raises ``SourceError`` when it is broken."""
    path = Path(path)
    try:
        if path.suffix == ".deb":
            return _deb_archive(path)
        return _zip_archive(path)
    except SourceError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, tarfile.TarError, subprocess.CalledProcessError) as err:
        raise SourceError(f"{path.name} is not a readable archive ({err}); delete it and build again") from err
