"""The random numbers of a generation, defined so that every decoding path draws the same ones.

A row's randomness in block b comes from its own CPU generator seeded with ``block_seed(seed, b)``:
first [steps, block] float64 uniforms for token draws (temperature > 0), then, with random
remasking, [steps, block] more for the commit order. Step j of the block's plan reads row j and
the position at offset i from the block's start reads column i. So a draw depends only on the
row's seed, the block, the step and the position: not on the batch, the device, the order in
which rows run, or whether a step was skipped, and the eager loop and the compiled engine
(which draws a whole block ahead, on the host) agree token for token.
"""

from __future__ import annotations

import torch

_MIX = 1_000_003  # block_seed: distinct (seed, block) pairs map to distinct seeds for blocks < _MIX


def block_seed(seed: int, block: int) -> int:
    return (seed * _MIX + block) % (1 << 63)


def block_noise(seed: int, block: int, steps: int, width: int, *, tokens: bool,
                order: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(u_tokens, u_order)``: [steps, width] float64 uniforms each, or None where not needed."""
    if not (tokens or order):
        return None, None
    g = torch.Generator().manual_seed(block_seed(seed, block))
    u_tokens = torch.rand(steps, width, generator=g, dtype=torch.float64) if tokens else None
    u_order = torch.rand(steps, width, generator=g, dtype=torch.float64) if order else None
    return u_tokens, u_order
