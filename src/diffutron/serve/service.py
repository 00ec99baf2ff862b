"""The OpenAI-compatible service (no HTTP): request -> prompts and ``SamplerConfig`` -> scheduler
-> ``DiffusionLM`` -> response objects and stream chunks.

Every user mistake becomes a ``ServiceError`` carrying the HTTP status and OpenAI error fields;
``http_errors.py`` only turns it into a response.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from ..errors import DiffutronError
from ..lm import Completion, DiffusionLM
from ..sampling import SamplerConfig
from ..sampling.engine import supports
from . import protocol as P
from .jobs import DenoiseState, Failed, Finished, Job, QueueFull, TextDelta
from .limits import Limits, default_max_batch_size
from .scheduler import Scheduler


class ServiceError(Exception):
    """A request that cannot be served: HTTP ``status`` plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        if code is None and status == 422:
            code = "invalid_value"
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return P.ErrorResponse(error=P.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                 code=self.code)).model_dump()


@dataclass
class Prepared:
    """A validated request on its way through the scheduler."""

    job: Job
    chat: bool
    id: str
    created: int
    prompt_tokens: int
    include_usage: bool


class OpenAIService:
    """Turns OpenAI requests into scheduler jobs and results into OpenAI responses."""

    def __init__(self, lm: DiffusionLM, *, served_model_name: str | None = None, limits: Limits | None = None):
        self.lm = lm
        self.model_name = served_model_name or lm.name
        self.limits = limits or Limits()
        if self.limits.max_batch_size is None:
            self.limits = dataclasses.replace(self.limits, max_batch_size=default_max_batch_size(lm))
        ctx = lm.context_length
        self.context = ctx
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens or ctx, ctx - 1)
        self.max_tokens = min(self.limits.max_tokens or ctx, ctx - 1)
        self.max_n = min(self.limits.max_n, self.limits.max_batch_size)
        self.created = int(time.time())
        self.scheduler = Scheduler(lm, max_batch_size=self.limits.max_batch_size,
                                   max_queue=self.limits.max_queue, batch_wait_s=self.limits.batch_wait_ms / 1000)

    async def start(self) -> None:
        await self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()

    # ---------------------------------------------------------------------------- models
    def model_card(self) -> P.ModelCard:
        return P.ModelCard(
            id=self.model_name, created=self.created, max_model_len=self.context,
            diffusion_defaults=self.lm.defaults.to_dict(),
            limits={"max_prompt_tokens": self.max_prompt_tokens, "max_tokens": self.max_tokens,
                    "max_steps": self.limits.max_steps, "max_n": self.max_n,
                    "max_batch_size": self.limits.max_batch_size},
        )

    def models(self) -> P.ModelList:
        return P.ModelList(data=[self.model_card()])

    def health(self) -> dict:
        """Status for operators: ``queued`` requests, ``running_rows`` (answers decoding now),
        ``max_batch_size``, ``compiled`` (the engine runs CUDA graphs / torch.compile) and the
        scheduler's counters (``jobs.Stats``: batches, blocks, joined_running, ...)."""
        s = self.scheduler
        return {"status": "ok", "model": self.model_name, "queued": s.queued, "running_rows": s.running_rows,
                "max_batch_size": self.limits.max_batch_size, "compiled": bool(getattr(self.lm, "compiled", False)),
                "stats": vars(s.stats).copy()}

    def warm_up(self, text: str = "Merhaba") -> dict | None:
        """Decode a short chat prompt with a default request's settings at batch 1 and at the largest
        batch, on the engine the server will use, compiling it and capturing its graphs now rather
        than during the first requests. On a GPU the largest batch then runs once more, timed: the
        engine's own tokens/s at that batch, what serving at full load is measured against.

        Returns ``{"seconds", "batch", "tokens_per_s"}`` (``tokens_per_s`` None on a CPU), or None
        when the default settings run on the eager sampler (nothing to warm up). Call before serving."""
        prep = self.prepare_chat(P.ChatCompletionRequest(messages=[P.ChatMessage(role="user", content=text)], seed=0))
        job, lm = prep.job, self.lm
        if supports(job.config, job.token_lists, lm.mask_token_id) is not None:
            return None
        engine = self.scheduler.engine_for(job.config)
        batch = min(self.limits.max_batch_size, engine.max_batch)

        def run(rows: int):
            ids, att = lm.batch(job.token_lists * rows)
            return engine.generate(ids, att, seeds=list(range(rows)), stop_sequences=lm.stop_sequences)

        t0 = time.perf_counter()
        for rows in sorted({1, batch}):
            run(rows)
        seconds = time.perf_counter() - t0
        tokens_per_s = None
        if lm.device.type == "cuda":
            t1 = time.perf_counter()
            out = run(batch)
            done = sum(c.completion_tokens for c in lm.completions(out, job.token_lists * batch, lm.stop_sequences))
            tokens_per_s = done / (time.perf_counter() - t1)
        return {"seconds": seconds, "batch": batch, "tokens_per_s": tokens_per_s}

    def check_model(self, name: str | None) -> None:
        # Compared as a string only: a request can never name a path to load.
        if name is not None and name != self.model_name:
            raise ServiceError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                               param="model", code="model_not_found")

    # ---------------------------------------------------------------------------- requests
    def prepare_chat(self, req: P.ChatCompletionRequest) -> Prepared:
        self.check_model(req.model)
        messages = [m.as_dict() for m in req.messages]
        try:
            tokens = self.lm.encode(self.lm.render(messages, chat=True))
        except DiffutronError as err:
            raise ServiceError(422, str(err), param="messages") from None
        return self._prepare(req, [tokens], chat=True)

    def prepare_completion(self, req: P.CompletionRequest) -> Prepared:
        self.check_model(req.model)
        token_lists = []
        for i, p in enumerate(req.prompts()):
            try:
                token_lists.append(self.lm.encode(self.lm.render(p, chat=False)))
            except DiffutronError as err:
                raise ServiceError(422, f"prompt {i}: {err}", param="prompt") from None
            if not token_lists[-1]:
                raise ServiceError(422, f"prompt {i} has no tokens", param="prompt")
        return self._prepare(req, token_lists, chat=False)

    def _prepare(self, req: P.SamplingFields, token_lists: list[list[int]], *, chat: bool) -> Prepared:
        longest = max(len(t) for t in token_lists)
        if longest > self.max_prompt_tokens:
            raise ServiceError(413, f"the prompt has {longest} tokens; this server accepts at most "
                               f"{self.max_prompt_tokens}", param="messages" if chat else "prompt",
                               code="prompt_too_long")
        config = self.sampler_config(req, longest)
        try:
            self.lm.check_fits(longest, config.max_new_tokens)
        except DiffutronError as err:
            raise ServiceError(413, str(err), param="max_tokens", code="context_length_exceeded") from None
        rows = len(token_lists) * req.n
        if req.n > self.max_n:
            raise ServiceError(422, f"n={req.n} is over this server's limit of {self.max_n}", param="n")
        if rows > self.limits.max_batch_size:
            raise ServiceError(422, f"{len(token_lists)} prompts x n={req.n} = {rows} answers exceed this "
                               f"server's batch size of {self.limits.max_batch_size}", param="n")
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        stream_opts = req.stream_options or P.StreamOptions()
        job = Job(
            token_lists=[t for t in token_lists for _ in range(req.n)],
            seeds=[seed + i for i in range(rows)],  # choice i uses seed + i, as lm.generate's rows
            config=config, stop_sequences=self.stop_sequences(req.stops()),
            stream=req.stream, denoise=req.stream and stream_opts.include_denoising,
        )
        return Prepared(job=job, chat=chat, id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                        created=int(time.time()), prompt_tokens=sum(len(t) for t in token_lists),
                        include_usage=stream_opts.include_usage)

    def sampler_config(self, req: P.SamplingFields, prompt_tokens: int) -> SamplerConfig:
        """The request's settings over the model's defaults (the paper's), within this server's limits."""
        d = self.lm.defaults
        if req.max_tokens is not None:
            if req.max_tokens > self.max_tokens:
                raise ServiceError(422, f"max_tokens={req.max_tokens} is over this server's limit of "
                                   f"{self.max_tokens}", param="max_tokens")
            max_new = req.max_tokens
        else:  # the default answer length, shortened to what the context still holds
            max_new = max(1, min(d.max_new_tokens, self.max_tokens, self.context - prompt_tokens))
        if req.steps is not None:
            steps = req.steps
            if steps > self.limits.max_steps:
                raise ServiceError(422, f"steps={steps} is over this server's limit of {self.limits.max_steps}",
                                   param="steps")
        else:  # the defaults' tokens per step (the paper: one)
            steps = min(self.limits.max_steps, max(1, math.ceil(max_new * d.steps / max(1, d.max_new_tokens))))
        if req.block_length is not None and req.block_length > self.context:
            raise ServiceError(422, f"block_length={req.block_length} is longer than the context ({self.context})",
                               param="block_length")
        fields = dict(
            max_new_tokens=max_new, steps=steps, block_length=req.block_length, temperature=req.temperature,
            top_p=req.top_p, top_k=None if req.top_k is None else max(0, req.top_k),
            repetition_penalty=req.repetition_penalty, remasking=req.remasking, threshold=req.threshold,
            cfg_scale=req.cfg_scale,
        )
        if req.cfg_scale:  # guidance runs exact decoding (the cache of a --fast server does not do it)
            fields["cache"] = "none"
        try:
            return d.replace(**{k: v for k, v in fields.items() if v is not None}, stop_at_eos=True, seed=0)
        except DiffutronError as err:
            raise ServiceError(422, str(err)) from None

    def stop_sequences(self, stops: list[str]) -> tuple[tuple[int, ...], ...]:
        """Token sequences of the request's stop strings (``DiffusionLM.stop_ids``); matching
        happens on tokens, in the sampler."""
        try:
            return tuple(tuple(ids) for ids in self.lm.stop_ids(stops))
        except DiffutronError as err:
            raise ServiceError(422, str(err), param="stop") from None

    # ---------------------------------------------------------------------------- running
    def submit(self, prep: Prepared) -> None:
        try:
            self.scheduler.submit(prep.job)
        except QueueFull as err:
            raise ServiceError(429, f"server busy: {err}", type="rate_limit_error", code="queue_full") from None
        except DiffutronError as err:
            raise ServiceError(422, str(err), param="n") from None

    def cancel(self, prep: Prepared) -> None:
        self.scheduler.cancel(prep.job)

    async def result(self, prep: Prepared, is_disconnected: Callable[[], Awaitable[bool]] | None = None,
                     poll_s: float = 0.25) -> P.ChatCompletionResponse | P.CompletionResponse | None:
        """Wait for a non-streamed answer; None (and the job cancelled) if the client went away."""
        getter = asyncio.ensure_future(prep.job.events.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=poll_s)
                if not done:
                    if is_disconnected is not None and await is_disconnected():
                        self.cancel(prep)
                        return None
                    continue
                ev = getter.result()
                if isinstance(ev, Finished):
                    return self.response(prep, ev.completions)
                if isinstance(ev, Failed):
                    raise self._failure(ev.error)
                getter = asyncio.ensure_future(prep.job.events.get())
        except asyncio.CancelledError:
            self.cancel(prep)
            raise
        finally:
            getter.cancel()

    def _failure(self, err: Exception) -> ServiceError:
        if isinstance(err, DiffutronError):
            return ServiceError(422, str(err))
        return ServiceError(500, "internal error while generating; the server logged the details",
                            type="server_error", code="internal_error")

    def usage(self, prep: Prepared, completions: list[Completion]) -> P.Usage:
        done = sum(c.completion_tokens for c in completions)
        return P.Usage(prompt_tokens=prep.prompt_tokens, completion_tokens=done,
                       total_tokens=prep.prompt_tokens + done)

    @staticmethod
    def _reason(c: Completion) -> str:
        return "stop" if c.finish_reason == "stop" else "length"

    def response(self, prep: Prepared, completions: list[Completion]):
        usage = self.usage(prep, completions)
        if prep.chat:
            return P.ChatCompletionResponse(
                id=prep.id, created=prep.created, model=self.model_name, usage=usage,
                choices=[P.ChatChoice(index=i, message=P.ChatMessageOut(content=c.text), finish_reason=self._reason(c))
                         for i, c in enumerate(completions)],
            )
        return P.CompletionResponse(
            id=prep.id, created=prep.created, model=self.model_name, usage=usage,
            choices=[P.CompletionChoice(index=i, text=c.text, finish_reason=self._reason(c))
                     for i, c in enumerate(completions)],
        )

    async def stream(self, prep: Prepared) -> AsyncIterator[dict]:
        """Chunks (as dicts) of a streamed answer; cancels the job if the consumer stops early.
        An error after the stream started is yielded as ``{"error": ...}`` (what OpenAI clients read)."""
        job = prep.job
        done = False
        try:
            if prep.chat:
                for i in range(job.rows):
                    yield self._chunk(prep, i, delta=P.DeltaMessage(role="assistant", content=""))
            while True:
                ev = await job.events.get()
                if isinstance(ev, TextDelta):
                    yield self._chunk(prep, ev.index, text=ev.text)
                elif isinstance(ev, DenoiseState):
                    yield self._chunk(prep, ev.index, denoising=P.Denoising(
                        step=ev.step, block=ev.block, block_length=job.config.block_length, masked=ev.masked,
                        tokens=ev.tokens))
                elif isinstance(ev, Finished):
                    done = True
                    for i, c in enumerate(ev.completions):
                        yield self._chunk(prep, i, finish=self._reason(c))
                    if prep.include_usage:
                        yield self._chunk(prep, None, usage=self.usage(prep, ev.completions))
                    return
                elif isinstance(ev, Failed):
                    done = True
                    yield self._failure(ev.error).body()
                    return
        finally:
            if not done:  # the client went away (or stopped reading): free its rows
                self.cancel(prep)

    def _chunk(self, prep: Prepared, index: int | None, *, text: str | None = None, delta=None,
               finish: str | None = None, denoising=None, usage=None) -> dict:
        if prep.chat:
            choices = [] if index is None else [P.ChatChunkChoice(
                index=index, delta=delta or P.DeltaMessage(content=text), finish_reason=finish,
                denoising=denoising)]
            chunk = P.ChatCompletionChunk(id=prep.id, created=prep.created, model=self.model_name,
                                          choices=choices, usage=usage)
        else:
            choices = [] if index is None else [P.CompletionChoice(
                index=index, text=text or "", finish_reason=finish, denoising=denoising)]
            chunk = P.CompletionResponse(id=prep.id, created=prep.created, model=self.model_name,
                                         choices=choices, usage=usage)
        return chunk.model_dump()
