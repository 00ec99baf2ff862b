"""The one unmasking loop: semi-autoregressive block denoising with Diffutron semantics.

Each row of the batch keeps its own block/step state, so a row decodes exactly as it would
alone (ragged prompts, per-row seeds, early stops); rows that need a forward at the same time
share one. Per step and row:

1. the canvas holds prompt, committed tokens and masks; the current block's masks are the
   positions that may be committed;
2. logits at those positions only (``logits_at``), with classifier-free guidance when asked;
3. repetition penalty, candidates x0 and confidences (``policies``; with ``rng="reference"`` the
   reference's Gumbel-max draw over the whole batch's stream, ``noise.ReferenceNoise``);
4. commit the k most confident (k from the block schedule, ``policies.block_schedule``: the
   reference's arithmetic, steps that reveal nothing dropped; plus all above the threshold).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..backbone import logits_at, packed_head
from ..errors import DiffutronError
from . import policies
from .cache import DualCache
from .config import SamplerConfig
from .noise import ReferenceNoise, block_noise
from .stopping import find_stop


@dataclass
class GenerationOutput:
    """``sequences``: LongTensor [B, max_prompt_len + max_new_tokens], the whole canvas (a row
    that stopped early has its tail after the stop filled with pad); ``finish_reasons``:
    "stop" (EOS or a stop sequence), "length" or "cancelled" per row; ``nfe``: model forward
    calls for the whole batch; ``answer_start``: where each row's first mask was."""

    sequences: torch.Tensor
    finish_reasons: list[str]
    nfe: int
    answer_start: list[int] = field(default_factory=list)


@dataclass
class _Row:
    blocks: list[tuple[int, int]]
    steps: int
    block: int = -1
    plan: list[int] = field(default_factory=list)
    j: int = 0
    done: str | None = None
    cached_block: int = -1  # cache="dual" / "delayed": the block whose start refreshed this row's keys and values
    windows: int = 0  # window forwards since this row's last refresh
    u_tokens: torch.Tensor | None = None  # this block's uniforms [steps, block] (noise.block_noise)
    u_order: torch.Tensor | None = None


Callback = Callable[[int, torch.Tensor], "Sequence[int] | None"]


