"""Synthetic Turkish instruction sets for the two instruction stages, and their one metric.

Templates are ours, data are the corpus's. Every row is chat JSONL::

    {"id": "general/train/000042", "stage": "general", "task": "fill_blank",
     "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],
     "references": ["...", ...],          # only when several answers are right
     "doc": "<corpus document id>", "sources": ["<hash of each source sentence>", ...]}

Stage 1, ``general`` (a mix of seven families):
    continue     next sentence of a news/help/manual text            primary metric: f1
    complete     the rest of a sentence given its first words         f1
    fill_blank   the word hidden as ``___`` in a sentence             exact_match
    summarize    the most central sentence of a news passage          f1
    translate    Turkish for an English headword (FreeDict)           exact_match (any sense-1 gloss)
    qa           a short factual question on a sentence of the        exact_match (the phrase or its bare
                 corpus's training text: where / when / how many      name / number)
    about        a sentence about a name or word of the text          f1
Stage 2, ``specific`` (Turkish morphology, from the Turkish Web Treebank):
    lemma        the lemma of a word in its sentence                  exact_match
    case         the grammatical case of a noun ("yönelme hâli")      exact_match
    analysis     the full morphological analysis (Oflazer style)      f1

Splits follow the corpus: rows of ``train`` come only from corpus-train documents, and
so on, so a model trained on corpus-train text never saw a held-out task's source. On top
of that, no source sentence (headword, for ``translate``) of a held-out row appears in any
row of an earlier split: such training rows are dropped and counted in ``stats.json``.
The one exception is ``qa`` (``CLOSED_BOOK``): its questions ask for facts of the corpus's
*training* text, which the model read in pre-training, so all its rows come from corpus-train
documents and its splits are made by sentence (a held-out question's sentence is in no
instruction row of an earlier split, of any family).

``score`` is the one metric function: the training recipe and the evaluation import it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..backbone import CHAT_TEMPLATE
from ..errors import DiffutronError
from ..text import count_words, split_sentences, tr_capitalize, tr_casefold, tr_lower, words
from .corpus import SPLITS, atomic_output_dir, default_corpus_dir, iter_corpus, load_annotations
from .sources import cache_root

__all__ = [
    "STAGES",
    "TASKS",
    "TASK_METRIC",
    "TASKS_FORMAT",
    "CLOSED_BOOK",
    "default_tasks_dir",
    "build_tasks",
    "load_tasks",
    "prompt_of",
    "references_of",
    "normalize_answer",
    "exact_match",
    "token_f1",
    "score",
]

# /2: the families complete, qa and about (a recipe rebuilds tasks of another format)
TASKS_FORMAT = "diffutron-tasks/2"
STAGES = ("general", "specific")
TASKS = {"general": ("continue", "complete", "fill_blank", "summarize", "translate", "qa", "about"),
         "specific": ("lemma", "case", "analysis")}
TASK_METRIC = {"continue": "f1", "complete": "f1", "fill_blank": "exact_match", "summarize": "f1",
               "translate": "exact_match", "qa": "exact_match", "about": "f1",
               "lemma": "exact_match", "case": "exact_match", "analysis": "f1"}
# families whose held-out rows ask about corpus-train text (split by sentence, not by document)
CLOSED_BOOK = ("qa",)

_TEMPLATES = {
    "continue": ["Aşağıdaki metni bir cümleyle devam ettir.\n\n{context}",
                 "Metnin devamında gelecek cümleyi yaz:\n\n{context}"],
    "complete": ["Cümleyi tamamla:\n\n{prefix} …",
                 "Aşağıdaki cümlenin devamını yaz.\n\n{prefix} …"],
    "qa": ["{question}", "Kısaca cevapla: {question}"],
    "about": ["{topic} hakkında bir cümle yaz.", "{topic} hakkında kısa bir bilgi ver."],
    "fill_blank": ["Cümledeki boşluğa (___) gelmesi gereken kelimeyi yaz.\n\n{sentence}",
                   "Boşluğu dolduran kelime nedir?\n\n{sentence}"],
    "summarize": ["Aşağıdaki haber metnini en iyi özetleyen cümleyi metinden aynen seç.\n\n{text}",
                  "Bu metnin ana fikrini en iyi veren cümle hangisidir? Cümleyi aynen yaz.\n\n{text}"],
    "translate": ["İngilizce “{word}” kelimesinin Türkçe karşılığı nedir?",
                  "“{word}” sözcüğünü Türkçeye çevir."],
    "lemma": ["Cümle: {sentence}\n\nBu cümledeki “{word}” kelimesinin kökü (sözlük biçimi) nedir?",
              "“{word}” kelimesinin sözlükteki biçimini yaz.\n\nCümle: {sentence}"],
    "case": ["Cümle: {sentence}\n\nBu cümledeki “{word}” kelimesi hangi hâldedir?",
             "“{word}” sözcüğü hangi hâl ekini almıştır?\n\nCümle: {sentence}"],
    "analysis": ["Cümle: {sentence}\n\n“{word}” kelimesinin biçimbilimsel çözümlemesini yaz.",
                 "“{word}” sözcüğünü biçimbirimlerine ayırarak çözümle.\n\nCümle: {sentence}"],
}
# Treebank case values -> the Turkish name of the case (Bare and Nom are both "yalın").
_CASE_NAMES = {"Bare": "yalın", "Nom": "yalın", "Acc": "belirtme", "Dat": "yönelme", "Loc": "bulunma",
               "Abl": "ayrılma", "Gen": "ilgi", "Ins": "vasıta"}


def default_tasks_dir() -> Path:
    """``<cache>/tasks`` (see ``diffutron.data.sources.cache_root``)."""
    return cache_root() / "tasks"


# --------------------------------------------------------------------------- metric


def _clean_prediction(text: str) -> str:
    # Generations may run on past the end-of-turn marker; only the answer counts.
    return text.split("[/Answer]", 1)[0]


def normalize_answer(text: str) -> str:
    """Comparison form: Turkish lower-case words joined by single spaces, punctuation out.

    ``"Ankara'nın!"`` -> ``"ankara'nın"``; ``"  YÖNELME Hâli."`` -> ``"yönelme hâli"``.
    Anything after an ``[/Answer]`` marker is ignored.
    """
    return " ".join(words(tr_lower(_clean_prediction(text))))


def _as_list(references: str | Sequence[str]) -> list[str]:
    return [references] if isinstance(references, str) else list(references)


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in _as_list(references)))


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """Word-overlap F1 (SQuAD style, on ``normalize_answer`` words), best over references.

    Both empty: 1.0; exactly one empty: 0.0.
    """
    pred = normalize_answer(prediction).split()
    best = 0.0
    for ref in _as_list(references):
        gold = normalize_answer(ref).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def prompt_of(row: Mapping) -> str:
    """The user turn of a task row."""
    return row["messages"][0]["content"]


def references_of(row: Mapping) -> list[str]:
    """All accepted answers of a task row (the assistant turn first)."""
    return list(row.get("references") or [row["messages"][-1]["content"]])


def score(task_rows: Sequence[Mapping], predictions: Sequence[str] | Mapping[str, str]) -> dict:
    """Score predictions on task rows: the one metric for training and evaluation.

    Args:
        task_rows: rows as ``load_tasks`` returns them (any mix of tasks).
        predictions: one answer string per row, in order, or a mapping ``row id -> answer``.

    Returns:
        ``{"score", "n", "tasks": {task: {"n", "metric", "score", "exact_match", "f1"}}}``,
        values in [0, 1]. A task's ``score`` is the mean of its primary metric
        (``TASK_METRIC``); the top-level ``score`` is the unweighted mean over tasks present.

    Raises:
        DiffutronError: predictions do not line up with the rows.
    """
    if isinstance(predictions, Mapping):
        missing = [r["id"] for r in task_rows if r["id"] not in predictions]
        if missing:
            raise DiffutronError(f"no prediction for {len(missing)} task rows (first: {missing[0]}); "
                                 "give one prediction per row id")
        preds = [predictions[r["id"]] for r in task_rows]
    else:
        preds = list(predictions)
        if len(preds) != len(task_rows):
            raise DiffutronError(f"{len(preds)} predictions for {len(task_rows)} task rows; give one per row, in order")
    per_task: dict[str, dict[str, list[float]]] = {}
    for row, pred in zip(task_rows, preds):
        refs = references_of(row)
        acc = per_task.setdefault(row["task"], {"exact_match": [], "f1": []})
        acc["exact_match"].append(exact_match(pred, refs))
        acc["f1"].append(token_f1(pred, refs))
    tasks = {}
    for task, acc in sorted(per_task.items()):
        metric = TASK_METRIC.get(task, "exact_match")
        em, f1 = (sum(v) / len(v) for v in (acc["exact_match"], acc["f1"]))
        tasks[task] = {"n": len(acc["f1"]), "metric": metric, "score": em if metric == "exact_match" else f1,
                       "exact_match": em, "f1": f1}
    overall = sum(t["score"] for t in tasks.values()) / len(tasks) if tasks else 0.0
    return {"score": overall, "n": len(task_rows), "tasks": tasks}


# --------------------------------------------------------------------------- generators


def _key(text: str) -> str:
    """Short stable hash of a normalised source unit (sentence or headword)."""
    return hashlib.sha1(" ".join(tr_casefold(text).split()).encode()).hexdigest()[:12]


def _row(task: str, user: str, answer: str, doc: str, sources: Iterable[str], references=None) -> dict:
    row = {"task": task, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
           "doc": doc, "sources": sorted({_key(s) for s in sources})}
    if references and list(references) != [answer]:
        row["references"] = list(dict.fromkeys([answer, *references]))
    return row


def _rng(seed: int, *parts: str) -> random.Random:
    return random.Random(hashlib.sha256(":".join([str(seed), *parts]).encode()).digest())


def _good_sentence(s: str, min_words: int = 5, max_words: int = 40) -> bool:
    n = count_words(s)
    return min_words <= n <= max_words and s[-1:] in ".!?…\"”’)" and sum(c.isalpha() for c in s) > len(s) / 2


def _doc_sentences(doc: dict, annotations: Mapping[str, dict]) -> list[str]:
    ann = annotations.get(doc["id"])
    if ann and ann.get("sentences"):
        return [s["text"] if isinstance(s, dict) else s for s in ann["sentences"]]
    return split_sentences(doc["text"])


def _continue_rows(doc: dict, sentences: list[str], seed: int, per_doc: int, max_context_chars: int) -> list[dict]:
    rng = _rng(seed, "continue", doc["id"])
    targets = [i for i in range(1, len(sentences)) if _good_sentence(sentences[i])
               and count_words(sentences[i - 1]) >= 3]
    rows = []
    for i in sorted(rng.sample(targets, min(per_doc, len(targets)))):
        context = [sentences[i - 1]]
        for j in range(i - 2, max(-1, i - 4), -1):
            if sum(map(len, context)) + len(sentences[j]) > max_context_chars:
                break
            context.insert(0, sentences[j])
        if sum(map(len, context)) > max_context_chars:
            continue
        user = rng.choice(_TEMPLATES["continue"]).format(context=" ".join(context))
        rows.append(_row("continue", user, sentences[i], doc["id"], [*context, sentences[i]]))
    return rows


_BLANK_WORD = re.compile(r"^[^\W\d_]{4,}$")


def _fill_blank_rows(doc: dict, sentences: list[str], seed: int, per_doc: int) -> list[dict]:
    rng = _rng(seed, "fill_blank", doc["id"])
    usable = [s for s in sentences if _good_sentence(s, 6, 35)]
    rows = []
    for sentence in rng.sample(usable, min(per_doc, len(usable))):
        tokens = list(re.finditer(r"\S+", sentence))
        spots = [m for m in tokens[1:] if _BLANK_WORD.match(m.group().strip(".,;:!?\"“”‘’()…"))
                 and not m.group().isupper()]
        if not spots:
            continue
        m = rng.choice(spots)
        word = m.group().strip(".,;:!?\"“”‘’()…")
        start = m.start() + m.group().index(word)
        blanked = sentence[:start] + "___" + sentence[start + len(word):]
        user = rng.choice(_TEMPLATES["fill_blank"]).format(sentence=blanked)
        rows.append(_row("fill_blank", user, word, doc["id"], [sentence]))
    return rows


def _complete_rows(doc: dict, sentences: list[str], seed: int, per_doc: int) -> list[dict]:
    """The first 40-60% of a sentence's words; the answer is the rest of it."""
    rng = _rng(seed, "complete", doc["id"])
    usable = [s for s in sentences if _good_sentence(s, 8, 35)]
    rows = []
    for sentence in rng.sample(usable, min(per_doc, len(usable))):
        tokens = sentence.split()
        cut = rng.randint(max(3, round(len(tokens) * 0.4)), max(3, round(len(tokens) * 0.6)))
        prefix, rest = " ".join(tokens[:cut]), " ".join(tokens[cut:])
        if count_words(rest) < 3 or count_words(prefix) < 3:
            continue
        user = rng.choice(_TEMPLATES["complete"]).format(prefix=prefix)
        rows.append(_row("complete", user, rest, doc["id"], [sentence]))
    return rows


