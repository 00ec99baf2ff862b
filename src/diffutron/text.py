"""Turkish text helpers used across diffutron.

Python's ``str.lower`` / ``str.upper`` are wrong for Turkish: ``"I".lower()`` is ``"i"``
(Turkish: ``"ı"``) and ``"İ".lower()`` is ``"i̇"`` (``i`` plus a combining dot). Everything
that changes or compares the case of Turkish text goes through the functions here.

- ``nfc``: Unicode NFC (``"I" + U+0307`` becomes ``"İ"``, decomposed ``ş`` becomes ``ş``).
- ``tr_lower`` / ``tr_upper`` / ``tr_capitalize`` / ``tr_casefold``: Turkish casing.
- ``normalize_whitespace``: one space between words, stripped lines, at most one blank line.
- ``words`` / ``count_words``: words for per-word statistics and metrics; an apostrophe
  between letters keeps a proper noun and its suffix together (``"Ankara'nın"``).
- ``split_sentences``: a small rule-based Turkish sentence splitter.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = [
    "nfc",
    "tr_lower",
    "tr_upper",
    "tr_capitalize",
    "tr_casefold",
    "normalize_whitespace",
    "words",
    "count_words",
    "split_sentences",
    "TURKISH_LETTERS",
]

TURKISH_LETTERS = "abcçdefgğhıijklmnoöprsştuüvyzABCÇDEFGĞHIİJKLMNOÖPRSŞTUÜVYZ"



def nfc(text: str) -> str:
    """Return ``text`` in Unicode normal form C."""
    return unicodedata.normalize("NFC", text)


def tr_lower(text: str) -> str:
    """Lower-case with Turkish rules: ``I`` -> ``ı`` and ``İ`` -> ``i`` (input is NFC-normalised)."""
    return nfc(text).replace("I", "ı").replace("İ", "i").lower()


def tr_upper(text: str) -> str:
    """Upper-case with Turkish rules: ``i`` -> ``İ`` and ``ı`` -> ``I`` (input is NFC-normalised)."""
    return nfc(text).replace("i", "İ").replace("ı", "I").upper()


def tr_capitalize(text: str) -> str:
    """Upper-case the first character with Turkish rules; the rest is left as it is.

    Unlike ``str.capitalize`` the rest is not lower-cased, so ``"iPhone'u"`` becomes
    ``"İPhone'u"`` and ``"istanbul Boğazı"`` becomes ``"İstanbul Boğazı"``.
    """
    text = nfc(text)
    return tr_upper(text[:1]) + text[1:]


def tr_casefold(text: str) -> str:
    """Case-insensitive comparison key with Turkish rules (``tr_lower`` then ``str.casefold``)."""
    return tr_lower(text).casefold()


# Characters that render as (or next to) a space but are not ASCII space.
_SPACES = re.compile(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
# Invisible characters that only get in the way of tokenisation and matching.
_INVISIBLE = re.compile(r"[\u00ad\u200b-\u200d\u2060\ufeff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_whitespace(text: str, keep_newlines: bool = True) -> str:
    """Collapse runs of spaces (any Unicode space) to one, drop invisible/control characters.

    With ``keep_newlines`` lines are stripped and at most one blank line is kept between
    paragraphs; otherwise all whitespace, newlines included, becomes single spaces.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n")
    text = _INVISIBLE.sub("", text)
    text = _CONTROL.sub(" ", text)
    if not keep_newlines:
        return " ".join(text.split())
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


# A word: a number with inner separators ("1.79", "3,5", "10:30"), or letters/digits with
# inner apostrophes or hyphens ("Ankara'nın", "Türkiye’de", "e-posta").
_WORD = re.compile(r"\d+(?:[.,:]\d+)+|[^\W_]+(?:['’\-][^\W_]+)*")


def words(text: str) -> list[str]:
    """Split ``text`` into words; punctuation is dropped, inner apostrophes/hyphens kept."""
    return _WORD.findall(nfc(text))


def count_words(text: str) -> int:
    """Number of ``words`` in ``text``."""
    return len(_WORD.findall(nfc(text)))


# Abbreviations after which a period does not end a sentence (compared lower-cased).
_ABBREVIATIONS = frozenset(
    """
    dr prof doç yrd av op uzm öğr gör sn bkz vb vs vd örn ör mah cad sok apt no tel
    st mr mrs ms vol ed ss s yy bk çev haz der yay jr sr inc ltd şti a.ş a.ş.
    """.split()
)
# A sentence ends at . ! ? … (optionally followed by closing quotes/brackets) when whitespace
# and an upper-case letter, digit or opening quote follow.
_BOUNDARY = re.compile(r"([.!?…]+[\"'”’)\]]*)\s+(?=[\"'“‘(\[]?[A-ZÇĞİÖŞÜÂÎÛ0-9])")


def split_sentences(text: str) -> list[str]:
    """Split Turkish text into sentences with simple rules.

    Lines are split separately (a line break always ends a sentence). A period does not end
    a sentence after a known abbreviation (``Dr.``, ``vb.``), a single letter (``A.``) or a
    number of at most three digits, which in Turkish is usually an ordinal (``19. yüzyıl``).
    """
    sentences: list[str] = []
    for line in nfc(text).split("\n"):
        line = line.strip()
        if not line:
            continue
        start = 0
        for match in _BOUNDARY.finditer(line):
            end = match.end(1)
            if match.group(1).startswith(".") and len(match.group(1)) == 1:
                before = line[start : match.start(1)].rsplit(maxsplit=1)
                last = before[-1] if before else ""
                if tr_lower(last) in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
                    continue
                if last.isdigit() and len(last) <= 3:
                    continue
            piece = line[start:end].strip()
            if piece:
                sentences.append(piece)
            start = match.end()
        tail = line[start:].strip()
        if tail:
            sentences.append(tail)
    return sentences


_TURKISH_ONLY = set("şğıİŞĞ")  # letters a Turkish text has and a Western European one lacks


def undecodable(sample: bytes, path: str = "FILE") -> str:
    """What bytes that are not UTF-8 look like, and how to convert them: UTF-16 (a byte-order
    mark), binary data (NUL or many control bytes), Turkish in Windows-1254 / ISO-8859-9 (legacy
    Turkish code pages: ş ğ ı İ decode there), or an unknown 8-bit code page."""
    if sample.startswith((b"\xff\xfe", b"\xfe\xff")):
        return f"it is UTF-16 text: convert it with `iconv -f UTF-16 -t UTF-8 {path} > {path}.utf8`"
    control = sum(b < 9 or 13 < b < 32 for b in sample)
    if b"\x00" in sample or control > len(sample) // 20:
        return "it holds binary data, not text: give a text file (.txt, .jsonl, .json) or .parquet"
    text = sample.decode("cp1254", errors="replace")
    if _TURKISH_ONLY & set(text):
        return ("it looks like Turkish in Windows-1254 (or ISO-8859-9): convert it with "
                f"`iconv -f CP1254 -t UTF-8 {path} > {path}.utf8`")
    return f"it is in an 8-bit code page: convert it to UTF-8 (e.g. `iconv -f CP1252 -t UTF-8 {path} > {path}.utf8`)"
