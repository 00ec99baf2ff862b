"""Progressive recipes: one YAML file runs a whole pipeline of training stages, in order.

::

    name: my-pipeline
    output_dir: runs/my-pipeline        # stage S writes to runs/my-pipeline/S
    defaults: {seed: 42, mixed_precision: auto}      # any stage setting, for every stage
    quick: {max_steps: 4}                # extra overrides for --quick (smoke runs)
    stages:
      - name: cpt
        start: jhu-clsp/mmBERT-base      # a directory, a hub id, "previous", or {config:, tokenizer:}
        data: {train: corpus/, kind: pretrain, max_length: 512}
        method: lora
        lora: {r: 256, alpha: 256, merge: true}
      - name: sft
        start: previous
        data: {train: chat.jsonl, kind: instruct, max_length: 256}
        epochs: 3

Every stage key other than ``name`` and ``start`` is a :class:`~diffutron.training.config.TrainConfig`
setting. The whole file is checked before any stage runs: unknown keys, wrong types, a start or a
data file that does not exist fail with ``file:line: key: message``. Finished stages are skipped;
an interrupted stage resumes from its newest complete checkpoint with ``resume=True``. Relative
paths are relative to the working directory.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..data.rows import check_sources
from ..errors import DiffutronError
from .config import InitConfig, SettingError, TrainConfig, Where, build, read_yaml
from .inputs import check_start
from .checkpoint import RUN_RECORD, check_output, output_state
from .loop import TrainResult, finished_result, train
from .export import ExportConfig, export
from .metrics import say
from .prepare import PrepareConfig, paths, prepare, substitute
from .task_metric import MetricConfig, task_evaluator

TOP_KEYS = ("name", "description", "output_dir", "defaults", "quick", "stages", "prepare", "export")
PREVIOUS = "previous"
# what --quick changes in every stage unless the recipe's quick: mapping says otherwise
QUICK_DEFAULTS = {"max_steps": 4, "batch_size": 2, "grad_accum": 1, "log_every": 1, "eval_sequences": 8,
                  "save_every": 2, "data": {"max_rows": 200, "heldout_fraction": 0.1}}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Stage:
    """One stage of a recipe: its name, where it starts (for messages) and its training config."""

    name: str
    start: str
    config: TrainConfig
    metric: MetricConfig | None = None


@dataclass
class Recipe:
    name: str
    output_dir: Path
    stages: list[Stage] = field(default_factory=list)
    source: str = ""
    prepare: PrepareConfig | None = None
    where: dict = field(default_factory=dict)  # ${corpus}, ${tasks}, ${tokenizer}, ${data}
    export: ExportConfig | None = None
    quick: bool = False

    def pending(self, path) -> bool:
        """A path that ``prepare`` will create but that does not exist yet (not checked now)."""
        return (path is not None and self.prepare is not None and not Path(str(path)).exists()
                and any(str(path).startswith(v) for v in self.where.values()))


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "config":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _quick(settings: dict, quick: dict) -> dict:
    out = copy.deepcopy(settings)
    for key, value in quick.items():
        if isinstance(value, dict):
            out[key] = _quick(out.get(key) or {}, value)
        elif key in ("max_steps", "batch_size", "eval_sequences", "max_rows") and isinstance(out.get(key), int):
            out[key] = min(out[key], value)  # shrink, never grow
        else:
            out[key] = value
    return out


def load_recipe(path: str | Path, *, quick: bool = False) -> Recipe:
    """Read and check a recipe YAML; every stage becomes a validated :class:`TrainConfig`.

    Raises:
        DiffutronError: unknown keys, wrong types, duplicate stage names, ``previous`` in the first
            stage, a start or data file that does not exist (with file, line and key).
    """
    data, where = read_yaml(path)
    if not isinstance(data, dict):
        raise DiffutronError(f"{path}: a recipe is a mapping with output_dir and stages")
    for key in data:
        if key not in TOP_KEYS:
            import difflib

            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise where.error(str(key), f"{key}: unknown key{hint}; allowed: {', '.join(TOP_KEYS)}")
    if not data.get("output_dir") or not isinstance(data["output_dir"], str):
        raise where.error("output_dir", "output_dir: missing: say where the stages write (a directory)")
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise where.error("stages", "stages: give a list of at least one stage")
    defaults = data.get("defaults") or {}
    for key in ("defaults", "quick"):
        if data.get(key) is not None:
            if not isinstance(data[key], dict):
                raise where.error(key, f"{key}: expected a mapping of stage settings")
            build(TrainConfig, data[key], where, key)  # unknown keys and wrong types, with their own lines
    quick_over = _merge(QUICK_DEFAULTS, data.get("quick") or {})
    out_root = Path(data["output_dir"] + ("-quick" if quick else ""))
    recipe = Recipe(name=str(data.get("name") or Path(path).stem), output_dir=out_root, source=str(path), quick=quick)
    if data.get("prepare") is not None:
        recipe.prepare = build(PrepareConfig, data["prepare"], where, "prepare")
        if quick and recipe.prepare.quick:  # --quick overrides, checked as strictly as the rest
            recipe.prepare = build(PrepareConfig, {**data["prepare"], **recipe.prepare.quick, "quick": {}},
                                   where, "prepare")
    if data.get("export") is not None:
        recipe.export = build(ExportConfig, data["export"], where, "export")
    if recipe.prepare is not None:
        recipe.where = paths(recipe.prepare, out_root / "data", quick=quick)
        defaults = substitute(defaults, recipe.where)
        stages_raw = substitute(stages_raw, recipe.where)
    names: set[str] = set()
    for i, raw in enumerate(stages_raw):
        key = f"stages[{i}]"
        if not isinstance(raw, dict):
            raise where.error(key, f"{key}: expected a mapping with name, start, data, ...")
        raw = dict(raw)
        name = raw.pop("name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise where.error(f"{key}.name" if name is not None else key,
                              f"{key}.name: give each stage a name of letters, digits, '.', '_' or '-'")
        if name in names:
            raise where.error(f"{key}.name", f"{key}.name: {name!r} is used by an earlier stage")
        names.add(name)
        start = raw.pop("start", None)
        metric = raw.pop("metric", None)
        if metric is not None:
            metric = build(MetricConfig, metric, where, f"{key}.metric")
            metric = dataclasses.replace(metric, tasks_dir=metric.tasks_dir or recipe.where.get("tasks"),
                                         limit=min(metric.limit, 16) if quick else metric.limit)
        for forbidden in ("model", "init", "output_dir"):
            if forbidden in raw:
                raise where.error(f"{key}.{forbidden}", f"{key}.{forbidden}: set the start with start: (and the "
                                  "output with the recipe's output_dir)")
        settings = _merge(defaults, raw)
        if quick:
            settings = _quick(settings, quick_over)
        config = build(TrainConfig, settings, where, key)
        model, init, start_text = _start(start, i, recipe, where, key)
        try:
            config = config.replace(model=model, init=init, output_dir=str(out_root / name))
        except SettingError as err:
            raise where.error(f"{key}.{err.key}", f"{key}.{err.key}: {err.message}") from None
        if config.data.train is None:
            raise where.error(f"{key}.data", f"{key}.data.train: missing: name the stage's training data")
        try:
            tok = config.init.tokenizer if config.init is not None else None
            if start_text != PREVIOUS and not recipe.pending(tok):
                check_start(config.model, config.init, key=f"{key}.start")
            if not any(recipe.pending(p) for p in _as_list(config.data.train)):
                check_sources(config.data.train, f"{key}.data.train")
            if not any(recipe.pending(p) for p in _as_list(config.data.heldout)):
                check_sources(config.data.heldout, f"{key}.data.heldout")
        except DiffutronError as err:
            sub = str(err).split(":", 1)[0]
            raise where.error(sub, str(err)) from None
        recipe.stages.append(Stage(name, start_text, config, metric))
    return recipe


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _start(start, i: int, recipe: Recipe, where: Where, key: str):
    """``(model, init, text)`` of a stage's start."""
    if start is None:
        raise where.error(key, f"{key}.start: missing: a model directory, a hub id, 'previous' or "
                               "{config: ..., tokenizer: ...} for a fresh model")
    if isinstance(start, dict):
        return None, build(InitConfig, start, where, f"{key}.start"), "fresh"
    if not isinstance(start, str):
        raise where.error(f"{key}.start", f"{key}.start: expected a path, a hub id, 'previous' or a mapping")
    if start == PREVIOUS:
        if i == 0:
            raise where.error(f"{key}.start", f"{key}.start: the first stage has no previous stage to start from")
        return recipe.stages[i - 1].config.output_dir, None, PREVIOUS
    return start, None, start