_MONTHS = "Ocak Şubat Mart Nisan Mayıs Haziran Temmuz Ağustos Eylül Ekim Kasım Aralık"
_DAYS = "Pazartesi Salı Çarşamba Perşembe Cuma Cumartesi Pazar"
_TIME_NAMES = frozenset(tr_lower(w) for w in (_MONTHS + " " + _DAYS).split())
_UPPER = "A-ZÇĞİÖŞÜÂÎÛ"
# a capitalised name with a case suffix after its apostrophe: locative, ablative, dative
_NAME_CASE = re.compile(rf"^([{_UPPER}][^\W\d_]*)['’]([^\W\d_]+)$")
_WHERE = ((re.compile(r"^n?[dt][ae]$"), "nerede"), (re.compile(r"^n?[dt][ae]n$"), "nereden"),
          (re.compile(r"^(?:y?[ae]|n[ae])$"), "nereye"))
_WHEN = re.compile(rf"(?:(?:\d{{1,2}} )?(?:{'|'.join(_MONTHS.split())}) )?(1[5-9]\d\d|20[0-4]\d)"
                   r"(?:['’](?:de|da|te|ta)\b| yılında\b| tarihinde\b)")
_HOW_MANY = re.compile(r"(?<![\d.,:/%'’\w])(\d{1,4}) ([a-zçğıöşü]{3,})\b")


