"""Where each row of a batch stands in semi-autoregressive block decoding (the eager loop's state).

A row's answer span (its first mask to its last) is cut into ``block_length``-wide blocks,
decoded left to right. A block of m masks and S steps commits k_j tokens at step j, the
reference's schedule (``policies.block_schedule``: steps that reveal nothing are dropped, so
every step of the plan costs a forward). After a block, the row stops if its answer has ended
(EOS or a stop sequence, with ``stop_at_eos``) or if it was the last block.

``RowState`` holds a view of its row of the canvas, so committing, stopping and cancelling write
the shared canvas [B, W] the loop forwards; rows keep their own block and step, so a row decodes
exactly as it would alone (ragged prompts, per-row seeds, early stops).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import DiffutronError
from . import policies
from .config import SamplerConfig
from .noise import block_noise
from .stopping import end_of_block, finish_reason


@dataclass(frozen=True)
class Specials:
    """The token ids the loop treats specially, and the token sequences that end an answer."""

    mask: int
    pad: int
    eos: int | None = None
    stops: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def of(cls, mask: int, pad: int, eos: int | None = None,
           stop_sequences: Sequence[Sequence[int]] | None = None) -> Specials:
        """Empty stop sequences are dropped."""
        return cls(mask, pad, eos, tuple(tuple(s) for s in (stop_sequences or ()) if len(s)))


class RowState:
    """One canvas row: its blocks, the current block and step, its plan and noise, and whether it is done.

    Args:
        index: the row's index in the canvas (the cache's slot, error messages).
        tokens: LongTensor [L], a view of the row's real positions (prompt and masks) in the canvas.
        config: the sampler settings (block_length, steps, stop_at_eos; temperature, remasking and
            rng decide which block uniforms to draw).
        specials: the mask, pad and EOS ids and the stop sequences.
        seed: the row's seed (``SamplerConfig.row_seeds``).

    Raises:
        DiffutronError: the row has no mask to decode.
    """

    def __init__(self, index: int, tokens: torch.Tensor, config: SamplerConfig, specials: Specials,
                 seed: int = 0):
        where = (tokens == specials.mask).nonzero().squeeze(-1)
        if where.numel() == 0:
            raise DiffutronError(
                f"row {index} has nothing to generate: set max_new_tokens >= 1 or put mask tokens in the input"
            )
        self.index, self.tokens, self.specials, self.seed = index, tokens, specials, seed
        self.start = int(where[0])  # where the answer starts: the first mask
        self.blocks = policies.blocks_of(self.start, int(where[-1]) + 1, config.block_length)
        self.steps = policies.steps_per_block(config.steps, len(self.blocks))  # per block
        self.stop_at_eos = config.stop_at_eos
        keyed = config.rng != "reference"  # "reference": one stream for the batch (noise.ReferenceNoise)
        self.draw_tokens = keyed and config.temperature > 0
        self.draw_order = keyed and config.remasking == "random"
        self.block = -1  # index into blocks; -1 before the first
        self.plan: list[int] = []  # tokens to commit at each step of the block (all > 0)
        self.j = 0  # the block's step
        self.k = 0  # tokens to commit at this step (``advance``)
        self.done: str | None = None  # "stop" | "length" | "cancelled"
        self.u_tokens: torch.Tensor | None = None  # this block's uniforms [steps, block] (noise.block_noise)
        self.u_order: torch.Tensor | None = None
        self.cached_block = -1  # cache="dual" / "delayed": the block whose start refreshed this row's keys and values
        self.windows = 0  # window forwards since this row's last refresh

    def __repr__(self) -> str:
        return (f"RowState(index={self.index}, block={self.block}/{len(self.blocks)}, span={self.span}, "
                f"j={self.j}, plan={self.plan}, done={self.done!r})")

    @property
    def length(self) -> int:
        return self.tokens.shape[0]

    @property
    def span(self) -> tuple[int, int]:
        """The current block's columns [start, end) (the first block's before ``advance``)."""
        return self.blocks[max(self.block, 0)]

    def masks_left(self) -> int:
        s, e = self.span
        return int((self.tokens[s:e] == self.specials.mask).sum())

    # ------------------------------------------------------------------------------ the schedule
    def advance(self) -> int:
        """Move to the row's next step and return its k (also ``self.k``); 0 once the row is done.

        A block ends when its plan is spent or it has no mask left (a threshold may fill it early):
        the row then stops (``end_block``) or starts its next block (``start_block``)."""
        self.k = 0
        while self.done is None:
            left = self.masks_left() if self.block >= 0 else 0
            if left > 0 and self.j < len(self.plan):
                self.k = min(self.plan[self.j], left)
                return self.k
            if self.block >= 0:
                self.end_block()
            if self.done is None:
                self.start_block()
        return 0

    def start_block(self) -> None:
        """Enter the next block: its plan from the masks it holds, and its uniforms."""
        self.block += 1
        self.plan = policies.block_schedule(self.masks_left(), self.steps)
        self.j = 0
        s, e = self.span
        self.u_tokens, self.u_order = block_noise(self.seed, self.block, self.steps, e - s,
                                                  tokens=self.draw_tokens, order=self.draw_order)

    def end_block(self) -> None:
        """The current block is decoded: stop if the answer has ended (the tail after it becomes
        padding), or if this was the last block."""
        sp = self.specials
        self.done = end_of_block(self.tokens, self.start, self.span[1], eos_token_id=sp.eos, stop_sequences=sp.stops,
                                 pad_token_id=sp.pad, stop_at_eos=self.stop_at_eos,
                                 last=self.block + 1 >= len(self.blocks)) or self.done

    # ------------------------------------------------------------------------------ one step
    def commit(self, cols: torch.Tensor, tokens: torch.Tensor) -> None:
        """Write the chosen ``tokens`` at canvas columns ``cols`` and move to the next step."""
        self.tokens[cols] = tokens
        self.j += 1

    def uniforms(self, cols: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This step's block uniforms at canvas columns ``cols`` (token draws, commit order)."""
        s = self.span[0]
        return tuple(None if u is None else u[self.j, cols - s] for u in (self.u_tokens, self.u_order))

    def cancel(self) -> None:
        """Stop now (a callback asked): the masks left become padding."""
        self.done = "cancelled"
        self.tokens[self.tokens == self.specials.mask] = self.specials.pad

    def finish_reason(self) -> str:
        """"stop", "length" or "cancelled"; a row that ran to its end stopped if its answer holds a stop."""
        sp = self.specials
        return finish_reason(self.done, self.tokens, self.start, eos_token_id=sp.eos, stop_sequences=sp.stops)

    # ------------------------------------------------------------------------------ cache="dual" / "delayed"
    def stale(self, refresh_every: int = 0) -> bool:
        """Its stored keys and values need a full forward: a new block, or ``refresh_every`` (> 0) windows since."""
        return self.cached_block != self.block or 0 < refresh_every <= self.windows

    def refreshed(self) -> None:
        self.cached_block, self.windows = self.block, 0

    def windowed(self) -> None:
        self.windows += 1
