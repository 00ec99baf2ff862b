"""The sampler flags of ``generate``, ``chat`` and ``serve``, made from ``SamplerConfig``'s fields.

Each field's metadata (``sampling.config._flag``) holds its help text and whatever its flag needs
beyond the field's name, type and default, so a field added to ``SamplerConfig`` becomes a flag of
all three commands, with the same default, without touching this module.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..backbone import FAST_MODES, fast_defaults
from ..sampling import SamplerConfig

FIELDS = {f.name: f for f in dataclasses.fields(SamplerConfig)}


def flag_name(name: str) -> str:
    """The flag of SamplerConfig field ``name`` (``--max-new-tokens``, ``--no-stop``)."""
    return FIELDS[name].metadata["cli"].get("flag", "--" + name.replace("_", "-"))


def add_sampler_flags(parser: argparse.ArgumentParser, title: str, *, notes: dict[str, str] | None = None,
                      skip: tuple[str, ...] = ()) -> argparse._ArgumentGroup:
    """Add one flag per ``SamplerConfig`` field (its name is the ``dest``) and ``--fast`` /
    ``--fast-mode`` to a new argument group called ``title``.

    Args:
        notes: text appended to a field's help, by field name (what the setting means to this command).
        skip: fields this command does not take from the command line.

    Returns:
        The group, for the command's own related flags.
    """
    group = parser.add_argument_group(title)
    for name, f in FIELDS.items():
        if name in skip:
            continue
        meta = f.metadata["cli"]
        helptext = meta["help"] + (f"; {notes[name]}" if notes and name in notes else "")
        if isinstance(f.default, bool):  # a switch that flips the default: --no-stop
            group.add_argument(flag_name(name), dest=name, action="store_false" if f.default else "store_true",
                               help=helptext)
            continue
        shown = meta.get("shown", f.default)
        kind = meta.get("type", None if isinstance(f.default, str) else type(f.default))  # choices: plain text
        group.add_argument(flag_name(name), dest=name, type=kind,
                           choices=meta.get("choices"), metavar=meta.get("metavar"),
                           default=None if meta.get("unset") else f.default, help=f"{helptext} (default {shown})")
    add_fast_flags(group)
    return group


def add_fast_flags(parser) -> None:
    """``--fast`` (no value) and ``--fast-mode MODE``; what they mean per device comes from
    ``backbone.fast_defaults``."""
    gpu, cpu = fast_defaults("cuda"), fast_defaults("cpu")
    parser.add_argument("--fast", action="store_true",
                        help=f"approximate but faster: {gpu[0]} weights and the {gpu[1]} cache on a GPU, {cpu[0]} "
                             f"(dynamic quantization) and the {cpu[1]} cache on a CPU; --fast-mode picks the weights, "
                             "--cache the cache (which runs on ModernBERT, without --cfg-scale)")
    parser.add_argument("--fast-mode", choices=FAST_MODES, default=None,
                        help="the weights of --fast whatever the device (implies --fast; int8 runs on CPU only)")


def sampler_overrides(args: argparse.Namespace) -> dict:
    """The ``SamplerConfig`` fields the parsed flags set, by name: every field the parser has a
    flag for, except an ``unset`` one (``--cache``) that was not given."""
    out = {}
    for name, f in FIELDS.items():
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if value is None and f.metadata["cli"].get("unset"):
            continue
        out[name] = value
    return out