def _question(sentence: str, start: int, end: int, wh: str) -> str:
    """``sentence`` with ``[start, end)`` replaced by the question word, ending in a question mark."""
    head = sentence[:start]
    q = head + (tr_capitalize(wh) if not head.strip() else wh) + sentence[end:]
    return q.rstrip().rstrip(".!…").rstrip() + "?"


def _names(sentence: str) -> list[tuple[int, int, str, str]]:
    """Capitalised names with a suffix after an apostrophe (``"Ankara Deneme Tiyatrosu'nda"``):
    ``(start, end, name, suffix)``. A name takes up to two capitalised words before it, never the
    sentence's first word (capitalised anyway); months and days are not names."""
    out = []
    tokens = list(re.finditer(r"\S+", sentence))
    for i, m in enumerate(tokens):
        word = m.group().rstrip(".,;:!?\"”’)…")
        match = _NAME_CASE.match(word)
        if not match or tr_lower(match.group(1)) in _TIME_NAMES:
            continue
        j = i
        while j > 1 and j > i - 3 and re.match(rf"^[{_UPPER}][^\W\d_]+$", tokens[j - 1].group()):
            j -= 1
        start, end = tokens[j].start(), m.start() + len(word)
        out.append((start, end, sentence[start : end - len(match.group(2)) - 1], match.group(2)))
    return out


