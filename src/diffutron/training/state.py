"""A stage's progress (``TrainState``: what a checkpoint saves and resumes) and its run record.

``TrainState`` replaces loose counters: the optimizer step, the data position (micro-batches
done: the stream and its noise are a function of it), the tokens logged and the metric window
since the last log line. A checkpoint stores ``TrainState.checkpoint(...)``; ``from_checkpoint``
reads it back, so a resumed run logs the same lines as one that was never interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DiffutronError
from .checkpoint import changed_settings
from .config import TrainConfig


@dataclass
class TrainState:
    """Where a stage stands. Checkpointed: ``step``, ``micro_step``, ``tokens``, the window and the
    elapsed time; not: the last gradient norm and learning rate and the clocks (this run's)."""

    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches done (per process): the position in the data and noise stream
    tokens: int = 0  # training tokens of the windows logged so far (all processes)
    elapsed_before: float = 0.0  # seconds trained before this run (by the runs a resume continues)
    window_loss: float = 0.0  # the window since the last log line: summed micro-batch losses,
    window_n: int = 0  # their number
    window_tokens: int = 0  # and their tokens (this process)
    grad_norm: float | None = None  # of the last optimizer step
    lr: float | None = None  # of the last optimizer step
    run_start: float = 0.0  # time.perf_counter() when this run's steps began
    window_start: float = 0.0  # ... and when the window began

    @classmethod
    def from_checkpoint(cls, saved: dict) -> TrainState:
        """The state a checkpoint's ``trainer_state.json`` holds (``checkpoint.read_state``)."""
        window = {"loss": 0.0, "n": 0, "tokens": 0, **saved.get("window", {})}
        return cls(step=saved["step"], micro_step=saved["micro_step"], tokens=saved.get("tokens", 0),
                   elapsed_before=saved.get("elapsed_s", 0.0), window_loss=window["loss"], window_n=window["n"],
                   window_tokens=window["tokens"])

    def checkpoint(self, record: dict, now: float) -> dict:
        """What a checkpoint saves at ``now`` (``time.perf_counter()``), with the run record."""
        return {"step": self.step, "micro_step": self.micro_step, "tokens": self.tokens, "window": self.window(),
                "elapsed_s": self.elapsed_before + now - self.run_start, "record": record}

    def window(self) -> dict:
        return {"loss": self.window_loss, "n": self.window_n, "tokens": self.window_tokens}

    def start_clock(self, now: float) -> None:
        self.run_start = self.window_start = now

    def reset_window(self, now: float) -> None:
        self.window_loss, self.window_n, self.window_tokens = 0.0, 0, 0
        self.window_start = now


def run_record(config: TrainConfig, kind: str, report: dict, world: int, start: str, n_trainable: int, n_total: int,
               total_steps: int, n_train: int) -> dict:
    """OUTPUT/run.json, also saved in every checkpoint and (completed) beside the final model."""
    import accelerate
    import transformers

    return {
        "config": config.to_dict(), "data_kind": kind, "data_report": report, "world_size": world,
        "start": start, "trainable_parameters": n_trainable, "parameters": n_total, "total_steps": total_steps,
        "train_sequences": n_train,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__},
    }


def check_resumable(saved: dict, record: dict, path: Path) -> None:
    """Raise ``DiffutronError`` unless the checkpoint at ``path`` (its state ``saved``) was written by
    a run like this one (``record``): same processes, same data, same settings (but ``RESUME_FREE``)."""
    old = saved.get("record", {})
    if old.get("world_size") != record["world_size"]:
        raise DiffutronError(f"{path} was written by {old.get('world_size')} processes, this run has "
                             f"{record['world_size']}: resume with the same number of processes")
    if old.get("train_sequences") != record["train_sequences"]:
        raise DiffutronError(f"{path}: the training data changed since the checkpoint "
                             f"({old.get('train_sequences')} sequences then, {record['train_sequences']} now)")
    changed = changed_settings(old.get("config", {}), record["config"])
    if changed:
        diffs = ", ".join(f"{k}: {before!r} -> {now!r}" for k, before, now in changed[:4])
        raise DiffutronError(f"{path} was trained with other settings ({diffs}): resume with the same settings, "
                             "or start a new output directory")
