"""Rows of training data from local files and Hugging Face datasets, each with where it came from.

Every row carries its location (``file.jsonl:12``, ``owner/name[train] row 7``), so a bad row
fails with a message naming it, or, with ``skip_bad_rows``, is skipped, counted and reported.

Local ``.txt``, ``.jsonl`` and ``.json`` files are read here, line by line with strict UTF-8
(a leading BOM is dropped): the ``datasets`` json builder reports neither the file nor the line
of a bad row and cannot skip one. Parquet files and hub datasets are read through ``datasets``
(streaming or downloaded). ``hf://datasets/OWNER/NAME/PATH`` names one file of a hub dataset
repository: it is downloaded with ``huggingface_hub`` and read like a local file (the way to
read LlamaTurk's BOM-prefixed JSON file).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..errors import DiffutronError
from ..text import undecodable

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
HF_FILE_PREFIX = "hf://datasets/"


@dataclass
class Row:
    """One row: a mapping of fields and where it came from."""

    data: dict
    where: str
    source: str = ""  # the file or dataset the row came from


@dataclass
class Batch:
    """What the MDLM loss needs: clean ids, the maskable positions, attention, optional weights."""

    input_ids: torch.Tensor  # [B, L] long
    maskable: torch.Tensor  # [B, L] bool
    attention_mask: torch.Tensor  # [B, L] long
    target_weight: torch.Tensor | None = None  # [B, L] float, or None (all 1)

    def rows(self, start: int, stop: int) -> "Batch":
        """The rows ``start:stop`` (one process's share of a global batch)."""
        w = self.target_weight[start:stop] if self.target_weight is not None else None
        return Batch(self.input_ids[start:stop], self.maskable[start:stop], self.attention_mask[start:stop], w)

    def to(self, device) -> "Batch":
        w = self.target_weight.to(device) if self.target_weight is not None else None
        return Batch(self.input_ids.to(device), self.maskable.to(device), self.attention_mask.to(device), w)

    @property
    def tokens(self) -> int:
        """Tokens the model reads (attended positions)."""
        return int(self.attention_mask.sum())


@dataclass
class ReadReport:
    """Counts of what reading a source kept and skipped."""

    rows: int = 0
    bad_rows: int = 0
    bad_examples: list[str] = field(default_factory=list)

    def bad(self, message: str, skip: bool) -> None:
        """A bad row: fatal unless ``skip``, then counted (the first five messages kept)."""
        if not skip:
            raise DiffutronError(f"{message} (pass --skip-bad-rows / data.skip_bad_rows to skip such rows)")
        self.bad_rows += 1
        if len(self.bad_examples) < 5:
            self.bad_examples.append(message)


# ---------------------------------------------------------------------------------------------
# naming sources


def is_local(spec: str) -> bool:
    """A local path (existing, or shaped like a path) rather than a hub dataset id."""
    if spec.startswith(HF_FILE_PREFIX):
        return False
    if os.path.exists(os.path.expanduser(spec)) or any(ch in spec for ch in "*?["):
        return True
    return (
        spec.startswith((".", "/", "~"))
        or spec.lower().endswith(LOCAL_SUFFIXES)
        or spec.count("/") != 1
    )


def local_files(spec: str, key: str = "data.train") -> list[Path]:
    """The data files a local spec names: a file, a directory (its data files, recursively) or a glob.

    Raises:
        DiffutronError: nothing there, or a file of an unsupported kind.
    """
    path = Path(os.path.expanduser(spec))
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
        if not files:
            raise DiffutronError(f"{key}: no file matches {spec}")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
        if not files:
            raise DiffutronError(f"{key}: directory {spec} holds no {'/'.join(LOCAL_SUFFIXES)} files")
    elif path.is_file():
        files = [path]
    else:
        hint = " (hub datasets are named owner/name)" if "/" not in spec and not path.suffix else ""
        raise DiffutronError(f"{key}: data file {spec} does not exist{hint}")
    for f in files:
        if f.suffix.lower() not in LOCAL_SUFFIXES:
            raise DiffutronError(f"{key}: {f} is not a {', '.join(LOCAL_SUFFIXES)} file")
    return files


def check_sources(specs, key: str = "data.train") -> None:
    """Fail early (before any training) on local files that are missing."""
    for spec in [specs] if isinstance(specs, str) else list(specs or []):
        if is_local(spec):
            local_files(spec, key)


def _download(spec: str, revision: str | None) -> Path:
    rest = spec[len(HF_FILE_PREFIX):]
    parts = rest.split("/")
    if len(parts) < 3:
        raise DiffutronError(f"{spec}: write hf://datasets/OWNER/NAME/PATH/TO/FILE")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename, repo_type="dataset", revision=revision))
    except Exception as err:  # offline, missing file, gated repo: one line for the user
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DiffutronError(f"cannot download {spec}: {text}") from None


