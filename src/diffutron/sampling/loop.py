"""The one unmasking loop: semi-autoregressive block denoising with Diffutron semantics.

The paper's algorithm, as the authors' generator runs it (``tests/reference_sampler.py`` writes it
out in plain torch: the oracle of the tests):

1. canvas [B, W] = each prompt followed by ``max_new_tokens`` masks (``build_canvas``);
2. each row's answer span (its first mask to its last, so masks inside a prompt too) is cut into
   blocks of ``block_length``, decoded left to right, each with
   ``ceil(steps / blocks)`` steps; step j of a block commits k_j tokens (the reference's
   schedule, ``policies.block_schedule``; steps that commit nothing are dropped);
3. per step: the masks of the current block are the positions that may be committed; logits
   there (classifier-free guidance when asked), the repetition penalty, candidates x0 and their
   confidences by the remasking rule (``policies``);
4. commit the k most confident (plus every one above ``threshold``); committed tokens stay;
5. after a block, stop the row if its answer has ended (EOS or a stop sequence).

Unlike the reference's lockstep, each row keeps its own block and step (``state.RowState``), so
a row decodes exactly as it would alone (ragged prompts, per-row seeds, early stops); rows that
need a forward at the same time share one. Random numbers come from each row's block noise
(``noise.block_noise``), or with ``rng="reference"`` from the reference's one stream over the
whole batch (``noise.ReferenceNoise``). Shapes: B rows and W columns in the canvas; n rows and w
columns in a step; N positions to commit in a step; V the vocabulary.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..backbone import choose_pad_id, logits_at, packed_head
from . import policies
from .cache import DualCache
from .config import SamplerConfig
from .noise import ReferenceNoise
from .state import RowState, Specials


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
        mask_token_id / eos_token_id / pad_token_id: the tokenizer's ids (``eos_token_id``: its
            end of text; pad defaults to it, then to the mask id: ``backbone.choose_pad_id``).
        attention_mask: 1 on real prompt tokens (all ones when None).
        stop_sequences: token-id sequences that end an answer (e.g. the tokens of ``[/Answer]``).
        callback: ``callback(step, canvas)`` after every step; may return row indices to cancel.

    Raises:
        DiffutronError: nothing to generate (no masks and max_new_tokens 0).
    """
    pad_token_id = choose_pad_id(pad_token_id, eos_token_id, mask_token_id)
    specials = Specials.of(mask_token_id, pad_token_id, eos_token_id, stop_sequences)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with packed_head(model):  # CPU float32: the output layer on a oneDNN-packed weight (backbone)
        return _denoise(model, input_ids, attention_mask.to(input_ids.device), config, specials, callback)


