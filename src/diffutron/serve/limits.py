"""A server's limits and batching constants: plain values, no web framework, so that
``diffutron serve --help`` states them without the ``serve`` extra installed."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DiffutronError

GPU_MAX_BATCH_SIZE = 128  # answers decoded together by default with the model on a GPU
CPU_MAX_BATCH_SIZE = 16  # ... and on a CPU
QUIET_S = 0.005  # a pause in arrivals this long ends the wait for more requests (scheduler)


def default_max_batch_size(lm) -> int:
    """Answers decoded together when not set: ``GPU_MAX_BATCH_SIZE`` with the model (a
    ``DiffusionLM``) on a GPU, ``CPU_MAX_BATCH_SIZE`` on a CPU."""
    return CPU_MAX_BATCH_SIZE if lm.device.type == "cpu" else GPU_MAX_BATCH_SIZE


@dataclass
class Limits:
    """Request limits of one server (``None`` = the model's context length; ``max_batch_size``
    ``None`` = ``default_max_batch_size``)."""

    max_batch_size: int | None = None
    max_queue: int = 256
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None
    max_steps: int = 1024
    max_n: int = 8
    batch_wait_ms: float = 20.0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_steps", "max_n"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise DiffutronError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_prompt_tokens", "max_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise DiffutronError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.batch_wait_ms < 0:
            raise DiffutronError(f"--batch-wait-ms must be >= 0, got {self.batch_wait_ms}")
