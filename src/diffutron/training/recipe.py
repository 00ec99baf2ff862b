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

A recipe may also name ``variants``: partial recipes merged into it on request
(``--variant NAME``), e.g. a smaller model and fewer steps for a CPU::

    variants:
      cpu:
        output_dir: runs/my-pipeline-cpu          # default: OUTPUT_DIR-NAME
        defaults: {mixed_precision: "no"}
        stages:                                   # by stage name; mappings merge key by key
          cpt: {start: {config: {hidden_size: 320}}, epochs: 4}

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
from .checkpoint import RUN_RECORD, changed_settings, check_output, output_state
from .loop import TrainResult, finished_result, train
from .export import ExportConfig, export
from .metrics import say
from .plot import PLOT, draw_quietly, plot_recipe
from .prepare import PrepareConfig, paths, prepare, substitute
from .task_metric import MetricConfig, task_evaluator

TOP_KEYS = ("name", "description", "output_dir", "defaults", "quick", "stages", "prepare", "export", "variants")
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
    variant: str | None = None

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


def _deep_merge(base, over):
    """``over`` merged into ``base`` key by key at every depth (lists and scalars replace)."""
    if not isinstance(base, dict) or not isinstance(over, dict):
        return copy.deepcopy(over)
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if key in out else copy.deepcopy(value)
    return out


def resolve_variant(data: dict, variant: str | None) -> str | None:
    """``auto``: the recipe's ``cpu`` variant where no CUDA device is present, else none."""
    if variant != "auto":
        return variant
    import torch

    has_cpu = isinstance(data.get("variants"), dict) and "cpu" in data["variants"]
    return "cpu" if has_cpu and not torch.cuda.is_available() else None


def _apply_variant(data: dict, variant: str, where: Where) -> dict:
    variants = data.get("variants") or {}
    if not isinstance(variants, dict) or variant not in variants:
        raise where.error("variants", f"variants: no variant {variant!r} in this recipe; it has: "
                                      f"{', '.join(variants) if isinstance(variants, dict) and variants else 'none'}")
    over = variants[variant] or {}
    allowed = ("output_dir", "defaults", "quick", "stages", "prepare", "export", "description")
    for key in over:
        if key not in allowed:
            raise where.error(f"variants.{variant}.{key}", f"variants.{variant}.{key}: unknown key; allowed: "
                                                           f"{', '.join(allowed)}")
    out = {k: v for k, v in data.items() if k != "variants"}
    out["output_dir"] = over.get("output_dir") or f"{data.get('output_dir')}-{variant}"
    for key in ("defaults", "quick", "prepare", "export"):
        if over.get(key) is not None:
            out[key] = _deep_merge(data.get(key) or {}, over[key])
    stages = over.get("stages") or {}
    names = [s.get("name") for s in data.get("stages") or [] if isinstance(s, dict)]
    unknown = [n for n in stages if n not in names]
    if unknown:
        raise where.error(f"variants.{variant}.stages", f"variants.{variant}.stages: no stage {unknown[0]!r} in the "
                                                        f"recipe (stages: {', '.join(map(str, names))})")
    out["stages"] = [_deep_merge(s, stages[s["name"]]) if isinstance(s, dict) and s.get("name") in stages else s
                     for s in data.get("stages") or []]
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


