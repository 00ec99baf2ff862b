"""Sampling: one semi-autoregressive block-denoising loop, its settings and stopping rules."""

from .config import CACHES, PAPER_DEFAULTS, REMASKING, RNGS, SamplerConfig
from .loop import GenerationOutput, build_canvas, generate
from .stopping import find_stop, partial_stop_len

__all__ = [
    "CACHES", "PAPER_DEFAULTS", "REMASKING", "RNGS", "SamplerConfig", "GenerationOutput", "build_canvas", "generate",
    "find_stop", "partial_stop_len",
]
