"""Pinned registry packages that ship Turkish text: the pins, their download, their documents.

Each ``Source`` names one package on PyPI or Debian with its exact version, the sha256 of
the downloaded file, its license, and an extractor (``diffutron.corpus.extractors``) that
turns the archive into ``Document``s. ``fetch`` downloads with the registry's own client
(``pip download --no-deps``, ``apt-get download``) into a cache (``cache_root``), and a file
is only used after its sha256 matches the pin. Archives are read in place
(``diffutron.corpus.archives``). ``extract`` runs a source's extractor on its file;
``select_sources`` keeps the sources of the wanted licenses and registries. ``SOURCES``,
at the end, holds the pins.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ..files import file_sha256
from .archives import Archive, SourceError, open_archive
from .extractors import (Document, extract_freedict, extract_gettext, extract_libreoffice_help, extract_manpages,
                         extract_sadedegel, extract_treebank)

__all__ = [
    "Source",
    "SOURCES",
    "cache_root",
    "fetch",
    "extract",
    "select_sources",
]


def cache_root() -> Path:
    """Where diffutron keeps downloads and built data.

    ``$DIFFUTRON_CACHE`` if set, else ``$XDG_CACHE_HOME/diffutron``, else ``~/.cache/diffutron``.
    """
    if os.environ.get("DIFFUTRON_CACHE"):
        return Path(os.environ["DIFFUTRON_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).expanduser() / "diffutron"


@dataclass(frozen=True)
class Source:
    """One pinned registry package and how to turn it into documents."""

    name: str
    registry: str  # "pypi" or "debian"
    package: str
    version: str
    filename: str  # the file the registry client writes
    sha256: str
    license: str  # SPDX-like identifier
    domains: tuple[str, ...]
    extractor: Callable[[Archive], Iterable[Document]] = field(repr=False, compare=False)
    homepage: str = ""
    language_filter: bool = True  # drop non-Turkish lines when cleaning

    def record(self) -> dict:
        """The JSON-able facts written to ``stats.json``."""
        return {"name": self.name, "registry": self.registry, "package": self.package,
                "version": self.version, "filename": self.filename, "sha256": self.sha256,
                "license": self.license, "domains": list(self.domains), "homepage": self.homepage}


def _download(source: Source, into: Path, timeout: float) -> None:
    if source.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-cache-dir", "--timeout", "20", "--retries", "1",
               "-q", "-d", str(into), f"{source.package}=={source.version}"]
    elif source.registry == "debian":
        if shutil.which("apt-get") is None:
            raise SourceError(f"{source.name}: apt-get is not available on this system")
        cmd = ["apt-get", "download", "-q"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd += ["-o", "APT::Sandbox::User=root"]  # _apt cannot write into our private temp dir
        cmd.append(f"{source.package}={source.version}")
    else:
        raise SourceError(f"{source.name}: unknown registry {source.registry!r} (expected pypi or debian)")
    try:
        run = subprocess.run(cmd, cwd=into, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SourceError(f"{source.name}: {source.registry} download failed ({err})") from err
    if run.returncode != 0:
        lines = [ln.strip() for ln in (run.stderr or run.stdout).splitlines() if ln.strip()]
        lines = [ln for ln in lines if not ln.startswith("WARNING: Location")] or lines
        hint = " (run `apt-get update` first?)" if source.registry == "debian" else ""
        client = "pip download" if source.registry == "pypi" else "apt-get download"
        raise SourceError(f"{source.name}: `{client}` failed for {source.package}=={source.version}: "
                          f"{lines[-1] if lines else 'exit status ' + str(run.returncode)}{hint}")


def fetch(source: Source, cache_dir: str | Path | None = None, timeout: float = 300.0) -> Path:
    """The verified local file of ``source``, downloading it into the cache when needed.

    A cached file is re-checked against the pinned sha256 on every call; a file that does
    not match is deleted and downloaded again. A fresh download lands in a temporary folder
    and only moves into the cache once its sha256 matches.

    Raises:
        SourceError: registry unreachable or refusing the package, or checksum mismatch.
    """
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "downloads"
    target = cache / source.registry / source.filename
    if target.is_file():
        if file_sha256(target) == source.sha256:
            return target
        target.unlink()  # corrupt or truncated: never used
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        _download(source, Path(tmp), timeout)
        got = sorted(p for p in Path(tmp).iterdir() if p.is_file())
        if not got:
            raise SourceError(f"{source.name}: the {source.registry} client wrote no file")
        path = Path(tmp) / source.filename if (Path(tmp) / source.filename).is_file() else got[0]
        digest = file_sha256(path)
        if digest != source.sha256:
            raise SourceError(f"{source.name}: checksum mismatch for {path.name}: expected sha256 "
                              f"{source.sha256[:16]}..., got {digest[:16]}... (download corrupt, or the "
                              f"registry serves a different file for this version/architecture)")
        os.replace(path, target)
    return target


def extract(source: Source, path: str | Path) -> list[Document]:
    """All documents of ``source`` from its downloaded file, ids prefixed with the source name.

    The whole archive is read before anything is returned, so a broken archive yields no
    documents at all (never a partial source).
    """
    archive = open_archive(path)
    try:
        docs = list(source.extractor(archive))
    except SourceError:
        raise
    except Exception as err:  # a format surprise inside a package: skip the source, say why
        raise SourceError(f"{source.name}: could not extract text from {Path(path).name} "
                          f"({type(err).__name__}: {err})") from err
    for doc in docs:
        doc.id = f"{source.name}/{doc.id}"
        doc.source = source.name
    return docs


def select_sources(sources: Iterable[Source], exclude_licenses: Iterable[str] = (),
                   registries: Iterable[str] = ("pypi", "debian")) -> tuple[list[Source], list[dict]]:
    """Split ``sources`` into (kept, excluded) by license prefix and registry.

    A license is excluded when it starts with one of ``exclude_licenses``, ignoring case:
    ``GPL`` drops ``GPL``, ``GPL-2.0-or-later`` and ``GPL-3.0-or-later`` (not ``LGPL``).
    """
    prefixes = [p.strip().lower() for p in exclude_licenses if p.strip()]
    registries = set(registries)
    kept, excluded = [], []
    for s in sources:
        if s.registry not in registries:
            excluded.append({"name": s.name, "reason": f"registry {s.registry} not selected"})
        elif any(s.license.lower().startswith(p) for p in prefixes):
            excluded.append({"name": s.name, "reason": f"license {s.license} excluded"})
        else:
            kept.append(s)
    return kept, excluded


# --------------------------------------------------------------------------- the pins


def _deb(name, package, version, arch, sha256, license, domains, extractor, homepage, **kw) -> Source:
    filename = f"{package}_{version.replace(':', '%3a')}_{arch}.deb"
    return Source(name, "debian", package, version, filename, sha256, license, domains, extractor, homepage, **kw)


SOURCES: tuple[Source, ...] = (
    Source("sadedegel", "pypi", "sadedegel", "0.21.2", "sadedegel-0.21.2-py3-none-any.whl",
           "79cfb25423178c7381eb6fb1afcf31d576428bddf13a89e68e55a6f9278e7359", "MIT", ("news",),
           extract_sadedegel, "https://github.com/GlobalMaksimum/sadedegel", language_filter=False),
    Source("turkish-treebanks", "pypi", "turkish-treebanks", "1.0.0", "turkish_treebanks-1.0.0-py3-none-any.whl",
           "5a009c29a8e96e8f7e25059d59ac293c3baead6d746bf0fa4c9d3349b1e37ba0", "Apache-2.0", ("web", "wiki"),
           extract_treebank, "https://github.com/google-research-datasets/turkish-treebanks", language_filter=False),
    _deb("manpages-tr", "manpages-tr", "2.0.6-2", "all",
         "babf3ded00dd7c30db8fb333c1ff482fd5a52483d2bffec7557e3f78ed77eef1", "GPL", ("manual",),
         extract_manpages, "https://salsa.debian.org/nbb/manpages-tr"),
    _deb("libreoffice-help-tr", "libreoffice-help-tr", "4:7.4.7-1+deb12u14", "all",
         "8fe832104805b66d2dc5c153564bcc55b5a084e10b3c3a3ea773c4b57659bfb8", "MPL-2.0", ("help",),
         extract_libreoffice_help, "https://www.libreoffice.org"),
    _deb("dict-freedict-eng-tur", "dict-freedict-eng-tur", "2022.04.21-1", "all",
         "dd18d6682827301cb7131fda95728dd4c5ec3d73da6dab1f98619310608fbd99", "GPL-2.0-or-later", ("dictionary",),
         extract_freedict, "https://freedict.org", language_filter=False),
    _deb("libreoffice-l10n-tr", "libreoffice-l10n-tr", "4:7.4.7-1+deb12u14", "all",
         "1dccb8236d6030601faeb27d886b3a6afa051ae6ce91366bccf7fe1891b9837a", "MPL-2.0", ("ui",),
         extract_gettext, "https://www.libreoffice.org"),
    # System catalogs: architecture-specific packages, pinned for amd64 (skipped elsewhere).
    _deb("coreutils-tr", "coreutils", "9.1-1", "amd64",
         "61038f857e346e8500adf53a2a0a20859f4d3a3b51570cc876b153a2d51a3091", "GPL-3.0-or-later", ("ui",),
         extract_gettext, "https://www.gnu.org/software/coreutils/"),
    _deb("bash-tr", "bash", "5.2.15-2+b13", "amd64",
         "82130bb6a560cd2a7234d8018baf73f188f5dd56413d5aa0accc987b2197a6a1", "GPL-3.0-or-later", ("ui",),
         extract_gettext, "https://www.gnu.org/software/bash/"),
    _deb("dpkg-tr", "dpkg", "1.21.23", "amd64",
         "f89e9f8d1a4a50ade44be3ed59a6ec55460fce205d2f8520c5c492137c5b609b", "GPL-2.0-or-later", ("ui",),
         extract_gettext, "https://wiki.debian.org/Teams/Dpkg"),
)