# ---------------------------------------------------------------------------------------------
# reading


def iter_rows(
    spec: str,
    *,
    report: ReadReport,
    skip_bad_rows: bool = False,
    sample_by: str = "line",
    split: str = "train",
    hub_config: str | None = None,
    revision: str | None = None,
    streaming: bool = False,
    max_rows: int | None = None,
    key: str = "data.train",
) -> Iterator[Row]:
    """Rows of one source (a local file / directory / glob, ``hf://datasets/...`` or a hub id).

    ``.txt`` rows are ``{"text": ...}`` (one per line, blank-line paragraph or file: ``sample_by``).
    At most ``max_rows`` rows are read per file or dataset.

    Raises:
        DiffutronError: missing or empty files, bad UTF-8, JSON that does not parse (with file and
            line, unless ``skip_bad_rows``), a hub dataset that cannot be loaded.
    """
    if spec.startswith(HF_FILE_PREFIX):
        files = [_download(spec, revision)]
    elif is_local(spec):
        files = local_files(spec, key)
    else:
        yield from _hub_rows(spec, split=split, hub_config=hub_config, revision=revision, streaming=streaming,
                             max_rows=max_rows, report=report)
        return
    for path in files:
        n = 0
        for row in _file_rows(path, sample_by=sample_by, report=report, skip=skip_bad_rows):
            if max_rows is not None and n >= max_rows:
                break
            n += 1
            report.rows += 1
            row.source = str(path)
            yield row
        if n == 0 and report.bad_examples:
            raise DiffutronError(f"{path}: no row could be read; the first: {report.bad_examples[0]}")
        if n == 0:
            raise DiffutronError(f"{path} is empty: it holds no rows")


def _file_rows(path: Path, *, sample_by: str, report: ReadReport, skip: bool) -> Iterator[Row]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(path)
    elif suffix == ".json":
        yield from _json_rows(path, report=report, skip=skip)
    elif suffix == ".jsonl":
        for lineno, line in _lines(path, report=report, skip=skip):
            if not line.strip():
                continue
            row = _parse_object(line, f"{path}:{lineno}", report=report, skip=skip)
            if row is not None:
                yield row
    else:
        yield from _text_rows(path, sample_by=sample_by, report=report, skip=skip)


LINE_CHUNK = 1 << 20  # text lines are read in pieces of at most this many bytes (1 MiB)
BAR_BYTES = 64 << 20  # files at least this large show a progress bar while they are read


