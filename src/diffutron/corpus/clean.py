"""Cleaning the extracted text: markup out, Turkish lines only, boilerplate lines once.

``clean_text`` cleans one document (tags and entities out, NFC, whitespace normalised,
hyphenated line breaks re-joined) and, with its language filter, drops every line that
``is_turkish`` rejects. ``clean_extra`` normalises the strings of a document's annotations
the same way; ``remove_boilerplate`` keeps a line repeated across many documents of one
source only once. ``diffutron.corpus.build`` runs them in that order.
"""

from __future__ import annotations

import html
import re
from collections import Counter

from ..text import nfc, normalize_whitespace, tr_lower, words
from .extractors import Document

__all__ = ["is_turkish", "clean_text", "clean_extra", "remove_boilerplate"]


# Function words and frequent short words; strong evidence for one language in a line.
_TR_WORDS = frozenset("""
ve ile bir bu şu o da de ki mi mı mu mü için gibi daha çok en ne ya veya ama fakat ancak
olarak olan olur olup oldu değil var yok her hem kadar sonra önce göre ise diye eğer sadece
yani tüm bütün bazı birçok artık hiç nasıl neden niçin kendi biz siz onlar ben sen şey
yeni eski ayrıca seçin tıklayın dosya belge açık
""".split())
_EN_WORDS = frozenset("""
the and of to is in for that with this are be by on as it you or an from not can will which
if use used using your have has was were when all there their these those also into than
then more other only such may should would could must each its see how what where click
select choose file document open insert image table tab format menu window dialog box
button field value values function returns example following page go press enter
""".split()) - _TR_WORDS
_TR_CHARS = frozenset("çğıöşüÇĞİÖŞÜ")
_TR_SUFFIX = re.compile(r"(?:lar|ler|ları|leri|dır|dir|dur|dür|tır|tir|mak|mek|yor|nın|nin|dan|den|tan|ten)$")
_EN_PATTERN = re.compile(r"(?:th|wh|ght|tion|ing$|ed$|ly$|w)")


def is_turkish(line: str) -> bool:
    """Whether a line of text reads as Turkish (a cheap, explainable heuristic).

    Each word votes Turkish (a Turkish function word or a Turkish-only letter: 1; a common
    Turkish suffix: 0.5) or English (an English function word: 1; an English spelling
    pattern such as "th", "w", "-tion": 0.5). A line is Turkish when the Turkish votes win
    outright; lines without evidence (numbers, symbols, bare names) are not.
    """
    tr = en = 0.0
    for raw in words(line):
        if raw.isdigit():
            continue
        w = tr_lower(raw)
        if w in _TR_WORDS or not _TR_CHARS.isdisjoint(raw):
            tr += 1
        elif w in _EN_WORDS:
            en += 1
        elif _EN_PATTERN.search(w):
            en += 0.5
        elif _TR_SUFFIX.search(w):
            tr += 0.5
    return tr > en


_TAG = re.compile(r"</?[A-Za-z][^<>]{0,200}>")
_ENTITY = re.compile(r"&(?:[A-Za-z]+|#\d+|#x[0-9A-Fa-f]+);")
_HYPHEN_WRAP = re.compile(r"(\w)-\n(?=[a-zçğıöşü])")


def clean_text(text: str, language_filter: bool = True) -> tuple[str, int]:
    """Clean one document; returns ``(text, lines_dropped)``.

    Markup tags and entities out, NFC, whitespace normalised (paragraphs kept), words
    hyphenated across a line break re-joined, and with ``language_filter`` every line that
    ``is_turkish`` rejects dropped.
    """
    text = _TAG.sub(" ", text)
    if _ENTITY.search(text):
        text = html.unescape(text)
    text = normalize_whitespace(nfc(text))
    text = _HYPHEN_WRAP.sub(r"\1", text)
    if not language_filter:
        return text, 0
    kept, dropped = [], 0
    for line in text.split("\n"):
        if not line or is_turkish(line):
            kept.append(line)
        else:
            dropped += 1
    return normalize_whitespace("\n".join(kept)), dropped


def clean_extra(value):
    """NFC and one-line whitespace for every string inside an annotation structure."""
    if isinstance(value, str):
        value = nfc(value)
        if not value.isprintable() or "  " in value or value != value.strip():
            value = normalize_whitespace(value, keep_newlines=False)
        return value
    if isinstance(value, list):
        return [clean_extra(v) for v in value]
    if isinstance(value, dict):
        return {k: clean_extra(v) for k, v in value.items()}
    return value


def remove_boilerplate(docs: list[Document], max_repeats: int, min_spaces: int = 3) -> int:
    """Keep a line (of 4+ words) repeated in more than ``max_repeats`` documents of one source only once."""
    per_source: dict[str, Counter] = {}
    for doc in docs:
        counts = per_source.setdefault(doc.source, Counter())
        counts.update({line for line in doc.text.split("\n") if line.count(" ") >= min_spaces})
    removed = 0
    seen: set[tuple[str, str]] = set()
    for doc in docs:
        counts = per_source[doc.source]
        if not any(counts[line] > max_repeats for line in doc.text.split("\n") if line in counts):
            continue
        kept = []
        for line in doc.text.split("\n"):
            if counts.get(line, 0) > max_repeats:
                if (doc.source, line) in seen:
                    removed += 1
                    continue
                seen.add((doc.source, line))
            kept.append(line)
        doc.text = normalize_whitespace("\n".join(kept))
    return removed
