"""Batching scheduler: waiting requests -> one sampler batch at a time (no HTTP, no OpenAI shapes).

A ``Job`` is one request already turned into token lists, per-row seeds, a ``SamplerConfig``
and extra stop sequences. The scheduler keeps a bounded FIFO of jobs and one worker thread
that runs ``DiffusionLM.generate_ids`` (the same sampler as the CLI) on a batch:

- Compatible jobs share a batch: equal ``SamplerConfig`` apart from the seed (which is per
  row, so a row decodes as it would alone) and equal stop sequences. ``max_new_tokens`` is part
  of the settings: a longer canvas would change the block/step plan and so the answer, so
  requests of different lengths are never merged. The oldest job always goes first (no
  starvation); younger compatible jobs join it up to ``max_batch_size`` rows.
- Prompts of different lengths share a batch (the sampler aligns each row's masks after its
  own prompt; rows that finish early stop costing compute).
- The sampler's callback sees every intermediate canvas: it turns the committed prefix of
  streaming rows into append-only text deltas, sends the canvases of rows that asked for the
  denoising stream, and returns the rows of cancelled jobs (a client that went away), which
  the sampler stops at once.
- Answer cutting and stop handling are the model's: ``answer_ids`` / ``completions``.

Events (read from ``Job.events``, an ``asyncio.Queue``): ``TextDelta``, ``DenoiseState``,
then exactly one ``Finished`` or ``Failed``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..errors import DiffutronError
from ..lm import Completion, DiffusionLM
from ..sampling import SamplerConfig, partial_stop_len

log = logging.getLogger("diffutron.serve")


QUIET_S = 0.005  # a pause in arrivals this long ends the wait for more requests


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

    @property
    def rows(self) -> int:
        return len(self.token_lists)

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share one sampler batch."""
        return (self.config.replace(seed=0), self.stop_sequences)


# ---------------------------------------------------------------------------- streaming state
_LAST_SPACE = re.compile(r"\s\S*\Z")


def stable_text(text: str) -> str:
    """The part of a decoded, still-growing answer that later tokens cannot change.

    A tokenizer may rewrite the end of a text when tokens follow (byte-fallback pieces decode
    to U+FFFD until the character is complete; clean-up removes the space before punctuation),
    so the last word and anything from the first U+FFFD on are held back.
    """
    bad = text.find("\ufffd")
    if bad >= 0:
        text = text[:bad]
    m = _LAST_SPACE.search(text)
    return text[: m.start()] if m else ""


class _RowStream:
    """Turns the canvases of one streaming row into text deltas (and denoising states)."""

    def __init__(self, lm: DiffusionLM, job: Job, index: int, stops: list[list[int]], labels: "_Labels"):
        toks = job.token_lists[index]
        mask = lm.mask_token_id
        self.lm, self.job, self.index, self.stops, self.labels = lm, job, index, stops, labels
        self.start = toks.index(mask) if mask in toks else len(toks)  # as the sampler's canvas
        self.end = len(toks) + job.config.max_new_tokens
        self.first_mask = -1
        self.sent = ""
        self.steps = 0
        self.last: torch.Tensor | None = None

    def update(self, row: torch.Tensor, post) -> None:
        seg = row[self.start : self.end]
        is_mask = seg == self.lm.mask_token_id
        if self.job.denoise and (self.last is None or not torch.equal(seg, self.last)):
            self.last = seg.clone()
            self.steps += 1
            masked = int(is_mask.sum())
            first = int(is_mask.nonzero()[0, 0]) if masked else max(0, len(seg) - 1)
            post(DenoiseState(self.index, self.steps, first // self.job.config.block_length, masked,
                              self.labels(seg.tolist())))
        first = int(is_mask.nonzero()[0, 0]) if bool(is_mask.any()) else len(seg)
        if first == self.first_mask:
            return
        self.first_mask = first
        ids, ended = self.lm.answer_ids(seg[:first].tolist(), self.stops)
        if not ended:
            ids = ids[: len(ids) - partial_stop_len(ids, self.stops)]
        text = self.lm.decode(ids)
        text = text if ended else stable_text(text)
        if len(text) > len(self.sent) and text.startswith(self.sent):
            post(TextDelta(self.index, text[len(self.sent):]))
            self.sent = text

    def finish(self, completion: Completion, post) -> None:
        """The rest of the final text (append-only: the final text extends what was sent)."""
        final = completion.text
        if not final.startswith(self.sent):  # cannot happen with stable_text; never resend text
            log.warning("streamed text is not a prefix of the final answer; sending the tail only")
            n = 0
            while n < min(len(final), len(self.sent)) and final[n] == self.sent[n]:
                n += 1
            final = self.sent + final[n:]
        if len(final) > len(self.sent):
            post(TextDelta(self.index, final[len(self.sent):]))
        self.sent = final


class _Labels:
    """Display text of canvas tokens for the denoising stream (cached per id)."""

    def __init__(self, lm: DiffusionLM):
        tok = lm.tokenizer
        self.tokenizer, self.mask = tok, lm.mask_token_id
        self.special = set(tok.all_special_ids) - {self.mask}
        self.cache: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> list:
        out = []
        for i in ids:
            if i == self.mask:
                out.append(None)
            elif i in self.special:
                out.append("")
            else:
                s = self.cache.get(i)
                if s is None:
                    s = self.cache[i] = self.tokenizer.decode([i])
                out.append(s)
        return out


# ----------------------------------------------------------------------------------- scheduler
@dataclass
class Stats:
    requests: int = 0
    rows: int = 0
    batches: int = 0
    max_batch_rows: int = 0
    cancelled: int = 0
    rejected: int = 0
    failed: int = 0


