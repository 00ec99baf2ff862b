"""Pieces every subcommand shares: the model arguments and loading the model they name."""

from __future__ import annotations

import argparse


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype``, ``--trust-remote-code``."""
    parser.add_argument("--model", default=None,
                        help="model directory or hub id (default: the embedded tiny Turkish model)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow custom model code from the hub (off by default)")


def load_lm(args: argparse.Namespace):
    """The ``DiffusionLM`` named by ``--model``; the embedded default (shipped in the package) when
    omitted."""
    from ..lm import DiffusionLM

    return DiffusionLM.from_pretrained(getattr(args, "model", None), device=getattr(args, "device", "auto"),
                                       dtype=getattr(args, "dtype", None),
                                       trust_remote_code=getattr(args, "trust_remote_code", False))
