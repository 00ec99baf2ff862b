"""``diffutron eval perplexity | cetvel | lm-eval``: thin wrappers over ``diffutron.evaluation``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import DiffutronError
from ._common import add_model_args, load_lm


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate: ELBO perplexity, the CETVEL tasks, or lm-eval tasks",
                       description="Evaluate a masked diffusion LM.")
    ev = p.add_subparsers(dest="eval_command", metavar="WHAT")
    ev.required = True

    ppl = ev.add_parser(
        "perplexity", help="held-out ELBO perplexity bound (per token and per word) with its Monte Carlo error",
        description="The ELBO perplexity bound: documents are packed as in pre-training (text + EOS, cut at the "
                    "context length), t and masks are drawn per sequence from a fixed seed, and the weighted "
                    "masked cross-entropy is summed and divided by the number of tokens (or words).")
    add_model_args(ppl)
    ppl.add_argument("--data", required=True, metavar="FILE_OR_HF_ID",
                     help=".txt (one document per line), .jsonl/.json/.parquet/.csv file, or a hub dataset id")
    ppl.add_argument("--split", default="test", help="hub dataset split (default test)")
    ppl.add_argument("--config", default=None, help="hub dataset configuration name")
    ppl.add_argument("--column", default="text", help="column holding the text (default text)")
    ppl.add_argument("--limit", type=int, default=None, help="use only the first N documents")
    ppl.add_argument("--max-length", type=int, default=None, help="sequence length (default: the model's context)")
    ppl.add_argument("--mc-samples", type=int, default=4, help="draws of t and masks per sequence (default 4)")
    ppl.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default 16)")
    ppl.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0: runs agree)")
    ppl.add_argument("--output", type=Path, default=None, help="write the result with its provenance as JSON")
    ppl.add_argument("--no-progress", action="store_true", help="no progress bar")
    ppl.set_defaults(func=run_perplexity_cmd)

    from ..evaluation.cetvel import TASK_NAMES

    cet = ev.add_parser(
        "cetvel", help="the seven CETVEL tasks Diffutron reports (zero-shot multiple choice)",
        description="Score the CETVEL tasks with CETVEL's prompts, choices, splits and metrics. Data come from the "
                    "hub, or from --data-dir DIR holding DIR/<task>/<split>.{jsonl,parquet,csv}.")
    add_model_args(cet)
    cet.add_argument("--tasks", default=",".join(TASK_NAMES), help=f"comma-separated (default all: {','.join(TASK_NAMES)})")
    cet.add_argument("--data-dir", default=None, help="read DIR/<task>/<split>.{jsonl,parquet,csv} instead of the hub")
    cet.add_argument("--prepare", default=None, metavar="DIR",
                     help="on a connected machine: write the tasks' splits from the hub to DIR in the --data-dir "
                          "layout (to copy to an offline one), then exit; no model is loaded")
    cet.add_argument("--limit", type=int, default=None, help="score only the first N examples of each task")
    cet.add_argument("--output", type=Path, default=None, help="results JSON (rewritten after every task)")
    cet.add_argument("--samples", type=Path, default=None, help="JSONL with every example's log-likelihoods")
    cet.add_argument("--chat", action="store_true", help="apply the chat template to prompts (CETVEL does not)")
    cet.add_argument("--mc-samples", type=int, default=64, help="Monte Carlo draws per multi-token choice (default 64)")
    cet.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default 32)")
    cet.add_argument("--seed", type=int, default=0, help="Monte Carlo seed (default 0)")
    cet.add_argument("--stochastic", action="store_true",
                     help="draw masks from one seeded stream instead of keying them on each choice's tokens")
    cet.add_argument("--scheme", choices=["diffutron", "reference"], default="diffutron",
                     help="reference = replay the reference adapter (off-by-one split, 128 draws in batches of 32) "
                          "to compare with published scores")
    cet.add_argument("--turkish-casing", action="store_true",
                     help="lower-case xcopa_tr's choices with Turkish rules instead of CETVEL's Python str.lower")
    cet.add_argument("--no-progress", action="store_true", help="no progress bars")
    cet.set_defaults(func=run_cetvel_cmd)

    lme = ev.add_parser("lm-eval", prefix_chars="+", add_help=False,
                        help="lm-evaluation-harness with the diffutron model registered (arguments go to lm-eval)",
                        description="Runs lm-eval's CLI with --model diffutron.")
    lme.add_argument("lm_eval_args", nargs="*", metavar="ARG")
    lme.set_defaults(func=run_lm_eval_cmd)


def run_perplexity_cmd(args: argparse.Namespace) -> int:
    from ..evaluation.perplexity_run import read_texts, run_perplexity

    if args.limit is not None and args.limit < 1:
        raise DiffutronError(f"--limit {args.limit}: give a number of documents >= 1")
    read_texts(args.data, column=args.column, split=args.split, config=args.config, limit=args.limit)  # fail fast
    lm = load_lm(args)
    result, record = run_perplexity(
        lm, args.data, column=args.column, split=args.split, config=args.config, limit=args.limit,
        max_length=args.max_length, mc_samples=args.mc_samples, batch_size=args.batch_size, seed=args.seed,
        progress=not args.no_progress,
    )
    print(result.summary())
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def run_cetvel_cmd(args: argparse.Namespace) -> int:
    from ..evaluation.runner import CetvelConfig, format_table, prepare_cetvel, run_cetvel

    if args.prepare is not None:
        from ..evaluation.cetvel import TASKS, export_tasks

        names = [n.strip() for n in args.tasks.split(",") if n.strip()]
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise DiffutronError(f"--tasks: unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
        out = export_tasks([TASKS[n] for n in names], args.prepare, say=lambda m: print(m, file=sys.stderr))
        print(f"wrote {out}: copy it to the offline machine and pass --data-dir {out}", file=sys.stderr)
        return 0
    config = CetvelConfig(
        tasks=args.tasks, data_dir=args.data_dir, limit=args.limit, chat=args.chat, mc_samples=args.mc_samples,
        batch_size=args.batch_size, deterministic=not args.stochastic, seed=args.seed, scheme=args.scheme,
        turkish_casing=args.turkish_casing,
    )
    prepared = prepare_cetvel(config)  # bad data fails here, before the model loads
    lm = load_lm(args)
    try:
        results = run_cetvel(lm, config, prepared=prepared, output=args.output, samples=args.samples,
                             progress=not args.no_progress)
    except KeyboardInterrupt:
        if args.output is not None:
            print(f"diffutron: interrupted; finished tasks are in {args.output}", file=sys.stderr)
        raise
    print(format_table(results))
    if args.output is not None:
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def run_lm_eval_cmd(args: argparse.Namespace) -> int:
    try:
        from ..evaluation.lm_eval_adapter import main
    except ImportError:
        raise DiffutronError("lm-eval is not installed: pip install 'diffutron[eval]'") from None
    main(args.lm_eval_args)
    return 0
