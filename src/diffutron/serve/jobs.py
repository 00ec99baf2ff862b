"""What the scheduler queues and what it sends back: ``Job`` (one request as token lists, seeds
and a ``SamplerConfig``), its events (``TextDelta``, ``DenoiseState``, then exactly one
``Finished`` or ``Failed``, read from ``Job.events``), ``QueueFull`` and the counters (``Stats``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..lm import Completion
from ..sampling import SamplerConfig


class QueueFull(Exception):
    """The queue of waiting requests is full (HTTP 429)."""


# -------------------------------------------------------------------------------------- events
@dataclass
class TextDelta:
    index: int
    text: str


@dataclass
class DenoiseState:
    index: int
    step: int
    block: int
    masked: int
    tokens: list  # str | None per answer position


@dataclass
class Finished:
    completions: list[Completion]


@dataclass
class Failed:
    error: Exception


# ----------------------------------------------------------------------------------------- job
@dataclass(eq=False)
class Job:
    """One request: ``token_lists[i]`` is answered with seed ``seeds[i]`` (choice i)."""

    token_lists: list[list[int]]
    seeds: list[int]
    config: SamplerConfig
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    stream: bool = False
    denoise: bool = False
    cancelled: bool = False
    events: asyncio.Queue | None = field(default=None, repr=False)
    submitted: float = 0.0
    engine_ok: bool | None = field(default=None, repr=False)  # the engine can run it (set on submit)

    @property
    def rows(self) -> int:
        return len(self.token_lists)

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share one whole (eager) sampler batch."""
        return (self.config.replace(seed=0), self.stop_sequences)


@dataclass
class Stats:
    """Counters since the server started (``/health``).

    ``batches``: batches started (an engine batch runs from idle until its last row finishes,
    however many jobs join it meanwhile; a whole batch is one eager sampler call);
    ``whole_batches``: those of them run whole by the eager sampler (settings the engine cannot
    run); ``blocks``: engine blocks decoded; ``block_rows``: rows decoding summed over those
    blocks (``block_rows / blocks`` = mean rows per block); ``rows``: answers started;
    ``joined_running``: answers that joined a batch already running (at a block boundary);
    ``max_batch_rows``: most answers decoding at once."""

    requests: int = 0
    rows: int = 0
    batches: int = 0
    whole_batches: int = 0
    blocks: int = 0
    block_rows: int = 0
    joined_running: int = 0
    max_batch_rows: int = 0
    cancelled: int = 0
    rejected: int = 0
    failed: int = 0