def _denoise(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: SamplerConfig,
             sp: Specials, callback: Callback | None) -> GenerationOutput:
    # 1. the canvas [B, W]: each prompt, then its masks (padding after, attention 0)
    canvas, attention, lengths = build_canvas(input_ids, attention_mask, cfg.max_new_tokens, mask_token_id=sp.mask,
                                              pad_token_id=sp.pad)
    b, device = canvas.shape[0], canvas.device
    # 2. each row's blocks and steps per block; a block's plan and noise come as it starts
    seeds = cfg.row_seeds(b)
    rows = [RowState(r, canvas[r, :n], cfg, sp, seeds[r]) for r, n in enumerate(lengths)]
    prompt = _prompt_index(canvas, attention, sp)  # CFG's unconditional input masks these  [B, W]
    reference = ReferenceNoise(cfg.seed, device) if cfg.rng == "reference" else None
    cache = (DualCache(model, delayed=cfg.cache == "delayed", slots=b, width=canvas.shape[1])
             if cfg.cache != "none" else None)
    nfe = step = 0
    # 3. every step: the rows with tokens to commit share a forward (``RowState.advance`` moves each
    #    row to its own next step: next block, skipped steps, and 5., the stop after a block)
    while work := [row for row in rows if row.advance() > 0]:
        sel = torch.tensor([row.index for row in work], device=device)
        width = max(row.length for row in work)
        x, att = canvas[sel, :width], attention[sel, :width]  # [n, w]
        # 3a. the positions this step may commit: masks inside each row's current block  [n, w]
        cols = torch.arange(width, device=device)
        lo = torch.tensor([row.span[0] for row in work], device=device)
        hi = torch.tensor([row.span[1] for row in work], device=device)
        target = (x == sp.mask) & (cols >= lo[:, None]) & (cols < hi[:, None])
        flat = target.nonzero()  # [N, 2]: (index into work, column), row-major
        # 3b. logits there only: with CFG, the prompt-masked canvas in the same batch  [N, V]
        if cache is not None:  # a full forward for rows starting a block, a block window for the rest
            logits, forwards = _cached_logits(cache, work, x, att, target, sp.mask, cfg.cache_refresh)
        else:
            logits, forwards = _logits(model, x, att, target, prompt[sel, :width], cfg.cfg_scale, sp.mask), 1
        nfe += forwards
        # 3c. repetition penalty over each row's canvas (not mask, not EOS, not padding)
        if cfg.repetition_penalty != 1.0:
            present = _present(x, att, logits.shape[-1], sp)  # [n, V]
            logits = policies.apply_repetition_penalty(logits, present, flat[:, 0], cfg.repetition_penalty)
        # 3d. candidates x0 [N] and their confidences [N] by the remasking rule
        if reference is None:
            x0, conf = policies.propose(logits, *_uniforms(work, flat, device), temperature=cfg.temperature,
                                        top_k=cfg.top_k, top_p=cfg.top_p, remasking=cfg.remasking, forbid=sp.mask)
        else:
            x0, conf = _propose_reference(reference, logits, sel[flat[:, 0]], flat[:, 1], canvas.shape, cfg, sp)
        # 4. commit each row's k most confident candidates (and all at or above the threshold)
        for i, row in enumerate(work):
            mine = (flat[:, 0] == i).nonzero().squeeze(-1)
            chosen = mine[policies.choose(conf[mine], row.k, cfg.threshold)]
            row.commit(flat[chosen, 1], x0[chosen])
        step += 1
        # the caller sees the canvas and may cancel rows
        if callback is not None:
            for r in callback(step, canvas) or ():
                if 0 <= r < b and rows[r].done is None:
                    rows[r].cancel()
    return GenerationOutput(sequences=canvas, finish_reasons=[row.finish_reason() for row in rows], nfe=nfe,
                            answer_start=[row.start for row in rows])


def _prompt_index(canvas: torch.Tensor, attention: torch.Tensor, sp: Specials) -> torch.Tensor:
    """The prompt tokens CFG masks [B, W]: real tokens that are neither mask nor EOS at the start."""
    prompt = attention.bool() & (canvas != sp.mask)
    if sp.eos is not None:
        prompt &= canvas != sp.eos
    return prompt


def _logits(model: torch.nn.Module, x: torch.Tensor, att: torch.Tensor, target: torch.Tensor,
            prompt: torch.Tensor, cfg_scale: float, mask: int) -> torch.Tensor:
    """Float logits [N, V] at ``target`` (bool [n, w]); with ``cfg_scale`` > 0 guided by the
    unconditional canvas (``prompt`` [n, w] masked), run in the same batch."""
    model_att = None if bool(att.all()) else att  # no padding: the model's faster unmasked path
    if cfg_scale <= 0:
        return logits_at(model, x, target, model_att).float()
    uncond = torch.where(prompt, torch.full_like(x, mask), x)
    both = logits_at(model, torch.cat([x, uncond]), torch.cat([target, target]),
                     None if model_att is None else torch.cat([att, att]))
    cond, unc = both.float().chunk(2)
    return policies.guide(cond, unc, cfg_scale)


