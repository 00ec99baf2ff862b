"""Pre-training data: reading sources, packing with EOS, held-out splits, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffutron.data.pretrain import PackedDataset, build_pretrain, heldout_by_hash
from diffutron.data.rows import ReadReport, is_local, iter_rows
from diffutron.errors import DiffutronError
from diffutron.tiny import SAMPLE_TEXTS, tiny_tokenizer
from diffutron.training.config import DataConfig


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(cls_sep=True)  # wraps encodings in [CLS] ... [SEP]: packing must not add them


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_packing_appends_eos_per_document_without_special_tokens(tmp_path, tok):
    docs = SAMPLE_TEXTS[:5]
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    train, held, report = build_pretrain(tok, DataConfig(train=str(f), max_length=8, heldout_fraction=0.0))
    expected = []
    for d in docs:
        expected += tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
    n = len(expected) // 8
    assert held is None
    assert train.ids.dtype == np.int32 and train.ids.shape == (n, 8)
    assert train.ids.reshape(-1).tolist() == expected[: n * 8]
    assert tok.cls_token_id not in train.ids and tok.sep_token_id not in train.ids
    assert report.documents == 5 and report.dropped_tail_tokens == len(expected) - n * 8
    batch = train.batch([1, 0])
    assert batch.input_ids.tolist() == [expected[8:16], expected[:8]]
    assert batch.maskable.all() and batch.attention_mask.all() and batch.target_weight is None


def test_txt_sample_by_line_paragraph_document(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("bir\niki\n\nüç\n\n\ndört\n", encoding="utf-8")
    def texts(mode):
        return [r.data["text"] for r in iter_rows(str(f), report=ReadReport(), sample_by=mode)]
    assert texts("line") == ["bir", "iki", "üç", "dört"]
    assert texts("paragraph") == ["bir\niki", "üç", "dört"]
    assert texts("document") == ["bir\niki\n\nüç\n\n\ndört"]
    rows = list(iter_rows(str(f), report=ReadReport(), sample_by="paragraph"))
    assert [r.where for r in rows] == [f"{f}:1", f"{f}:4", f"{f}:7"]


def test_directory_glob_parquet_and_bom(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": SAMPLE_TEXTS[0]}, ensure_ascii=False).encode() + b"\n")
    (d / "sub" / "b.txt").write_text(SAMPLE_TEXTS[1] + "\n", encoding="utf-8")
    pq.write_table(pa.table({"body": [SAMPLE_TEXTS[2], SAMPLE_TEXTS[3]]}), d / "c.parquet")
    (d / "notes.md").write_text("ignored", encoding="utf-8")
    got = [r.data.get("text") or r.data.get("body") for r in iter_rows(str(d), report=ReadReport())]
    assert got == [SAMPLE_TEXTS[0], SAMPLE_TEXTS[2], SAMPLE_TEXTS[3], SAMPLE_TEXTS[1]]
    cfg = DataConfig(train=str(d / "c.parquet"), text_column="body", max_length=4, heldout_fraction=0.0)
    train, _, report = build_pretrain(tok, cfg)
    assert report.documents == 2 and len(train) > 0
    with pytest.raises(DiffutronError, match=r"c\.parquet: row 0: no 'text' field \(fields: body\)"):
        build_pretrain(tok, DataConfig(train=str(d / "c.parquet"), max_length=4))


def test_heldout_fraction_is_deterministic_and_document_level(tmp_path, tok):
    docs = [f"{SAMPLE_TEXTS[i % 12]} {SAMPLE_TEXTS[(i * 7) % 12]} {i}" for i in range(200)]
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    cfg = DataConfig(train=str(f), max_length=8, heldout_fraction=0.2, split_seed=3)
    a_train, a_held, rep = build_pretrain(tok, cfg)
    b_train, b_held, _ = build_pretrain(tok, cfg)
    assert np.array_equal(a_train.ids, b_train.ids) and np.array_equal(a_held.ids, b_held.ids)
    held_docs = [d for d in docs if heldout_by_hash(d, 0.2, 3)]
    assert rep.heldout_documents == len(held_docs) and 20 < len(held_docs) < 60
    # reversing the file moves no document across the split
    g = write_jsonl(tmp_path / "r.jsonl", [{"text": d} for d in reversed(docs)])
    _, _, rep2 = build_pretrain(tok, DataConfig(train=str(g), max_length=8, heldout_fraction=0.2, split_seed=3))
    assert rep2.heldout_documents == rep.heldout_documents
    # an explicit held-out file wins over the fraction
    h = write_jsonl(tmp_path / "h.jsonl", [{"text": SAMPLE_TEXTS[0]}] * 4)
    _, held, rep3 = build_pretrain(tok, DataConfig(train=str(f), heldout=str(h), max_length=8, heldout_fraction=0.2))
    assert rep3.documents == 200 and rep3.heldout_documents == 4 and len(held) > 0


@pytest.mark.parametrize("content, message", [
    (b'{"text": "bir"}\n{"text": "iki"\n', r"c\.jsonl:2: not valid JSON"),
    (b'{"text": "bir"}\n{"body": "iki"}\n', r"c\.jsonl:2: no 'text' field \(fields: body\): set data.text_column"),
    (b'{"text": "bir"}\n{"text": "\xff\xfeiki"}\n', r"c\.jsonl:2: not valid UTF-8 \(byte 0xff at column 11\)"),
    (b'{"text": "bir"}\n[1, 2]\n', r"c\.jsonl:2: expected a JSON object, got list"),
    (b'{"text": "bir"}\n{"text": 5}\n', r"c\.jsonl:2: field 'text' is int, not text"),
])
def test_bad_rows_fail_with_file_and_line_or_are_skipped_and_counted(tmp_path, tok, content, message):
    f = tmp_path / "c.jsonl"
    f.write_bytes(content + b'{"text": "' + " ".join(SAMPLE_TEXTS).encode() + b'"}\n')
    cfg = DataConfig(train=str(f), max_length=4, heldout_fraction=0.0)
    with pytest.raises(DiffutronError, match=message):
        build_pretrain(tok, cfg)
    from dataclasses import replace

    _, _, report = build_pretrain(tok, replace(cfg, skip_bad_rows=True))
    assert report.bad_rows == 1 and report.documents == 2
    assert "skipped" in report.summary() and ":2:" in report.bad_examples[0]


def test_missing_empty_and_too_short_sources(tmp_path, tok):
    with pytest.raises(DiffutronError, match=r"data.train: data file .*nope.jsonl does not exist"):
        build_pretrain(tok, DataConfig(train=str(tmp_path / "nope.jsonl")))
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DiffutronError, match=r"empty.jsonl is empty"):
        build_pretrain(tok, DataConfig(train=str(tmp_path / "empty.jsonl")))
    f = write_jsonl(tmp_path / "s.jsonl", [{"text": "bir"}])
    with pytest.raises(DiffutronError, match=r"do not fill one sequence of data.max_length=512"):
        build_pretrain(tok, DataConfig(train=str(f), heldout_fraction=0.0))
    (tmp_path / "x.csv").write_text("a\n", encoding="utf-8")
    with pytest.raises(DiffutronError, match=r"x.csv is not a"):
        build_pretrain(tok, DataConfig(train=str(tmp_path / "x.csv")))


def test_hub_ids_versus_paths(monkeypatch):
    assert not is_local("diffutron/DiffutronLM-Pretraining-Corpus")
    assert is_local("data/train.jsonl") and is_local("./corpus") and is_local("/abs/dir") and is_local("a/b/c")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DiffutronError, match=r"cannot load dataset 'nobody-here/no-such-corpus' \(split train\) \(offline"):
        list(iter_rows("nobody-here/no-such-corpus", report=ReadReport(), streaming=True))


def test_packed_dataset_save_load_roundtrip(tmp_path):
    ids = np.arange(24, dtype=np.int32).reshape(3, 8)
    PackedDataset(ids).save(tmp_path, "train")
    back = PackedDataset.load(tmp_path, "train")
    assert np.array_equal(np.asarray(back.ids), ids) and back.max_length == 8
