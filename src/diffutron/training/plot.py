"""Loss plots: training loss and held-out perplexity against the optimizer step, as a PNG.

- ``plot_stage(stage_dir)``: one stage's ``metrics.jsonl`` (or ``metrics.csv``) drawn into
  ``stage_dir/loss.png``; ``train`` calls it at the end of every stage.
- ``plot_recipe([(name, stage_dir), ...], path)``: the stages one after the other on one step
  axis, each boundary marked and named; ``run_recipe`` writes ``OUTPUT_DIR/loss.png``.
- ``plot_run(run_dir)``: either, as the directory holds (``diffutron plot RUN_DIR``).

matplotlib is imported only when a plot is drawn, and only its Agg canvas: no window opens, no
pyplot state is touched, and ``import diffutron`` does not pay for it. A PNG is written to a
temporary name and renamed, so a killed run leaves the old plot or the new one, never half of one.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

from ..errors import DiffutronError
from .metrics_log import CSV, JSONL, say

PLOT = "loss.png"
SIZE_INCHES, DPI = (8.0, 6.0), 100  # 800 x 600 pixels
LOG_SCALE_RATIO = 10.0  # perplexities spanning more than this factor get a log axis


def read_metrics(stage_dir: str | os.PathLike) -> list[dict]:
    """The metric records of a stage directory: ``metrics.jsonl`` (lines cut short by a kill are
    skipped), else ``metrics.csv``; ``[]`` when it has neither."""
    stage_dir = Path(stage_dir)
    if (stage_dir / JSONL).is_file():
        records = []
        for line in (stage_dir / JSONL).read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
        return records
    if (stage_dir / CSV).is_file():
        with open(stage_dir / CSV, encoding="utf-8", newline="") as fh:
            return [{k: _number(v) if k != "kind" else v for k, v in row.items()} for row in csv.DictReader(fh)]
    return []


def has_metrics(path: Path) -> bool:
    return (path / JSONL).is_file() or (path / CSV).is_file()


def _number(text: str | None):
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _points(records: list[dict], kind: str, key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of the finite ``key`` values of one record kind, in step order."""
    pairs = sorted((float(r["step"]), float(r[key])) for r in records
                   if r.get("kind") == kind and isinstance(r.get("step"), (int, float))
                   and isinstance(r.get(key), (int, float)) and math.isfinite(r[key]))
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_stage(stage_dir: str | os.PathLike, path: str | os.PathLike | None = None, *,
               title: str | None = None) -> Path:
    """Draw one stage's training loss and held-out perplexity bound against step.

    Args:
        stage_dir: a stage's output directory (it holds ``metrics.jsonl`` or ``metrics.csv``).
        path: the PNG to write (default ``stage_dir/loss.png``).
        title: the figure's title (default: the directory's name).

    Returns:
        the path of the PNG.

    Raises:
        DiffutronError: the directory holds no metric records.
    """
    stage_dir = Path(stage_dir)
    records = read_metrics(stage_dir)
    if not records:
        raise DiffutronError(f"{stage_dir} holds no {JSONL} or {CSV} with metric lines: name a training stage's "
                             "output directory (or a recipe's)")
    return _draw([(stage_dir.name, records)], Path(path) if path else stage_dir / PLOT,
                 title or stage_dir.resolve().name, marked=False)


def plot_recipe(stages: Sequence[tuple[str, str | os.PathLike]], path: str | os.PathLike, *,
                title: str | None = None) -> Path:
    """Draw several stages on one step axis: stage k's steps follow the last step of stage k-1,
    and each stage boundary is a dashed line named after the stage that starts there.

    Args:
        stages: ``(name, stage_dir)`` in the order they ran; stages without metrics are left out.
        path: the PNG to write.
        title: the figure's title.

    Returns:
        the path of the PNG.

    Raises:
        DiffutronError: no stage holds metric records.
    """
    found = [(name, records) for name, d in stages if (records := read_metrics(d))]
    if not found:
        raise DiffutronError(f"none of the stages ({', '.join(n for n, _ in stages) or 'none'}) holds metric lines "
                             "yet: nothing to plot")
    return _draw(found, Path(path), title or "recipe", marked=True)


