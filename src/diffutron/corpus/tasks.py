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
How each family's rows are made from one document is ``diffutron.corpus.task_generators``'s.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..backbone import CHAT_TEMPLATE
from ..errors import DiffutronError
from ..text import tr_lower, words
from .build import atomic_output_dir, default_corpus_dir, iter_corpus, load_annotations
from .sources import cache_root
from .split import SPLITS
from .task_generators import (about_rows, complete_rows, continue_rows, doc_sentences, fill_blank_rows, qa_rows,
                              seeded_rng, summarize_rows, translate_rows, treebank_rows)

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


def default_tasks_dir() -> Path:
    """``<cache>/tasks`` (see ``diffutron.corpus.sources.cache_root``)."""
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


# --------------------------------------------------------------------------- building


def _split_rows(docs: Iterable[dict], annotations: Mapping[str, dict], seed: int, per_doc: int,
                max_context_chars: int) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {t: [] for stage in STAGES for t in TASKS[stage]}
    for doc in docs:
        ann = annotations.get(doc["id"], {})
        domain = doc["domain"]
        if domain == "dictionary":
            rows["translate"] += translate_rows(doc, ann.get("entries", []), seed)
            continue
        if domain in ("web", "wiki") and ann.get("sentences"):
            for r in treebank_rows(doc, ann["sentences"], seed):
                rows[r["task"]].append(r)
        if domain == "ui":
            continue
        sentences = doc_sentences(doc, annotations)
        rows["fill_blank"] += fill_blank_rows(doc, sentences, seed, per_doc)
        rows["complete"] += complete_rows(doc, sentences, seed, per_doc)
        rows["about"] += about_rows(doc, sentences, seed, per_doc)
        if domain in ("news", "help", "manual"):  # running text (treebank sentences are samples)
            rows["continue"] += continue_rows(doc, sentences, seed, per_doc, max_context_chars)
        if domain == "news":
            rows["summarize"] += summarize_rows(doc, sentences, seed, max_context_chars)
    return rows


def _closed_book_rows(train_docs: Iterable[dict], annotations: Mapping[str, dict], seed: int,
                      heldout_fraction: float) -> dict[str, list[dict]]:
    """``qa`` rows of every split, all from corpus-train documents, split by source sentence:
    about ``heldout_fraction`` of the sentences each for validation and for test."""
    out: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for doc in train_docs:
        if doc["domain"] in ("ui", "dictionary"):
            continue
        for row in qa_rows(doc, doc_sentences(doc, annotations), seed):
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
    too_long = _drop_too_long(by_split, tokenizer, max_tokens) if tokenizer is not None else None
    final, dropped = _claim_sources(by_split, seed, max_train_per_task, max_heldout_per_task)
    if not any(final["train"].values()):
        raise DiffutronError(f"the corpus at {corpus_root} yields no task rows; rebuild it with `diffutron corpus build`")

    stats = {"format": TASKS_FORMAT, "corpus": str(corpus_root), "corpus_fingerprint": corpus_stats.get("fingerprint"),
             "seed": seed, "metrics": TASK_METRIC, "closed_book": list(CLOSED_BOOK), "dropped_for_overlap": dropped,
             "dropped_too_long": too_long, "max_tokens": max_tokens if tokenizer else None,
             "rows": {stage: {split: {t: len(final[split][t]) for t in TASKS[stage]} for split in SPLITS}
                      for stage in STAGES}}
    _write_tasks(out, final, stats, seed)
    return stats


def _drop_too_long(by_split: dict[str, dict[str, list[dict]]], tokenizer, max_tokens: int) -> dict[str, dict[str, int]]:
    """Leave out (in place) the rows longer than ``max_tokens`` (see ``_too_long``); how many, per split and task."""
    too_long: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    for split, tasks in by_split.items():
        for task, rows in tasks.items():
            flags = _too_long(rows, tokenizer, max_tokens) if rows else []
            if any(flags):
                too_long[split][task] = sum(flags)
                tasks[task] = [r for r, long in zip(rows, flags) if not long]
    return too_long


def _claim_sources(by_split: dict[str, dict[str, list[dict]]], seed: int, max_train_per_task: int,
                   max_heldout_per_task: int) -> tuple[dict[str, dict[str, list[dict]]], dict[str, dict[str, int]]]:
    """``(final rows, rows dropped for overlap)`` per split and task, each task capped (``_cap``).

    Held-out first: test, then validation; an earlier split loses rows sharing a source.
    """
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
    return final, dropped


def _write_tasks(out: atomic_output_dir, final: dict[str, dict[str, list[dict]]], stats: dict, seed: int) -> None:
    """``OUT/<stage>/<split>.jsonl`` (rows shuffled by the seed, ids numbered) and ``stats.json``, atomically."""
    with out as tmp:
        for stage in STAGES:
            (tmp / stage).mkdir()
            for split in SPLITS:
                rows = [r for t in TASKS[stage] for r in final[split][t]]
                rng = seeded_rng(seed, "shuffle", stage, split)
                rows.sort(key=lambda r: (r["task"], r["doc"], r["messages"][0]["content"]))
                rng.shuffle(rows)
                with open(tmp / stage / f"{split}.jsonl", "w", encoding="utf-8") as f:
                    for i, r in enumerate(rows):
                        row = {"id": f"{stage}/{split}/{i:06d}", "stage": stage, **r}
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


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
