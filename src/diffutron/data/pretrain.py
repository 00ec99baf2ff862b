"""Pre-training data: documents -> tokens (no special tokens) + EOS each -> one stream -> blocks.

As in the Diffutron reference: every document is tokenized without special tokens, gets the EOS
token appended, all documents are concatenated and the stream is cut into ``max_length`` blocks
(the tail that does not fill a block is dropped). Every token of a block is maskable. The same
packing, with the tail kept, makes the sequences of perplexity evaluation (:func:`pack_documents`).

The held-out split is an explicit source (files, or a hub split) or a deterministic share of
the documents: a document is held out when a hash of ``split_seed`` and its text falls below
``heldout_fraction``, so the split does not depend on file order and a document always lands
on the same side.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..backbone import end_of_text_id
from ..errors import DiffutronError
from .rows import Batch, ReadReport, Row, is_local, iter_rows

DEFAULT_HELDOUT_FRACTION = 0.01
DEFAULT_MAX_LENGTH = 512  # the paper's pre-training length
_TOKENIZE_BATCH = 512


class PackedDataset:
    """Fixed-length token blocks ``ids`` [N, L] (int32), every token maskable and attended."""

    kind = "pretrain"

    def __init__(self, ids: np.ndarray):
        if ids.ndim != 2:
            raise ValueError(f"packed ids must be [N, L], got shape {ids.shape}")
        self.ids = ids

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def max_length(self) -> int:
        return int(self.ids.shape[1])

    def batch(self, indices: Sequence[int]) -> Batch:
        ids = torch.from_numpy(np.asarray(self.ids[np.asarray(indices, dtype=np.int64)], dtype=np.int64))
        ones = torch.ones_like(ids)
        return Batch(ids, ones.bool(), ones)

    def save(self, directory: Path, prefix: str) -> None:
        np.save(directory / f"{prefix}_ids.npy", np.ascontiguousarray(self.ids))

    @classmethod
    def load(cls, directory: Path, prefix: str) -> "PackedDataset":
        return cls(np.load(directory / f"{prefix}_ids.npy", mmap_mode="r"))


@dataclass
class PretrainReport:
    """What building the pre-training data read, kept and dropped."""

    rows: int = 0
    bad_rows: int = 0
    bad_examples: list[str] = field(default_factory=list)
    empty_documents: int = 0
    documents: int = 0
    heldout_documents: int = 0
    tokens: int = 0
    heldout_tokens: int = 0
    sequences: int = 0
    heldout_sequences: int = 0
    dropped_tail_tokens: int = 0

    def summary(self) -> str:
        parts = [f"{self.documents} documents -> {self.sequences} sequences ({self.tokens} tokens)"]
        if self.heldout_sequences:
            parts.append(f"held out {self.heldout_documents} documents -> {self.heldout_sequences} sequences")
        if self.empty_documents:
            parts.append(f"{self.empty_documents} empty documents skipped")
        if self.bad_rows:
            parts.append(f"{self.bad_rows} bad rows skipped (first: {self.bad_examples[0]})")
        return "; ".join(parts)


def document_texts(rows: Iterable[Row], *, text_column: str, source: str, report: PretrainReport,
                   read: ReadReport, skip_bad_rows: bool) -> Iterator[str]:
    """The text of each row; rows without the text field are bad rows, empty texts are skipped."""
    first = True
    for row in rows:
        if first and not is_local(source) and text_column not in row.data:
            # a hub dataset's columns are a schema: a wrong name is never a bad row
            raise DiffutronError(
                f"{source}: no column {text_column!r} (columns: {', '.join(map(str, row.data))}): set data.text_column")
        first = False
        text = row.data.get(text_column)
        if text is None and text_column not in row.data:
            fields = ", ".join(map(str, row.data)) or "none"
            read.bad(f"{row.where}: no {text_column!r} field (fields: {fields}): set data.text_column", skip_bad_rows)
            continue
        if not isinstance(text, str):
            read.bad(f"{row.where}: field {text_column!r} is {type(text).__name__}, not text", skip_bad_rows)
            continue
        if not text.strip():
            report.empty_documents += 1
            continue
        yield text


def heldout_by_hash(text: str, fraction: float, seed: int) -> bool:
    """Deterministic document-level split: True for about ``fraction`` of all texts."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}\0{text}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < fraction


class _Packer:
    """Accumulates tokenized documents, each + its end of text (EOS, else SEP:
    ``backbone.end_of_text_id``), into one stream, cut into blocks at the end."""

    def __init__(self, tokenizer):
        eos = end_of_text_id(tokenizer)
        if eos is None:
            raise DiffutronError("the tokenizer has neither an EOS nor a SEP token to end documents with")
        self.tokenizer = tokenizer
        self.eos = eos
        self.pending: list[str] = []
        self.parts: list[np.ndarray] = []
        self.documents = 0

    def add(self, text: str) -> None:
        self.pending.append(text)
        if len(self.pending) >= _TOKENIZE_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        encoded = self.tokenizer(self.pending, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            arr = np.empty(len(ids) + 1, dtype=np.int32)
            arr[:-1] = ids
            arr[-1] = self.eos
            self.parts.append(arr)
        self.documents += len(self.pending)
        self.pending = []

    def stream(self) -> np.ndarray:
        """Every document added so far, in order, as one int32 stream (the packer starts empty again)."""
        self.flush()
        flat = np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=np.int32)
        self.parts = []
        return flat

    def blocks(self, max_length: int) -> tuple[np.ndarray, int, int]:
        """``(blocks [N, L], tokens, dropped tail tokens)``."""
        flat = self.stream()
        n = len(flat) // max_length
        return flat[: n * max_length].reshape(n, max_length), int(len(flat)), int(len(flat) - n * max_length)