# words that follow a number without being what it counts
_NOT_COUNTED = frozenset("ise ve ile veya ya da de ki gibi için olarak olan kadar ila ile ya da den dan "
                         "ya yani yahut hem ama fakat sonra önce".split())


def _qa_candidates(sentence: str) -> list[tuple[str, str, list[str]]]:
    """``(question, answer, references)`` for every where / when / how-many phrase of a sentence."""
    if not _good_sentence(sentence, 5, 25) or sentence.rstrip().endswith("?") or "=" in sentence:
        return []
    out = []
    for start, end, name, suffix in _names(sentence):
        wh = next((w for pattern, w in _WHERE if pattern.match(suffix)), None)
        if wh is not None:
            out.append((_question(sentence, start, end, wh), sentence[start:end], [sentence[start:end], name]))
    for m in _WHEN.finditer(sentence):
        out.append((_question(sentence, m.start(), m.end(), "ne zaman"), m.group(), [m.group(), m.group(1)]))
    for m in _HOW_MANY.finditer(sentence):
        number, noun = m.group(1), m.group(2)
        if tr_lower(noun) in _TIME_NAMES or noun in _NOT_COUNTED or noun.startswith("yıl") and len(number) == 4:
            continue
        out.append((_question(sentence, m.start(1), m.end(1), "kaç"), number, [number, f"{number} {noun}"]))
    return out


