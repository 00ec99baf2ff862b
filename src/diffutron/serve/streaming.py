"""Streaming: a running row's canvases -> append-only text deltas (``RowStream``, held back
by ``stable_text``) and denoising states (``TokenLabels``); ``StepWatch``, the engine's per-step
callback while some row streams (it also names the rows of cancelled jobs to stop).
"""

from __future__ import annotations

import logging
import re

import torch

from ..lm import Completion, DiffusionLM
from ..sampling import partial_stop_len
from .jobs import DenoiseState, Job, TextDelta

log = logging.getLogger("diffutron.serve")

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


class RowStream:
    """Turns the canvases of one streaming row into text deltas (and denoising states).

    ``update`` takes the row's canvas (prompt, then the answer's positions; longer is fine):
    a row of the sampler's batch canvas, an engine row's canvas, or a row of the engine's
    per-step host canvas."""

    def __init__(self, lm: DiffusionLM, job: Job, index: int, stops: list[list[int]], labels: TokenLabels):
        toks = job.token_lists[index]
        mask = lm.mask_token_id
        self.lm, self.job, self.index, self.stops, self.labels = lm, job, index, stops, labels
        self.start = toks.index(mask) if mask in toks else len(toks)  # as the sampler's canvas
        self.end = len(toks) + job.config.max_new_tokens
        self.first_mask = -1
        self.sent = ""
        self.steps = 0
        self.last: torch.Tensor | None = None

    def update(self, row: torch.Tensor, post, first: int | None = None) -> None:
        """``first``: the answer's first masked position when the caller computed it already."""
        seg = row[self.start : self.end]
        if self.job.denoise or first is None:
            is_mask = seg == self.lm.mask_token_id
            first = int(is_mask.nonzero()[0, 0]) if bool(is_mask.any()) else len(seg)
        if self.job.denoise and (self.last is None or not torch.equal(seg, self.last)):
            self.last = seg.clone()
            self.steps += 1
            masked = int(is_mask.sum())
            at = first if masked else max(0, len(seg) - 1)
            post(DenoiseState(self.index, self.steps, at // self.job.config.block_length, masked,
                              self.labels(seg.tolist())))
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


class TokenLabels:
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


class StepWatch:
    """The engine's per-step callback while some running row streams: text deltas and denoising
    states of streaming rows, and the rows of cancelled jobs to stop."""

    def __init__(self, mask_token_id: int):
        self.mask = mask_token_id
        self.rows = None

    def _bounds(self, rows, width: int) -> None:
        """Each row's answer columns, once per block (the engine's rows stay put within a block)."""
        self.rows = rows
        starts = torch.tensor([r.start for r in rows])
        ends = torch.tensor([r.tag[0].streams[r.tag[1]].end if r.tag[0].streams[r.tag[1]] is not None else r.length
                             for r in rows])
        cols = torch.arange(width)
        self.starts, self.ends = starts, ends
        self.inside = (cols >= starts[:, None]) & (cols < ends[:, None])
        self.cols = cols

    def __call__(self, step: int, rows, host: torch.Tensor):
        if self.rows is not rows:
            self._bounds(rows, host.shape[1])
        # each row's first masked answer position, all rows at once
        pos = torch.where((host == self.mask) & self.inside, self.cols, host.shape[1]).amin(1)
        firsts = (torch.minimum(pos, self.ends) - self.starts).tolist()
        cancel = []
        for i, row in enumerate(rows):
            if row.done is not None:
                continue
            run, k = row.tag
            if run.job.cancelled:
                cancel.append(i)
            elif run.streams[k] is not None:
                run.streams[k].update(host[i], run.post, firsts[i])
        return cancel