def _settings_changed(stage_dir: Path, config: TrainConfig) -> list[str]:
    record = stage_dir / RUN_RECORD
    if not record.is_file():
        return []
    try:
        old = json.loads(record.read_text(encoding="utf-8")).get("config", {})
    except ValueError:
        return []
    new = config.to_dict()
    ignore = {"progress", "log_every", "tensorboard", "keep_last", "save_every", "eval_every"}
    return sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))


def _stage_process(config: TrainConfig, resume: bool, metric: MetricConfig | None) -> TrainResult:
    """One stage in a fresh process (the child's side of ``run_recipe(isolate=True)``)."""
    try:
        return train(config, resume=resume, evaluators=[task_evaluator(metric)] if metric is not None else [])
    except DiffutronError as err:
        raise DiffutronError(str(err)) from None  # the plain type pickles back to the parent


def _run_isolated(config: TrainConfig, resume: bool, metric: MetricConfig | None) -> TrainResult:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_stage_process, config, resume, metric).result()
        except BrokenProcessPool:
            raise DiffutronError(f"the process training {config.output_dir} died (out of memory, or killed); "
                                 "run the recipe again with --resume to continue from its last checkpoint") from None


def _can_isolate(evaluators) -> bool:
    import os

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    custom = any(evaluators.values()) if isinstance(evaluators, Mapping) else bool(evaluators)
    return not distributed and not custom