class Scheduler:
    """Bounded queue + one sampler thread. Use from one asyncio event loop:
    ``await start()``, ``submit(job)``, read ``job.events``, ``cancel(job)``, ``await stop()``."""

    def __init__(self, lm: DiffusionLM, *, max_batch_size: int = 16, max_queue: int = 256,
                 batch_wait_s: float = 0.02):
        if max_batch_size < 1 or max_queue < 1 or batch_wait_s < 0:
            raise DiffutronError("max_batch_size and max_queue must be >= 1, batch_wait_s >= 0")
        self.lm = lm
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.stats = Stats()
        self.running_rows = 0
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._labels = _Labels(lm)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="diffutron-sampler")
        self._task = asyncio.create_task(self._run(), name="diffutron-scheduler")

    async def stop(self) -> None:
        """Fail what is queued, cancel what runs, and wait for the sampler thread."""
        for job in self._running:
            job.cancelled = True  # the sampler stops these rows at its next step
        while self._pending:
            job = self._pending.popleft()
            job.events.put_nowait(Failed(DiffutronError("the server is shutting down")))
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, job: Job) -> None:
        """Queue a job; raises ``QueueFull`` when ``max_queue`` jobs are already waiting."""
        if self._loop is None:
            raise RuntimeError("scheduler not started")
        if job.rows > self.max_batch_size:
            raise DiffutronError(f"{job.rows} answers in one request exceed the batch size {self.max_batch_size}")
        if len(self._pending) >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFull(f"{len(self._pending)} requests are waiting (the limit): retry later")
        job.events = asyncio.Queue()
        job.submitted = time.monotonic()
        self._pending.append(job)
        self.stats.requests += 1
        self._wake.set()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if it waits, stop its rows if it runs."""
        if job.cancelled:
            return
        job.cancelled = True
        self.stats.cancelled += 1
        try:
            self._pending.remove(job)
        except ValueError:
            pass

    # ------------------------------------------------------------------ event-loop side
    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._gather()
            batch = self._take()
            if not batch:
                continue
            rows = sum(j.rows for j in batch)
            self._running = batch
            self.running_rows = rows
            self.stats.batches += 1
            self.stats.rows += rows
            self.stats.max_batch_rows = max(self.stats.max_batch_rows, rows)
            try:
                await self._loop.run_in_executor(self._executor, self._run_batch, batch)
            except RuntimeError:  # the executor is shut down: the server is stopping
                return
            finally:
                self._running = []
                self.running_rows = 0

    async def _gather(self) -> None:
        """Let requests sent at about the same moment share a batch: wait while they keep arriving
        (gaps under ``QUIET_S``), at most ``batch_wait_s``, and not at all once the batch is full."""
        if not self.batch_wait_s:
            return
        loop = self._loop
        end = loop.time() + self.batch_wait_s
        seen = -1
        while (len(self._pending) != seen and loop.time() < end
               and sum(j.rows for j in self._pending) < self.max_batch_size):
            seen = len(self._pending)
            await asyncio.sleep(min(QUIET_S, end - loop.time()))

    def _take(self) -> list[Job]:
        if not self._pending:
            return []
        first = self._pending[0]
        key, rows, batch = first.key, 0, []
        for job in list(self._pending):
            if job.key == key and rows + job.rows <= self.max_batch_size:
                batch.append(job)
                rows += job.rows
                self._pending.remove(job)
        return batch

    # ------------------------------------------------------------------ sampler thread
    def _post(self, job: Job, event) -> None:
        try:
            self._loop.call_soon_threadsafe(job.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    def _run_batch(self, batch: list[Job]) -> None:
        """Decode one batch (in the sampler thread); every job gets exactly one Finished or Failed."""
        answered: set[int] = set()
        try:
            self._decode(batch, answered)
        except Exception as err:  # noqa: BLE001 - reported to each waiting client, the server goes on
            if not isinstance(err, DiffutronError):
                log.exception("sampler batch failed")
                self.stats.failed += 1
            for job in batch:
                if id(job) not in answered:
                    self._post(job, Failed(err))

    def _decode(self, batch: list[Job], answered: set[int]) -> None:
        lm = self.lm
        token_lists = [t for job in batch for t in job.token_lists]
        seeds = [s for job in batch for s in job.seeds]
        owners = [job for job in batch for _ in job.token_lists]
        stops = [list(s) for s in lm.stop_sequences] + [list(s) for s in batch[0].stop_sequences]
        config = batch[0].config.replace(seed=tuple(seeds))
        streams: list[_RowStream | None] = []
        for job in batch:
            for i in range(job.rows):
                streams.append(_RowStream(lm, job, i, stops, self._labels) if job.stream else None)

        def callback(step: int, canvas: torch.Tensor):
            cpu = canvas.cpu() if any(s is not None for s in streams) else None
            cancel = []
            for r, job in enumerate(owners):
                if job.cancelled:
                    cancel.append(r)
                elif streams[r] is not None:
                    streams[r].update(cpu[r], lambda ev, job=job: self._post(job, ev))
            return cancel

        out = lm.generate_ids(token_lists, config, callback=callback, stop_sequences=stops)
        completions = lm.completions(out, token_lists, stops)
        final = out.sequences.cpu()
        r = 0
        for job in batch:
            mine = completions[r : r + job.rows]
            if job.stream and not job.cancelled:
                post = lambda ev, job=job: self._post(job, ev)  # noqa: E731
                for i, c in enumerate(mine):
                    streams[r + i].update(final[r + i], post)  # the last state (padding after a stop)
                    streams[r + i].finish(c, post)
            self._post(job, Finished(mine))
            answered.add(id(job))
            r += job.rows
