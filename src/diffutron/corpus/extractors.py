"""The text extractors: one function per package format, from an ``Archive`` to ``Document``s.

- ``extract_sadedegel``: sadedegel's news articles (sentence-split JSON, annotators' rounds);
- ``extract_treebank``: Turkish Web Treebank CoNLL-U sentences grouped into documents
  (``parse_conllu_sentence``);
- ``extract_manpages``: Turkish man pages rendered with groff;
- ``extract_libreoffice_help``: LibreOffice help pages (``help_page_text``, HTML to lines);
- ``extract_freedict``: FreeDict English -> Turkish dictd entries (``parse_dictd_entry``);
- ``extract_gettext``: translated UI messages of gettext ``.mo`` catalogs (``parse_mo``,
  ``clean_ui_message``).

Nothing extracted here is cleaned beyond what the format needs (markup removed, structure
turned into lines); cleaning lives in ``diffutron.corpus.clean``, de-duplication in
``diffutron.corpus.dedupe``. Which package uses which extractor is pinned in
``diffutron.corpus.sources``.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import html
import json
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from typing import Iterator

from .archives import Archive, SourceError

__all__ = [
    "Document",
    "extract_sadedegel",
    "parse_conllu_sentence",
    "extract_treebank",
    "extract_manpages",
    "help_page_text",
    "extract_libreoffice_help",
    "parse_dictd_entry",
    "extract_freedict",
    "parse_mo",
    "clean_ui_message",
    "extract_gettext",
]


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
