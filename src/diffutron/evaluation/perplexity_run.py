"""``diffutron eval perplexity``: texts -> sequences as in pre-training -> the ELBO perplexity bound.

Documents are tokenized without special tokens, each gets the EOS token, they are concatenated
and cut into sequences of the model's context length, as in pre-training, by pre-training's own
packer (``data.pretrain.pack_documents``; the last, shorter sequence is kept: evaluation drops no
text). The bound itself is
:func:`diffutron.likelihood.elbo_perplexity`; words are counted with ``diffutron.text``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..data.pretrain import pack_documents
from ..errors import DiffutronError
from ..likelihood import PerplexityResult, elbo_perplexity
from ..text import count_words
from .provenance import provenance

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")


def read_texts(
    spec: str, *, column: str = "text", split: str = "test", config: str | None = None, limit: int | None = None
) -> tuple[list[str], dict]:
    """The documents of a local file or a hub dataset, and where they came from.

    A ``.txt`` file holds one document per non-empty line; ``.jsonl`` / ``.json`` (a list of
    objects) / ``.parquet`` / ``.csv`` files and hub datasets hold one per row, in ``column``.
    Empty documents are skipped. ``limit`` keeps the first N documents.

    Raises:
        DiffutronError: a missing file, an unreachable hub dataset, a missing column, no text.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DiffutronError(f"invalid limit={limit!r}: give a number of documents >= 1 (or no limit)")
    path = Path(spec).expanduser()
    if path.is_file():
        rows, source = _read_file(path, column)
    elif path.exists() or spec.lower().endswith(TEXT_SUFFIXES) or spec.startswith((".", "/", "~")):
        raise DiffutronError(f"--data {spec}: no such file (give a {'/'.join(TEXT_SUFFIXES)} file or a hub dataset id)")
    else:
        rows, source = _read_hub(spec, column, split, config)
    texts = []
    for i, value in enumerate(rows):
        if value is None:
            continue
        if not isinstance(value, str):
            raise DiffutronError(f"{source['location']}: row {i} of column {column!r} is {type(value).__name__}, not text")
        if value.strip():
            texts.append(value)
    if not texts:
        raise DiffutronError(f"{source['location']} holds no text (column {column!r} is empty)")
    return (texts[:limit] if limit else texts), source


def _read_file(path: Path, column: str) -> tuple[list, dict]:
    import hashlib

    suffix = path.suffix.lower()
    location = str(path)
    try:
        if suffix == ".txt":
            rows = path.read_text(encoding="utf-8-sig").splitlines()
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if column not in table.column_names:
                raise DiffutronError(f"{path} has no column {column!r} (it has: {', '.join(table.column_names)}): "
                                     "pass --column")
            rows = table.column(column).to_pylist()
        elif suffix in (".jsonl", ".json", ".csv"):
            records = _records(path, suffix)
            if records and column not in records[0]:
                raise DiffutronError(f"{path} has no column {column!r} (it has: {', '.join(map(str, records[0]))}): "
                                     "pass --column")
            rows = [r.get(column) for r in records]
        else:
            raise DiffutronError(f"{path}: read {', '.join(TEXT_SUFFIXES)} files")
    except (OSError, UnicodeDecodeError) as err:
        raise DiffutronError(f"cannot read {path}: {err}") from None
    return rows, {"kind": "local", "location": location, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _records(path: Path, suffix: str) -> list[dict]:
    with path.open(encoding="utf-8-sig", newline="" if suffix == ".csv" else None) as f:
        if suffix == ".csv":
            return list(csv.DictReader(f))
        if suffix == ".json":
            data = json.load(f)
            if not isinstance(data, list):
                raise DiffutronError(f"{path}: a .json file must hold a list of objects (or use .jsonl)")
            return data
        records = []
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DiffutronError(f"{path}:{lineno}: not JSON ({err.msg})") from None
        return records


def _read_hub(spec: str, column: str, split: str, config: str | None) -> tuple[list, dict]:
    try:
        import datasets

        ds = datasets.load_dataset(spec, config, split=split)
    except Exception as err:  # offline, unknown split or config: one line for the user
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DiffutronError(f"cannot load {spec} ({split}) from the Hugging Face hub: {text}; where offline, "
                             "pass a local file") from None
    if column not in ds.column_names:
        raise DiffutronError(f"{spec} has no column {column!r} (it has: {', '.join(ds.column_names)}): pass --column")
    location = f"{spec}{' / ' + config if config else ''} / {split}"
    return ds[column], {"kind": "hub", "location": location, "fingerprint": getattr(ds, "_fingerprint", None)}


def run_perplexity(
    lm,
    data: str,
    *,
    column: str = "text",
    split: str = "test",
    config: str | None = None,
    limit: int | None = None,
    max_length: int | None = None,
    mc_samples: int = 4,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> tuple[PerplexityResult, dict]:
    """The ELBO perplexity bound of ``lm`` on the documents of ``data`` (a file or hub id).

    Returns ``(result, record)`` where ``record`` is the JSON-ready result with its source and
    provenance. Raises DiffutronError on bad data or settings.
    """
    texts, source = read_texts(data, column=column, split=split, config=config, limit=limit)
    length = max_length or lm.context_length
    if length > lm.context_length:
        raise DiffutronError(f"--max-length {length} exceeds the model's context of {lm.context_length} tokens")
    sequences = pack_documents(lm.tokenizer, texts, length, keep_tail=True)
    words = sum(count_words(t) for t in texts)
    result = elbo_perplexity(
        lm.model, sequences, mask_token_id=lm.mask_token_id, seed=seed, mc_samples=mc_samples,
        batch_size=batch_size, words=words, pad_token_id=lm.pad_token_id,
        progress="ELBO perplexity" if progress else False,
    )
    settings = {"data": data, "column": column, "split": split, "config": config, "limit": limit,
                "max_length": length, "mc_samples": mc_samples, "batch_size": batch_size, "seed": seed,
                "schedule": "linear", "eps": 1e-3, "t_sampling": "iid", "documents": len(texts),
                "packing": "documents + EOS, concatenated, cut at max_length (tail kept)"}
    record = {"suite": "perplexity", "result": result.to_dict(), "source": source,
              "provenance": provenance(lm, settings)}
    return result, record