def _qa_rows(doc: dict, sentences: list[str], seed: int) -> list[dict]:
    """At most one question per sentence (where / when / how many), answer the phrase it replaces."""
    rng = _rng(seed, "qa", doc["id"])
    rows = []
    for sentence in sentences:
        cands = _qa_candidates(sentence)
        if not cands:
            continue
        question, answer, refs = rng.choice(cands)
        user = rng.choice(_TEMPLATES["qa"]).format(question=question)
        rows.append(_row("qa", user, answer, doc["id"], [sentence], references=refs))
    return rows


def _about_rows(doc: dict, sentences: list[str], seed: int, per_doc: int) -> list[dict]:
    """A name of a sentence (see ``_names``; suffix cut) -> the sentence."""
    rng = _rng(seed, "about", doc["id"])
    usable = []
    for sentence in sentences:
        names = sorted({name for _, _, name, _ in _names(sentence)})
        if names and _good_sentence(sentence, 6, 30):
            usable.append((sentence, names))
    rows = []
    for sentence, names in rng.sample(usable, min(per_doc, len(usable))):
        user = rng.choice(_TEMPLATES["about"]).format(topic=rng.choice(names))
        rows.append(_row("about", user, sentence, doc["id"], [sentence]))
    return rows


def _central(sentences: list[str]) -> int:
    """Index of the sentence with the highest summed cosine similarity to the others."""
    bags = [Counter(w for w in words(tr_casefold(s)) if len(w) > 2) for s in sentences]
    norms = [math.sqrt(sum(v * v for v in b.values())) or 1.0 for b in bags]
    best, best_score = 0, -1.0
    for i, b in enumerate(bags):
        if count_words(sentences[i]) < 5:
            continue
        total = sum(sum(b[w] * o[w] for w in b.keys() & o.keys()) / (norms[i] * norms[j])
                    for j, o in enumerate(bags) if j != i)
        if total > best_score:
            best, best_score = i, total
    return best


def _summarize_rows(doc: dict, sentences: list[str], seed: int, max_chars: int) -> list[dict]:
    """Non-overlapping passages of whole sentences (<= max_chars, >= 4 sentences) of a news article."""
    rng = _rng(seed, "summarize", doc["id"])
    rows, window = [], []
    for s in sentences + [None]:
        if s is not None and sum(map(len, window)) + len(s) + len(window) <= max_chars:
            window.append(s)
            continue
        if len(window) >= 4:
            answer = window[_central(window)]
            user = rng.choice(_TEMPLATES["summarize"]).format(text=" ".join(window))
            rows.append(_row("summarize", user, answer, doc["id"], window))
        window = [s] if s is not None and len(s) <= max_chars else []
    return rows


