"""Lockstep block decoding on fixed shapes: the sampler GPUs run (CUDA graphs, torch.compile).

``loop.generate`` lets every row keep its own step and reads the canvas back to the host after
each one. Here the rows of a batch take the steps of a block together, and a step is a pure tensor
function of preallocated buffers: no value is read back to the host and no shape depends on the
data, so on CUDA each step is captured once as a CUDA graph and replayed (its encoder optionally
compiled by torch.compile). Per block:

1. host: each row's block span, its plan (tokens to commit per step, ``policies.block_schedule``)
   and its uniforms (``noise.block_noise``); steps where no row commits are dropped;
2. device, per step (``engine_step.Step``): the block's masked positions (P per row, P fixed per
   step), logits there only (``backbone.logits_at``, or the dual cache's refresh / window), CFG and
   the repetition penalty, candidates and confidences (``policies``), and each row's k most
   confident committed (plus every one above the threshold);
3. host, once: the canvas is read back; rows whose answer ended retire (``stop_at_eos``), and new
   rows may join before the next block (the server's continuous batching).

A row decodes exactly as in ``loop.generate``: the same plan, uniforms, rules and tie-breaking, so
in float32 its tokens are the same (``tests/sampling/test_engine.py``). A row whose block fills early
(threshold) waits for the block's last step instead of starting its next block: same tokens, more
forwards than the eager loop. Not here (``loop.generate`` runs them): masks inside a prompt, the
delayed cache, whose windows change width from step to step, and ``rng="reference"`` (one random
stream over the whole batch's [B, width, V] logits per step, as the authors' generator draws it).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import backbone
from ..errors import DiffutronError
from . import policies
from .cache import DualCache
from .config import SamplerConfig
from .engine_step import Layout, Step
from .loop import GenerationOutput
from .noise import block_noise
from .stopping import end_of_block, finish_reason

log = logging.getLogger("diffutron.engine")

WIDTH_MULTIPLE = 32  # canvas widths are rounded up to this (fewer distinct shapes, fewer graphs)
MAX_LAYOUTS = 24  # (batch, width) shapes whose buffers and graphs are kept (least recently used dropped)


def supports(config: SamplerConfig, prompts: Sequence[Sequence[int]], mask_token_id: int) -> str | None:
    """None when the engine can run these prompts with these settings, else the reason it cannot."""
    if config.cache == "delayed":
        return "the delayed cache changes its window width every step"
    if config.rng == "reference":
        return "rng='reference' draws one [B, width, V] stream per step for the whole batch, as the reference does"
    if config.max_new_tokens < 1 or any(mask_token_id in p for p in prompts):
        return "masks inside a prompt (infilling)"
    return None


def bucket(n: int, cap: int) -> int:
    """The next power of two >= n, at most ``cap`` (batch and position counts)."""
    return min(cap, 1 << max(0, n - 1).bit_length())


@dataclass(eq=False)
class Row:
    """One answer being decoded: its canvas (prompt + masks) lives on the host between blocks."""

    prompt: list[int]
    seed: int
    stops: list[list[int]]
    canvas: torch.Tensor  # [length] long
    blocks: list[tuple[int, int]]
    steps: int  # steps per block
    tag: object = None  # the caller's (the server's job and choice)
    block: int = 0  # the block to decode next
    done: str | None = None  # "stop" | "length" | "cancelled"

    @property
    def length(self) -> int:
        return self.canvas.shape[0]

    @property
    def start(self) -> int:
        return len(self.prompt)

    def finish_reason(self, eos_token_id: int | None) -> str:
        return finish_reason(self.done, self.canvas, self.start, eos_token_id=eos_token_id, stop_sequences=self.stops)


class Engine:
    """Decodes rows with one ``SamplerConfig`` (seeds per row) in lockstep blocks.

    Args:
        model: a Hugging Face masked LM (ModernBERT for the dual cache), in eval mode.
        config: the sampler settings (``supports`` must accept them).
        max_batch: most rows decoded at once (the largest batch shape).
        graphs: capture each step as a CUDA graph (default: on CUDA).
        compile: run the encoder through ``torch.compile`` (a one-time cost per model, shapes dynamic).
    """

    def __init__(self, model, config: SamplerConfig, *, mask_token_id: int, eos_token_id: int | None,
                 pad_token_id: int, max_batch: int = 128, graphs: bool | None = None, compile: bool = False):
        self.model = model
        self.config = config
        self.mask_id, self.eos_id, self.pad_id = mask_token_id, eos_token_id, pad_token_id
        self.device = next(model.parameters()).device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise DiffutronError("CUDA graphs need a CUDA device: run without graphs on CPU")
        plain = self.graphs or compile or self.device.type != "cpu"  # CPU kernels read values back to the host
        self.max_batch = max_batch
        self.stepper = Step(model, config, mask_token_id=mask_token_id, eos_token_id=eos_token_id, plain=plain)
        self.rows: list[Row] = []
        self.layouts: dict[tuple[int, int], Layout] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.nfe = 0
        self.capture_s = 0.0  # time spent capturing graphs (and compiling, the first time)
        self.compiling = compile
        self._plain_step = self.stepper.run
        self._step = _compiled(self._plain_step) if compile else self._plain_step
        if config.cache == "dual" and not self.stepper.modernbert:
            raise DiffutronError(f"cache='dual' supports ModernBERT masked LMs only, not "
                                 f"{type(backbone.unwrap(model)).__name__}: use cache='none'")

    @property
    def plain(self) -> bool:
        """The step runs the plain rules (what GPUs run), not the CPU kernels (settable, for tests)."""
        return self.stepper.plain

    @plain.setter
    def plain(self, value: bool) -> None:
        self.stepper.plain = value

    def packed(self):
        """CPU float32 without torch.compile: the output layer on oneDNN's packed weight while
        decoding (``backbone.packed_head``); elsewhere nothing changes."""
        return contextlib.nullcontext() if self.compiling else backbone.packed_head(self.model)

    # ------------------------------------------------------------------------------ rows
    def add(self, prompt: Sequence[int], seed: int, stops: Sequence[Sequence[int]] = (), tag=None) -> Row:
        """Queue a prompt; it starts decoding at the next block boundary (``step_block``)."""
        cfg = self.config
        prompt = list(prompt)
        canvas = torch.tensor(prompt + [self.mask_id] * cfg.max_new_tokens, dtype=torch.long)
        blocks = policies.blocks_of(len(prompt), canvas.shape[0], cfg.block_length)
        row = Row(prompt, seed, [list(s) for s in stops], canvas, blocks,
                  policies.steps_per_block(cfg.steps, len(blocks)), tag)
        self.rows.append(row)
        return row

    @property
    def active(self) -> list[Row]:
        return [r for r in self.rows if r.done is None]

    # ------------------------------------------------------------------------------ one block
    @torch.inference_mode()
    def step_block(self, callback: Callable[[int, list[Row], torch.Tensor], Sequence[int] | None] | None = None
                   ) -> list[Row]:
        """Decode the current block of every active row; returns the rows that finished in it
        (and drops them). ``callback(step, rows, canvas)`` after each step (a host read per step)
        may return indices into ``rows`` to cancel."""
        rows = self.active
        self.rows = rows
        if not rows:
            return []
        static = self.graphs or self.compiling  # fixed shapes pay only there; eager steps take exact ones
        size = min(self.max_batch, max(self._least, bucket(len(rows), self.max_batch))) if static else len(rows)
        width = max(r.length for r in rows)
        lay = self._layout(size, self._width(width) if static else width)
        plans = self._load(lay, rows)
        k_all = torch.zeros(max(len(p) for p in plans), lay.B, dtype=torch.long)
        for i, p in enumerate(plans):
            k_all[: len(p), i] = torch.tensor(p)
        k_all = k_all.to(self.device)
        u_all, order_all = self._noise(lay, rows)
        for n, (j, kind, p) in enumerate(self._steps(plans, static)):
            if p is None:  # threshold, eager steps: the most masks a row has left in its block
                p = max(self._least, int(self._masks_left(lay).max()))
            lay.k.copy_(k_all[j])
            if u_all is not None:
                lay.u.copy_(u_all[j])
            if order_all is not None:
                lay.u_order.copy_(order_all[j])
            self._run(lay, kind, p)
            self.nfe += 1
            if callback is not None:
                host = lay.canvas[: len(rows), : lay.W].cpu()
                for i in callback(n + 1, rows, host) or ():
                    self._cancel(rows[i], host[i, : rows[i].length], lay, i)
        host = lay.canvas[: len(rows), : lay.W].cpu()  # the block's one read back
        finished = []
        for i, row in enumerate(rows):
            if row.done is None:  # else cancelled during the block
                row.canvas = host[i, : row.length].clone()
                self._end_block(row)
            if row.done is not None:
                finished.append(row)
        self.rows = [r for r in rows if r.done is None]
        return finished

    @property
    def _least(self) -> int:
        return 2 if self.compiling else 1  # torch.compile specialises sizes of 1: never ask for one

    def _steps(self, plans: list[list[int]], static: bool) -> list[tuple[int, str, int | None]]:
        """The block's steps that commit in some row: ``(plan step j, kind, P)``. Kind: "full" (no
        cache), "refresh" (the dual cache's first step, and after every ``cache_refresh`` windows)
        or "window"; P: the masks a row has left before step j at most (a power of two for fixed
        shapes), the whole block with a threshold (None in eager steps: counted then)."""
        cfg = self.config
        out, windows = [], 0
        for j in range(max(len(p) for p in plans)):
            if not any(j < len(p) and p[j] for p in plans):
                continue  # no row commits: no forward
            if cfg.cache == "none":
                kind = "full"
            elif not out or 0 < cfg.cache_refresh <= windows:
                kind, windows = "refresh", 0
            else:
                kind, windows = "window", windows + 1
            if cfg.threshold is not None:
                p = cfg.block_length if static else None
            else:
                p = max(sum(plan[j:]) for plan in plans)
                p = min(cfg.block_length, max(self._least, bucket(p, cfg.block_length) if static else p))
            out.append((j, kind, p))
        return out

    def _masks_left(self, lay: Layout) -> torch.Tensor:
        """[B] masks each slot has left in its block (a host read)."""
        ar = torch.arange(self.config.block_length, device=lay.canvas.device)
        cols = torch.where(ar < lay.blen[:, None], lay.lo[:, None] + ar, lay.W)
        return ((lay.canvas.gather(1, cols) == self.mask_id) & (ar < lay.blen[:, None])).sum(1)

    def _end_block(self, row: Row) -> None:
        """As the eager loop's ``end_block``: stop the row if its answer has ended, or at its last block."""
        done = end_of_block(row.canvas, row.start, row.blocks[row.block][1], eos_token_id=self.eos_id,
                            stop_sequences=row.stops, pad_token_id=self.pad_id, stop_at_eos=self.config.stop_at_eos,
                            last=row.block + 1 >= len(row.blocks))
        if done != "stop":
            row.block += 1
        row.done = done or row.done

    def cancel(self, row: Row) -> None:
        """Stop a row between blocks (its masks become padding); ``step_block`` drops it."""
        if row.done is None:
            row.canvas = torch.where(row.canvas == self.mask_id, self.pad_id, row.canvas)
            row.done = "cancelled"

    def _cancel(self, row: Row, canvas: torch.Tensor, lay: Layout, slot: int) -> None:
        """Stop a row inside a block (from a callback): its canvas as it stands, no more commits."""
        if row.done is not None:
            return
        row.canvas = canvas.clone()
        self.cancel(row)
        lay.blen[slot] = 0  # commits nothing for the rest of the block

    # ------------------------------------------------------------------------------ buffers
    def _width(self, n: int) -> int:
        return -(-n // WIDTH_MULTIPLE) * WIDTH_MULTIPLE

    def _layout(self, B: int, W: int) -> Layout:
        lay = self.layouts.pop((B, W), None)
        if lay is not None:
            self.layouts[(B, W)] = lay  # most recently used last
            return lay
        if len(self.layouts) >= MAX_LAYOUTS:  # forget the least recently used shape (its buffers and graphs)
            self.layouts.pop(next(iter(self.layouts)))
        L, dev = self.config.block_length, self.device
        zeros = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype, device=dev)  # noqa: E731
        cache = DualCache(self.model, slots=B, width=W) if self.config.cache == "dual" else None
        lay = Layout(B, W, zeros(B, W + 1), zeros(B, W), zeros(B, W, dtype=torch.bool), zeros(B), zeros(B),
                      zeros(B), zeros(B, L, dtype=torch.float64), zeros(B, L, dtype=torch.float64), cache)
        self.layouts[(B, W)] = lay
        return lay

    def _load(self, lay: Layout, rows: list[Row]) -> list[list[int]]:
        """Copy the rows' canvases and block spans into the layout; returns each row's plan."""
        canvas = torch.full((lay.B, lay.W + 1), self.pad_id, dtype=torch.long)
        att = torch.zeros(lay.B, lay.W, dtype=torch.long)
        uncond = torch.zeros(lay.B, lay.W, dtype=torch.bool)
        lo = torch.zeros(lay.B, dtype=torch.long)
        blen = torch.zeros(lay.B, dtype=torch.long)
        plans = []
        for i, row in enumerate(rows):
            canvas[i, : row.length] = row.canvas
            att[i, : row.length] = 1
            uncond[i, : row.start] = torch.tensor(row.prompt) != self.eos_id if self.eos_id is not None else True
            s, e = row.blocks[row.block]
            lo[i], blen[i] = s, e - s
            plans.append(policies.block_schedule(int((row.canvas[s:e] == self.mask_id).sum()), row.steps))
        for buf, value in ((lay.canvas, canvas), (lay.att, att), (lay.uncond, uncond), (lay.lo, lo), (lay.blen, blen)):
            buf.copy_(value)
        return plans

    def _noise(self, lay: Layout, rows: list[Row]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Each row's block uniforms, as [steps, B, L] device tensors (None where unused)."""
        cfg = self.config
        tokens, order = cfg.temperature > 0, cfg.remasking == "random"
        if not (tokens or order):
            return None, None
        S, L = max(r.steps for r in rows), cfg.block_length
        out = [torch.zeros(S, lay.B, L, dtype=torch.float64) if want else None for want in (tokens, order)]
        for i, row in enumerate(rows):
            s, e = row.blocks[row.block]
            for buf, u in zip(out, block_noise(row.seed, row.block, row.steps, e - s, tokens=tokens, order=order)):
                if buf is not None:
                    buf[: row.steps, i, : e - s] = u
        return tuple(None if t is None else t.to(self.device) for t in out)

    # ------------------------------------------------------------------------------ running a step: graphs, compile
    def _run(self, lay: Layout, kind: str, p: int) -> None:
        """One step: replayed from its CUDA graph (captured on first use), or run as is."""
        slots = lay.slots.get(p)
        if slots is None:  # P given as a tensor's length: torch.compile keeps it symbolic (no recompiling)
            slots = lay.slots[p] = torch.arange(p, device=self.device)
        if not self.graphs:
            t0 = time.perf_counter()
            first = self.compiling and (kind, p) not in lay.graphs  # the first call of a shape compiles
            try:
                self._step(lay, kind, slots)
            except Exception as err:  # noqa: BLE001
                if not first:
                    raise
                self._give_up_compiling(err)
                self._step(lay, kind, slots)
            if first:
                lay.graphs[(kind, p)] = None
                self.capture_s += time.perf_counter() - t0
            return
        graph = lay.graphs.get((kind, p))
        if graph is None:
            try:
                graph = self._capture(lay, kind, slots)
            except Exception as err:  # noqa: BLE001 - torch.compile failing must not stop decoding
                if not self.compiling:
                    raise
                self._give_up_compiling(err)
                graph = self._capture(lay, kind, slots)
            lay.graphs[(kind, p)] = graph
        graph.replay()

    def _give_up_compiling(self, err: Exception) -> None:
        """torch.compile failed on this step: decode on, with the plain step (still graphed)."""
        log.warning("torch.compile failed (%s: %s); decoding without it", type(err).__name__,
                    str(err).strip().splitlines()[0][:200] if str(err).strip() else "")
        self.compiling = False
        self._step = self._plain_step
        for lay in self.layouts.values():
            lay.graphs.clear()  # graphs recorded the compiled kernels: record the plain ones again

    def _capture(self, lay: Layout, kind: str, slots: torch.Tensor) -> torch.cuda.CUDAGraph:
        """Warm up (the first call compiles, when asked), then record the step. Warm-up runs really
        commit tokens, so the canvas is put back after each; the cache's writes are idempotent."""
        t0 = time.perf_counter()
        saved = lay.canvas.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(lay, kind, slots)
                lay.canvas.copy_(saved)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._step(lay, kind, slots)
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - t0
        return graph

    # ------------------------------------------------------------------------------ batch decoding
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, seeds: Sequence[int] | None = None,
                 stop_sequences: Sequence[Sequence[int]] = (), callback=None) -> GenerationOutput:
        """``loop.generate``'s contract for prompts with no masks: every row decoded, early-stopped
        rows' tails padded, ``nfe`` the forwards run; ``seeds`` per row (default: the config's)."""
        if self.rows:
            raise RuntimeError("the engine is busy")
        cfg = self.config
        lengths = attention_mask.sum(1).tolist()
        seeds = cfg.row_seeds(len(lengths)) if seeds is None else list(seeds)
        ids = input_ids.cpu()
        rows = [self.add(ids[r, :n].tolist(), seeds[r], stop_sequences, tag=r) for r, n in enumerate(lengths)]
        order = {id(row): r for r, row in enumerate(rows)}
        width = input_ids.shape[1] + cfg.max_new_tokens
        out = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        nfe0, step = self.nfe, 0

        def on_step(n, active, host):
            nonlocal step
            step += 1
            full = out.clone()
            for i, row in enumerate(active):
                full[order[id(row)], : row.length] = host[i, : row.length] if row.done is None else row.canvas
            cancel = callback(step, full) or ()
            index = {order[id(row)]: i for i, row in enumerate(active)}
            return [index[r] for r in cancel if r in index]

        try:
            with self.packed():
                while self.rows:
                    self.step_block(on_step if callback is not None else None)
        finally:
            self.rows = []
        for row in rows:
            out[order[id(row)], : row.length] = row.canvas
        reasons = [row.finish_reason(self.eos_id) for row in rows]
        return GenerationOutput(sequences=out.to(input_ids.device), finish_reasons=reasons, nfe=self.nfe - nfe0,
                                answer_start=[r.start for r in rows])


def _compiled(fn):
    """``fn`` through torch.compile, shapes dynamic: one compilation per step kind serves every batch,
    width and position count (sizes that happen to be equal when it traces are not tied together)."""
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)

    def run(*args):
        from torch.fx.experimental import _config

        with _config.patch(use_duck_shape=False):
            return compiled(*args)

    return run
