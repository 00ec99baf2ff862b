"""The sampler thread's decoding outside the running engine batch: answers of an engine job
whose rows are all done (``finish_run``, in the delivery thread) and a whole batch through the
eager sampler (``decode_whole``: ``DiffusionLM.generate_ids``, for settings the engine cannot run).
Each job gets exactly one ``Finished`` or ``Failed``; ``post(job, event)`` hands events to the
event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import DiffutronError
from ..lm import DiffusionLM
from ..sampling import GenerationOutput
from .jobs import Failed, Finished, Job, Stats
from .streaming import RowStream, TokenLabels

log = logging.getLogger("diffutron.serve")

Post = Callable[[Job, object], None]


@dataclass(eq=False)
class Run:
    """A job whose rows decode on the engine: ``rows[i]`` answers choice i."""

    job: Job
    rows: list
    streams: list
    stops: list[list[int]]
    nfe0: int
    post: object
    left: int
    answered: bool = False


def finish_run(lm: DiffusionLM, run: Run, nfe: int, post: Post, stats: Stats) -> None:
    """All rows of ``run`` are done: its answers, built as ``DiffusionLM.completions`` does
    (in the delivery thread)."""
    try:
        rows = run.rows
        seqs = torch.full((len(rows), max(r.length for r in rows)), lm.pad_token_id, dtype=torch.long)
        reasons = []
        for i, row in enumerate(rows):
            seqs[i, : row.length] = row.canvas
            reasons.append(row.finish_reason(lm.eos_token_id))
        out = GenerationOutput(sequences=seqs, finish_reasons=reasons, nfe=nfe, answer_start=[r.start for r in rows])
        completions = lm.completions(out, run.job.token_lists, run.stops)
        if run.job.stream and not run.job.cancelled:
            for stream, c in zip(run.streams, completions):
                stream.finish(c, run.post)
    except Exception as err:  # noqa: BLE001 - reported to the client, the server goes on
        log.exception("building an answer failed")
        stats.failed += 1
        post(run.job, Failed(err))
        return
    post(run.job, Finished(completions))


def decode_whole(lm: DiffusionLM, batch: list[Job], labels: TokenLabels, post: Post, stats: Stats) -> None:
    """Decode one whole batch (in the sampler thread); every job gets exactly one Finished or Failed."""
    answered: set[int] = set()
    try:
        _decode(lm, batch, labels, post, answered)
    except Exception as err:  # noqa: BLE001 - reported to each waiting client, the server goes on
        if not isinstance(err, DiffutronError):
            log.exception("sampler batch failed")
            stats.failed += 1
        for job in batch:
            if id(job) not in answered:
                post(job, Failed(err))


def _decode(lm: DiffusionLM, batch: list[Job], labels: TokenLabels, post: Post, answered: set[int]) -> None:
    token_lists = [t for job in batch for t in job.token_lists]
    seeds = [s for job in batch for s in job.seeds]
    owners = [job for job in batch for _ in job.token_lists]
    stops = [list(s) for s in lm.stop_sequences] + [list(s) for s in batch[0].stop_sequences]
    config = batch[0].config.replace(seed=tuple(seeds))
    streams: list[RowStream | None] = []
    for job in batch:
        for i in range(job.rows):
            streams.append(RowStream(lm, job, i, stops, labels) if job.stream else None)

    def callback(step: int, canvas: torch.Tensor):
        cpu = canvas.cpu() if any(s is not None for s in streams) else None
        cancel = []
        for r, job in enumerate(owners):
            if job.cancelled:
                cancel.append(r)
            elif streams[r] is not None:
                streams[r].update(cpu[r], lambda ev, job=job: post(job, ev))
        return cancel

    out = lm.generate_ids(token_lists, config, callback=callback, stop_sequences=stops)
    completions = lm.completions(out, token_lists, stops)
    final = out.sequences.cpu()
    r = 0
    for job in batch:
        mine = completions[r : r + job.rows]
        if job.stream and not job.cancelled:
            to_job = lambda ev, job=job: post(job, ev)  # noqa: E731
            for i, c in enumerate(mine):
                streams[r + i].update(final[r + i], to_job)  # the last state (padding after a stop)
                streams[r + i].finish(c, to_job)
        post(job, Finished(mine))
        answered.add(id(job))
        r += job.rows