def _lines(path: Path, *, report: ReadReport, skip: bool, split_long: bool = False) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 file, read in bounded pieces: with ``split_long`` a line
    longer than ``LINE_CHUNK`` bytes comes out as several (cut at its last space, else between two
    characters), so that a 12 MB one-line file is many rows, not one; without it the pieces are
    joined (a JSON line must be whole)."""
    from tqdm import tqdm

    size = path.stat().st_size
    described = False

    def decoded(lineno: int, raw: bytes) -> Iterator[tuple[int, str]]:
        nonlocal described
        try:
            yield lineno, raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as err:
            what = ""
            if not described:  # the first bad line says what the file looks like
                with open(path, "rb") as head:
                    what = f": {undecodable(head.read(1 << 16), str(path))}"
                described = True
            report.bad(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                       f"{what}", skip)

    with open(path, "rb") as fh, tqdm(total=size, unit="B", unit_scale=True, desc=f"reading {path.name}",
                                      disable=size < BAR_BYTES, leave=False) as bar:
        lineno, carry = 1, b""
        while piece := fh.readline(LINE_CHUNK):
            bar.update(len(piece))
            raw = carry + piece
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw.endswith(b"\n"):
                yield from decoded(lineno, raw)
                lineno, carry = lineno + 1, b""
            elif not split_long:
                carry = raw
            else:
                cut = raw.rfind(b" ")
                if cut > 0:  # the space itself is dropped
                    yield from decoded(lineno, raw[:cut])
                    carry = raw[cut + 1 :]
                    continue
                cut = len(raw) - 1  # no space: cut before the last character's first byte
                while cut > 0 and raw[cut] & 0xC0 == 0x80:
                    cut -= 1
                yield from decoded(lineno, raw[:cut])
                carry = raw[cut:]
        if carry:
            yield from decoded(lineno, carry)


def _parse_object(text: str, where: str, *, report: ReadReport, skip: bool) -> Row | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        report.bad(f"{where}: not valid JSON ({err.msg} at column {err.colno})", skip)
        return None
    if not isinstance(obj, dict):
        report.bad(f"{where}: expected a JSON object, got {type(obj).__name__}", skip)
        return None
    return Row(obj, where)


def _json_rows(path: Path, *, report: ReadReport, skip: bool) -> Iterator[Row]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DiffutronError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x}): re-encode the file as UTF-8") from None
    stripped = text.lstrip()
    if not stripped:
        return
    if stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON Lines saved with a .json name
        if isinstance(whole, dict):
            lists = [v for v in whole.values() if isinstance(v, list)]
            if len(whole) == 1 and len(lists) == 1:  # {"data": [rows...]}
                for i, item in enumerate(lists[0]):
                    if isinstance(item, dict):
                        yield Row(item, f"{path}: item {i}")
                    else:
                        report.bad(f"{path}: item {i}: expected a JSON object, got {type(item).__name__}", skip)
            else:
                yield Row(whole, f"{path}:1")
            return
    if not stripped.startswith("["):  # JSON Lines saved with a .json name
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                row = _parse_object(line, f"{path}:{lineno}", report=report, skip=skip)
                if row is not None:
                    yield row
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DiffutronError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not isinstance(item, dict):
            report.bad(f"{where}: expected a JSON object, got {type(item).__name__}", skip)
            continue
        yield Row(item, where)


def _text_rows(path: Path, *, sample_by: str, report: ReadReport, skip: bool) -> Iterator[Row]:
    if sample_by == "document":
        lines = [line for _, line in _lines(path, report=report, skip=skip)]
        text = "\n".join(lines)
        if text.strip():
            yield Row({"text": text}, f"{path}:1")
        return
    para: list[str] = []
    start = 0
    for lineno, line in _lines(path, report=report, skip=skip, split_long=True):
        if sample_by == "line":
            if line.strip():
                yield Row({"text": line}, f"{path}:{lineno}")
            continue
        if line.strip():
            if not para:
                start = lineno
            para.append(line)
        elif para:
            yield Row({"text": "\n".join(para)}, f"{path}:{start}")
            para = []
    if para:
        yield Row({"text": "\n".join(para)}, f"{path}:{start}")


def _parquet_rows(path: Path) -> Iterator[Row]:
    from datasets import load_dataset

    try:
        ds = load_dataset("parquet", data_files=str(path), split="train", streaming=True)
        for i, row in enumerate(ds):
            yield Row(dict(row), f"{path}: row {i}")
    except DiffutronError:
        raise
    except Exception as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DiffutronError(f"{path}: cannot read this parquet file: {text}") from None


def _hub_rows(spec, *, split, hub_config, revision, streaming, max_rows, report: ReadReport) -> Iterator[Row]:
    from datasets import load_dataset

    streaming = streaming or max_rows is not None  # a few rows: never download the whole dataset for them
    try:
        ds = load_dataset(spec, name=hub_config, split=split, streaming=streaming, revision=revision)
    except Exception as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = " (offline: download it where you are online and pass the local files)" if offline else ""
        raise DiffutronError(f"cannot load dataset {spec!r} (split {split}){hint}: {text}") from None
    n = 0
    for i, row in enumerate(ds):
        if max_rows is not None and n >= max_rows:
            break
        n += 1
        report.rows += 1
        yield Row(dict(row), f"{spec}[{split}] row {i}", spec)
    if n == 0:
        raise DiffutronError(f"dataset {spec!r} split {split} is empty")
