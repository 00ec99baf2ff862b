"""One step of the lockstep engine (``engine.py``): ``Layout``, the device buffers of B rows of
canvas width W, and ``Step``, which commits a step's tokens into them as a pure tensor function:
no value read back to the host and no shape taken from the data, so that the engine can capture
it as a CUDA graph and compile it with torch.compile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import backbone
from ..backbone import modernbert
from . import policies
from .cache import DualCache
from .config import SamplerConfig


@dataclass(eq=False)
class Layout:
    """Device buffers for B slots of canvas width W, and the CUDA graphs captured on them."""

    B: int
    W: int
    canvas: torch.Tensor  # [B, W + 1] long; the last column is scratch (padding entries write there)
    att: torch.Tensor  # [B, W] long
    uncond: torch.Tensor  # [B, W] bool: prompt tokens CFG's unconditional canvas masks
    lo: torch.Tensor  # [B] block start column
    blen: torch.Tensor  # [B] block width (0 = an empty slot)
    k: torch.Tensor  # [B] tokens to commit this step
    u: torch.Tensor  # [B, L] float64 uniforms of this step (token draws)
    u_order: torch.Tensor  # [B, L] float64 (random remasking)
    cache: DualCache | None
    graphs: dict = field(default_factory=dict)  # (kind, P) -> CUDA graph
    slots: dict = field(default_factory=dict)  # P -> arange(P) on the device


class Step:
    """The step for one model and ``SamplerConfig``; ``run(lay, kind, slots)`` is the step itself.

    ``plain``: the plain rules (what GPUs run) rather than the CPU kernels, which read values
    back to the host."""

    def __init__(self, model, config: SamplerConfig, *, mask_token_id: int, eos_token_id: int | None, plain: bool):
        self.model = model
        self.config = config
        self.mask_id, self.eos_id = mask_token_id, eos_token_id
        self.plain = plain
        self.vocab = backbone.unwrap(model).get_output_embeddings().out_features
        self.modernbert = modernbert.is_modernbert(model)
        self.half_window = getattr(backbone.unwrap(model).config, "local_attention", 0) // 2

    def run(self, lay: Layout, kind: str, slots: torch.Tensor) -> None:
        """Commit this step's tokens into ``lay.canvas`` (see ``engine``'s module docstring, step 2); the
        block's masked positions are read at ``len(slots)`` places per row (``slots`` = arange(P))."""
        cfg = self.config
        B, W, L, p = lay.B, lay.W, cfg.block_length, slots.shape[0]
        canvas = lay.canvas
        ar = torch.arange(L, device=canvas.device)
        inside = ar < lay.blen[:, None]  # [B, L]
        cols = torch.where(inside, lay.lo[:, None] + ar, W)  # the block's columns; scratch outside
        tok = canvas.gather(1, cols)
        masked = (tok == self.mask_id) & inside
        order = torch.sort((~masked).int(), dim=1, stable=True).indices.index_select(1, slots)  # masks first
        pos = cols.gather(1, order)  # [B, p] canvas columns (W = scratch)
        valid = masked.gather(1, order)
        logits = self._logits(lay, kind, tok, cols, inside, order, pos).float()  # [B * p, V]
        rows = torch.arange(B, device=canvas.device).repeat_interleave(p)
        if cfg.repetition_penalty != 1.0:
            x = canvas[:, :W]
            seen = lay.att.bool() & (x != self.mask_id)
            if self.eos_id is not None:
                seen &= x != self.eos_id
            present = torch.zeros(B, self.vocab + 1, dtype=torch.bool, device=canvas.device)
            present = present.scatter_(1, torch.where(seen, x, self.vocab), True)[:, : self.vocab]
            logits = policies.apply_repetition_penalty(logits, present, rows, cfg.repetition_penalty, plain=self.plain)
        u = lay.u.gather(1, order).reshape(-1) if cfg.temperature > 0 else None
        u_order = lay.u_order.gather(1, order).reshape(-1) if cfg.remasking == "random" else None
        x0, conf = policies.propose(logits, u, u_order, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                    remasking=cfg.remasking, forbid=self.mask_id, plain=self.plain)
        x0 = x0.view(B, p)
        conf = conf.view(B, p).masked_fill(~valid, float("-inf"))
        n = lay.k
        if cfg.threshold is not None:
            n = torch.where(n > 0, torch.maximum(n, (conf >= cfg.threshold).sum(1)), n)
        n = torch.minimum(n, valid.sum(1))
        ranked = torch.sort(conf, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(ranked).scatter_(1, ranked, slots.expand(B, p))
        commit = rank < n[:, None]
        canvas.scatter_(1, pos, torch.where(commit, x0, canvas.gather(1, pos)))

    def _logits(self, lay: Layout, kind: str, tok, cols, inside, order, pos) -> torch.Tensor:
        """Logits [B * p (row-major), V] at ``pos``: a full forward, or the dual cache's refresh or window."""
        B, W, L = lay.B, lay.W, self.config.block_length
        base = torch.arange(B, device=pos.device)[:, None]
        if kind == "window":
            return lay.cache.window(None, tok, cols, inside, (base * L + order).reshape(-1))
        flat = (base * W + pos.clamp(max=W - 1)).reshape(-1)
        x = lay.canvas[:, :W]
        if kind == "refresh":
            return lay.cache.refresh(None, x, lay.att, flat)
        if self.config.cfg_scale > 0:
            uncond = torch.where(lay.uncond, self.mask_id, x)
            both = self._encode(torch.cat([x, uncond]), torch.cat([lay.att, lay.att]),
                                torch.cat([flat, flat + B * W]))
            cond, unc = both.float().chunk(2)
            return policies.guide(cond, unc, self.config.cfg_scale)
        return self._encode(x, lay.att, flat)

    def _encode(self, ids: torch.Tensor, att: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """The model's logits at ``flat`` (an index into [b * W]) of canvases ``ids`` [b, W]."""
        if self.modernbert:  # ModernBERT's masks built here from tensors: its own builder may read values back
            pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
            masks = modernbert.modernbert_masks(pos, att.bool(), self.half_window)
            return modernbert.modernbert_logits_at(self.model, ids, flat, masks)
        return backbone.logits_at(self.model, ids, flat, att)
