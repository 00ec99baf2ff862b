"""The seven CETVEL tasks the Diffutron paper reports: data, prompts, choices, gold labels.

Each task renders its prompt and choices byte for byte as CETVEL's lm-eval task files do
(zero-shot: the context is the rendered prompt, each continuation is ``" " + choice``).
Data comes from the Hugging Face hub ids of the reference (through ``datasets``) or, offline,
from ``DIR/<task>/<split>.{jsonl,parquet,csv}`` files in the same schema.

Casing: CETVEL lower-cases the first letter of xcopa_tr's choices with Python's ``str.lower``
(``"I" -> "i"``, ``"İ" -> "i̇"``), and that is kept so scores compare; ``turkish_casing=True``
uses Turkish rules instead (``"I" -> "ı"``, ``"İ" -> "i"``). No other task changes case.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DiffutronError
from ..files import file_sha256
from ..text import tr_lower


@dataclass(frozen=True)
class Example:
    """One item: the prompt (context), the choices (without the leading space) and the gold index.

    ``gold`` may be outside ``range(len(choices))`` (no gold label, e.g. MNLI's -1): such an
    item counts as wrong, as in CETVEL."""

    prompt: str
    choices: tuple[str, ...]
    gold: int

    @property
    def has_gold(self) -> bool:
        return 0 <= self.gold < len(self.choices)


@dataclass(frozen=True)
class Task:
    """A CETVEL task: where its data lives, how a row becomes an :class:`Example`, its metrics."""

    name: str
    hub_path: str
    hub_name: str | None
    split: str
    size: int  # rows of the split, as the reference lists
    columns: tuple[str, ...]  # top-level fields a row must have
    metrics: tuple[str, ...]
    text: Callable[[dict], str]
    choices: Callable[[dict], list[str]]
    target: Callable[[dict], int]
    choices_turkish: Callable[[dict], list[str]] | None = None
    class_label_columns: tuple[str, ...] = field(default=())  # hub ClassLabel ints -> names
    f1_average: str | None = None  # with metric f1: "binary" (class 1 positive) or "macro", as CETVEL scores it

    @property
    def source(self) -> str:
        config = f" / {self.hub_name}" if self.hub_name else ""
        return f"{self.hub_path}{config} / {self.split}"

    def example(self, doc: dict, *, turkish_casing: bool = False) -> Example:
        """Render one row. Raises DiffutronError naming the field when the row is malformed."""
        pick = self.choices_turkish if turkish_casing and self.choices_turkish else self.choices
        try:
            return Example(prompt=self.text(doc), choices=tuple(pick(doc)), gold=int(self.target(doc)))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise DiffutronError(f"{self.name}: a row does not fit the task's schema ({_describe(err)}): "
                                 f"check the data against {self.source}") from None


def _describe(err: Exception) -> str:
    if isinstance(err, KeyError):
        return f"missing field {err.args[0]!r}"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


# ---------------------------------------------------------------------------------------------
# the seven tasks (templates as in CETVEL's YAML files)


def _belebele_text(d: dict) -> str:
    return (f"P: {d['flores_passage']}\nQ: {d['question'].strip()}\nA: {d['mc_answer1']}\nB: {d['mc_answer2']}"
            f"\nC: {d['mc_answer3']}\nD: {d['mc_answer4']}\nAnswer:")


def _belebele_target(d: dict) -> int:
    value = d["correct_answer_num"]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return ["1", "2", "3", "4"].index(str(value).strip())


def _exams_question(d: dict) -> dict:
    q = d["question"]
    if isinstance(q, str):  # a CSV cell holding the JSON object
        q = json.loads(q)
    return q


def _exams_choices(d: dict) -> list[str]:
    choices = _exams_question(d)["choices"]
    if isinstance(choices, list):  # list of {"text", "label"} records
        return [c["text"] for c in choices]
    return list(choices["text"])


def _exams_target(d: dict) -> int:
    choices = _exams_question(d)["choices"]
    labels = [c["label"] for c in choices] if isinstance(choices, list) else list(choices["label"])
    key = (d.get("answerKey") or "").lstrip()
    return labels.index(key) if key in labels else 3


def _irony_text(d: dict) -> str:
    return f"Cümle: {d['text']}\nSoru: Bu cümlede ironi var mı?\n"


NEWS_LABELS = ("sport", "magazine", "politics", "health", "economy")


def _news_target(d: dict) -> int:
    label = d["label"]
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label.strip())
    if isinstance(label, int) and not isinstance(label, bool):
        if 0 <= label < len(NEWS_LABELS):
            return label
        raise ValueError(f"label {label} is not 0..4")
    key = str(label).strip().casefold()  # the labels are English words
    if key not in NEWS_LABELS:
        raise ValueError(f"label {label!r} is none of {', '.join(NEWS_LABELS)}")
    return NEWS_LABELS.index(key)


def _pair_text(d: dict, s1: str, s2: str, question: str) -> str:
    return (f"Aşağıda iki cümle verilmektedir:\n\nCümle 1: \"{d[s1]}\"\nCümle 2: \"{d[s2]}\"\n\n{question}")


def _sts_target(d: dict) -> int:
    score = float(d["score"])
    for gold, upper in enumerate((0.5, 1.5, 2.5, 3.5, 4.5)):
        if score < upper:
            return gold
    return 5


XCOPA_CONNECTORS = {"cause": "çünkü", "effect": "bu yüzden"}


def _xcopa_text(d: dict) -> str:
    return d["premise"].strip()[:-1] + f" {XCOPA_CONNECTORS[d['question']]}"


def _python_lower_first(choice: str) -> str:
    return choice[0].lower() + choice[1:]


def _turkish_lower_first(choice: str) -> str:
    return tr_lower(choice[0]) + choice[1:]


def _label(d: dict) -> int:
    return int(d["label"])


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("belebele_tr", "facebook/belebele", "tur_Latn", "test", 900,
         ("flores_passage", "question", "mc_answer1", "mc_answer2", "mc_answer3", "mc_answer4", "correct_answer_num"),
         ("acc", "acc_norm"), _belebele_text, lambda d: ["A", "B", "C", "D"], _belebele_target),
    Task("exams_tr", "mhardalov/exams", "crosslingual_tr", "validation", 393, ("question", "answerKey"),
         ("acc", "acc_norm"), lambda d: _exams_question(d)["stem"], _exams_choices, _exams_target),
    Task("ironytr", "mcemilg/IronyTR", None, "validation", 600, ("text", "label"),
         ("acc", "acc_norm", "f1"), _irony_text, lambda d: ["Hayır", "Evet"], _label, f1_average="binary"),
    Task("news_cat", "mcemilg/news-cat", None, "test", 250, ("text", "label"),
         ("acc", "acc_norm", "f1"), lambda d: f"Cümle: {d['text']}\nSoru: Bu cümlenin konusu nedir?\n Cevap:",
         lambda d: ["spor", "magazin", "siyaset", "sağlık", "ekonomi"], _news_target,
         class_label_columns=("label",), f1_average="macro"),
    Task("mnli_tr", "boun-tabi/nli_tr", "multinli_tr", "validation_matched", 10000, ("premise", "hypothesis", "label"),
         ("acc", "acc_norm"),
         lambda d: _pair_text(d, "premise", "hypothesis", "Bu iki cümle arasındaki ilişki nedir:"),
         lambda d: ["TUTARLI", "ALAKASIZ", "ÇELİŞKİLİ"], _label),
    Task("sts_tr", "emrecan/stsb-mt-turkish", None, "test", 1379, ("sentence1", "sentence2", "score"),
         ("acc", "acc_norm"),
         lambda d: _pair_text(d, "sentence1", "sentence2", "Bu iki cümle arasında ne kadar benzerlik vardır:"),
         lambda d: ["Benzerlik Yok", "Düşük Benzerlik", "Orta Benzerlik", "Yüksek Benzerlik",
                    "Çok Yüksek Benzerlik", "Mantıksal Olarak Aynı"], _sts_target),
    Task("xcopa_tr", "cambridgeltl/xcopa", "tr", "test", 500, ("premise", "choice1", "choice2", "question", "label"),
         ("acc",), _xcopa_text,
         lambda d: [_python_lower_first(d["choice1"]), _python_lower_first(d["choice2"])], _label,
         choices_turkish=lambda d: [_turkish_lower_first(d["choice1"]), _turkish_lower_first(d["choice2"])]),
]}
TASK_NAMES = tuple(TASKS)


def get_tasks(names: str | Sequence[str] | None) -> list[Task]:
    """Tasks by name (a comma-separated string or a list); all seven when None or empty.

    Raises:
        DiffutronError: an unknown or repeated name (the message lists the valid ones).
    """
    if names is None:
        return list(TASKS.values())
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    names = [n for n in names if n]
    if not names:
        return list(TASKS.values())
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise DiffutronError(f"unknown task {', '.join(map(repr, unknown))}: choose from {', '.join(TASK_NAMES)}")
    if len(set(names)) != len(names):
        raise DiffutronError(f"a task is named twice in {','.join(names)}")
    return [TASKS[n] for n in names]


# ---------------------------------------------------------------------------------------------
# loading


DATA_SUFFIXES = (".jsonl", ".parquet", ".csv")


@dataclass
class TaskData:
    """The rows of one task and where they came from (for the results' provenance)."""

    task: Task
    docs: list[dict]
    source: dict
    total: int  # rows in the split before --limit

    def examples(self, *, turkish_casing: bool = False) -> list[Example]:
        return [self.task.example(d, turkish_casing=turkish_casing) for d in self.docs]


def load_task(task: Task, data_dir: str | Path | None = None, *, limit: int | None = None) -> TaskData:
    """Read a task's split: ``data_dir/<task>/<split>.{jsonl,parquet,csv}`` when ``data_dir`` is
    given, else the hub dataset through ``datasets``. ``limit`` keeps the first N rows.

    Raises:
        DiffutronError: missing files, an unreachable hub, a missing column, an empty split, a
            bad ``limit``.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise DiffutronError(f"invalid limit {limit!r}: give a number of examples >= 1 (or no limit)")
    if data_dir is not None:
        docs, source = _read_local(task, Path(data_dir))
    else:
        docs, source = _read_hub(task)
    if not docs:
        raise DiffutronError(f"{task.name}: the {task.split} split at {source['location']} is empty")
    missing = [c for c in task.columns if c not in docs[0]]
    if missing:
        have = ", ".join(map(str, docs[0])) or "none"
        raise DiffutronError(f"{task.name}: the data at {source['location']} has no column "
                             f"{', '.join(map(repr, missing))} (it has: {have}); use the schema of {task.source}")
    total = len(docs)
    return TaskData(task, docs[:limit] if limit else docs, source, total)


def _read_local(task: Task, data_dir: Path) -> tuple[list[dict], dict]:
    if not data_dir.is_dir():
        raise DiffutronError(f"--data-dir {data_dir} is not a directory")
    candidates = [data_dir / task.name / f"{task.split}{suffix}" for suffix in DATA_SUFFIXES]
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise DiffutronError(f"{data_dir} has no {task.name}/{task.split}.{{jsonl,parquet,csv}}: put the task's "
                             f"{task.split} split there ({task.source}) or leave {task.name} out of --tasks")
    path = found[0]
    suffix = path.suffix
    try:
        if suffix == ".jsonl":
            docs = _read_jsonl(path)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            docs = pq.read_table(path).to_pylist()
        else:
            with path.open(newline="", encoding="utf-8-sig") as f:
                docs = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DiffutronError(f"cannot read {path}: {_describe(err)}") from None
    digest = file_sha256(path)
    return docs, {"kind": "local", "location": str(path), "sha256": digest}


def _read_jsonl(path: Path) -> list[dict]:
    docs = []
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DiffutronError(f"{path}:{lineno}: not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DiffutronError(f"{path}:{lineno}: a row must be a JSON object")
            docs.append(row)
    return docs


def _read_hub(task: Task) -> tuple[list[dict], dict]:
    try:
        import datasets

        ds = datasets.load_dataset(task.hub_path, task.hub_name, split=task.split)
    except Exception as err:  # offline, unknown split, gated: one line for the user
        raise DiffutronError(
            f"cannot load {task.source} from the Hugging Face hub ({_describe(err)}); where offline, pass "
            f"--data-dir DIR with {task.name}/{task.split}.jsonl in the same schema"
        ) from None
    docs = ds.to_list()
    for column in task.class_label_columns:
        feature = ds.features.get(column)
        if feature is not None and hasattr(feature, "int2str"):
            for d in docs:
                d[column] = feature.int2str(d[column])
    fingerprint = getattr(ds, "_fingerprint", None)
    return docs, {"kind": "hub", "location": task.source, "fingerprint": fingerprint}


def export_tasks(tasks: Sequence[Task], out_dir: str | Path, *, say=print) -> Path:
    """Write each task's split from the hub to ``out_dir/<task>/<split>.jsonl`` (the ``--data-dir``
    layout; class labels as names, as ``load_task`` gives them), on a connected machine, to copy to
    an offline one. ``out_dir/SOURCES.json`` records where each file came from. Each file is
    written to a temporary name and renamed: an interrupted export leaves no partial split."""
    from ..outputs import check_output_dir

    out = check_output_dir(out_dir, "--prepare")
    out.mkdir(parents=True, exist_ok=True)
    sources = {}
    for task in tasks:
        docs, source = _read_hub(task)
        target = out / task.name / f"{task.split}.jsonl"
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False, default=str) + "\n")
        tmp.replace(target)
        sources[task.name] = {**source, "file": str(target.relative_to(out)), "rows": len(docs),
                              "sha256": file_sha256(target)}
        say(f"{task.name}: {len(docs)} rows from {task.source} -> {target}")
    (out / "SOURCES.json").write_text(json.dumps(sources, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
