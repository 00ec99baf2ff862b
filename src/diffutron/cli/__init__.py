"""``diffutron`` command line: a thin layer over the library.

Each subcommand lives in its own module of this package and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` to a function taking the parsed ``argparse.Namespace``.
User errors (``DiffutronError``) print one line to stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import DiffutronError

# Subcommand modules, in the order they appear in ``diffutron --help``.
_COMMANDS = ["generate", "corpus", "train", "evaluate", "serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffutron",
        description="Masked diffusion language models for Turkish: generate, chat, train, evaluate, serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"{__name__}.{name}":
                continue  # subcommand not shipped in this build
            raise
        module.register(sub)
    return parser




def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except DiffutronError as err:
        print(f"diffutron: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffutron: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