def run_recipe(
    path: str | Path,
    *,
    quick: bool = False,
    resume: bool = False,
    evaluators: Sequence[Callable] | Mapping[str, Sequence[Callable]] = (),
    isolate: bool | None = None,
) -> list[TrainResult]:
    """Run every stage of a recipe in order; returns one :class:`TrainResult` per stage.

    Finished stages are skipped (with a note when their settings changed since). An interrupted
    stage continues from its newest checkpoint when ``resume`` is set, and fails with a message
    saying so otherwise. ``evaluators`` (a list for every stage, or ``{stage name: list}``) add
    held-out metrics, see :func:`~diffutron.training.train`.

    ``isolate``: train each stage in a fresh (spawned) process, so one stage's memory is given
    back before the next starts and no stage inherits another's allocator state (the numbers and
    weights are those of an in-process run, bit for bit). Default: on, unless the recipe runs under a
    distributed launcher (torchrun / accelerate launch: every rank is already its own process) or
    Python ``evaluators`` are given (they live in this process).

    Raises:
        DiffutronError: an invalid recipe (nothing runs), or a stage's own errors.
    """
    import time

    began = time.perf_counter()
    recipe = load_recipe(path, quick=quick)
    if recipe.prepare is not None:
        prepare(recipe.prepare, recipe.where, log=say)
    # an interrupted stage without --resume is found before any stage runs
    if not resume:
        for stage in recipe.stages:
            if output_state(Path(stage.config.output_dir)) == "interrupted":
                check_output(Path(stage.config.output_dir), resume=False)  # raises: pass --resume
    if isolate is None:
        isolate = _can_isolate(evaluators)
    results = []
    for n, stage in enumerate(recipe.stages, 1):
        out = Path(stage.config.output_dir)
        header = f"stage {n}/{len(recipe.stages)} {stage.name!r}"
        state = output_state(out)
        if state == "finished":
            changed = _settings_changed(out, stage.config)
            note = f" (settings changed since: {', '.join(changed)}; delete {out} to train it again)" if changed else ""
            say(f"{header}: already finished in {out}, skipped{note}")
            results.append(finished_result(out))
            continue
        say(f"{header}: start {stage.start}, {stage.config.method}, output {out}")
        if isolate:
            results.append(_run_isolated(stage.config, resume and state == "interrupted", stage.metric))
            continue
        stage_evals = list(evaluators.get(stage.name, ()) if isinstance(evaluators, Mapping) else evaluators)
        if stage.metric is not None:
            stage_evals.append(task_evaluator(stage.metric))
        results.append(train(stage.config, resume=resume and state == "interrupted", evaluators=stage_evals))
    if recipe.export is not None:
        target = recipe.output_dir / "export" if quick or not recipe.export.dir else Path(recipe.export.dir)
        ran_all = not any(r.already_finished for r in results)
        export(recipe.export, target, recipe=recipe, results=results, corpus_dir=recipe.where.get("corpus"),
               wall_seconds=time.perf_counter() - began if ran_all else None, log=say)
    return results