def pack_documents(tokenizer, texts: Iterable[str], max_length: int, *, keep_tail: bool = False) -> list[list[int]]:
    """The sequences pre-training cuts from ``texts``: each text without special tokens + EOS (else
    SEP), concatenated, cut into ``max_length`` pieces. The tail that does not fill a piece is
    dropped, as in training, or with ``keep_tail`` kept as a last, shorter sequence (evaluation
    drops no text).

    Raises:
        DiffutronError: ``max_length`` below 2, or a tokenizer with neither EOS nor SEP.
    """
    if max_length < 2:
        raise DiffutronError(f"invalid max_length={max_length}: must be >= 2")
    packer = _Packer(tokenizer)
    for text in texts:
        packer.add(text)
    stream = packer.stream().tolist()
    end = len(stream) if keep_tail else len(stream) - len(stream) % max_length
    return [stream[i : i + max_length] for i in range(0, end, max_length)]


def build_pretrain(tokenizer, cfg) -> tuple[PackedDataset, PackedDataset | None, PretrainReport]:
    """Training and held-out blocks from ``cfg`` (a :class:`~diffutron.training.config.DataConfig`).

    Returns ``(train, heldout or None, report)``.

    Raises:
        DiffutronError: missing/empty sources, bad rows (unless ``skip_bad_rows``), a wrong text
            column, or too little text for one block of ``max_length`` tokens.
    """
    if cfg.max_length is None:
        cfg = replace(cfg, max_length=DEFAULT_MAX_LENGTH)
    report = PretrainReport()
    read = ReadReport()
    train_packer, held_packer = _Packer(tokenizer), _Packer(tokenizer)
    explicit_heldout = cfg.heldout is not None or cfg.heldout_split is not None
    fraction = 0.0 if explicit_heldout else (
        DEFAULT_HELDOUT_FRACTION if cfg.heldout_fraction is None else cfg.heldout_fraction)

    def read_source(spec: str, split: str, key: str) -> Iterator[str]:
        rows = iter_rows(spec, report=read, skip_bad_rows=cfg.skip_bad_rows, sample_by=cfg.sample_by, split=split,
                         hub_config=cfg.hub_config, revision=cfg.revision, streaming=cfg.streaming,
                         max_rows=cfg.max_rows, key=key)
        yield from document_texts(rows, text_column=cfg.text_column, source=spec, report=report, read=read,
                                  skip_bad_rows=cfg.skip_bad_rows)

    for spec in _as_list(cfg.train):
        for text in read_source(spec, cfg.split, "data.train"):
            if heldout_by_hash(text, fraction, cfg.split_seed):
                held_packer.add(text)
            else:
                train_packer.add(text)
    if cfg.heldout is not None:
        for spec in _as_list(cfg.heldout):
            for text in read_source(spec, cfg.split, "data.heldout"):
                held_packer.add(text)
    elif cfg.heldout_split is not None:
        for spec in _as_list(cfg.train):
            if is_local(spec):
                raise DiffutronError("data.heldout_split applies to hub datasets: give data.heldout files instead")
            for text in read_source(spec, cfg.heldout_split, "data.heldout_split"):
                held_packer.add(text)

    train_ids, report.tokens, dropped = train_packer.blocks(cfg.max_length)
    report.documents = train_packer.documents
    held_ids, report.heldout_tokens, held_dropped = held_packer.blocks(cfg.max_length)
    report.heldout_documents = held_packer.documents
    report.dropped_tail_tokens = dropped + held_dropped
    report.rows, report.bad_rows, report.bad_examples = read.rows, read.bad_rows, list(read.bad_examples)
    report.sequences, report.heldout_sequences = len(train_ids), len(held_ids)

    if report.documents == 0:
        raise DiffutronError(f"data.train: no usable documents in {', '.join(_as_list(cfg.train))}")
    if len(train_ids) == 0:
        raise DiffutronError(
            f"data.train: {report.tokens} tokens do not fill one sequence of data.max_length={cfg.max_length}: "
            "give more text or lower data.max_length")
    heldout = None
    if held_packer.documents and len(held_ids) == 0:
        raise DiffutronError(
            f"the held-out split has {report.heldout_tokens} tokens, less than one sequence of "
            f"data.max_length={cfg.max_length}: raise data.heldout_fraction or give data.heldout")
    if len(held_ids):
        heldout = PackedDataset(held_ids)
    elif explicit_heldout:
        raise DiffutronError("data.heldout: the held-out source holds no usable documents")
    return PackedDataset(train_ids), heldout, report


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)
