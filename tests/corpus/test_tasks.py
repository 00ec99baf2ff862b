"""Synthetic instruction tasks: format, determinism, held-out disjointness, the metric."""

import json
import re
from pathlib import Path

import pytest

from diffutron.cli import main
from diffutron.corpus.tasks import (CLOSED_BOOK, TASK_METRIC, TASKS, build_tasks, exact_match, load_tasks,
                                  normalize_answer, prompt_of, references_of, score, token_f1)
from diffutron.errors import DiffutronError
from diffutron.text import tr_lower

_SUBJECTS = ["Öğrenciler", "Çiftçiler", "Mühendisler", "Doktorlar", "Sanatçılar", "İşçiler", "Yazarlar"]
_PLACES = ["kütüphanede", "Ankara'da", "şantiyede", "hastanede", "İzmir Fuarı'nda", "fabrikada", "evde"]
_ACTIONS = ["uzun süre çalıştılar", "yeni bir proje başlattılar", "önemli bir karar aldılar",
            "toplantı düzenlediler", "sorunları tartıştılar"]


def sentence(i: int) -> str:
    """The i-th of many distinct Turkish sentences (ours)."""
    return (f"{_SUBJECTS[i % 7]} {1990 + i} yılında {_PLACES[(i // 7) % 7]} "
            f"{_ACTIONS[(i // 49) % 5]} ve sonuçtan memnun kaldılar.")


SHARED = "Bu paylaşılan cümle hem eğitim hem de test belgesinde geçmektedir."


def treebank_sentence(sent_id: str, i: int) -> dict:
    words = [
        {"form": _SUBJECTS[i % 7], "lemma": tr_lower(_SUBJECTS[i % 7][:-3]), "upos": "NOUN", "case": "Nom",
         "analysis": f"{tr_lower(_SUBJECTS[i % 7][:-3])}+Noun+A3pl+Pnon+Nom"},
        {"form": "evlerine", "lemma": "ev", "upos": "NOUN", "case": "Dat", "analysis": "ev+Noun+A3pl+P3sg+Dat"},
        {"form": f"{i}", "lemma": f"{i}", "upos": "NUM", "case": None, "analysis": f"{i}+Num"},
        {"form": "döndüler", "lemma": "dön", "upos": "VERB", "case": None, "analysis": "dön+Verb+Pos+Past+V3pl"},
        {"form": ".", "lemma": ".", "upos": "PUNCT", "case": None, "analysis": ".+Punc"},
    ]
    return {"id": sent_id, "text": f"{_SUBJECTS[i % 7]} evlerine {i} döndüler.", "words": words}


def write_corpus(root: Path) -> Path:
    """A hand-made corpus in the format ``build_corpus`` writes."""
    root.mkdir(parents=True)
    splits = {"train": [], "validation": [], "test": []}
    annotations = []
    n = 0
    for split, count in (("train", 4), ("validation", 1), ("test", 2)):
        for k in range(count):
            sents = [sentence(n + j) for j in range(12)]
            n += 12
            doc_id = f"news/{split}-{k}"
            splits[split].append({"id": doc_id, "text": " ".join(sents), "source": "news", "domain": "news"})
            annotations.append({"id": doc_id, "source": "news", "domain": "news", "sentences": sents, "rounds": None})
        for k in range(count):
            lines = [f"Başlık {split} {k}"] + [sentence(n + j) for j in range(5)]
            n += 5
            if k == 0 and split in ("train", "test"):
                lines.insert(3, SHARED)
            splits[split].append({"id": f"help/{split}-{k}", "text": "\n".join(lines), "source": "help",
                                  "domain": "help"})
        for k in range(count):
            doc_id = f"tb/web/{split}-{k}"
            sents = [treebank_sentence(f"{split}-{k}:S{j}", n + j) for j in range(3)]
            n += 3
            splits[split].append({"id": doc_id, "text": " ".join(s["text"] for s in sents), "source": "tb",
                                  "domain": "web"})
            annotations.append({"id": doc_id, "source": "tb", "domain": "web", "sentences": sents})
        for k in range(count):
            doc_id = f"dict/{split}-{k}"
            entries = [{"headword": f"w{split}{'abcd'[k]}{'abcd'[j]}",
                        "senses": [f"(bot.) kelime{'abcd'[j]}, sözcük{'abcd'[j]}. word phrase açıklama", "ikinci"]}
                       for j in range(4)]
            splits[split].append({"id": doc_id, "text": "\n".join(f"{e['headword']}: x" for e in entries),
                                  "source": "dict", "domain": "dictionary"})
            annotations.append({"id": doc_id, "source": "dict", "domain": "dictionary", "entries": entries})
    for split, docs in splits.items():
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(root / "annotations.jsonl", "w", encoding="utf-8") as f:
        for a in annotations:
            f.write(json.dumps(a, ensure_ascii=False) + "\n")
    (root / "stats.json").write_text(json.dumps({"format": "diffutron-corpus/1", "fingerprint": "test"}))
    return root


