"""Dual key/value cache for ModernBERT: the approximate ``SamplerConfig(cache="dual" | "delayed")``.

Fast-dLLM's DualCache, for semi-autoregressive block decoding. When a row starts a block, one
forward over its whole canvas stores every layer's keys and values (after rotary embedding).
The block's later steps run the encoder on the block's own positions only: their queries attend
to freshly computed keys and values inside the block and to the stored ones everywhere else
(prompt, earlier blocks, the masks after the block). Only tokens inside the block change
during the block, so what is stale is how the rest of the canvas would have re-read them:
the outputs differ from exact decoding, while a step costs about block_length / canvas of a
full forward. Measured agreement and speed are in docs/benchmarks.md (benchmarks/sampler.py).

``delayed`` (dKV-Cache's one-step delay, inside the dual cache) narrows each step further: a
committed token's keys and values are computed once, in the step after it was committed (the
first forward that sees it as itself), and then read from the store until the block ends. A step
runs only the block's masks and its newly committed tokens, about half a block on average.

The layer loop below is ModernBERT's own forward written out over the model's modules (so the
weights, rotary tables, local/global attention windows, bf16 or int8 layers are the model's);
``tests/sampling/test_sampler.py`` checks that a refresh forward equals the model's logits. It calls
internals of recent transformers' ModernBERT; with an older one, :func:`check_internals` refuses
the cache in one line naming the version needed, and decoding without the cache still runs.

Keys and values live in one preallocated buffer per layer, [slots, heads, width + 1, head_dim]:
a canvas row is a slot, and the last column is scratch (never attended), where the padding
entries of a window write. With every slot in a call and fixed shapes, nothing here reads back to
the host or allocates from host data, so the compiled engine (``engine.py``) captures it in CUDA
graphs; the eager loop passes subsets of rows.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..backbone import unwrap
from ..backbone.modernbert import is_modernbert, modernbert_head, modernbert_masks
from ..errors import DiffutronError

# The transformers this package needs (pyproject.toml). 5.0's ModernBERT brought the per-layer-type
# rotary embeddings the layer loop below calls (``config.layer_types``, ``rotary_emb(x, positions,
# layer_type)``, each layer's ``attention_type``); 5.1's attention takes the prepared per-type masks
# of ``backbone.modernbert.modernbert_logits_at`` (what the engine runs).
TRANSFORMERS_NEEDED = "5.1"


def check_internals(model: torch.nn.Module, cache: str = "dual") -> None:
    """A ModernBERT masked LM with the internals the cache's layer loop calls, or a one-line error.

    Raises:
        DiffutronError: an older transformers' ModernBERT (the plain, uncached path still runs).
    """
    inner = unwrap(model)
    encoder = getattr(inner, "model", None)
    rotary = getattr(encoder, "rotary_emb", None)
    layers = getattr(encoder, "layers", None) or []
    ok = (isinstance(getattr(getattr(inner, "config", None), "layer_types", None), (list, tuple))
          and callable(rotary) and "layer_type" in inspect.signature(rotary.forward).parameters
          and len(layers) > 0 and all(hasattr(layer, "attention_type") for layer in layers))
    if not ok:
        import transformers

        raise DiffutronError(f"cache={cache!r} needs the ModernBERT of transformers >= {TRANSFORMERS_NEEDED} "
                             f"(per-layer-type rotary embeddings), this is transformers {transformers.__version__}: "
                             "upgrade it, or use cache='none'")


class DualCache:
    """Per-slot, per-layer keys and values of the last full forward of that slot's canvas."""

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        return is_modernbert(model)

    def __init__(self, model: torch.nn.Module, *, delayed: bool = False, slots: int = 0, width: int = 0):
        inner = unwrap(model)
        if not self.supports(inner):
            raise DiffutronError(f"cache='{'delayed' if delayed else 'dual'}' supports ModernBERT masked LMs only, "
                                 f"not {type(inner).__name__}: "
                                 "use cache='none'")
        check_internals(inner, "delayed" if delayed else "dual")
        from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

        self.mlm, self.encoder, self.rotate = inner, inner.model, apply_rotary_pos_emb
        config = inner.config
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.half_window = config.local_attention // 2  # sliding layers: |q - k| <= half_window
        self.delayed = delayed
        self.k: list[torch.Tensor] = []  # per layer [slots, h, width + 1, d]
        self.v: list[torch.Tensor] = []
        self.keys_att = torch.zeros(0, 0, dtype=torch.bool)  # [slots, width + 1]: real key positions
        self.ids = torch.zeros(0, 0, dtype=torch.long)  # delayed: the token each stored key/value was computed for
        if slots and width:
            self.allocate(slots, width)

    @property
    def slots(self) -> int:
        return self.keys_att.shape[0]

    @property
    def width(self) -> int:
        return self.keys_att.shape[1] - 1

    def allocate(self, slots: int, width: int) -> None:
        """Buffers for ``slots`` canvases of up to ``width`` columns (what was stored is kept)."""
        if slots <= self.slots and width <= self.width:
            return
        slots, width = max(slots, self.slots), max(width, self.width)
        p = next(self.mlm.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        old = (self.k, self.v, self.keys_att, self.ids)
        self.k = [torch.zeros(slots, self.heads, width + 1, self.head_dim, dtype=dtype, device=p.device)
                  for _ in self.encoder.layers]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.keys_att = torch.zeros(slots, width + 1, dtype=torch.bool, device=p.device)
        self.ids = torch.zeros(slots, width + 1, dtype=torch.long, device=p.device)
        if old[0]:
            b, w = old[2].shape[0], old[2].shape[1] - 1
            for new, prev in zip(self.k + self.v, old[0] + old[1]):
                new[:b, :, :w] = prev[:, :, :w]
            self.keys_att[:b, :w] = old[2][:, :w]
            self.ids[:b, :w] = old[3][:, :w]

    def refresh(self, rows: list[int] | None, input_ids: torch.Tensor, attention: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        """Full forward of canvas rows ``rows`` (None = every slot, in order) ([b, L] ids and
        attention), storing their keys and values; returns the logits [N, V] at ``positions``
        (bool [b, L], row-major, or a flat index into [b * L])."""
        b, width = input_ids.shape
        self.allocate(b if rows is None else max(rows) + 1, width)
        if rows is None and b != self.slots:
            raise ValueError(f"a refresh of every slot needs {self.slots} rows, got {b}")
        slot = self._slot_index(rows, input_ids.device)
        pos = torch.arange(width, device=input_ids.device).expand(b, width)
        att = attention.bool()
        self._put(self.keys_att, slot, F.pad(att, (0, self.width + 1 - width)))
        if self.delayed:
            self._put(self.ids, slot, F.pad(input_ids, (0, self.width + 1 - width)))
        hidden = self._layers(input_ids, pos, slot, keys_att=att)
        return self._logits(hidden, positions)

    def columns(self, row: int, canvas_row: torch.Tensor, span: tuple[int, int], mask_token_id: int) -> torch.Tensor:
        """The canvas columns a window step of ``row`` runs in its block ``span``: all of them, or
        (delayed) the masks and the tokens whose stored keys and values were computed for another id."""
        s, e = span
        if not self.delayed:
            return torch.arange(s, e, device=canvas_row.device)
        seg = canvas_row[s:e]
        return s + ((seg == mask_token_id) | (seg != self.ids[row, s:e])).nonzero().squeeze(-1)

    def window(self, rows: list[int] | None, input_ids: torch.Tensor, cols: torch.Tensor,
               counts: list[int] | torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Forward of the canvas columns ``cols`` [b, n] of slots ``rows`` (None = every slot) with
        tokens ``input_ids`` [b, n], against the stored keys and values everywhere else; their own
        fresh keys and values are written into the store. ``counts``: each row's first counts[j]
        columns are real (a list), or a bool [b, n] of the real ones; the others pad a shorter row
        and are neither stored nor read. Logits [N, V] at ``positions`` (as in ``refresh``)."""
        b, n = input_ids.shape
        if not torch.is_tensor(counts):
            counts = torch.arange(n, device=cols.device) < torch.tensor(counts, device=cols.device)[:, None]
        dest = torch.where(counts, cols, self.width)  # padding entries write the scratch column
        slot = self._slot_index(rows, input_ids.device)
        if self.delayed:
            ids = self.ids if slot is None else self.ids[slot]
            ids = ids.scatter(1, dest, input_ids)
            self._put(self.ids, slot, ids)
        hidden = self._layers(input_ids, dest, slot, dest=dest)
        return self._logits(hidden, positions)

    def _slot_index(self, rows: list[int] | None, device: torch.device) -> torch.Tensor | None:
        """None when the call covers every slot in order (buffers used in place), else the slots."""
        if rows is None or list(rows) == list(range(self.slots)):
            return None
        return torch.tensor(list(rows), device=device)

    @staticmethod
    def _put(buffer: torch.Tensor, slot: torch.Tensor | None, value: torch.Tensor) -> None:
        if slot is None:
            buffer.copy_(value)
        else:
            buffer.index_copy_(0, slot, value)

    def _logits(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        picked = hidden[positions] if positions.dtype == torch.bool else \
            hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        return modernbert_head(self.mlm, picked)

    def _layers(self, input_ids: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor | None, *,
                keys_att: torch.Tensor | None = None, dest: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder over ``input_ids`` at positions ``pos`` [b, n]: with ``keys_att`` (a refresh)
        the whole canvas, its keys and values stored; with ``dest`` (a window) against the store,
        with this window's fresh keys and values written over it at ``dest`` first (only the block
        changes until the next refresh, and each step rewrites what it ran)."""
        enc = self.encoder
        b, n = input_ids.shape
        x = enc.embeddings(input_ids=input_ids)
        rope = {t: enc.rotary_emb(x, pos, t) for t in set(enc.config.layer_types)}
        if keys_att is None:
            keys_att = self.keys_att if slot is None else self.keys_att[slot]
        masks = modernbert_masks(pos, keys_att, self.half_window)
        for i, layer in enumerate(enc.layers):
            qkv = layer.attn.Wqkv(layer.attn_norm(x)).view(b, n, 3, self.heads, self.head_dim)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [b, h, n, d]
            cos, sin = rope[layer.attention_type]
            q, k = self.rotate(q, k, cos, sin, unsqueeze_dim=1)
            if dest is None:  # refresh: attend to its own keys, store them
                self._put(self.k[i][:, :, :n] if slot is None else self.k[i], slot,
                          k if slot is None else self._padded(k))
                self._put(self.v[i][:, :, :n] if slot is None else self.v[i], slot,
                          v if slot is None else self._padded(v))
                keys, values = k, v
            else:
                where = dest[:, None, :, None].expand(b, self.heads, n, self.head_dim)
                keys = self.k[i] if slot is None else self.k[i][slot]
                values = self.v[i] if slot is None else self.v[i][slot]
                keys.scatter_(2, where, k.to(keys.dtype))
                values.scatter_(2, where, v.to(values.dtype))
                if slot is not None:
                    self.k[i].index_copy_(0, slot, keys)
                    self.v[i].index_copy_(0, slot, values)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=masks[layer.attention_type],
                                                 scale=self.head_dim ** -0.5)
            x = x + layer.attn.Wo(out.transpose(1, 2).reshape(b, n, -1))
            x = x + layer.mlp(layer.mlp_norm(x))
        return enc.final_norm(x)

    def _padded(self, kv: torch.Tensor) -> torch.Tensor:
        """[b, h, n, d] keys or values padded to the store's width (for an index_copy into it)."""
        return F.pad(kv, (0, 0, 0, self.width + 1 - kv.shape[2]))