def _present(x: torch.Tensor, att: torch.Tensor, vocab: int, sp: Specials) -> torch.Tensor:
    """Bool [n, V]: the ids on each row's canvas ``x`` [n, w] (not mask, not EOS, not padding)."""
    seen = att.bool() & (x != sp.mask)
    if sp.eos is not None:
        seen &= x != sp.eos
    present = torch.zeros(x.shape[0], vocab, dtype=torch.bool, device=x.device)
    present[seen.nonzero()[:, 0], x[seen]] = True
    return present


def _uniforms(work: list[RowState], flat: torch.Tensor,
              device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The uniforms [N] of this step's positions (``flat`` [N, 2], row-major: work index, column),
    read from each row's block noise at (its step, the column's offset in its block)."""
    if not (work[0].draw_tokens or work[0].draw_order):
        return None, None
    counts = torch.bincount(flat[:, 0], minlength=len(work)).tolist()
    per_row = [row.uniforms(c) for row, c in zip(work, flat[:, 1].cpu().split(counts))]  # [(u, u_order)]
    return tuple(None if parts[0] is None else torch.cat(parts).to(device) for parts in zip(*per_row))


def _propose_reference(reference: ReferenceNoise, logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       shape: torch.Size, cfg: SamplerConfig, sp: Specials) -> tuple[torch.Tensor, torch.Tensor]:
    """rng="reference": x0 and confidences [N] with this step's draws over the whole [B, W, V]
    canvas, read at canvas (``rows``, ``cols``) [N]."""
    b, w = shape
    device = logits.device
    u = (reference.token_uniforms((b, w, logits.shape[-1]), rows, cols).to(device)
         if cfg.temperature > 0 else None)
    u_order = reference.order_uniforms((b, w), rows, cols).to(device) if cfg.remasking == "random" else None
    return policies.propose_reference(logits, u, u_order, temperature=cfg.temperature, top_k=cfg.top_k,
                                      top_p=cfg.top_p, remasking=cfg.remasking, forbid=sp.mask)


def _cached_logits(cache: DualCache, work: list[RowState], x: torch.Tensor, att: torch.Tensor,
                   target: torch.Tensor, mask_token_id: int, refresh_every: int = 0) -> tuple[torch.Tensor, int]:
    """cache="dual" / "delayed": logits [N, V] at ``target`` (row-major over ``work``), from a full
    forward for rows that start a block or ran ``refresh_every`` (> 0) windows since their last
    one (storing their keys and values), and a window forward over the block (``cache.columns``)
    for the rest; returns ``(logits, forwards run)``."""
    fresh = [i for i, row in enumerate(work) if row.stale(refresh_every)]
    warm = [i for i, row in enumerate(work) if not row.stale(refresh_every)]
    offsets = [0, *itertools.accumulate(target.sum(1).tolist())]  # row i's logits: offsets[i]:offsets[i + 1]
    parts = []
    if fresh:
        idx = torch.tensor(fresh, device=x.device)
        parts.append(cache.refresh([work[i].index for i in fresh], x[idx], att[idx], target[idx]))
        for i in fresh:
            work[i].refreshed()
    if warm:
        runs = [cache.columns(work[i].index, x[i], work[i].span, mask_token_id) for i in warm]
        counts = [len(c) for c in runs]
        n = max(counts)  # a shorter row repeats its first column (never stored nor read)
        cols = torch.stack([torch.cat([c, c[:1].expand(n - len(c))]) for c in runs])  # [n_warm, n]
        idx = torch.tensor(warm, device=x.device)
        valid = torch.arange(n, device=x.device) < torch.tensor(counts, device=x.device)[:, None]
        ids = x[idx].gather(1, cols)
        pos = target[idx].gather(1, cols) & valid
        parts.append(cache.window([work[i].index for i in warm], ids, cols, counts, pos))
        for i in warm:
            work[i].windowed()
    if len(parts) == 1:  # one group: already in row-major order
        return parts[0], 1
    order = [k for i in fresh + warm for k in range(offsets[i], offsets[i + 1])]
    logits = torch.empty(offsets[-1], parts[0].shape[1], dtype=parts[0].dtype, device=parts[0].device)
    logits[torch.tensor(order, device=logits.device)] = torch.cat(parts)
    return logits, 2
