"""Continuous batching: waiting requests -> rows of a running batch (no HTTP, no OpenAI shapes).

A ``Job`` is one request already turned into token lists, per-row seeds, a ``SamplerConfig``
and extra stop sequences. The scheduler keeps a bounded FIFO of jobs and one sampler thread.

Most jobs decode on the lockstep engine (``sampling.engine.Engine``), one engine per sampler
configuration apart from the seed (``DiffusionLM.engine_for``'s compiled one when the model was
compiled: CUDA graphs on GPUs; else a plain one). The worker alternates, in the event loop and
the sampler thread:

1. at a block boundary: queued jobs join the running batch (all rows of a job together, up to
   ``max_batch_size`` rows decoding), rows of cancelled jobs leave;
2. one block of every running row (the engine's ``step_block``), in the sampler thread;
3. jobs whose rows have all finished get their answers (``Finished``), at once (built in a
   second thread while the next block decodes).

So a request that arrives while a batch runs waits at most one block, not until the batch ends.
A row decodes exactly as it would alone (its own seed, plan and noise: ``tests/sampling/test_engine.py``),
whatever joins or leaves around it. Rows of one batch share the sampler settings (``max_tokens``,
``steps``, ``block_length``, ... a longer canvas changes the block and step plan); stop strings
are per row. Fairness is FIFO: a new batch takes the oldest job and the queued jobs that can
share its engine; while it runs, jobs join only from the head of the queue: once the oldest
waiting job needs other settings, the batch takes no more rows, drains, and that job's batch
goes next (a younger job never passes an older one of other settings more than once).

When rows have just finished and others still run, the boundary waits briefly (while requests
keep arriving, at most ``batch_wait_s``) so that clients who ask again at once join now rather
than a block later. A batch that starts from idle waits the same way (requests sent together
share it).

Jobs the engine cannot run (the delayed cache; masks inside a prompt) run as a whole batch
through ``DiffusionLM.generate_ids`` (the eager sampler), when they reach the head of the queue
and the engine is idle: equal settings and equal stop strings share such a batch.

Streaming: while some running row streams, the engine's per-step callback (``streaming.py``,
``StepWatch``) reads the canvas (one host read per step; none otherwise) and turns each
streaming row's committed prefix into append-only text deltas, and the canvases of rows that
asked for the denoising stream into ``DenoiseState`` events; it also stops the rows of
cancelled jobs at once. Answer cutting and stop handling are the model's: ``answer_ids`` /
``completions``.

Events (read from ``Job.events``, an ``asyncio.Queue``; ``jobs.py``): ``TextDelta``,
``DenoiseState``, then exactly one ``Finished`` or ``Failed``.

This module holds the queue, admission at block boundaries and the engine batch's blocks;
``worker.py`` the answers of finished engine jobs and the whole (eager) batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import DiffutronError
from ..lm import DiffusionLM
from ..sampling import SamplerConfig
from ..sampling import engine as engines
from .jobs import Failed, Finished, Job, QueueFull, Stats  # noqa: F401 - Finished: re-exported (tests)
from .limits import QUIET_S
from .streaming import RowStream, StepWatch, TokenLabels, stable_text  # noqa: F401 - stable_text: re-exported (tests)
from .worker import Run, decode_whole, finish_run

log = logging.getLogger("diffutron.serve")


MAX_ENGINES = 4  # sampler configurations whose engines (buffers, graphs) are kept
SWITCH_S = 0.0005  # Python's thread switch interval while serving from a GPU


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
        self._whole: list[Job] = []  # the whole batch running, if any
        self._engines: dict[SamplerConfig, engines.Engine] = {}
        self._engine: engines.Engine | None = None  # the engine of the running batch
        self._runs: list[Run] = []  # its jobs
        self._freed = False  # rows finished in the last block
        self._batch_blocks = 0  # blocks the running engine batch has decoded
        self._packed: contextlib.ExitStack | None = None
        self._labels = TokenLabels(lm)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None  # the sampler thread
        self._deliver: ThreadPoolExecutor | None = None  # builds finished jobs' answers meanwhile

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def _running(self) -> list[Job]:
        return self._whole + [r.job for r in self._runs]

    async def start(self) -> None:
        if self.lm.device.type == "cuda" and sys.getswitchinterval() > SWITCH_S:
            # The sampler thread launches a step (a CUDA graph) every few milliseconds; with Python's
            # default 5 ms switch interval, HTTP work in the event loop could delay each launch by
            # that much and leave the GPU idle.
            sys.setswitchinterval(SWITCH_S)
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="diffutron-sampler")
        self._deliver = ThreadPoolExecutor(1, thread_name_prefix="diffutron-answers")
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
            self._deliver.shutdown(wait=True)
        for run in self._runs:  # rows left in the engine: nobody decodes them any more
            if not run.answered:
                run.answered = True
                run.job.events.put_nowait(Failed(DiffutronError("the server is shutting down")))
        self._runs = []
        if self._engine is not None:
            self._engine.rows = []  # a shared (compiled) engine is free again for a later server
            self._engine = None
        self._close_packed()
        self.running_rows = 0

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
        job.engine_ok = engines.supports(job.config, job.token_lists, self.lm.mask_token_id) is None
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

    def engine_for(self, config: SamplerConfig) -> engines.Engine:
        """The engine of ``config`` (one per configuration apart from the seed, kept): the model's
        compiled one when ``lm.compile()`` was called, else a plain one (eager steps, no graphs)."""
        key = config.replace(seed=0)
        found = self._engines.get(key)
        if found is not None:
            return found
        lm = self.lm
        found = lm.engine_for(key)  # None unless lm.compile() was called
        if found is None:
            found = engines.Engine(lm.model, key, mask_token_id=lm.mask_token_id, eos_token_id=lm.eos_token_id,
                                   pad_token_id=lm.pad_token_id, max_batch=self.max_batch_size, graphs=False)
        lm.model.eval()
        for old in list(self._engines):  # forget the oldest configuration (never the running one)
            if len(self._engines) < MAX_ENGINES:
                break
            if self._engines[old] is not self._engine:
                del self._engines[old]
        self._engines[key] = found
        return found

    # ------------------------------------------------------------------ event-loop side
    async def _run(self) -> None:
        while True:
            if self._engine is not None:  # a batch runs: a block boundary
                await self._boundary()
                try:
                    await self._loop.run_in_executor(self._executor, self._engine_block)
                except RuntimeError:  # the executor is shut down: the server is stopping
                    return
                self.running_rows = len(self._engine.rows)
                if not self._engine.rows:  # drained
                    self._engine = None
                continue
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._gather(self._pending, self.max_batch_size)
            if not self._pending:
                continue
            head = self._pending[0]
            engine = self._engine_of(head) if head.engine_ok else None
            if engine is not None:
                if head.rows > self._capacity(engine):  # a compiled engine smaller than --max-batch-size
                    self._pending.popleft()
                    head.events.put_nowait(Failed(DiffutronError(
                        f"{head.rows} answers in one request exceed the engine's batch size {engine.max_batch}")))
                    continue
                self._engine = engine
                self._batch_blocks = 0
                self.stats.batches += 1
                self._admit(starting=True)
                continue
            batch = self._take()
            if not await self._run_whole(batch):
                return

    def _engine_of(self, job: Job) -> engines.Engine | None:
        try:
            return self.engine_for(job.config)
        except Exception:  # noqa: BLE001 - the eager sampler then reports it to the client
            log.debug("no engine for %s", job.config, exc_info=True)
            job.engine_ok = False
            return None

    def _capacity(self, engine: engines.Engine) -> int:
        return min(self.max_batch_size, engine.max_batch)

    def _joins(self, job: Job) -> bool:
        """Can ``job`` decode in the running engine?"""
        return bool(job.engine_ok) and job.config.replace(seed=0) == self._engine.config

    async def _gather(self, waiting, room: int) -> None:
        """Let requests sent at about the same moment start together: wait while they keep
        arriving (gaps under ``QUIET_S``), at most ``batch_wait_s``, and not once ``room`` rows wait."""
        if not self.batch_wait_s:
            return
        loop = self._loop
        end = loop.time() + self.batch_wait_s
        seen = -1
        while len(self._pending) != seen and loop.time() < end and sum(j.rows for j in waiting) < room:
            seen = len(self._pending)
            await asyncio.sleep(min(QUIET_S, end - loop.time()))

    async def _boundary(self) -> None:
        """Between two blocks: when rows just finished, wait briefly for requests that would join
        (clients whose answers just went out often ask again at once), then admit."""
        room = self._capacity(self._engine) - len(self._engine.rows)
        if self._freed and room > 0 and self._engine.rows and (not self._pending or self._joins(self._pending[0])):
            await self._gather(_Joinable(self), room)
        self._freed = False
        self._admit(starting=False)

    def _admit(self, *, starting: bool) -> None:
        """Queued jobs into the engine's batch: from the head of the queue while they can share it
        (a batch that starts also takes compatible jobs from behind ones that cannot)."""
        engine = self._engine
        room = self._capacity(engine) - len(engine.rows)
        lm = self.lm
        for job in list(self._pending):
            if not self._joins(job):
                if starting:
                    continue
                break  # FIFO: an older job needs other settings; this batch drains, then it runs
            if job.rows > room:
                break  # FIFO: it waits at the head for free rows
            self._pending.remove(job)
            room -= job.rows
            stops = [list(s) for s in lm.stop_sequences] + [list(s) for s in job.stop_sequences]
            run = Run(job, [], [], stops, engine.nfe, lambda ev, job=job: self._post(job, ev), job.rows)
            for i, (toks, seed) in enumerate(zip(job.token_lists, job.seeds)):
                run.rows.append(engine.add(toks, seed, stops, tag=(run, i)))
                run.streams.append(RowStream(lm, job, i, stops, self._labels) if job.stream else None)
            self._runs.append(run)
            self.stats.rows += job.rows
            if not starting and self._batch_blocks:
                self.stats.joined_running += job.rows
        self.running_rows = len(engine.rows)
        self.stats.max_batch_rows = max(self.stats.max_batch_rows, self.running_rows)

    def _take(self) -> list[Job]:
        """A whole batch: the oldest job and the queued jobs with its settings and stop strings."""
        first = self._pending[0]
        key, rows, batch = first.key, 0, []
        for job in list(self._pending):
            if job is first or (job.key == key and not job.engine_ok and rows + job.rows <= self.max_batch_size):
                batch.append(job)
                rows += job.rows
                self._pending.remove(job)
        return batch

    async def _run_whole(self, batch: list[Job]) -> bool:
        rows = sum(j.rows for j in batch)
        self._whole = batch
        self.running_rows = rows
        self.stats.batches += 1
        self.stats.whole_batches += 1
        self.stats.rows += rows
        self.stats.max_batch_rows = max(self.stats.max_batch_rows, rows)
        try:
            await self._loop.run_in_executor(self._executor, decode_whole, self.lm, batch, self._labels, self._post,
                                             self.stats)
        except RuntimeError:  # the executor is shut down: the server is stopping
            return False
        finally:
            self._whole = []
            self.running_rows = 0
        return True

    # ------------------------------------------------------------------ sampler thread
    def _post(self, job: Job, event) -> None:
        try:
            self._loop.call_soon_threadsafe(job.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    def _close_packed(self) -> None:
        if self._packed is not None:
            self._packed.close()
            self._packed = None

    def _engine_block(self) -> None:
        """One block of every running row (in the sampler thread). Jobs whose rows are all done go
        to the delivery thread, which builds their answers while the next block decodes."""
        engine = self._engine
        done: list[Run] = []
        try:
            for run in self._runs:  # rows of jobs whose client went away leave here
                if run.job.cancelled:
                    for row in run.rows:
                        engine.cancel(row)
                    done.append(run)
            if not engine.active:
                engine.rows = []
            else:
                if self._packed is None:
                    self._packed = contextlib.ExitStack()
                    self._packed.enter_context(engine.packed())
                callback = StepWatch(self.lm.mask_token_id) if any(r.job.stream for r in self._runs) else None
                rows = len(engine.active)
                with torch.inference_mode():
                    finished = engine.step_block(callback)
                self.stats.blocks += 1
                self.stats.block_rows += rows
                self._batch_blocks += 1
                self._freed = bool(finished)
                for row in finished:
                    run, i = row.tag
                    run.left -= 1
                    if run.left == 0 and run not in done:
                        done.append(run)
                    if run.streams[i] is not None and not run.job.cancelled:
                        run.streams[i].update(row.canvas, run.post)  # the final canvas (padding after a stop)
        except Exception as err:  # noqa: BLE001 - reported to each waiting client, the server goes on
            if not isinstance(err, DiffutronError):
                log.exception("sampler block failed")
                self.stats.failed += 1
            for run in self._runs:
                if run not in done:
                    run.answered = True
                    self._post(run.job, Failed(err))
            self._runs = [r for r in self._runs if r in done]
            engine.rows = []
        finally:
            if not engine.rows:
                self._close_packed()
        for run in done:
            self._runs.remove(run)
            run.answered = True
            self._deliver.submit(finish_run, self.lm, run, engine.nfe - run.nfe0, self._post, self.stats)



class _Joinable:
    """The jobs at the head of the queue that can join the running batch (for ``_gather``)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def __iter__(self):
        s = self.scheduler
        for job in s._pending:
            if not s._joins(job):
                return
            yield job