def build_canvas(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *, mask_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Canvas [B, P + max_new] with each row's masks right after its own prompt; returns
    ``(canvas, attention, lengths)`` where lengths are the real lengths (prompt + masks)."""
    b, p = input_ids.shape
    lengths = attention_mask.sum(1).tolist()
    canvas = torch.full((b, p + max_new_tokens), pad_token_id, dtype=torch.long, device=input_ids.device)
    attention = torch.zeros_like(canvas)
    for r, n in enumerate(lengths):
        canvas[r, :n] = input_ids[r, :n]
        canvas[r, n : n + max_new_tokens] = mask_token_id
        attention[r, : n + max_new_tokens] = 1
    return canvas, attention, [n + max_new_tokens for n in lengths]


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    config: SamplerConfig,
    *,
    mask_token_id: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    callback: Callback | None = None,
) -> GenerationOutput:
    """Denoise ``config.max_new_tokens`` masks after each prompt (and any masks inside it).

    Args:
        model: a Hugging Face masked LM (or a peft-wrapped one).
        input_ids: LongTensor [B, P], prompts right-padded with ``pad_token_id``.
        config: the sampler settings.
        mask_token_id / eos_token_id / pad_token_id: the tokenizer's ids (pad defaults to EOS,
            then to the mask id).
        attention_mask: 1 on real prompt tokens (all ones when None).
        stop_sequences: token-id sequences that end an answer (e.g. the tokens of ``[/Answer]``).
        callback: ``callback(step, canvas)`` after every step; may return row indices to cancel.

    Raises:
        DiffutronError: nothing to generate (no masks and max_new_tokens 0).
    """
    with packed_head(model):  # CPU float32: the output layer on a oneDNN-packed weight (backbone)
        return _denoise(model, input_ids, config, mask_token_id=mask_token_id, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id, attention_mask=attention_mask, stop_sequences=stop_sequences,
                        callback=callback)


def _denoise(model, input_ids, config, *, mask_token_id, eos_token_id, pad_token_id, attention_mask,
             stop_sequences, callback) -> GenerationOutput:
    cfg = config
    device = input_ids.device
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else mask_token_id
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    stops = [list(s) for s in (stop_sequences or []) if len(s)]
    b = input_ids.shape[0]
    canvas, attention, lengths = build_canvas(
        input_ids, attention_mask, cfg.max_new_tokens, mask_token_id=mask_token_id, pad_token_id=pad_token_id
    )
    is_mask = (canvas == mask_token_id) & attention.bool()
    # CFG's unconditional input masks the prompt: real tokens that are neither mask nor EOS at the start.
    prompt_index = attention.bool() & ~is_mask
    if eos_token_id is not None:
        prompt_index &= canvas != eos_token_id

    rows: list[_Row] = []
    starts: list[int] = []
    for r in range(b):
        where = is_mask[r].nonzero().squeeze(-1)
        if where.numel() == 0:
            raise DiffutronError(
                f"row {r} has nothing to generate: set max_new_tokens >= 1 or put mask tokens in the input"
            )
        first, last = int(where[0]), int(where[-1]) + 1
        blocks = policies.blocks_of(first, last, cfg.block_length)
        rows.append(_Row(blocks=blocks, steps=policies.steps_per_block(cfg.steps, len(blocks))))
        starts.append(first)
    seeds = cfg.row_seeds(b)
    reference = ReferenceNoise(cfg.seed, device) if cfg.rng == "reference" else None  # one stream for the batch
    keyed_tokens = cfg.temperature > 0 and reference is None
    keyed_order = cfg.remasking == "random" and reference is None
    cache = (DualCache(model, delayed=cfg.cache == "delayed", slots=b, width=canvas.shape[1])
             if cfg.cache != "none" else None)

    def masks_left(r: int) -> int:
        s, e = rows[r].blocks[rows[r].block]
        return int((canvas[r, s:e] == mask_token_id).sum())

    def end_block(r: int) -> None:
        """Called when row r's current block is decoded: stop the row if its answer has ended."""
        row = rows[r]
        if cfg.stop_at_eos:
            s, e = row.blocks[row.block]
            hit = find_stop(canvas[r, starts[r] : e].tolist(), eos_token_id=eos_token_id, stop_sequences=stops)
            if hit is not None:
                tail = starts[r] + hit[1]
                canvas[r, tail : lengths[r]] = pad_token_id
                row.done = "stop"
                return
        if row.block + 1 >= len(row.blocks):
            row.done = "length"

    def next_work(r: int) -> int:
        """Advance row r to its next step that commits k > 0 tokens; 0 when the row is done."""
        row = rows[r]
        while row.done is None:
            if row.block < 0 or row.j >= len(row.plan) or masks_left(r) == 0:
                if row.block >= 0:
                    end_block(r)
                    if row.done is not None:
                        break
                row.block += 1
                row.plan = policies.block_schedule(masks_left(r), row.steps)
                row.j = 0
                s, e = row.blocks[row.block]
                row.u_tokens, row.u_order = block_noise(seeds[r], row.block, row.steps, e - s,
                                                        tokens=keyed_tokens, order=keyed_order)
                continue
            k = min(row.plan[row.j], masks_left(r))
            if k > 0:
                return k
            row.j += 1  # a step that reveals nothing is skipped without a forward
        return 0

    nfe = 0
    step = 0
    while True:
        work = [(r, k) for r in range(b) if rows[r].done is None and (k := next_work(r)) > 0]
        if not work:
            break
        sel = torch.tensor([r for r, _ in work], device=device)
        width = max(lengths[r] for r, _ in work)
        x = canvas[sel, :width]
        att = attention[sel, :width]
        model_att = None if bool(att.all()) else att  # no padding: the model's faster unmasked path
        # 1. the positions this step may commit: masks inside each row's current block  [n, w]
        cols = torch.arange(width, device=device)
        lo = torch.tensor([rows[r].blocks[rows[r].block][0] for r, _ in work], device=device)
        hi = torch.tensor([rows[r].blocks[rows[r].block][1] for r, _ in work], device=device)
        target = (x == mask_token_id) & (cols >= lo[:, None]) & (cols < hi[:, None])
        # 2. logits there only; CFG runs the prompt-masked canvas in the same batch  [N, V]
        forwards = 1
        if cache is not None:  # a full forward for rows starting a block, a block window for the rest
            logits, forwards = _cached_logits(cache, rows, work, x, att, target, mask_token_id, cfg.cache_refresh)
        elif cfg.cfg_scale > 0:
            uncond = torch.where(prompt_index[sel, :width], torch.full_like(x, mask_token_id), x)
            both = logits_at(model, torch.cat([x, uncond]), torch.cat([target, target]),
                             None if model_att is None else torch.cat([att, att]))
            cond, unc = both.float().chunk(2)
            logits = policies.guide(cond, unc, cfg.cfg_scale)
        else:
            logits = logits_at(model, x, target, model_att).float()
        nfe += forwards
        local_rows = target.nonzero()[:, 0]  # [N] index into the work list
        # 3. repetition penalty over each row's canvas (not mask, not EOS, not padding)
        if cfg.repetition_penalty != 1.0:
            seen = att.bool() & (x != mask_token_id)
            if eos_token_id is not None:
                seen &= x != eos_token_id
            present = torch.zeros(len(work), logits.shape[-1], dtype=torch.bool, device=device)
            present[seen.nonzero()[:, 0], x[seen]] = True
            logits = policies.apply_repetition_penalty(logits, present, local_rows, cfg.repetition_penalty)
        flat = target.nonzero()
        if reference is None:
            u, u_order = _uniforms(rows, work, flat, device)
            x0, conf = policies.propose(
                logits, u, u_order, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                remasking=cfg.remasking, forbid=mask_token_id,
            )
        else:  # rng="reference": this step's draws over the whole [B, W, V] canvas, read where needed
            canvas_rows, cols = sel[flat[:, 0]], flat[:, 1]
            u = (reference.token_uniforms((b, canvas.shape[1], logits.shape[-1]), canvas_rows, cols).to(device)
                 if cfg.temperature > 0 else None)
            u_order = (reference.order_uniforms((b, canvas.shape[1]), canvas_rows, cols).to(device)
                       if cfg.remasking == "random" else None)
            x0, conf = policies.propose_reference(
                logits, u, u_order, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                remasking=cfg.remasking, forbid=mask_token_id,
            )
        # 4. commit the most confident candidates of each row
        for i, (r, k) in enumerate(work):
            mine = (local_rows == i).nonzero().squeeze(-1)
            chosen = mine[policies.choose(conf[mine], k, cfg.threshold)]
            canvas[r, flat[chosen, 1]] = x0[chosen]
            rows[r].j += 1
        step += 1
        if callback is not None:
            for r in callback(step, canvas) or ():
                if 0 <= r < b and rows[r].done is None:
                    rows[r].done = "cancelled"
                    tail = canvas[r, : lengths[r]] == mask_token_id
                    canvas[r, : lengths[r]][tail] = pad_token_id

    reasons = []
    for r in range(b):
        reason = rows[r].done or "length"
        if reason == "length" and find_stop(
            canvas[r, starts[r] : lengths[r]].tolist(), eos_token_id=eos_token_id, stop_sequences=stops
        ):
            reason = "stop"
        reasons.append(reason)
    return GenerationOutput(sequences=canvas, finish_reasons=reasons, nfe=nfe, answer_start=starts)


