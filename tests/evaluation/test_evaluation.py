"""CETVEL tasks (prompts byte for byte, gold labels, loading), metrics, the runner and the CLI."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from diffutron.cli import main
from diffutron.data.pretrain import pack_documents
from diffutron.errors import DiffutronError
from diffutron.evaluation import metrics as M
from diffutron.evaluation import runner as R
from diffutron.evaluation.perplexity_run import read_texts
from diffutron.evaluation.cetvel import TASK_NAMES, TASKS, get_tasks, load_task
from diffutron.likelihood import loglikelihood
from diffutron.lm import DiffusionLM
from diffutron.tiny import tiny_model, tiny_tokenizer

# One row per task in the hub schema, with the traps each template must survive.
DOCS = {
    "belebele_tr": {"flores_passage": "Ankara, Türkiye'nin başkentidir.", "question": "  Başkent neresidir? \n",
                    "mc_answer1": "İstanbul", "mc_answer2": "Ankara", "mc_answer3": "İzmir", "mc_answer4": "Bursa",
                    "correct_answer_num": "2"},
    "exams_tr": {"question": {"stem": "Hangisi bir renktir?",
                              "choices": {"text": ["masa", "mavi", "koşmak", "hızlı"], "label": ["A", "B", "C", "D"]}},
                 "answerKey": " B"},
    "ironytr": {"text": "Harika, yine yağmur yağıyor.", "label": 1},
    "news_cat": {"text": "Galatasaray maçı 3-0 kazandı.", "label": "sport"},
    "mnli_tr": {"premise": "Kedi uyuyor.", "hypothesis": "Bir hayvan dinleniyor.", "label": 0},
    "sts_tr": {"sentence1": "Adam gitar çalıyor.", "sentence2": "Bir adam gitar çalıyor.", "score": 4.75},
    "xcopa_tr": {"premise": "  Adam bardağı düşürdü. ", "choice1": "Işıklar söndü.", "choice2": "İki bardak kırıldı.",
                 "question": "effect", "label": 1},
}

EXPECTED = {
    "belebele_tr": ("P: Ankara, Türkiye'nin başkentidir.\nQ: Başkent neresidir?\nA: İstanbul\nB: Ankara\nC: İzmir\n"
                    "D: Bursa\nAnswer:", ("A", "B", "C", "D"), 1),
    "exams_tr": ("Hangisi bir renktir?", ("masa", "mavi", "koşmak", "hızlı"), 1),
    "ironytr": ("Cümle: Harika, yine yağmur yağıyor.\nSoru: Bu cümlede ironi var mı?\n", ("Hayır", "Evet"), 1),
    "news_cat": ("Cümle: Galatasaray maçı 3-0 kazandı.\nSoru: Bu cümlenin konusu nedir?\n Cevap:",
                 ("spor", "magazin", "siyaset", "sağlık", "ekonomi"), 0),
    "mnli_tr": ('Aşağıda iki cümle verilmektedir:\n\nCümle 1: "Kedi uyuyor."\nCümle 2: "Bir hayvan dinleniyor."\n\n'
                "Bu iki cümle arasındaki ilişki nedir:", ("TUTARLI", "ALAKASIZ", "ÇELİŞKİLİ"), 0),
    "sts_tr": ('Aşağıda iki cümle verilmektedir:\n\nCümle 1: "Adam gitar çalıyor."\nCümle 2: "Bir adam gitar çalıyor."'
               "\n\nBu iki cümle arasında ne kadar benzerlik vardır:",
               ("Benzerlik Yok", "Düşük Benzerlik", "Orta Benzerlik", "Yüksek Benzerlik", "Çok Yüksek Benzerlik",
                "Mantıksal Olarak Aynı"), 5),
    # Python's str.lower, as CETVEL: "I" -> "i" and "İ" -> "i" + U+0307 (combining dot above)
    "xcopa_tr": ("Adam bardağı düşürdü bu yüzden", ("işıklar söndü.", "i\u0307ki bardak kırıldı."), 1),
}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_prompts_choices_and_gold_byte_for_byte(name):
    ex = TASKS[name].example(DOCS[name])
    prompt, choices, gold = EXPECTED[name]
    assert ex.prompt.encode("utf-8") == prompt.encode("utf-8")
    assert [c.encode("utf-8") for c in ex.choices] == [c.encode("utf-8") for c in choices]
    assert ex.gold == gold


def test_xcopa_cause_and_turkish_casing_option():
    doc = dict(DOCS["xcopa_tr"], question="cause")
    ex = TASKS["xcopa_tr"].example(doc)
    assert ex.prompt == "Adam bardağı düşürdü çünkü"
    tr = TASKS["xcopa_tr"].example(doc, turkish_casing=True)
    assert tr.choices == ("ışıklar söndü.", "iki bardak kırıldı.")
    # every other task ignores the option
    assert TASKS["ironytr"].example(DOCS["ironytr"], turkish_casing=True) == TASKS["ironytr"].example(DOCS["ironytr"])


@pytest.mark.parametrize("score,gold", [(0.0, 0), (0.49, 0), (0.5, 1), (1.49, 1), (1.5, 2), (2.5, 3), (3.49, 3),
                                        (3.5, 4), (4.49, 4), (4.5, 5), (5.0, 5), ("2.7", 3)])
def test_sts_bins(score, gold):
    assert TASKS["sts_tr"].example(dict(DOCS["sts_tr"], score=score)).gold == gold


def test_gold_label_rules():
    exams = TASKS["exams_tr"]
    assert exams.example(dict(DOCS["exams_tr"], answerKey="D")).gold == 3
    assert exams.example(dict(DOCS["exams_tr"], answerKey=" C")).gold == 2
    assert exams.example(dict(DOCS["exams_tr"], answerKey=None)).gold == 3  # missing: 3, as CETVEL
    assert exams.example(dict(DOCS["exams_tr"], answerKey="")).gold == 3
    # a CSV cell holding the question object as JSON
    assert exams.example(dict(DOCS["exams_tr"], question=json.dumps(DOCS["exams_tr"]["question"]))).gold == 1
    news = TASKS["news_cat"]
    for label, gold in [("sport", 0), ("magazine", 1), ("politics", 2), ("health", 3), ("economy", 4),
                        ("Economy", 4), (2, 2), ("3", 3)]:
        assert news.example(dict(DOCS["news_cat"], label=label)).gold == gold
    with pytest.raises(DiffutronError, match="news_cat"):
        news.example(dict(DOCS["news_cat"], label="weather"))
    mnli = TASKS["mnli_tr"].example(dict(DOCS["mnli_tr"], label=-1))
    assert mnli.gold == -1 and not mnli.has_gold  # counts as wrong, as in CETVEL
    assert TASKS["belebele_tr"].example(dict(DOCS["belebele_tr"], correct_answer_num=4)).gold == 3
    with pytest.raises(DiffutronError, match="flores_passage"):
        TASKS["belebele_tr"].example({k: v for k, v in DOCS["belebele_tr"].items() if k != "flores_passage"})


def test_task_names():
    assert [t.name for t in get_tasks(None)] == list(TASK_NAMES)
    assert [t.name for t in get_tasks("xcopa_tr, ironytr")] == ["xcopa_tr", "ironytr"]
    with pytest.raises(DiffutronError) as err:
        get_tasks("belebele,xcopa_tr")
    assert "'belebele'" in str(err.value) and all(n in str(err.value) for n in TASK_NAMES)
    assert {t.split for t in TASKS.values()} == {"test", "validation", "validation_matched"}


# ---------------------------------------------------------------------------------------------
# loading


def write_rows(path, rows, fmt="jsonl"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


def fixture_dir(root, n=4, fmt=None):
    """All seven tasks, n rows each, in their hub schema (formats rotate over jsonl/parquet/csv)."""
    formats = {"sts_tr": "csv", "ironytr": "parquet"}
    for name, task in TASKS.items():
        rows = []
        for i in range(n):
            doc = json.loads(json.dumps(DOCS[name]))
            if name in ("ironytr", "xcopa_tr", "mnli_tr"):
                doc["label"] = i % 2
            if name == "belebele_tr":
                doc["correct_answer_num"] = str(i % 4 + 1)
            rows.append(doc)
        f = fmt or formats.get(name, "jsonl")
        write_rows(root / name / f"{task.split}.{f}", rows, f)
    return root


def test_local_files_in_every_format(tmp_path):
    root = fixture_dir(tmp_path)
    for name in TASK_NAMES:
        data = load_task(TASKS[name], root)
        assert len(data.docs) == 4 and data.total == 4 and data.source["kind"] == "local"
        exs = data.examples()
        assert exs[0].prompt == EXPECTED[name][0]
    sts = load_task(TASKS["sts_tr"], root)  # CSV: every cell a string, the score still bins
    assert sts.examples()[0].gold == 5
    irony = load_task(TASKS["ironytr"], root, limit=3)
    assert len(irony.docs) == 3 and irony.total == 4 and [e.gold for e in irony.examples()] == [0, 1, 0]


def test_loading_errors(tmp_path):
    root = fixture_dir(tmp_path / "ok")
    with pytest.raises(DiffutronError, match=r"xcopa_tr/test\.\{jsonl,parquet,csv\}"):
        load_task(TASKS["xcopa_tr"], tmp_path)
    with pytest.raises(DiffutronError, match="not a directory"):
        load_task(TASKS["xcopa_tr"], tmp_path / "nope")
    with pytest.raises(DiffutronError, match="limit"):
        load_task(TASKS["xcopa_tr"], root, limit=0)
    bad = tmp_path / "bad"
    write_rows(bad / "ironytr" / "validation.jsonl", [{"sentence": "x", "label": 0}])
    with pytest.raises(DiffutronError, match="no column 'text'"):
        load_task(TASKS["ironytr"], bad)
    (bad / "news_cat").mkdir()
    (bad / "news_cat" / "test.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DiffutronError, match="empty"):
        load_task(TASKS["news_cat"], bad)
    (bad / "mnli_tr").mkdir()
    (bad / "mnli_tr" / "validation_matched.jsonl").write_text('{"premise": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DiffutronError, match="validation_matched.jsonl:2"):
        load_task(TASKS["mnli_tr"], bad)


def test_hub_loading_names_labels_and_reports_offline(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, split=None):
        calls.append((path, name, split))
        features = datasets.Features({"text": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=["economy", "health", "magazine",
                                                                          "politics", "sport"])})
        return datasets.Dataset.from_dict({"text": ["a", "b"], "label": [4, 0]}, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = load_task(TASKS["news_cat"])
    assert calls == [("mcemilg/news-cat", None, "test")]
    # ClassLabel ints are turned into their names first: the hub's order is not CETVEL's
    assert [e.gold for e in data.examples()] == [0, 4]

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'facebook/belebele' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DiffutronError, match=r"facebook/belebele / tur_Latn / test .*--data-dir"):
        load_task(TASKS["belebele_tr"])


def test_prepare_exports_every_task_from_the_hub_for_an_offline_data_dir(monkeypatch, tmp_path, capsys):
    import datasets

    by_path = {t.hub_path: name for name, t in TASKS.items()}

    def fake_load(path, name=None, split=None):  # the hub, in memory: each task's DOCS row twice
        task = TASKS[by_path[path]]
        assert (name, split) == (task.hub_name, task.split)
        row = DOCS[task.name]
        if task.class_label_columns:  # news_cat's labels are ClassLabel ints on the hub
            names = ["economy", "health", "magazine", "politics", "sport"]
            features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
            return datasets.Dataset.from_list([{**row, "label": names.index(row["label"])}] * 2, features=features)
        return datasets.Dataset.from_list([row, row])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    out = tmp_path / "cetvel"
    assert main(["eval", "cetvel", "--prepare", str(out)]) == 0
    assert f"--data-dir {out}" in capsys.readouterr().err
    sources = json.loads((out / "SOURCES.json").read_text(encoding="utf-8"))
    assert sorted(sources) == sorted(TASK_NAMES) and all(s["rows"] == 2 for s in sources.values())
    assert not list(out.rglob("*.tmp"))
    for name in TASK_NAMES:  # offline, the exported files give what the hub gives
        local, hub = load_task(TASKS[name], out), load_task(TASKS[name])
        assert local.examples() == hub.examples() == [hub.task.example(DOCS[name])] * 2
        assert local.source["kind"] == "local"
    # where it cannot write: one line, before any download
    assert main(["eval", "cetvel", "--prepare", str(out / "SOURCES.json")]) == 2
    assert main(["eval", "cetvel", "--prepare", str(tmp_path / "x"), "--tasks", "nope"]) == 2
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# metrics


def test_acc_and_acc_norm_by_hand():
    choices = [("Hayır", "Evet")] * 3
    lls = [[-5.0, -4.5], [-4.0, -4.2], [-2.0, -2.0]]
    golds = [0, 0, 1]
    # acc: argmax -> 1, 0, 0 (first of equals) -> right: no, yes, no = 1/3
    # acc_norm: /5 and /4 -> (-1.0, -1.125) -> 0; (-0.8, -1.05) -> 0; (-0.4, -0.5) -> 0 -> 2/3
    out = M.score_task(lls, choices, golds, ("acc", "acc_norm"))
    assert out["acc"]["value"] == pytest.approx(1 / 3)
    assert out["acc_norm"]["value"] == pytest.approx(2 / 3)
    # sample std of (0, 1, 0) is sqrt(1/3); stderr = that / sqrt(3) = 1/3
    assert out["acc"]["stderr"] == pytest.approx(1 / 3)


def test_f1_and_macro_f1_by_hand():
    golds = [1, 1, 1, 0, 0, 0, 1, 0]
    preds = [1, 1, 0, 1, 0, 0, 1, 1]
    # positive class 1: TP 3, FP 2, FN 1 -> 2*3 / (6 + 2 + 1) = 6/9
    assert M.f1_binary(golds, preds) == pytest.approx(6 / 9)
    golds = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 0, 3]
    # class 0: TP 1 FP 1 FN 1 -> 2/4; class 1: TP 2 FP 1 FN 0 -> 4/5; class 2: TP 0 FN 2 -> 0;
    # class 3 (predicted only): TP 0 FP 1 -> 0; macro = (0.5 + 0.8 + 0 + 0) / 4
    assert M.f1_macro(golds, preds) == pytest.approx(1.3 / 4)
    sk = pytest.importorskip("sklearn.metrics")
    assert M.f1_macro(golds, preds) == pytest.approx(sk.f1_score(golds, preds, average="macro"))
    g2, p2 = [1, 0, 1, 1, 0], [1, 1, 0, 1, 0]
    assert M.f1_binary(g2, p2) == pytest.approx(sk.f1_score(g2, p2))
    assert M.f1_binary([0, 0], [0, 0]) == 0.0  # no positive anywhere: sklearn's zero_division=0
    lls, choices = [[0.0, 1.0, 0.0, 0.0]] * 3 + [[1.0, 0.0, 0.0, 0.0]], [("a", "b", "c", "d")] * 4
    golds4 = [1, 1, 0, 3]  # preds 1, 1, 1, 0
    assert M.score_task(lls, choices, golds4, ["f1"])["f1"]["value"] == pytest.approx(M.f1_binary(golds4, [1, 1, 1, 0]))
    assert M.score_task(lls, choices, golds4, ["f1"], f1_average="macro")["f1"]["value"] == pytest.approx(
        M.f1_macro(golds4, [1, 1, 1, 0]))
    with pytest.raises(ValueError, match="macro_f1"):
        M.score_task(lls, choices, golds4, ["macro_f1"])


def test_bootstrap_stderr_is_seeded_and_sane():
    golds = [0, 1] * 20
    preds = [0, 1, 1, 1] * 10
    a = M.bootstrap_stderr(M.f1_binary, golds, preds)
    assert a == M.bootstrap_stderr(M.f1_binary, golds, preds) and 0.02 < a < 0.2


# ---------------------------------------------------------------------------------------------
# runner


@pytest.fixture(scope="module")
def cls_lm():
    texts = [json.dumps(DOCS, ensure_ascii=False)]  # a vocabulary that covers the fixtures
    choices = " ".join(" ".join(c) for _, c, _ in EXPECTED.values())
    tok = tiny_tokenizer(texts + [choices, "P Q A B C D Answer Cevap Soru Cümle Aşağıda"], cls_sep=True)
    model = tiny_model(tok, seed=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    return DiffusionLM(model, tok, name="tiny-cls")


def test_run_all_tasks_writes_results_with_provenance(tmp_path, cls_lm):
    root = fixture_dir(tmp_path / "data")
    out, samples = tmp_path / "res.json", tmp_path / "samples.jsonl"
    config = R.CetvelConfig(data_dir=str(root), mc_samples=8, batch_size=16)
    lines = []
    results = R.run_cetvel(cls_lm, config, output=out, samples=samples, progress=False, log=lines.append)
    saved = json.loads(out.read_text())
    assert saved["incomplete"] == [] and saved["errors"] == {}
    assert list(saved["results"]) == list(TASK_NAMES) and len(lines) == 7
    prov = saved["provenance"]
    assert prov["model"]["sha256"] and prov["model"]["dtype"] == "float32" and prov["model"]["device"] == "cpu"
    assert prov["settings"]["mc_samples"] == 8 and prov["settings"]["estimator"]["deterministic"] is True
    assert prov["versions"]["torch"] and prov["date"]
    for name, r in saved["results"].items():
        assert set(r["metrics"]) == set(TASKS[name].metrics) and r["examples"] == 4
        assert r["source"]["location"].startswith(str(root))
    # the metrics follow from the samples file's log-likelihoods
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 28
    irony = [r for r in rows if r["task"] == "ironytr"]
    acc = sum(r["pred"] == r["gold"] for r in irony) / 4
    assert saved["results"]["ironytr"]["metrics"]["acc"]["value"] == pytest.approx(acc)
    assert saved["results"]["ironytr"]["metrics"]["f1"]["value"] == pytest.approx(
        M.f1_binary([r["gold"] for r in irony], [r["pred"] for r in irony]))
    # CETVEL's names: f1 for both F1 tasks, binary for ironytr and macro for news_cat, recorded per task
    news = [r for r in rows if r["task"] == "news_cat"]
    assert saved["results"]["news_cat"]["metrics"]["f1"]["value"] == pytest.approx(
        M.f1_macro([r["gold"] for r in news], [r["pred"] for r in news]))
    assert saved["results"]["news_cat"]["f1_average"] == "macro" and saved["results"]["ironytr"]["f1_average"] == "binary"
    assert "f1_average" not in saved["results"]["belebele_tr"]
    assert {m for t in TASKS.values() for m in t.metrics} == {"acc", "acc_norm", "f1"}
    # and they are this estimator's values
    first = irony[0]
    direct = loglikelihood(cls_lm, [(first["prompt"], " " + c) for c in first["choices"]])
    assert first["loglikelihoods"] == pytest.approx([s.value for s in direct], abs=1e-5)
    table = R.format_table(results)
    assert table.splitlines()[0].split()[:3] == ["task", "n", "acc"] and "belebele_tr" in table


def test_reference_scheme_ties_single_letters_and_ours_does_not(tmp_path, cls_lm):
    root = fixture_dir(tmp_path / "data", n=4)
    base = dict(data_dir=str(root), tasks=("belebele_tr", "ironytr"), batch_size=32)
    ours = R.run_cetvel(cls_lm, R.CetvelConfig(**base), progress=False, log=lambda s: None)
    ref = R.run_cetvel(cls_lm, R.CetvelConfig(**base, scheme="reference", mc_samples=32), progress=False,
                       log=lambda s: None)
    for task in ("belebele_tr", "ironytr"):
        assert ref["results"][task]["all_choices_tied"] == 4  # every item: the first choice wins
        assert ours["results"][task]["all_choices_tied"] == 0
    # belebele golds are A, B, C, D: a tie picks A, 1 of 4 right
    assert ref["results"]["belebele_tr"]["metrics"]["acc"]["value"] == 0.25
    assert ours["results"]["belebele_tr"]["forward_passes"] == 1  # 4 items x 4 letters: one batch
    assert ref["results"]["belebele_tr"]["forward_passes"] == 16  # 16 pairs x 32/32


def test_chat_limit_and_truncation(tmp_path, cls_lm):
    root = tmp_path / "data"
    long_text = " ".join(["Harika, yine yağmur yağıyor."] * 40)
    write_rows(root / "ironytr" / "validation.jsonl", [{"text": long_text, "label": 1}, {"text": "Kısa.", "label": 0},
                                                      {"text": "Üç.", "label": 0}])
    res = R.run_cetvel(cls_lm, R.CetvelConfig(data_dir=str(root), tasks=("ironytr",), limit=2), progress=False,
                       log=lambda s: None)
    r = res["results"]["ironytr"]
    assert r["examples"] == 2 and r["examples_in_split"] == 3 and r["truncated_examples"] == 1
    samples = tmp_path / "s.jsonl"
    R.run_cetvel(cls_lm, R.CetvelConfig(data_dir=str(root), tasks=("ironytr",), limit=1, chat=True),
                 samples=samples, progress=False, log=lambda s: None)
    prompt = json.loads(samples.read_text().splitlines()[0])["prompt"]
    assert prompt.startswith("[Question]\nCümle: Harika") and prompt.endswith("[/Question]\n\n[Answer]\n")


def test_a_failing_task_keeps_finished_ones(tmp_path, cls_lm, monkeypatch):
    root = fixture_dir(tmp_path / "data")
    out = tmp_path / "res.json"
    real = R.loglikelihood
    seen = []

    def flaky(lm, pairs, **kw):
        seen.append(1)
        if len(seen) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(lm, pairs, **kw)

    monkeypatch.setattr(R, "loglikelihood", flaky)
    config = R.CetvelConfig(data_dir=str(root), tasks=("ironytr", "news_cat", "xcopa_tr"))
    with pytest.raises(RuntimeError):
        R.run_cetvel(cls_lm, config, output=out, progress=False, log=lambda s: None)
    saved = json.loads(out.read_text())
    assert list(saved["results"]) == ["ironytr"]
    assert saved["incomplete"] == ["news_cat", "xcopa_tr"]
    assert "out of memory" in saved["errors"]["news_cat"]
    assert "failed" in R.format_table(saved)


def test_config_validation():
    for bad in ({"limit": 0}, {"mc_samples": 0}, {"batch_size": -1}, {"scheme": "llada"}, {"tasks": "nope"},
                {"scheme": "reference", "mc_samples": 100, "batch_size": 32}):
        with pytest.raises(DiffutronError):
            R.CetvelConfig(**bad)


# ---------------------------------------------------------------------------------------------
# perplexity data and the CLI


def test_pack_as_pretraining_keeping_the_tail(tokenizer):
    texts = ["Kitap okumak güzel.", "Çay içtik."]
    seqs = pack_documents(tokenizer, texts, 4, keep_tail=True)
    stream = [i for s in seqs for i in s]
    expected = []
    for t in texts:
        expected += tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert stream == expected and all(len(s) == 4 for s in seqs[:-1]) and 1 <= len(seqs[-1]) <= 4
    # training's packing is the same with the short tail dropped
    assert pack_documents(tokenizer, texts, 4) == (seqs if len(seqs[-1]) == 4 else seqs[:-1])


def test_read_texts(tmp_path):
    (tmp_path / "a.txt").write_text("bir\n\niki üç\n", encoding="utf-8")
    assert read_texts(str(tmp_path / "a.txt"))[0] == ["bir", "iki üç"]
    write_rows(tmp_path / "b.jsonl", [{"body": "x"}, {"body": "y"}])
    assert read_texts(str(tmp_path / "b.jsonl"), column="body", limit=1)[0] == ["x"]
    with pytest.raises(DiffutronError, match="no column 'text'"):
        read_texts(str(tmp_path / "b.jsonl"))
    with pytest.raises(DiffutronError, match="no such file"):
        read_texts(str(tmp_path / "missing.jsonl"))


def test_cli_perplexity_twice_agrees(tmp_path, saved_model_dir, capsys):
    data = tmp_path / "held.jsonl"
    write_rows(data, [{"text": "Türkiye'nin başkenti Ankara'dır."},
                      {"text": "Kitap okumak insanın ufkunu genişletir."}])
    outs = []
    for k in range(2):
        out = tmp_path / f"ppl{k}.json"
        rc = main(["eval", "perplexity", "--model", str(saved_model_dir), "--data", str(data), "--mc-samples", "3",
                   "--output", str(out), "--no-progress"])
        assert rc == 0
        outs.append(json.loads(out.read_text()))
    assert "ELBO perplexity <=" in capsys.readouterr().out
    a, b = outs[0]["result"], outs[1]["result"]
    assert a["loss"] == b["loss"] and a["stderr"] > 0
    assert a["words"] == 3 + 5 and a["tokens"] > 0 and a["ppl_per_word"] == pytest.approx(math.exp(a["loss_per_word"]))
    assert outs[0]["provenance"]["settings"]["mc_samples"] == 3


def test_cli_cetvel_end_to_end_and_errors(tmp_path, saved_model_dir, capsys):
    root = fixture_dir(tmp_path / "data", n=2)
    out = tmp_path / "res.json"
    rc = main(["eval", "cetvel", "--model", str(saved_model_dir), "--data-dir", str(root), "--tasks",
               "ironytr,xcopa_tr", "--output", str(out), "--no-progress", "--mc-samples", "8"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ironytr" in printed and "xcopa_tr" in printed
    assert list(json.loads(out.read_text())["results"]) == ["ironytr", "xcopa_tr"]
    model = ["--model", str(saved_model_dir), "--no-progress"]
    cases = [
        (["--data-dir", str(root), "--tasks", "ironytr", "--limit", "0"], "limit"),
        (["--data-dir", str(root), "--tasks", "belebele"], "unknown task 'belebele'"),
        (["--data-dir", str(tmp_path), "--tasks", "ironytr"], "has no ironytr/validation"),
    ]
    for args, message in cases:
        rc = main(["eval", "cetvel", *model, *args])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