def _glosses(sense: str) -> list[str]:
    """Clean Turkish glosses of one dictionary sense: ``"(bot.) elma, elma ağacı. apple pie ..."``."""
    head = re.split(r"[.;]\s", sense + " ", maxsplit=1)[0]
    head = re.sub(r"\([^)]*\)", " ", head)
    out = []
    for g in head.split(","):
        g = " ".join(g.split()).strip(" .;:-")
        if g and count_words(g) <= 3 and re.fullmatch(r"[^\W\d_]+(?:[ '’\-][^\W\d_]+)*", g):
            out.append(g)
    return out


def _translate_rows(doc: dict, entries: list[dict], seed: int) -> list[dict]:
    rng = _rng(seed, "translate", doc["id"])
    rows = []
    for entry in entries:
        head = entry["headword"]
        if not re.fullmatch(r"[a-z]{3,}", head) or not entry["senses"]:
            continue
        glosses = _glosses(entry["senses"][0])
        if not glosses or tr_lower(glosses[0]) == head:
            continue
        user = rng.choice(_TEMPLATES["translate"]).format(word=head)
        rows.append(_row("translate", user, glosses[0], doc["id"], [head], references=glosses))
    return rows


_TREEBANK_WORD = re.compile(r"[^\W\d_]{2,}(?:['’][^\W\d_]+)?")


def _treebank_rows(doc: dict, sentences: list[dict], seed: int) -> list[dict]:
    rng = _rng(seed, "specific", doc["id"])
    rows = []
    for sent in sentences:
        text = sent["text"]
        # Alphabetic words (a proper noun may carry its suffix after an apostrophe) that occur
        # once in the sentence, so the question names one word unambiguously.
        cands = [w for w in sent["words"] if _TREEBANK_WORD.fullmatch(w["form"]) and text.count(w["form"]) == 1]
        if not cands:
            continue
        inflected = [w for w in cands if tr_lower(w["form"]) != tr_lower(w["lemma"])]
        w = rng.choice(inflected if inflected and rng.random() < 0.75 else cands)
        user = rng.choice(_TEMPLATES["lemma"]).format(sentence=text, word=w["form"])
        rows.append(_row("lemma", user, tr_lower(w["lemma"]), doc["id"], [text]))

        cased = [w for w in cands if w.get("case") in _CASE_NAMES]
        marked = [w for w in cased if _CASE_NAMES[w["case"]] != "yalın"]
        if cased:
            w = rng.choice(marked if marked and rng.random() < 0.75 else cased)
            name = _CASE_NAMES[w["case"]]
            answer = f"{name} hâl" if name == "yalın" else f"{name} hâli"
            refs = [answer, answer.replace("â", "a"), name]
            user = rng.choice(_TEMPLATES["case"]).format(sentence=text, word=w["form"])
            rows.append(_row("case", user, answer, doc["id"], [text], references=refs))

        w = rng.choice(inflected or cands)
        user = rng.choice(_TEMPLATES["analysis"]).format(sentence=text, word=w["form"])
        rows.append(_row("analysis", user, w["analysis"], doc["id"], [text]))
    return rows


def _split_rows(docs: Iterable[dict], annotations: Mapping[str, dict], seed: int, per_doc: int,
                max_context_chars: int) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {t: [] for stage in STAGES for t in TASKS[stage]}
    for doc in docs:
        ann = annotations.get(doc["id"], {})
        domain = doc["domain"]
        if domain == "dictionary":
            rows["translate"] += _translate_rows(doc, ann.get("entries", []), seed)
            continue
        if domain in ("web", "wiki") and ann.get("sentences"):
            for r in _treebank_rows(doc, ann["sentences"], seed):
                rows[r["task"]].append(r)
        if domain == "ui":
            continue
        sentences = _doc_sentences(doc, annotations)
        rows["fill_blank"] += _fill_blank_rows(doc, sentences, seed, per_doc)
        rows["complete"] += _complete_rows(doc, sentences, seed, per_doc)
        rows["about"] += _about_rows(doc, sentences, seed, per_doc)
        if domain in ("news", "help", "manual"):  # running text (treebank sentences are samples)
            rows["continue"] += _continue_rows(doc, sentences, seed, per_doc, max_context_chars)
        if domain == "news":
            rows["summarize"] += _summarize_rows(doc, sentences, seed, max_context_chars)
    return rows


