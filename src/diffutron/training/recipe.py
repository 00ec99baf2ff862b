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

``recipe_file.py`` reads and checks the file (``load_recipe``); this module runs it (``run_recipe``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..errors import DiffutronError
from .checkpoint import RUN_RECORD, changed_settings, check_output, output_state
from .config import TrainConfig
from .export import export
from .loop import TrainResult, finished_result, train
from .metrics_log import say
from .plot import PLOT, draw_quietly, plot_recipe
from .prepare import prepare
from .recipe_file import Recipe, Stage, load_recipe
from .task_metric import MetricConfig, task_evaluator

__all__ = ["Recipe", "Stage", "load_recipe", "run_recipe"]


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
    if not resume:  # an interrupted stage without --resume is found before any stage runs
        _check_not_interrupted(recipe)
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
        results.append(_run_stage(stage, header, state, resume=resume, isolate=isolate, evaluators=evaluators))
        result = results[-1]
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


def _check_not_interrupted(recipe: Recipe) -> None:
    """Raise (pass --resume) when a stage of ``recipe`` was interrupted."""
    for stage in recipe.stages:
        if output_state(Path(stage.config.output_dir)) == "interrupted":
            check_output(Path(stage.config.output_dir), resume=False)  # raises: pass --resume


def _run_stage(stage: Stage, header: str, state: str, *, resume: bool, isolate: bool, evaluators) -> TrainResult:
    """One stage: skipped when finished (noting changed settings), else trained (in a fresh
    process with ``isolate``), from its last checkpoint when interrupted and ``resume`` is set."""
    out = Path(stage.config.output_dir)
    if state == "finished":
        changed = _settings_changed(out, stage.config)
        note = f" (settings changed since: {', '.join(changed)}; delete {out} to train it again)" if changed else ""
        say(f"{header}: already finished in {out}, skipped{note}")
        return finished_result(out)
    say(f"{header}: start {stage.start}, {stage.config.method}, output {out}")
    if isolate:
        return _run_isolated(stage.config, resume and state == "interrupted", stage.metric)
    stage_evals = list(evaluators.get(stage.name, ()) if isinstance(evaluators, Mapping) else evaluators)
    if stage.metric is not None:
        stage_evals.append(task_evaluator(stage.metric))
    return train(stage.config, resume=resume and state == "interrupted", evaluators=stage_evals)


def _plot(recipe: Recipe, results: list[TrainResult]) -> None:
    """``OUTPUT_DIR/loss.png``: every stage run so far on one step axis (one process draws it)."""
    import os

    if results and os.environ.get("RANK", "0") == "0":
        stages = [(stage.name, Path(result.output_dir)) for stage, result in zip(recipe.stages, results)]
        draw_quietly(plot_recipe, stages, recipe.output_dir / PLOT, title=recipe.name)


def _stems():
    from ..corpus.lexicon import load_stems

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
