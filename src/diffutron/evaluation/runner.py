"""Run the CETVEL tasks on a model: scores, a results JSON with provenance, a printed table.

``prepare_cetvel`` reads and renders every task first (bad data fails before any compute);
``run_cetvel`` scores them one after the other through the one likelihood estimator, writes the
results file after each task (a run that fails midway keeps the tasks it finished, and says
which are missing) and returns the results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import DiffutronError
from ..likelihood import Score, loglikelihood
from .metrics import predictions, score_task
from .provenance import provenance
from .reference_scheme import reference_loglikelihood
from .cetvel import TASK_NAMES, Example, TaskData, get_tasks, load_task

SCHEMES = ("diffutron", "reference")


@dataclass(frozen=True)
class CetvelConfig:
    """Settings of a CETVEL run (every one is recorded in the results).

    Attributes:
        tasks: task names (all seven by default).
        data_dir: read ``data_dir/<task>/<split>.{jsonl,parquet,csv}`` instead of the hub.
        limit: score only the first N examples of each task.
        chat: wrap each prompt in the chat template (CETVEL does not).
        mc_samples: Monte Carlo draws per multi-token choice.
        batch_size: rows per forward pass.
        deterministic: key each choice's draws on its tokens (same score in any run or batch).
        seed: Monte Carlo seed.
        scheme: ``diffutron`` (this estimator) or ``reference`` (a replay of the reference
            adapter, off-by-one split included, to show where published scores come from).
        turkish_casing: lower-case xcopa_tr's first letters with Turkish rules, not CETVEL's.
    """

    tasks: tuple[str, ...] = TASK_NAMES
    data_dir: str | None = None
    limit: int | None = None
    chat: bool = False
    mc_samples: int = 64
    batch_size: int = 32
    deterministic: bool = True
    seed: int = 0
    scheme: str = "diffutron"
    turkish_casing: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            object.__setattr__(self, "tasks", tuple(t.name for t in get_tasks(self.tasks)))
        else:
            object.__setattr__(self, "tasks", tuple(t.name for t in get_tasks(list(self.tasks))))
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise DiffutronError(f"invalid limit={self.limit!r}: give a number of examples >= 1 (or no limit)")
        for name in ("mc_samples", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise DiffutronError(f"invalid {name}={value!r}: must be an integer >= 1")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise DiffutronError(f"invalid seed={self.seed!r}: must be an integer >= 0")
        if self.scheme not in SCHEMES:
            raise DiffutronError(f"unknown scheme {self.scheme!r}: choose {' or '.join(SCHEMES)}")
        if self.scheme == "reference" and (self.mc_samples < self.batch_size or self.mc_samples % self.batch_size):
            raise DiffutronError(f"the reference scheme needs mc_samples ({self.mc_samples}) to be a multiple of "
                                 f"batch_size ({self.batch_size}), e.g. 128 and 32")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks)
        return d


def prepare_cetvel(config: CetvelConfig) -> list[tuple[TaskData, list[Example]]]:
    """Read every task's data and render its examples (fails fast, before any model work)."""
    prepared = []
    for task in get_tasks(list(config.tasks)):
        data = load_task(task, config.data_dir, limit=config.limit)
        prepared.append((data, data.examples(turkish_casing=config.turkish_casing)))
    return prepared


