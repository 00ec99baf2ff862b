"""``diffutron`` command line: a thin layer over the library.

Each subcommand lives in its own module of this package and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` to a function taking the parsed ``argparse.Namespace``.
User errors (``DiffutronError``) print one line to stderr and exit with code 2; so do the file
system's refusals (``OSError``: a full disk, a permission taken away mid-run) that no check could
see coming.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import DiffutronError

# Subcommand modules, in the order they appear in ``diffutron --help``.
_COMMANDS = ["generate", "corpus", "train", "plot", "evaluate", "serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffutron",
        description="Masked diffusion language models for Turkish: generate, chat, train, evaluate, serve.",
    )
    parser.add_argument("--version", action=_Version, help="print the version (and torch's) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


class _Version(argparse.Action):
    """``--version``: this package's version, torch's and Python's (torch imported only when asked)."""

    def __init__(self, option_strings, dest, help=None):  # noqa: A002 - argparse's name
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        import torch

        try:
            ours = version("diffutron")
        except PackageNotFoundError:  # a source tree that was never installed
            ours = "(not installed)"
        print(f"diffutron {ours} (torch {torch.__version__}, Python {sys.version.split()[0]})")
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except DiffutronError as err:
        print(f"diffutron: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system said no where no check could foresee it
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"diffutron: error: {where}{err.strerror or err} (check the path, its permissions and free "
              "disk space)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffutron: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