def _closed_book_rows(train_docs: Iterable[dict], annotations: Mapping[str, dict], seed: int,
                      heldout_fraction: float) -> dict[str, list[dict]]:
    """``qa`` rows of every split, all from corpus-train documents, split by source sentence:
    about ``heldout_fraction`` of the sentences each for validation and for test."""
    out: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for doc in train_docs:
        if doc["domain"] in ("ui", "dictionary"):
            continue
        for row in _qa_rows(doc, _doc_sentences(doc, annotations), seed):
            bucket = int(hashlib.sha256(f"{seed}:qa-split:{row['sources'][0]}".encode()).hexdigest(), 16) % 1000
            split = "test" if bucket < heldout_fraction * 1000 else (
                "validation" if bucket < 2 * heldout_fraction * 1000 else "train")
            out[split].append(row)
    return out


def _cap(rows: list[dict], limit: int, seed: int, task: str) -> list[dict]:
    """At most ``limit`` rows, chosen by a stable hash (independent of input order)."""
    ordered = sorted(rows, key=lambda r: hashlib.sha256(f"{seed}:{task}:{json.dumps(r, sort_keys=True, ensure_ascii=False)}"
                                                        .encode()).digest())
    return ordered[:limit]


def _too_long(rows: list[dict], tokenizer, max_tokens: int) -> list[bool]:
    """Which rows, rendered with the chat template and the tokenizer's special tokens, exceed ``max_tokens``."""
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False, chat_template=CHAT_TEMPLATE) for r in rows]
    return [len(ids) > max_tokens for ids in tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]


