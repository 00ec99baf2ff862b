"""Is a word Turkish? Stems of Debian's hunspell-tr dictionary, and the Turkish-word share of text.

The measure (the model card's "Turkish-word share"):

1. words are ``diffutron.text.words`` of the text, lower-cased with Turkish rules (``I`` -> ``ı``,
   ``İ`` -> ``i``) and reduced to their letters (``"İstanbul'a"`` -> ``"istanbula"``); a word with no
   letter (a number) is not counted at all;
2. a word counts as Turkish when the longest stem of ``tr_TR.dic`` that is a prefix of it covers at
   least half of its letters (``len(stem) >= len(word) / 2``);
3. the share is Turkish words / counted words.

Only ``tr_TR.dic`` of the pinned ``hunspell-tr`` package is used (never its affix rules): its stems
(the part of each line before ``/``) go through the same lower-casing and letters-only step. The file
is fetched at build time through ``diffutron.corpus.sources`` (``apt-get download``, sha256 checked)
and kept as ``<cache>/lexicon/tr_TR.dic``; nothing of it is committed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from ..errors import DiffutronError
from ..text import tr_lower, words
from .archives import Archive, SourceError, open_archive
from .sources import Source, _deb, cache_root, fetch

__all__ = [
    "HUNSPELL_TR",
    "DIC_MEMBER",
    "default_lexicon_path",
    "fetch_lexicon",
    "load_stems",
    "parse_dic",
    "letters",
    "is_turkish_word",
    "turkish_word_share",
]

DIC_MEMBER = "usr/share/hunspell/tr_TR.dic"


def _no_documents(archive: Archive):  # the lexicon is a word list, never corpus text
    return iter(())


HUNSPELL_TR: Source = _deb(
    "hunspell-tr", "hunspell-tr", "1:7.5.0-1", "all",
    "c4d444d5f541678d4b29ceecd4527f8f9a12887c933cdf2257947aa6b592953b", "MPL-2.0", ("lexicon",),
    _no_documents, "https://github.com/hrzafer/hunspell-tr", language_filter=False)


def default_lexicon_path() -> Path:
    """``<cache>/lexicon/tr_TR.dic`` (see ``diffutron.corpus.sources.cache_root``)."""
    return cache_root() / "lexicon" / "tr_TR.dic"


def fetch_lexicon(path: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """``tr_TR.dic`` on disk: the cached copy, else extracted from the verified hunspell-tr package.

    Raises:
        DiffutronError: the package cannot be downloaded (offline, no apt-get) or holds no tr_TR.dic.
    """
    target = Path(path) if path is not None else default_lexicon_path()
    if target.is_file():
        return target
    try:
        archive = open_archive(fetch(HUNSPELL_TR, cache_dir, timeout=120))
        data = archive.read(DIC_MEMBER)
    except (SourceError, KeyError) as err:
        raise DiffutronError(f"no Turkish lexicon at {target} and hunspell-tr could not be fetched ({err}); "
                             "on an offline machine copy tr_TR.dic there (or set DIFFUTRON_LEXICON)") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tr_TR.dic.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
    return target


def letters(word: str) -> str:
    """``word`` lower-cased with Turkish rules, letters only: ``"İstanbul'a"`` -> ``"istanbula"``."""
    return "".join(c for c in tr_lower(word) if c.isalpha())


def parse_dic(text: str) -> frozenset[str]:
    """The stems of a hunspell ``.dic`` file (first line: the entry count), as ``letters`` gives them."""
    stems = set()
    for i, line in enumerate(text.splitlines()):
        if i == 0 and line.strip().isdigit():
            continue
        stem = letters(line.split("/", 1)[0].strip())
        if stem:
            stems.add(stem)
    return frozenset(stems)


_STEMS: dict[str, frozenset[str]] = {}


def load_stems(path: str | Path | None = None) -> frozenset[str]:
    """The stems of ``tr_TR.dic`` (cached per process).

    ``path`` defaults to ``$DIFFUTRON_LEXICON``, else ``default_lexicon_path()`` (fetched there when
    missing, see ``fetch_lexicon``). ``DIFFUTRON_LEXICON=none`` says there is none (an offline machine:
    no download is tried).

    Raises:
        DiffutronError: no lexicon (see ``fetch_lexicon``), or ``DIFFUTRON_LEXICON=none``.
    """
    env = os.environ.get("DIFFUTRON_LEXICON")
    if path is None and env is not None and env.strip().lower() in ("", "none", "off"):
        raise DiffutronError(f"DIFFUTRON_LEXICON={env!r}: no Turkish lexicon on this machine")
    if path is None and env:
        path = env
    resolved = fetch_lexicon(path)
    key = str(resolved.resolve())
    if key not in _STEMS:
        _STEMS[key] = parse_dic(resolved.read_text(encoding="utf-8"))
    return _STEMS[key]


def is_turkish_word(word: str, stems: Iterable[str] | frozenset[str]) -> bool | None:
    """Whether the longest stem that is a prefix of ``letters(word)`` covers >= 50% of its letters;
    ``None`` for a word without letters (it is not counted)."""
    w = letters(word)
    if not w:
        return None
    need = (len(w) + 1) // 2  # len(stem) >= len(w) / 2
    return any(w[:k] in stems for k in range(len(w), need - 1, -1))


def turkish_word_share(texts: Iterable[str] | str, stems: Iterable[str] | frozenset[str]) -> dict:
    """``{"share", "words", "turkish"}`` over all words of ``texts`` (``share`` None without words)."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(stems, (set, frozenset)):
        stems = frozenset(stems)
    total = turkish = 0
    for text in texts:
        for word in words(text):
            verdict = is_turkish_word(word, stems)
            if verdict is None:
                continue
            total += 1
            turkish += verdict
    return {"share": turkish / total if total else None, "words": total, "turkish": turkish}