def recipe_stages(root: str | os.PathLike) -> list[tuple[str, Path]]:
    """The stage directories under a recipe's output directory, in the order they ran.

    A stage that started from another listed stage (``start: previous``, as its ``run.json``
    records) comes after it; otherwise stages are in the order they started (``run.json``'s time).
    """
    root = Path(root)
    dirs = [p for p in sorted(root.iterdir()) if p.is_dir() and has_metrics(p)] if root.is_dir() else []

    def started(p: Path) -> float:
        for name in ("run.json", JSONL, CSV):
            if (p / name).is_file():
                return (p / name).stat().st_mtime
        return 0.0

    def parent(p: Path) -> Path | None:
        try:
            start = json.loads((p / "run.json").read_text(encoding="utf-8")).get("start")
        except (OSError, ValueError):
            return None
        if not isinstance(start, str):
            return None
        resolved = Path(start).resolve()
        return next((d for d in dirs if d.resolve() == resolved), None)

    pending = sorted(dirs, key=started)
    parents = {p: parent(p) for p in pending}
    ordered: list[Path] = []
    while pending:  # the earliest stage whose start is not still pending; a cycle cannot stall it
        pick = next((p for p in pending if parents[p] not in pending), pending[0])
        ordered.append(pick)
        pending.remove(pick)
    return [(p.name, p) for p in ordered]


def plot_run(run_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Redraw the plot of a finished or interrupted run: a stage directory (its own metrics) or a
    recipe's output directory (its stages, see ``recipe_stages``); default ``run_dir/loss.png``.

    Raises:
        DiffutronError: ``run_dir`` is not a directory, or holds no metrics at either level.
    """
    run_dir = Path(os.path.expanduser(str(run_dir)))
    if not run_dir.is_dir():
        raise DiffutronError(f"{run_dir}: no such directory: name a training stage's output directory "
                             "(or a recipe's)")
    out = Path(path) if path else run_dir / PLOT
    if has_metrics(run_dir):
        return plot_stage(run_dir, out)
    stages = recipe_stages(run_dir)
    if not stages:
        raise DiffutronError(f"{run_dir} holds no {JSONL}, and no stage directory below it does: name a training "
                             "stage's output directory (or a recipe's)")
    return plot_recipe(stages, out, title=run_dir.resolve().name)


def draw_quietly(fn: Callable[..., Path], *args, **kwargs) -> Path | None:
    """``fn(*args, **kwargs)``, with a warning instead of an exception: a plot never costs a
    finished training run. Returns the PNG's path, or None."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - any failure of a plot is reported, never raised
        say(f"warning: the loss plot was not drawn ({type(err).__name__}: {err}); redraw it with "
            "`diffutron plot RUN_DIR`")
        return None


# ---------------------------------------------------------------------------------------------
# drawing


def _draw(stages: list[tuple[str, list[dict]]], path: Path, title: str, *, marked: bool) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, ppl_ax = fig.subplots(2, 1, sharex=True)
    colors = [f"C{i % 10}" for i in range(len(stages))]
    offset, all_ppl, bounds = 0.0, [], []
    for (name, records), color in zip(stages, colors):
        steps, loss = _points(records, "train", "loss")
        e_steps, ppl = _points(records, "eval", "heldout_ppl")
        label = name if marked else "training loss"
        if steps:
            loss_ax.plot([offset + s for s in steps], loss, color=color, linewidth=1.4,
                         marker="o" if len(steps) < 30 else None, markersize=3,
                         label=f"{label} (last {loss[-1]:.3f})")
        if ppl:
            all_ppl += ppl
            ppl_ax.plot([offset + s for s in e_steps], ppl, color=color, marker="o", markersize=4, linewidth=1.2,
                        label=f"{name if marked else 'held-out'} (last {ppl[-1]:,.1f})")
        bounds.append((offset, name))
        last = max(steps + e_steps, default=0.0)
        offset += last
    loss_ax.set_ylabel("training loss (MDLM)")
    loss_ax.set_title(title)
    ppl_ax.set_ylabel("held-out perplexity bound")
    ppl_ax.set_xlabel("optimizer step" + (" (stages one after another)" if marked else ""))
    if all_ppl:
        if max(all_ppl) > LOG_SCALE_RATIO * min(all_ppl) > 0:  # a fresh model starts near the vocabulary size
            ppl_ax.set_yscale("log")
        ppl_ax.legend(loc="best", fontsize="small")
    else:
        ppl_ax.text(0.5, 0.5, "no held-out evaluation", transform=ppl_ax.transAxes, ha="center", va="center",
                    color="0.4")
    if loss_ax.lines:
        loss_ax.legend(loc="best", fontsize="small")
    if marked:
        for start, name in bounds:
            for ax in (loss_ax, ppl_ax):
                ax.axvline(start, color="0.55", linestyle="--", linewidth=0.9)
            loss_ax.annotate(name, xy=(start, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
                             textcoords="offset points", ha="left", va="top", fontsize="small", color="0.3")
    for ax in (loss_ax, ppl_ax):
        ax.grid(True, alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