@pytest.fixture
def built(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    stats = build_tasks(corpus, tmp_path / "tasks", max_context_chars=400)
    return tmp_path / "tasks", stats


def all_rows(tasks_dir):
    return {(stage, split): load_tasks(stage, split, tasks_dir)
            for stage in ("general", "specific") for split in ("train", "validation", "test")}


def test_rows_are_chat_jsonl_with_every_task_family(built):
    tasks_dir, stats = built
    rows = all_rows(tasks_dir)
    for (stage, split), rs in rows.items():
        assert rs, (stage, split)
        for r in rs:
            assert r["stage"] == stage and r["id"].startswith(f"{stage}/{split}/")
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            assert all(m["content"].strip() for m in r["messages"])
            assert r["task"] in TASKS[stage] and r["doc"] and r["sources"]
        if split == "train":
            assert {r["task"] for r in rs} == set(TASKS[stage])
    assert stats["rows"]["general"]["train"]["summarize"] == sum(r["task"] == "summarize"
                                                                 for r in rows[("general", "train")])
    assert json.loads((tasks_dir / "stats.json").read_text()) == stats
    assert stats["corpus_fingerprint"] == "test" and stats["metrics"] == TASK_METRIC


def test_held_out_splits_share_no_document_and_no_source_sentence(built):
    tasks_dir, stats = built
    rows = all_rows(tasks_dir)
    for stage in ("general", "specific"):
        # closed-book questions ask about corpus-train text: disjoint by sentence, not by document
        docs = {s: {r["doc"] for r in rows[(stage, s)] if r["task"] not in CLOSED_BOOK}
                for s in ("train", "validation", "test")}
        srcs = {s: {h for r in rows[(stage, s)] for h in r["sources"]} for s in ("train", "validation", "test")}
        for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
            assert not docs[a] & docs[b]
            assert not srcs[a] & srcs[b]
        assert all(d.split("/")[-1].startswith("train-") for d in docs["train"])
    closed = [r for rs in rows.values() for r in rs if r["task"] in CLOSED_BOOK]
    assert closed and all(r["doc"].split("/")[-1].startswith("train-") for r in closed)
    assert {s for (_, s), rs in rows.items() for r in rs if r["task"] == "qa"} == {"train", "validation", "test"}
    # the sentence in both a train and a test document: train rows that use it are dropped
    assert any(SHARED in prompt_of(r) or SHARED == r["messages"][1]["content"] for r in rows[("general", "test")])
    for r in rows[("general", "train")]:
        assert SHARED not in prompt_of(r) and SHARED != r["messages"][1]["content"]
    assert sum(stats["dropped_for_overlap"]["train"].values()) >= 1


def test_answers_come_from_the_source(built):
    tasks_dir, _ = built
    rows = [r for rs in all_rows(tasks_dir).values() for r in rs]
    seen = set()
    for r in rows:
        prompt, answer = prompt_of(r), r["messages"][1]["content"]
        seen.add(r["task"])
        if r["task"] == "fill_blank":
            filled = prompt.split("\n\n", 1)[1].replace("___", answer)
            assert re.fullmatch(r"[^\W\d_]{4,}", answer) and "___" in prompt
            assert any(filled == sentence(i) for i in range(400)) or filled == SHARED
        elif r["task"] == "summarize":
            passage = prompt.split("\n\n", 1)[1]
            assert answer in passage and len(passage) <= 400
        elif r["task"] == "continue":
            assert answer not in prompt and answer.endswith(".")
        elif r["task"] == "translate":
            assert re.search(r"“([a-z]+)”", prompt)
            assert answer.startswith("kelime") and references_of(r) == [answer, answer.replace("kelime", "sözcük")]
        elif r["task"] == "lemma":
            word = re.search(r"“([^”]+)”", prompt).group(1)
            assert (word, answer) in {("evlerine", "ev"), ("döndüler", "dön")} or answer == tr_lower(word[:-3])
        elif r["task"] == "case":
            word = re.search(r"“([^”]+)”", prompt).group(1)
            expected = "yönelme hâli" if word == "evlerine" else "yalın hâl"
            assert answer == expected and expected.replace("â", "a") in references_of(r)
        elif r["task"] == "analysis":
            assert re.fullmatch(r"\w+\+(Noun|Verb)\+.+", answer)
        elif r["task"] == "complete":
            prefix = prompt.split("\n\n", 1)[1].removesuffix(" …")
            assert any(f"{prefix} {answer}" == sentence(i) for i in range(400)) or f"{prefix} {answer}" == SHARED
        elif r["task"] == "qa":
            question = prompt.removeprefix("Kısaca cevapla: ")
            assert question.endswith("?") and answer in references_of(r) and answer not in question
        elif r["task"] == "about":
            topic = prompt.split(" hakkında ", 1)[0]
            assert topic in answer and topic in ("Ankara", "İzmir Fuarı")
    assert seen == set(TASKS["general"]) | set(TASKS["specific"])


@pytest.mark.parametrize("text, expected", [
    ("Kongre 1919 yılında Sivas'ta toplandı.",
     {("Kongre 1919 yılında nerede toplandı?", "Sivas'ta", ("Sivas'ta", "Sivas")),
      ("Kongre ne zaman Sivas'ta toplandı?", "1919 yılında", ("1919 yılında", "1919"))}),
    ("İlk oyunculuk deneyimlerini Ankara Deneme Tiyatrosu'nda yaşadı.",
     {("İlk oyunculuk deneyimlerini nerede yaşadı?", "Ankara Deneme Tiyatrosu'nda",
       ("Ankara Deneme Tiyatrosu'nda", "Ankara Deneme Tiyatrosu"))}),
    ("İzmir'den yola çıkan gemi sabah limana vardı.",  # a sentence-initial name: a capitalised question word
     {("Nereden yola çıkan gemi sabah limana vardı?", "İzmir'den", ("İzmir'den", "İzmir"))}),
    ("Toplantıya dün akşam 300 kişi katıldı.",
     {("Toplantıya dün akşam kaç kişi katıldı?", "300", ("300", "300 kişi"))}),
    ("Çocuklar 12 Eylül'de okula başladı ve mutlu oldular.", set()),  # a date is no place
    ("Sonuç 5 ise işlem tamamlanır ve pencere kapanır.", set()),  # "ise" counts nothing
    ("Ankara'da mı yaşıyorsun, yoksa başka bir yerde mi?", set()),  # already a question
])
def test_qa_questions_replace_the_phrase_they_ask_for(text, expected):
    from diffutron.corpus.task_generators import _qa_candidates

    assert {(q, a, tuple(refs)) for q, a, refs in _qa_candidates(text)} == expected


def test_build_is_deterministic_and_seeded(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    build_tasks(corpus, tmp_path / "a")
    build_tasks(corpus, tmp_path / "b")
    build_tasks(corpus, tmp_path / "c", seed=1)
    for stage in ("general", "specific"):
        for split in ("train", "validation", "test"):
            a = (tmp_path / "a" / stage / f"{split}.jsonl").read_bytes()
            assert a == (tmp_path / "b" / stage / f"{split}.jsonl").read_bytes()
    assert (tmp_path / "a" / "general" / "train.jsonl").read_bytes() != \
        (tmp_path / "c" / "general" / "train.jsonl").read_bytes()


def test_caps_and_cli(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    assert main(["corpus", "tasks", "--corpus", str(corpus), "--out", str(tmp_path / "t"), "--max-train", "2",
                 "--max-heldout", "1"]) == 0
    out = capsys.readouterr().out
    assert "tasks written to" in out and "general/fill_blank" in out
    for stage in ("general", "specific"):
        train = load_tasks(stage, "train", tmp_path / "t")
        assert all(sum(r["task"] == t for r in train) <= 2 for t in TASKS[stage])
        assert all(sum(r["task"] == t for r in load_tasks(stage, "test", tmp_path / "t")) <= 1 for t in TASKS[stage])


class WordTokenizer:
    """Stands in for an HF tokenizer: one token per whitespace word, plus <bos>/<eos>."""

    def apply_chat_template(self, messages, tokenize=False, chat_template=None):
        assert not tokenize and "[Question]" in chat_template
        return "\n".join(m["content"] for m in messages)

    def __call__(self, texts, add_special_tokens=True, verbose=True):
        return {"input_ids": [[0] * (len(t.split()) + 2 * add_special_tokens) for t in texts]}


def test_rows_longer_than_max_tokens_are_left_out(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    stats = build_tasks(corpus, tmp_path / "t", max_context_chars=400, tokenizer=WordTokenizer(), max_tokens=40)
    assert stats["max_tokens"] == 40 and stats["dropped_too_long"]["train"]["summarize"] >= 1
    rows = [r for stage in ("general", "specific") for split in ("train", "validation", "test")
            for r in load_tasks(stage, split, tmp_path / "t")]
    assert rows and all(sum(len(m["content"].split()) for m in r["messages"]) + 2 <= 40 for r in rows)
    assert not any(r["task"] == "summarize" for r in rows)  # four ~12-word sentences plus one: always too long


def test_load_tasks_filters_and_errors(built, tmp_path):
    tasks_dir, _ = built
    lemma = load_tasks("specific", "train", tasks_dir, tasks=["lemma"])
    assert lemma and {r["task"] for r in lemma} == {"lemma"}
    with pytest.raises(DiffutronError, match="unknown stage"):
        load_tasks("stage3", "train", tasks_dir)
    with pytest.raises(DiffutronError, match="unknown task"):
        load_tasks("general", "train", tasks_dir, tasks=["lemma"])
    with pytest.raises(DiffutronError, match="corpus tasks"):
        load_tasks("general", "train", tmp_path / "none")


# --------------------------------------------------------------------------- the metric


@pytest.mark.parametrize("text, normal", [
    ("  Ankara'nın!  ", "ankara'nın"),
    ("YÖNELME Hâli.", "yönelme hâli"),
    ("İstanbul\n[/Answer]\n\nsonrası", "istanbul"),
    ("«Evet», dedi.", "evet dedi"),
    ("", ""),
])
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_uses_turkish_casing_and_any_reference():
    assert exact_match("ISPARTA", "ısparta") == 1.0
    assert exact_match("ISPARTA", "isparta") == 0.0  # I is the capital of ı, not of i
    assert exact_match("İZMİR", "izmir") == 1.0
    refs = ["yönelme hâli", "yönelme hali", "yönelme"]
    assert exact_match("Yönelme hali.", refs) == 1.0
    assert exact_match("bulunma hâli", refs) == 0.0


def test_token_f1_hand_computed():
    assert token_f1("kedi evde uyuyor", "kedi bahçede uyuyor") == pytest.approx(2 / 3)
    assert token_f1("kedi kedi", "kedi") == pytest.approx(2 / 3)  # p = 1/2, r = 1
    assert token_f1("Kedi, bahçede!", ["köpek", "kedi bahçede uyuyor"]) == pytest.approx(0.8)  # p = 1, r = 2/3
    assert token_f1("", "") == 1.0
    assert token_f1("bir şey", "") == 0.0
    assert token_f1("", "bir şey") == 0.0


def _row(i, task, answer, references=None):
    row = {"id": f"r{i}", "task": task, "messages": [{"role": "user", "content": "?"},
                                                       {"role": "assistant", "content": answer}]}
    if references:
        row["references"] = references
    return row


def test_score_aggregates_primary_metrics_per_task():
    rows = [_row(0, "fill_blank", "kitap"), _row(1, "fill_blank", "masa"),
            _row(2, "continue", "kedi bahçede uyuyor"),
            _row(3, "translate", "elma", ["elma", "elma ağacı"])]
    preds = ["Kitap", "sandalye", "kedi evde uyuyor", "elma ağacı"]
    result = score(rows, preds)
    assert result["n"] == 4
    assert result["tasks"]["fill_blank"] == {"n": 2, "metric": "exact_match", "score": 0.5, "exact_match": 0.5,
                                             "f1": 0.5}
    assert result["tasks"]["continue"]["score"] == pytest.approx(2 / 3)
    assert result["tasks"]["continue"]["exact_match"] == 0.0
    assert result["tasks"]["translate"]["score"] == 1.0
    assert result["score"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    by_id = score(rows, {f"r{i}": p for i, p in enumerate(preds)})
    assert by_id == result
    with pytest.raises(DiffutronError, match="4 task rows"):
        score(rows, preds[:3])
    with pytest.raises(DiffutronError, match="no prediction"):
        score(rows, {"r0": "kitap"})
    assert score([], []) == {"score": 0.0, "n": 0, "tasks": {}}


def test_gold_answers_score_perfectly(built):
    tasks_dir, _ = built
    rows = load_tasks("general", "test", tasks_dir) + load_tasks("specific", "test", tasks_dir)
    result = score(rows, [r["messages"][1]["content"] + "\n[/Answer]" for r in rows])
    assert result["score"] == 1.0 and all(t["exact_match"] == 1.0 for t in result["tasks"].values())


def test_stage_metric_batches_by_length_and_scores_each_row_as_alone(built, monkeypatch):
    """The recipe's instruction metric answers rows in length-sorted batches: each answer must be
    the row's greedy answer alone, and the score that of ``score`` on those answers."""
    from diffutron.lm import DiffusionLM
    from diffutron.sampling import SamplerConfig
    from diffutron.tiny import tiny_model, tiny_tokenizer
    from diffutron.training.task_metric import MetricConfig, task_evaluator

    tasks_dir, _ = built
    tok = tiny_tokenizer()
    lm = DiffusionLM(tiny_model(tok, seed=3), tok)
    cfg = MetricConfig(tasks="general", limit=9, max_new_tokens=6, steps=6, block_length=3, batch_size=4,
                       tasks_dir=str(tasks_dir))
    import diffutron.corpus.tasks as tasks_module

    seen = {}

    def spy(rows, answers):
        seen["answers"] = list(answers)
        return score(rows, answers)

    monkeypatch.setattr(tasks_module, "score", spy)
    evaluate = task_evaluator(cfg)
    rows = evaluate.rows
    prompts = [[m for m in r["messages"] if m["role"] != "assistant"] for r in rows]
    assert len({len(lm.encode(lm.render(p))) for p in prompts}) > 1  # ragged, so sorting matters
    sampler = SamplerConfig(max_new_tokens=6, steps=6, block_length=3, temperature=0.0, repetition_penalty=1.0)
    alone = [lm.generate([p], sampler)[0].text for p in prompts]
    got = evaluate(lm=lm, step=0)
    assert seen["answers"] == alone and any(alone)
    expected = score(rows, alone)
    assert got["general_score"] == pytest.approx(expected["score"]) and got["general_rows"] == len(rows)
    for task, value in expected["tasks"].items():
        assert got[f"general_{task}"] == pytest.approx(value["score"])
