"""Sampler settings: one frozen dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import DiffutronError

REMASKING = ("low_confidence", "random", "margin", "entropy")
CACHES = ("none", "dual", "delayed")
RNGS = ("keyed", "reference")


def _flag(help: str, **cli) -> dict:
    """A field's command-line flag, read by ``diffutron.cli._sampler`` (generate, chat, serve):
    ``help`` (the default is appended), and where the field's own type and name do not say it,
    ``type``, ``flag`` (a bool's flag flips its default), ``choices``, ``metavar``, ``shown`` (the
    default as help states it) and ``unset`` (the flag defaults to None: not given, the field's
    default or --fast's choice applies)."""
    return {"cli": {"help": help, **cli}}


@dataclass(frozen=True)
class SamplerConfig:
    """Settings of semi-autoregressive block denoising (defaults: the Diffutron paper's).

    Each field's metadata describes its command-line flag (``_flag``), so the flags of
    ``diffutron generate``, ``chat`` and ``serve`` follow this class.

    Attributes:
        max_new_tokens: masks appended after each prompt (0 allowed when the input holds masks).
        steps: denoising steps in total, spread evenly over the blocks.
        block_length: tokens per block; blocks are decoded left to right.
        temperature: 0 = argmax; > 0 samples from softmax(logits / temperature).
        top_k: keep only the k most likely tokens when sampling (0 = off).
        top_p: nucleus sampling mass in (0, 1] (1 = off).
        repetition_penalty: divides positive / multiplies negative logits of every token id
            already on the canvas (1 = off).
        remasking: how confident a candidate is: low_confidence (its probability), margin
            (p1 - p2), entropy (-H) or random.
        threshold: None, or commit every masked position of the block whose confidence is at
            least this (Fast-dLLM), and never fewer than the schedule's count.
        cfg_scale: classifier-free guidance scale (0 = off); costs a second forward per step.
        stop_at_eos: stop a row after the block in which its answer ended (EOS or end of turn).
        cache: "none" (exact), "dual" (approximate, ModernBERT only: a block's later steps run
            only the block's tokens against keys and values stored at the block's start) or
            "delayed" (the dual cache, and a committed token's keys and values are computed once,
            the step after it was committed: a step runs only the block's masks and new tokens).
        cache_refresh: with a cache, also refresh a row's stored keys and values after every this
            many window steps (0 = only when a block starts; dLLM-Cache's refresh interval):
            fresher reads at the cost of a full forward each time.
        seed: an int (row r uses seed + r) or one int per row.
        rng: where the random numbers come from. "keyed" (default): each row draws from its own
            generator keyed by (row seed, block), one uniform per (step, position), so a row
            samples the same tokens alone, in any batch, on any path. "reference": as the authors'
            generator draws them, to reproduce a seeded run of it: once per step, one float64
            uniform per (row, canvas position, vocabulary id) of the whole batch from one
            generator seeded with ``seed`` (an int), tokens x0 = argmax(exp(logits) / (-log U) **
            temperature) (Gumbel-max), then one float32 uniform per (row, position) for random
            remasking (``noise.ReferenceNoise``). The eager loop runs it (the compiled engine
            declines it); it costs drawing [B, width, V] numbers every step.
    """

    max_new_tokens: int = field(default=64, metadata=_flag("answer length in tokens"))
    steps: int = field(default=64, metadata=_flag("denoising steps in total"))
    block_length: int = field(default=32, metadata=_flag("tokens per block"))
    temperature: float = field(default=0.1, metadata=_flag("0 = greedy"))
    top_k: int = field(default=0, metadata=_flag("sample among the k most likely tokens; 0 = off"))
    top_p: float = field(default=1.0, metadata=_flag("nucleus sampling mass; 1 = off"))
    repetition_penalty: float = field(default=1.2, metadata=_flag(
        "penalise every token already on the canvas; 1 = off"))
    remasking: str = field(default="low_confidence", metadata=_flag(
        "confidence rule that picks what to commit", choices=REMASKING))
    threshold: float | None = field(default=None, metadata=_flag(
        "also commit every position at least this confident, e.g. 0.9", type=float, shown="off"))
    cfg_scale: float = field(default=0.0, metadata=_flag("classifier-free guidance; 0 = off"))
    stop_at_eos: bool = field(default=True, metadata=_flag(
        "decode every block even after the answer ended", flag="--no-stop"))
    cache: str = field(default="none", metadata=_flag(
        "dual: a block's later steps run only its own tokens against keys and values stored at the block's "
        "start (approximate, ModernBERT); delayed: dual, and each step runs only the block's masks and newly "
        "committed tokens; none: exact", choices=CACHES, unset=True, shown="none, or --fast's"))
    cache_refresh: int = field(default=0, metadata=_flag(
        "with a cache, also refresh it after every R window steps, fresher but slower; 0: only when a block "
        "starts", metavar="R"))
    seed: int | tuple[int, ...] = field(default=0, metadata=_flag(
        "random seed: runs with the same seed reproduce", type=int))
    rng: str = field(default="keyed", metadata=_flag(
        "keyed: each row draws from its own seeded stream, so a row decodes the same in any batch; "
        "reference: draw as the authors' generator does (one stream seeded with --seed, [batch, canvas, "
        "vocabulary] float64 uniforms per step), to reproduce a seeded run of it token for token on CPU; "
        "runs on the eager loop", choices=RNGS))

    def __post_init__(self) -> None:
        def bad(name: str, value, allowed: str) -> DiffutronError:
            return DiffutronError(f"invalid sampler setting {name}={value!r}: {allowed}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise bad("max_new_tokens", self.max_new_tokens, "must be an integer >= 0 (>= 1 unless the input holds masks)")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise bad("steps", self.steps, "must be an integer >= 1")
        if not isinstance(self.block_length, int) or self.block_length < 1:
            raise bad("block_length", self.block_length, "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise bad("temperature", self.temperature, "must be >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", self.top_k, "must be an integer >= 0 (0 = off)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0:
            raise bad("repetition_penalty", self.repetition_penalty, "must be > 0 (1 = off)")
        if self.remasking not in REMASKING:
            raise bad("remasking", self.remasking, f"choose one of {', '.join(REMASKING)}")
        if self.threshold is not None and (
            not isinstance(self.threshold, (int, float)) or not 0 < self.threshold <= 1
        ):
            raise bad("threshold", self.threshold, "must be in (0, 1] or None")
        if not isinstance(self.cfg_scale, (int, float)) or not self.cfg_scale >= 0:
            raise bad("cfg_scale", self.cfg_scale, "must be >= 0 (0 = off)")
        if self.cache not in CACHES:
            raise bad("cache", self.cache, f"choose one of {', '.join(CACHES)}")
        if self.cache != "none" and self.cfg_scale > 0:
            raise bad("cache", self.cache, "the dual cache does not run classifier-free guidance: set cfg_scale=0 "
                      "or cache='none'")
        if not isinstance(self.cache_refresh, int) or isinstance(self.cache_refresh, bool) or self.cache_refresh < 0:
            raise bad("cache_refresh", self.cache_refresh, "must be an integer >= 0 (0 = only when a block starts)")
        if isinstance(self.seed, list):
            object.__setattr__(self, "seed", tuple(self.seed))
        seeds = self.seed if isinstance(self.seed, tuple) else (self.seed,)
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise bad("seed", self.seed, "must be an integer >= 0 or one such integer per row")
        if self.rng not in RNGS:
            raise bad("rng", self.rng, f"choose one of {', '.join(RNGS)}")
        if self.rng == "reference" and isinstance(self.seed, tuple):
            raise bad("rng", self.rng, "draws one stream for the whole batch, as the reference does: give one "
                      "integer seed, not one per row")

    def replace(self, **changes) -> "SamplerConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def row_seeds(self, batch: int) -> list[int]:
        """The seed of each row: seed + r for an int, the given list otherwise."""
        if isinstance(self.seed, tuple):
            if len(self.seed) != batch:
                raise DiffutronError(f"seed has {len(self.seed)} values for a batch of {batch} rows: give one per row")
            return list(self.seed)
        return [self.seed + r for r in range(batch)]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["seed"], tuple):
            d["seed"] = list(d["seed"])
        return d


PAPER_DEFAULTS = SamplerConfig()
