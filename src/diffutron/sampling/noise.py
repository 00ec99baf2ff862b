"""The random numbers of a generation, defined so that every decoding path draws the same ones.

A row's randomness in block b comes from its own CPU generator seeded with ``block_seed(seed, b)``:
first [steps, block] float64 uniforms for token draws (temperature > 0), then, with random
remasking, [steps, block] more for the commit order. Step j of the block's plan reads row j and
the position at offset i from the block's start reads column i. So a draw depends only on the
row's seed, the block, the step and the position: not on the batch, the device, the order in
which rows run, or whether a step was skipped, and the eager loop and the compiled engine
(which draws a whole block ahead, on the host) agree token for token.

``ReferenceNoise`` is the other source (``SamplerConfig(rng="reference")``): the authors'
generator's one stream for the whole batch, drawn in its order, to reproduce its seeded runs.
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


class ReferenceNoise:
    """``rng="reference"``: the random numbers the authors' generator draws, in its order.

    The reference seeds the global generator once (``torch.manual_seed(seed)``) and, at every step
    of a batch of B rows on a canvas of width T: ``U = torch.rand_like(logits, dtype=torch.float64)``
    over the whole [B, T, V] logits when the temperature is above 0, then ``torch.rand((B, T))``
    (float32) for random remasking. A generator of its own, seeded with the same seed, yields the
    same numbers (the global generator is left alone). The sampler needs only a few positions:
    on CPU the stream is drawn in row-major chunks of whole positions (the same numbers as one
    draw, tested), keeping only the rows asked for; elsewhere the whole tensor is drawn on the
    device, since a device generator's numbers depend on how a draw is split.
    """

    CHUNK_VALUES = 1 << 22  # CPU: float64 uniforms per chunk (32 MB)

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))

    def token_uniforms(self, shape: tuple[int, int, int], rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """One step's draw over ``shape`` = (B, T, V): the [N, V] float64 uniforms at (``rows``,
        ``cols``) [N] (each pair at most once); every B * T * V number is drawn."""
        b, t, v = shape
        if self.device.type != "cpu":
            return torch.rand(shape, generator=self.generator, dtype=torch.float64, device=self.device)[rows, cols]
        flat = (rows.cpu() * t + cols.cpu()).tolist()
        order = sorted(range(len(flat)), key=flat.__getitem__)
        out = torch.empty(len(flat), v, dtype=torch.float64)
        chunk = max(1, self.CHUNK_VALUES // v)
        buf = torch.empty(min(chunk, b * t), v, dtype=torch.float64)
        at = 0
        for lo in range(0, b * t, chunk):
            piece = buf[: min(chunk, b * t - lo)]
            piece.uniform_(generator=self.generator)
            while at < len(order) and flat[order[at]] < lo + piece.shape[0]:
                out[order[at]] = piece[flat[order[at]] - lo]
                at += 1
        return out

    def order_uniforms(self, shape: tuple[int, int], rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """One step's ``torch.rand((B, T))`` (float32) for random remasking, at (``rows``, ``cols``)."""
        return torch.rand(shape, generator=self.generator, device=self.device)[rows.to(self.device),
                                                                                cols.to(self.device)]
