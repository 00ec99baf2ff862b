"""Dual key/value cache for ModernBERT: the approximate ``SamplerConfig(cache="dual" | "delayed")``.

Fast-dLLM's DualCache, for semi-autoregressive block decoding. When a row starts a block, one
forward over its whole canvas stores every layer's keys and values (after rotary embedding).
The block's later steps run the encoder on the block's own positions only: their queries attend
to freshly computed keys and values inside the block and to the stored ones everywhere else
(prompt, earlier blocks, the masks after the block). Only tokens inside the block change
during the block, so what is stale is how the rest of the canvas would have re-read them:
the outputs differ from exact decoding, while a step costs about block_length / canvas of a
full forward. Measured agreement and speed are in the README (benchmarks/sampler.py).

``delayed`` (dKV-Cache's one-step delay, inside the dual cache) narrows each step further: a
committed token's keys and values are computed once, in the step after it was committed (the
first forward that sees it as itself), and then read from the store until the block ends. A step
runs only the block's masks and its newly committed tokens, about half a block on average.

The layer loop below is ModernBERT's own forward written out over the model's modules (so the
weights, rotary tables, local/global attention windows, bf16 or int8 layers are the model's);
``tests/test_sampler.py`` checks that a refresh forward equals the model's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbone import unwrap
from ..errors import DiffutronError


class DualCache:
    """Per-row, per-layer keys and values of the last full forward of that row's canvas."""

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        return type(unwrap(model)).__name__ == "ModernBertForMaskedLM"

    def __init__(self, model: torch.nn.Module, *, delayed: bool = False):
        inner = unwrap(model)
        if not self.supports(inner):
            raise DiffutronError(f"cache='{'delayed' if delayed else 'dual'}' supports ModernBERT masked LMs only, "
                                 f"not {type(inner).__name__}: "
                                 "use cache='none'")
        from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

        self.mlm, self.encoder, self.rotate = inner, inner.model, apply_rotary_pos_emb
        config = inner.config
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.half_window = config.local_attention // 2  # sliding layers: |q - k| <= half_window
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # row -> per layer ([h, L, d], [h, L, d])
        self.keys_att: dict[int, torch.Tensor] = {}  # row -> bool [L], real key positions
        self.ids: dict[int, torch.Tensor] = {}  # delayed: row -> [L], the token each stored key/value was computed for
        self.delayed = delayed

    def refresh(self, rows: list[int], input_ids: torch.Tensor, attention: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        """Full forward of canvas rows ``rows`` ([b, L] ids and attention), storing their keys and
        values; returns the logits [N, V] at the True entries of ``positions`` (row-major)."""
        b, width = input_ids.shape
        pos = torch.arange(width, device=input_ids.device).expand(b, width)
        att = attention.bool()
        for j, r in enumerate(rows):
            self.kv[r] = []
            self.keys_att[r] = att[j]
            if self.delayed:
                self.ids[r] = input_ids[j].clone()
        hidden = self._layers(input_ids, pos, rows, att=att)
        return self._logits(hidden[positions])

    def columns(self, row: int, canvas_row: torch.Tensor, span: tuple[int, int], mask_token_id: int) -> torch.Tensor:
        """The canvas columns a window step of ``row`` runs in its block ``span``: all of them, or
        (delayed) the masks and the tokens whose stored keys and values were computed for another id."""
        s, e = span
        if not self.delayed:
            return torch.arange(s, e, device=canvas_row.device)
        seg = canvas_row[s:e]
        return s + ((seg == mask_token_id) | (seg != self.ids[row][s:e])).nonzero().squeeze(-1)

    def window(self, rows: list[int], input_ids: torch.Tensor, cols: torch.Tensor, counts: list[int],
               positions: torch.Tensor) -> torch.Tensor:
        """Forward of the canvas columns ``cols[j, :counts[j]]`` of each row (``input_ids`` [b, n]
        their tokens; later entries pad a shorter row, repeat one of its columns and are neither
        stored nor read) against the stored keys and values everywhere else; logits [N, V] at the
        True entries of ``positions`` [b, n] (row-major)."""
        for j, r in enumerate(rows if self.delayed else ()):
            self.ids[r][cols[j, : counts[j]]] = input_ids[j, : counts[j]]
        hidden = self._layers(input_ids, cols, rows, counts=counts)
        return self._logits(hidden[positions])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlm.decoder(self.mlm.head(hidden))

    def _masks(self, q_pos: torch.Tensor, keys_att: torch.Tensor) -> dict[str, torch.Tensor]:
        """Boolean attention masks [b, 1, n, L] per layer type (True = attend)."""
        k_pos = torch.arange(keys_att.shape[1], device=q_pos.device)
        full = keys_att[:, None, None, :].expand(-1, 1, q_pos.shape[1], -1)
        near = (q_pos[:, :, None] - k_pos[None, None, :]).abs() <= self.half_window  # [b, n, L]
        return {"full_attention": full, "sliding_attention": full & near[:, None]}

    def _stacked(self, rows: list[int], layer: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [b, h, width, d] of ``rows`` at ``layer``: one row's own tensors as a view
        (no copy), several rows stacked (padded to ``width``)."""
        if len(rows) == 1 and self.kv[rows[0]][layer][0].shape[1] == width:
            k, v = self.kv[rows[0]][layer]
            return k.unsqueeze(0), v.unsqueeze(0)
        ks, vs = [], []
        for r in rows:
            k, v = self.kv[r][layer]
            pad = width - k.shape[1]
            ks.append(F.pad(k, (0, 0, 0, pad)) if pad else k)
            vs.append(F.pad(v, (0, 0, 0, pad)) if pad else v)
        return torch.stack(ks), torch.stack(vs)

    def _layers(self, input_ids: torch.Tensor, pos: torch.Tensor, rows: list[int], *,
                att: torch.Tensor | None = None, counts: list[int] | None = None) -> torch.Tensor:
        """The encoder over ``input_ids`` at positions ``pos`` [b, n]: with ``att`` (a refresh) the
        whole canvas, storing keys and values; with ``counts`` (a window) each row's first
        ``counts[j]`` columns against the store, their keys and values written into it."""
        enc = self.encoder
        store = counts is None
        b, n = input_ids.shape
        x = enc.embeddings(input_ids=input_ids)
        rope = {t: enc.rotary_emb(x, pos, t) for t in set(enc.config.layer_types)}
        if store:
            keys_att = att
        else:
            width = max(self.keys_att[r].shape[0] for r in rows)
            writes = [(self.kv[r], pos[j, :c], j, c) for j, (r, c) in enumerate(zip(rows, counts))]
            keys_att = torch.stack([F.pad(self.keys_att[r], (0, width - self.keys_att[r].shape[0])) for r in rows])
        masks = self._masks(pos, keys_att)
        for i, layer in enumerate(enc.layers):
            qkv = layer.attn.Wqkv(layer.attn_norm(x)).view(b, n, 3, self.heads, self.head_dim)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [b, h, n, d]
            cos, sin = rope[layer.attention_type]
            q, k = self.rotate(q, k, cos, sin, unsqueeze_dim=1)
            if store:
                for j, r in enumerate(rows):
                    self.kv[r].append((k[j], v[j]))
                keys, values = k, v
            else:  # the stored canvas with this window's fresh keys and values written over it, in place:
                # only the block changes until the next refresh, and each step rewrites what it ran
                for kv, where, j, c in writes:
                    kv[i][0].index_copy_(1, where, k[j, :, :c])
                    kv[i][1].index_copy_(1, where, v[j, :, :c])
                keys, values = self._stacked(rows, i, keys_att.shape[1])
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=masks[layer.attention_type],
                                                 scale=self.head_dim ** -0.5)
            x = x + layer.attn.Wo(out.transpose(1, 2).reshape(b, n, -1))
            x = x + layer.mlp(layer.mlp_norm(x))
        return enc.final_norm(x)