def _uniforms(rows: list[_Row], work: list[tuple[int, int]], flat: torch.Tensor,
              device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The uniforms [N] of this step's positions (``flat`` [N, 2], row-major: work index, column),
    read from each row's block noise at (its step, the column's offset in its block)."""
    first = rows[work[0][0]]
    if first.u_tokens is None and first.u_order is None:
        return None, None
    counts = torch.bincount(flat[:, 0], minlength=len(work)).tolist()
    cols = flat[:, 1].cpu().split(counts)
    out = []
    for name in ("u_tokens", "u_order"):
        if getattr(first, name) is None:
            out.append(None)
            continue
        parts = []
        for (r, _), c in zip(work, cols):
            row = rows[r]
            parts.append(getattr(row, name)[row.j, c - row.blocks[row.block][0]])
        out.append(torch.cat(parts).to(device))
    return out[0], out[1]


def _cached_logits(cache: DualCache, rows: list[_Row], work: list[tuple[int, int]], x: torch.Tensor,
                   att: torch.Tensor, target: torch.Tensor, mask_token_id: int,
                   refresh_every: int = 0) -> tuple[torch.Tensor, int]:
    """cache="dual" / "delayed": logits [N, V] at ``target`` (row-major over ``work``), from a full
    forward for rows that start a block or ran ``refresh_every`` (> 0) windows since their last
    one (storing their keys and values), and a window forward over the block (``cache.columns``)
    for the rest; returns ``(logits, forwards run)``."""
    def stale(r: int) -> bool:
        return rows[r].cached_block != rows[r].block or 0 < refresh_every <= rows[r].windows

    fresh = [i for i, (r, _) in enumerate(work) if stale(r)]
    warm = [i for i, (r, _) in enumerate(work) if not stale(r)]
    offsets = [0, *itertools.accumulate(target.sum(1).tolist())]  # row i's logits: offsets[i]:offsets[i + 1]
    parts = []
    if fresh:
        idx = torch.tensor(fresh, device=x.device)
        parts.append(cache.refresh([work[i][0] for i in fresh], x[idx], att[idx], target[idx]))
        for i in fresh:
            rows[work[i][0]].cached_block, rows[work[i][0]].windows = rows[work[i][0]].block, 0
    if warm:
        runs = [cache.columns(work[i][0], x[i], rows[work[i][0]].blocks[rows[work[i][0]].block], mask_token_id)
                for i in warm]
        counts = [len(c) for c in runs]
        n = max(counts)  # a shorter row repeats its first column (never stored nor read)
        cols = torch.stack([torch.cat([c, c[:1].expand(n - len(c))]) for c in runs])
        idx = torch.tensor(warm, device=x.device)
        valid = torch.arange(n, device=x.device) < torch.tensor(counts, device=x.device)[:, None]
        ids = x[idx].gather(1, cols)
        pos = target[idx].gather(1, cols) & valid
        parts.append(cache.window([work[i][0] for i in warm], ids, cols, counts, pos))
        for i in warm:
            rows[work[i][0]].windows += 1
    if len(parts) == 1:  # one group: already in row-major order
        return parts[0], 1
    order = [k for i in fresh + warm for k in range(offsets[i], offsets[i + 1])]
    logits = torch.empty(offsets[-1], parts[0].shape[1], dtype=parts[0].dtype, device=parts[0].device)
    logits[torch.tensor(order, device=logits.device)] = torch.cat(parts)
    return logits, 2