def load_recipe(path: str | Path, *, quick: bool = False, variant: str | None = None) -> Recipe:
    """Read and check a recipe YAML; every stage becomes a validated :class:`TrainConfig`.

    ``variant`` merges one of the recipe's ``variants`` into it (``auto``: see ``resolve_variant``).

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
    variant = resolve_variant(data, variant)
    if variant is not None:
        data = _apply_variant(data, variant, where)
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
    recipe = Recipe(name=str(data.get("name") or Path(path).stem), output_dir=out_root, source=str(path), quick=quick,
                    variant=variant)
    if data.get("prepare") is not None:
        recipe.prepare = build(PrepareConfig, data["prepare"], where, "prepare")
        if quick and recipe.prepare.quick:  # --quick overrides, checked as strictly as the rest
            recipe.prepare = build(PrepareConfig, {**data["prepare"], **recipe.prepare.quick, "quick": {}},
                                   where, "prepare")
    if recipe.prepare is not None:
        recipe.where = paths(recipe.prepare, out_root / "data", quick=quick)
        defaults = substitute(defaults, recipe.where)
        stages_raw = substitute(stages_raw, recipe.where)
    if data.get("export") is not None:
        recipe.export = build(ExportConfig, substitute(data["export"], recipe.where), where, "export")
        if quick and recipe.export.card is not None:  # --quick: a few documents and prompts
            recipe.export.card = dataclasses.replace(recipe.export.card, max_documents=8, max_prompts=4,
                                                     draws=min(recipe.export.card.draws, 2))
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
    return [key for key, _, _ in changed_settings(old, config.to_dict())]


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
    variant: str | None = None,
    on_stage_end: Callable[[Stage, TrainResult, dict | None], None] | None = None,
    deadline: float | None = None,
    export_model: bool = True,
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

    ``variant``: one of the recipe's ``variants`` (``auto``: ``cpu`` without a CUDA device).
    With ``export.card`` set, each stage's model gets the card's numbers (``card_metrics``) in
    ``STAGE/card_metrics.json`` (with the stage's training seconds) as soon as it is finished;
    ``on_stage_end(stage, result, card_metrics)`` is then called. ``deadline`` (a
    ``time.perf_counter()`` value): stages not started by then are left out (the export too).
    ``export_model=False`` skips the ``export:`` section (a run whose weights are installed elsewhere).
    ``OUTPUT_DIR/loss.png`` shows every stage's loss and held-out perplexity on one step axis.

    Raises:
        DiffutronError: an invalid recipe (nothing runs), or a stage's own errors.
    """
    import time

    began = time.perf_counter()
    recipe = load_recipe(path, quick=quick, variant=variant)
    if recipe.prepare is not None:
        prepare(recipe.prepare, recipe.where, log=say)
    # an interrupted stage without --resume is found before any stage runs
    if not resume:
        for stage in recipe.stages:
            if output_state(Path(stage.config.output_dir)) == "interrupted":
                check_output(Path(stage.config.output_dir), resume=False)  # raises: pass --resume
    if isolate is None:
        isolate = _can_isolate(evaluators)
    card = recipe.export.card if recipe.export is not None else None
    stems = _stems() if card is not None else None
    results = []
    for n, stage in enumerate(recipe.stages, 1):
        out = Path(stage.config.output_dir)
        header = f"stage {n}/{len(recipe.stages)} {stage.name!r}"
        state = output_state(out)
        if state != "finished" and deadline is not None and time.perf_counter() > deadline:
            say(f"{header}: not started, the run's deadline has passed; stages left out: "
                f"{', '.join(s.name for s in recipe.stages[n - 1:])}")
            _plot(recipe, results)
            return results
        stage_began = time.perf_counter()
        if state == "finished":
            changed = _settings_changed(out, stage.config)
            note = f" (settings changed since: {', '.join(changed)}; delete {out} to train it again)" if changed else ""
            say(f"{header}: already finished in {out}, skipped{note}")
            result = finished_result(out)
        else:
            say(f"{header}: start {stage.start}, {stage.config.method}, output {out}")
            if isolate:
                result = _run_isolated(stage.config, resume and state == "interrupted", stage.metric)
            else:
                stage_evals = list(evaluators.get(stage.name, ()) if isinstance(evaluators, Mapping) else evaluators)
                if stage.metric is not None:
                    stage_evals.append(task_evaluator(stage.metric))
                result = train(stage.config, resume=resume and state == "interrupted", evaluators=stage_evals)
        results.append(result)
        metrics = _stage_card(stage, result, card, stems, time.perf_counter() - stage_began) if card else None
        if on_stage_end is not None:
            on_stage_end(stage, result, metrics)
    _plot(recipe, results)
    if recipe.export is not None and export_model:
        target = recipe.output_dir / "export" if quick or not recipe.export.dir else Path(recipe.export.dir)
        ran_all = not any(r.already_finished for r in results)
        export(recipe.export, target, recipe=recipe, results=results, corpus_dir=recipe.where.get("corpus"),
               wall_seconds=time.perf_counter() - began if ran_all else None, log=say, stems=stems)
    return results


def _plot(recipe: Recipe, results: list[TrainResult]) -> None:
    """``OUTPUT_DIR/loss.png``: every stage run so far on one step axis (one process draws it)."""
    import os

    if results and os.environ.get("RANK", "0") == "0":
        stages = [(stage.name, Path(result.output_dir)) for stage, result in zip(recipe.stages, results)]
        draw_quietly(plot_recipe, stages, recipe.output_dir / PLOT, title=recipe.name)


def _stems():
    from ..data.lexicon import load_stems

    try:
        return load_stems()
    except DiffutronError as err:
        say(f"card: no Turkish-word share ({err})")
        return None


def _stage_card(stage: Stage, result: TrainResult, card, stems, seconds: float) -> dict:
    """``STAGE/card_metrics.json``: computed once per trained stage (kept when the stage is skipped)."""
    from .card_metrics import CARD_METRICS, stage_card_metrics

    path = Path(result.output_dir) / CARD_METRICS
    if result.already_finished and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    metrics = stage_card_metrics(result.output_dir, card, stems=stems)
    metrics.update(stage=stage.name, train_seconds=None if result.already_finished else seconds)
    path.write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    ppl = metrics.get("perplexity", {}).get("ppl_per_word")
    share = (metrics["prompt_set"].get("turkish_share") or {}).get("share")
    say(f"card: {stage.name}: held-out ELBO perplexity per word {ppl if ppl is None else f'{ppl:,.1f}'}, "
        f"Turkish-word share of the prompt set's answers {share if share is None else f'{share:.3f}'}, "
        f"{metrics['prompt_set']['lengths']['mean_words']:.1f} words per answer")
    return metrics
