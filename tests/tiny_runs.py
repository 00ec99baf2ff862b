"""Inputs of a tiny training run, written where a test asks: a random tiny ModernBERT directory and
a pre-training corpus of shuffled sample sentences (both seeded)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from diffutron.lm import DiffusionLM
from diffutron.tiny import SAMPLE_TEXTS, tiny_model, tiny_tokenizer


def tiny_run_inputs(d: Path, *, seed: int, rows: int) -> tuple[Path, Path]:
    """``d / "base"`` (the model) and ``d / "corpus.jsonl"`` (``rows`` texts of 3 sentences)."""
    tok = tiny_tokenizer()
    DiffusionLM(tiny_model(tok, seed=seed), tok).save_pretrained(d / "base")
    rng = random.Random(seed)
    with open(d / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"text": " ".join(rng.sample(SAMPLE_TEXTS, 3))}, ensure_ascii=False) + "\n")
    return d / "base", d / "corpus.jsonl"


def loss_batch(tok, seed: int = 0):
    """A small MDLM loss batch [3, 20]: ``(ids, maskable, attention, t, noise_mask)``, with a row whose
    prompt is not maskable and a row with padding."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(tok), (3, 20), generator=g)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[0, :7] = False
    att = torch.ones_like(ids)
    att[2, 15:] = 0
    maskable[2, 15:] = False
    t = torch.tensor([0.9, 0.3, 0.6])
    noise = (torch.rand(ids.shape, generator=g) < t[:, None]) & maskable
    return ids, maskable, att, t, noise