def build_tasks(corpus_dir: str | Path | None = None, out_dir: str | Path | None = None, *, seed: int = 0,
                max_train_per_task: int = 4000, max_heldout_per_task: int = 400, per_doc: int = 3,
                max_context_chars: int = 600, tokenizer=None, max_tokens: int = 256,
                closed_book_heldout: float = 0.1) -> dict:
    """Write the two instruction sets from a built corpus; returns ``stats.json`` content.

    Layout (replaced atomically)::

        OUT/general/{train,validation,test}.jsonl
        OUT/specific/{train,validation,test}.jsonl
        OUT/stats.json        rows per stage/split/task, rows dropped for overlap, corpus fingerprint

    Args:
        corpus_dir: a corpus from ``build_corpus`` (default ``default_corpus_dir()``).
        out_dir: output folder (default ``default_tasks_dir()``).
        seed: choice of templates, words and rows; same seed and corpus, same files.
        max_train_per_task / max_heldout_per_task: caps per task and split.
        per_doc: at most this many ``continue`` / ``fill_blank`` rows per document.
        max_context_chars: longest context of ``continue`` and passage of ``summarize``, so
            prompt plus answer fit a 256-token model (all but ~0.1% of rows with the corpus tokenizer).
        tokenizer, max_tokens: with a tokenizer, rows longer than ``max_tokens`` once rendered
            with the Diffutron chat template (special tokens included) are left out and counted.
        closed_book_heldout: share of the ``qa`` source sentences (of corpus-train documents)
            whose questions go to validation, and the same share to test.

    Raises:
        DiffutronError: no corpus at ``corpus_dir``, or it yields no rows at all.
    """
    corpus_root = Path(corpus_dir) if corpus_dir is not None else default_corpus_dir()
    annotations = load_annotations(corpus_root)
    corpus_stats = json.loads((corpus_root / "stats.json").read_text(encoding="utf-8"))
    out = atomic_output_dir(out_dir if out_dir is not None else default_tasks_dir(), "stats.json").check()

    by_split = {split: _split_rows(iter_corpus(split, corpus_root), annotations, seed, per_doc, max_context_chars)
                for split in SPLITS}
    for split, rows in _closed_book_rows(iter_corpus("train", corpus_root), annotations, seed,
                                         closed_book_heldout).items():
        by_split[split]["qa"] = rows
    too_long: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    if tokenizer is not None:
        for split, tasks in by_split.items():
            for task, rows in tasks.items():
                flags = _too_long(rows, tokenizer, max_tokens) if rows else []
                if any(flags):
                    too_long[split][task] = sum(flags)
                    tasks[task] = [r for r, long in zip(rows, flags) if not long]
    # Held-out first: test, then validation; an earlier split loses rows sharing a source.
    order = ["test", "validation", "train"]
    claimed: set[str] = set()
    dropped: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    final: dict[str, dict[str, list[dict]]] = {}
    for split in order:
        limit = max_train_per_task if split == "train" else max_heldout_per_task
        final[split] = {}
        for task, rows in by_split[split].items():
            clean = [r for r in rows if claimed.isdisjoint(r["sources"])]
            if len(rows) > len(clean):
                dropped[split][task] = len(rows) - len(clean)
            final[split][task] = _cap(clean, limit, seed, task)
        for rows in final[split].values():
            for r in rows:
                claimed.update(r["sources"])
    if not any(final["train"].values()):
        raise DiffutronError(f"the corpus at {corpus_root} yields no task rows; rebuild it with `diffutron corpus build`")

    stats = {"format": TASKS_FORMAT, "corpus": str(corpus_root), "corpus_fingerprint": corpus_stats.get("fingerprint"),
             "seed": seed, "metrics": TASK_METRIC, "closed_book": list(CLOSED_BOOK), "dropped_for_overlap": dropped,
             "dropped_too_long": too_long if tokenizer is not None else None, "max_tokens": max_tokens if tokenizer else None,
             "rows": {stage: {split: {t: len(final[split][t]) for t in TASKS[stage]} for split in SPLITS}
                      for stage in STAGES}}
    with out as tmp:
        for stage in STAGES:
            (tmp / stage).mkdir()
            for split in SPLITS:
                rows = [r for t in TASKS[stage] for r in final[split][t]]
                rng = _rng(seed, "shuffle", stage, split)
                rows.sort(key=lambda r: (r["task"], r["doc"], r["messages"][0]["content"]))
                rng.shuffle(rows)
                with open(tmp / stage / f"{split}.jsonl", "w", encoding="utf-8") as f:
                    for i, r in enumerate(rows):
                        row = {"id": f"{stage}/{split}/{i:06d}", "stage": stage, **r}
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return stats


def load_tasks(stage: str = "general", split: str = "train", tasks_dir: str | Path | None = None,
               tasks: Iterable[str] | None = None) -> list[dict]:
    """Rows of one stage (``general`` / ``specific``) and split, optionally only some ``tasks``.

    Raises:
        DiffutronError: unknown stage/split/task, or no task files (build them with
            ``diffutron corpus tasks``).
    """
    if stage not in STAGES:
        raise DiffutronError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    if split not in SPLITS:
        raise DiffutronError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    wanted = set(tasks) if tasks is not None else None
    if wanted is not None and not wanted <= set(TASKS[stage]):
        raise DiffutronError(f"unknown task(s) {sorted(wanted - set(TASKS[stage]))} for stage {stage}; "
                             f"choose from {', '.join(TASKS[stage])}")
    root = Path(tasks_dir).expanduser() if tasks_dir is not None else default_tasks_dir()
    path = root / stage / f"{split}.jsonl"
    if not path.is_file():
        raise DiffutronError(f"no task file {path}; build the tasks with `diffutron corpus tasks"
                             f"{'' if tasks_dir is None else ' --out ' + str(root)}`")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if wanted is None or r["task"] in wanted]
