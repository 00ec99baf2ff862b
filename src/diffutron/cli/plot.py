"""``diffutron plot``: redraw the loss plot of a training run from its metrics."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "plot", help="redraw the loss plot (loss.png) of a training stage or a recipe",
        description="Draw training loss and held-out perplexity against step from the metrics.jsonl a run "
                    "wrote: for a stage's output directory its own plot, for a recipe's output directory all "
                    "its stages on one step axis. Training draws the same plot at the end of each stage and "
                    "recipe; this redraws it, e.g. for a run still in progress or one that was interrupted.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a stage's output directory (diffutron train --output) or a "
                                                      "recipe's output_dir")
    p.add_argument("--output", default=None, help="the PNG to write (default: RUN_DIR/loss.png)")
    p.set_defaults(func=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from ..outputs import check_output_file
    from ..training.plot import PLOT, plot_run

    run_dir = Path(args.run_dir).expanduser()
    out = Path(args.output) if args.output is not None else run_dir / PLOT if run_dir.is_dir() else None
    if out is not None:  # a directory, or one that cannot be written, is refused before any drawing
        check_output_file(out)
    print(f"loss plot written to {plot_run(run_dir, out)}")
    return 0