def run_cetvel(
    lm,
    config: CetvelConfig,
    *,
    prepared: list[tuple[TaskData, list[Example]]] | None = None,
    output: str | Path | None = None,
    samples: str | Path | None = None,
    progress: bool = True,
    log=None,
) -> dict:
    """Score the CETVEL tasks of ``config`` on ``lm`` (a ``DiffusionLM``).

    Args:
        lm: the model; ``lm.render`` applies the chat template when ``config.chat``.
        config: the run's settings.
        prepared: the output of :func:`prepare_cetvel` (read here when None).
        output: results JSON, rewritten after every task.
        samples: a JSONL file with every example's choices, log-likelihoods and prediction.
        progress: progress bars on stderr.
        log: ``log(line)`` for one line per finished task (stderr by default).

    Returns:
        the results dict (also written to ``output``): ``results[task]`` with metrics, standard
        errors and counts, ``provenance``, ``incomplete`` and ``errors``.

    Raises:
        whatever stopped a task, after the results of the finished tasks were written.
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    prepared = prepare_cetvel(config) if prepared is None else prepared
    settings = config.to_dict()
    settings["estimator"] = _estimator_settings(config)
    results: dict = {
        "suite": "cetvel",
        "results": {},
        "incomplete": [data.task.name for data, _ in prepared],
        "errors": {},
        "provenance": provenance(lm, settings),
    }
    _write(output, results)
    sample_file = Path(samples).open("w", encoding="utf-8") if samples else None
    try:
        for data, examples in prepared:
            name = data.task.name
            try:
                results["results"][name] = _run_task(lm, config, data, examples, sample_file, progress)
            except BaseException as err:
                line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                results["errors"][name] = f"{type(err).__name__}: {line}"
                _write(output, results)
                raise
            results["incomplete"].remove(name)
            _write(output, results)
            log(_task_line(name, results["results"][name]))
    finally:
        if sample_file is not None:
            sample_file.close()
    return results


def _estimator_settings(config: CetvelConfig) -> dict:
    if config.scheme == "reference":
        return {"scheme": "reference", "split": "ids with special tokens, sliced (off by one)",
                "mc_samples": config.mc_samples, "batch_size": config.batch_size, "logits": "full"}
    return {"scheme": "diffutron", "split": "ids without special tokens, specials once around the sequence",
            "one_token": "exact", "multi_token": "ELBO: all mask patterns when 2^T - 1 <= mc_samples, else "
            "Monte Carlo with stratified mask counts", "mc_samples": config.mc_samples,
            "batch_size": config.batch_size, "deterministic": config.deterministic, "seed": config.seed,
            "logits": "masked positions only"}


def _run_task(lm, config: CetvelConfig, data: TaskData, examples: list[Example], sample_file, progress) -> dict:
    task = data.task
    prompts = [lm.render(ex.prompt, chat=True) if config.chat else ex.prompt for ex in examples]
    pairs = [(prompt, " " + choice) for prompt, ex in zip(prompts, examples) for choice in ex.choices]
    counter = _ForwardCounter(lm.model)
    start = time.perf_counter()
    label = f"{task.name} ({len(examples)})" if progress else False
    with counter:
        if config.scheme == "reference":
            scores = reference_loglikelihood(lm, pairs, mc_samples=config.mc_samples, batch_size=config.batch_size,
                                             seed=config.seed, progress=label)
        else:
            scores = loglikelihood(lm, pairs, mc_samples=config.mc_samples, batch_size=config.batch_size,
                                   deterministic=config.deterministic, seed=config.seed, check_greedy=False,
                                   progress=label)
    seconds = time.perf_counter() - start
    per_example: list[list[Score]] = []
    at = 0
    for ex in examples:
        per_example.append(scores[at : at + len(ex.choices)])
        at += len(ex.choices)
    lls = [[s.value for s in group] for group in per_example]
    choices = [ex.choices for ex in examples]
    golds = [ex.gold for ex in examples]
    metrics = score_task(lls, choices, golds, task.metrics, f1_average=task.f1_average or "binary")
    mc = [s.stderr for s in scores if s.method == "monte_carlo"]
    if sample_file is not None:
        for i, (ex, prompt, group) in enumerate(zip(examples, prompts, per_example)):
            pred, pred_norm = predictions([s.value for s in group], ex.choices)
            sample_file.write(json.dumps({
                "task": task.name, "index": i, "prompt": prompt, "choices": list(ex.choices), "gold": ex.gold,
                "loglikelihoods": [s.value for s in group], "stderrs": [s.stderr for s in group],
                "methods": [s.method for s in group], "tokens": [s.tokens for s in group],
                "pred": pred, "pred_norm": pred_norm, "truncated": max(s.truncated for s in group),
            }, ensure_ascii=False) + "\n")
        sample_file.flush()
    ties = sum(1 for group in lls if len(group) > 1 and all(v == group[0] for v in group))
    return {
        "metrics": metrics,
        **({"f1_average": task.f1_average} if "f1" in task.metrics else {}),  # CETVEL's f1: binary or macro
        "examples": len(examples),
        "examples_in_split": data.total,
        "examples_without_gold": sum(1 for ex in examples if not ex.has_gold),
        "truncated_examples": sum(1 for group in per_example if any(s.truncated for s in group)),
        "all_choices_tied": ties,
        "choice_tokens": _mean([s.tokens for s in scores]),
        "mean_mc_stderr": _mean(mc) if mc else 0.0,
        "forward_passes": counter.count,
        "seconds": round(seconds, 3),
        "source": data.source,
    }


class _ForwardCounter:
    """Counts forward calls of the model while active."""

    def __init__(self, model):
        self.model, self.count, self._handle = model, 0, None

    def __enter__(self):
        def hook(module, args, kwargs=None):
            self.count += 1

        self._handle = self.model.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _write(path, results: dict) -> None:
    if path is None:
        return
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(results), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _finite(value):
    """JSON has no NaN: write null instead."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _pct(metric: dict | None) -> str:
    if metric is None:
        return "-"
    value, se = metric["value"], metric["stderr"]
    if se is None or (isinstance(se, float) and math.isnan(se)):
        return f"{100 * value:.2f}"
    return f"{100 * value:.2f} ± {100 * se:.2f}"


def _task_line(name: str, result: dict) -> str:
    parts = [f"{m} {_pct(v)}" for m, v in result["metrics"].items()]
    extra = f", {result['truncated_examples']} truncated" if result["truncated_examples"] else ""
    return f"{name}: {', '.join(parts)} ({result['examples']} examples, {result['seconds']:.1f} s{extra})"


def format_table(results: dict) -> str:
    """The results as a plain-text table (percentages, ± standard error)."""
    header = ["task", "n", "acc", "acc_norm", "f1", "truncated", "ties"]
    rows = [header]
    for name, r in results["results"].items():
        m = r["metrics"]
        f1 = _pct(m.get("f1")) + (f" ({r['f1_average']})" if m.get("f1") and r.get("f1_average") else "")
        rows.append([name, str(r["examples"]), _pct(m.get("acc")), _pct(m.get("acc_norm")),
                     f1, str(r["truncated_examples"]), str(r["all_choices_tied"])])
    for name in results.get("incomplete", []):
        rows.append([name, "-", "not run" if name not in results.get("errors", {}) else "failed", "", "", "", ""])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
