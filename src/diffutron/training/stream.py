"""The training data and noise as a seeded stream, so any process split and any resume sees the same.

The data is one endless stream (epoch e: a permutation seeded by ``seed`` and e); a global
micro-batch is the next processes x batch_size samples, each process taking its own consecutive
share, and sample q of the stream draws its ``t`` and its mask from a generator seeded by ``seed``
and q alone (``draw_training_noise``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..objective import draw_noise
from ..schedules import sample_t
from .config import TrainConfig


def seed_for(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


class DataStream:
    """Global batches as index lists: epoch e is a seeded permutation, epochs follow each other.

    With ``widths`` (each row's width) the permutation is grouped by length: every run of
    ``GROUP_BATCHES`` batches of ``batch`` rows (one optimizer step's rows, so accumulation and
    process splits still see the same data) is sorted by width and its batches are put in a
    seeded random order. Each epoch still holds every row once; a batch then pads to a width
    close to its rows' own (the SFT stages of tiny-tr compute ~0.55x the positions).
    """

    GROUP_BATCHES = 16

    def __init__(self, n: int, seed: int, widths: np.ndarray | None = None, batch: int = 1):
        self.n, self.seed, self.widths, self.batch = n, seed, widths, batch
        self._perm: tuple[int, np.ndarray] | None = None

    def perm(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            if self.widths is not None:
                order = self._grouped(order, np.random.default_rng([self.seed, epoch, 1]))
            self._perm = (epoch, order)
        return self._perm[1]

    def _grouped(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size = self.batch * self.GROUP_BATCHES
        out = []
        for start in range(0, len(order), size):
            group = order[start : start + size]
            group = group[np.argsort(self.widths[group], kind="stable")]
            full = len(group) // self.batch  # an epoch's short last batch stays last
            batches = [group[i * self.batch : (i + 1) * self.batch] for i in range(full)]
            out += [batches[i] for i in rng.permutation(full)] + [group[full * self.batch :]]
        return np.concatenate(out)

    def indices(self, start: int, count: int) -> list[int]:
        """Sample positions ``start .. start+count`` of the endless stream, as dataset indices."""
        out = []
        for q in range(start, start + count):
            out.append(int(self.perm(q // self.n)[q % self.n]))
        return out


def draw_training_noise(maskable: torch.Tensor, positions: Sequence[int], micro: int, config: TrainConfig,
                        rank_rows: slice, global_batch: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t [b], noise mask [b, L])`` of this process's rows.

    Sample q of the stream (its position counted over all processes) draws its time (iid) and its
    mask from a generator seeded by (seed, q) alone, over ``max_length`` positions: one process
    with batch N*b, N processes with batch b and gradient accumulation in any split all see the
    same noise. Antithetic / stratified times couple a batch, so they come from a generator per
    global micro-batch instead.
    """
    width = maskable.shape[1]
    gens = [torch.Generator().manual_seed(seed_for(config.seed, 0, q)) for q in positions]
    if config.t_sampling == "iid":
        t = torch.cat([sample_t(1, eps=config.eps, method="iid", generator=g) for g in gens])  # [b]
    else:
        g = torch.Generator().manual_seed(seed_for(config.seed, 1, micro))
        t = sample_t(global_batch, eps=config.eps, method=config.t_sampling, generator=g)[rank_rows]
    u = torch.stack([torch.rand(max_length, generator=g)[:width] for g in gens])  # [b, L]
    return t, draw_noise(maskable, t, schedule=config.noise_schedule, u=u)
