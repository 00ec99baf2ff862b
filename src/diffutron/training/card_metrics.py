"""The model card's numbers, computed the same way after every stage and for the shipped model.

::

    export:
      card:                                   # in a recipe (see export.py)
        perplexity_data: ${data}/cpt/validation.jsonl   # the CPT stage's validation split
        prompt_set: null                      # default: diffutron/embedded/card-prompts.jsonl
        max_length: 128                       # sequences as in pre-training
        draws: 4                              # noise draws per sequence (fixed seed)
        timing_repeat: 3                      # the answer time: best of this many runs

- **Held-out ELBO perplexity per word**: ``likelihood.elbo_perplexity`` on the documents of
  ``perplexity_data`` packed as in pre-training (``data.pretrain.pack_documents``, the tail kept),
  the summed bound divided by the number of words (``diffutron.text.count_words``), so that no
  tokenizer can game it.
- **Answers to the fixed prompt set** at the paper's sampler settings (64 new tokens, 64 steps,
  blocks of 32, temperature 0.1, repetition penalty 1.2, seed 0): their Turkish-word share
  (``corpus.lexicon.turkish_word_share``), their lengths in words and the share of distinct words.
- **The corpus ceiling**: the Turkish-word share of the corpus's test split (real text).
- **Speed**: one 64-token answer on this machine (best of a few, the threads noted).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..data.pretrain import pack_documents
from ..errors import DiffutronError
from ..text import count_words, tr_lower, words
from .config import Settings

__all__ = [
    "CardSettings",
    "PROMPT_SET",
    "CARD_METRICS",
    "MIN_WORDS",
    "MIN_DISTINCT",
    "load_prompt_set",
    "card_sampler",
    "answer_stats",
    "perplexity_per_word",
    "answer_prompts",
    "prompt_set_metrics",
    "corpus_word_share",
    "answer_seconds",
    "device_name",
    "stage_card_metrics",
]

PROMPT_SET = Path(__file__).resolve().parents[1] / "embedded" / "card-prompts.jsonl"
CARD_METRICS = "card_metrics.json"  # written into each stage's output folder
MIN_WORDS, MIN_DISTINCT = 5, 0.6  # the bar for every answer of the prompt set


@dataclass
class CardSettings(Settings):
    """The ``export.card`` mapping of a recipe (loaded strictly by ``config.build``)."""

    perplexity_data: str | None = None
    prompt_set: str | None = None
    max_length: int = 128
    draws: int = 4
    seed: int = 0
    batch_size: int = 32
    max_documents: int | None = None  # --quick: fewer held-out documents and prompts
    max_prompts: int | None = None
    timing_repeat: int = 3  # the answer time is the best of this many runs (--quick: 1)

    def __post_init__(self):
        from .config import SettingError

        if self.max_length < 2:
            raise SettingError("max_length", f"{self.max_length} must be >= 2")
        if self.timing_repeat < 1:
            raise SettingError("timing_repeat", f"{self.timing_repeat} must be >= 1")
        if self.draws < 1:
            raise SettingError("draws", f"{self.draws} must be >= 1")


def load_prompt_set(path: str | Path | None = None) -> list[dict]:
    """The committed prompts: ``{"prompt", "kind": "open" | "task", "task"?}`` per line."""
    path = Path(path) if path else PROMPT_SET
    if not path.is_file():
        raise DiffutronError(f"no prompt set at {path}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows or not all(isinstance(r.get("prompt"), str) and r["prompt"].strip() for r in rows):
        raise DiffutronError(f"{path}: every line needs a non-empty \"prompt\"")
    return rows


def card_sampler():
    """The paper's settings, as the card reports them: 64 tokens, 64 steps, blocks of 32, T 0.1, penalty 1.2."""
    from ..sampling import SamplerConfig

    return SamplerConfig(max_new_tokens=64, steps=64, block_length=32, temperature=0.1, repetition_penalty=1.2,
                         seed=0)


def answer_stats(texts: Sequence[str]) -> dict:
    """Lengths of answers in words (``diffutron.text.words``) and the share of distinct words in each.

    Returns ``{"answers", "mean_words", "min_words", "mean_distinct", "min_distinct", "long_enough"}``
    where ``long_enough`` counts answers with >= ``MIN_WORDS`` words of which >= ``MIN_DISTINCT`` are
    distinct (Turkish lower-case); an empty answer has distinct share 0.
    """
    lengths, distinct = [], []
    for text in texts:
        ws = [tr_lower(w) for w in words(text)]
        lengths.append(len(ws))
        distinct.append(len(set(ws)) / len(ws) if ws else 0.0)
    n = len(lengths)
    ok = sum(1 for k, d in zip(lengths, distinct) if k >= MIN_WORDS and d >= MIN_DISTINCT)
    return {"answers": n, "mean_words": sum(lengths) / n if n else 0.0, "min_words": min(lengths, default=0),
            "mean_distinct": sum(distinct) / n if n else 0.0, "min_distinct": min(distinct, default=0.0),
            "long_enough": ok}


def _texts(path: str | Path, limit: int | None) -> list[str]:
    from ..evaluation.perplexity_run import read_texts

    texts, _ = read_texts(str(path), limit=limit)
    return texts


def perplexity_per_word(lm, data: str | Path, *, max_length: int = 128, draws: int = 4, seed: int = 0,
                        batch_size: int = 32, max_documents: int | None = None) -> dict:
    """The held-out ELBO bound of ``lm`` on the documents of ``data``, per word and per token.

    Documents are packed as in pre-training (each + EOS, concatenated, cut at ``max_length``).
    Returns the :class:`~diffutron.likelihood.PerplexityResult` as a dict plus ``documents``.
    """
    from ..likelihood import elbo_perplexity

    texts = _texts(data, max_documents)
    length = min(max_length, lm.context_length)
    sequences = pack_documents(lm.tokenizer, texts, length, keep_tail=True)
    result = elbo_perplexity(lm.model, sequences, mask_token_id=lm.mask_token_id, seed=seed, mc_samples=draws,
                             batch_size=batch_size, words=sum(count_words(t) for t in texts),
                             pad_token_id=lm.pad_token_id)
    return {**result.to_dict(), "documents": len(texts), "max_length": length}


def answer_prompts(lm, prompts: Sequence[str], sampler=None, batch_size: int = 32) -> list[str]:
    """Answers (text) to ``prompts`` at ``sampler`` (default ``card_sampler()``), in order."""
    sampler = sampler or card_sampler()
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        out += [c.text for c in lm.generate(list(prompts[i : i + batch_size]), sampler)]
    return out


def prompt_set_metrics(lm, rows: Sequence[dict], stems, *, batch_size: int = 32) -> dict:
    """Answers to the prompt set with their Turkish-word share and lengths (overall, open prompts apart)."""
    from ..corpus.lexicon import turkish_word_share

    answers = answer_prompts(lm, [r["prompt"] for r in rows], batch_size=batch_size)
    out = {"sampler": card_sampler().to_dict(), "prompts": len(rows),
           "open_prompts": sum(r.get("kind") == "open" for r in rows),
           "lengths": answer_stats(answers),
           "answers": [{"prompt": r["prompt"], "kind": r.get("kind"), "answer": a} for r, a in zip(rows, answers)]}
    if stems is not None:
        out["turkish_share"] = turkish_word_share(answers, stems)
        out["turkish_share_open"] = turkish_word_share(
            [a for r, a in zip(rows, answers) if r.get("kind") == "open"], stems)
    return out


def corpus_word_share(stems, corpus_dir: str | Path | None = None, split: str = "test") -> dict:
    """The Turkish-word share of real text: every document of a corpus split (the card's ceiling)."""
    from ..corpus.build import iter_corpus
    from ..corpus.lexicon import turkish_word_share

    return {**turkish_word_share((d["text"] for d in iter_corpus(split, corpus_dir)), stems), "split": split}


def answer_seconds(lm, prompt: str = "Türkiye'nin başkenti neresidir?", repeat: int = 3) -> dict:
    """Seconds for one 64-token answer at the card's settings (decoding all 64 tokens), best of ``repeat``."""
    sampler = card_sampler().replace(stop_at_eos=False)
    lm.generate(prompt, sampler)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        lm.generate(prompt, sampler)
        best = min(best, time.perf_counter() - t0)
    return {"seconds": best, "new_tokens": sampler.max_new_tokens, "device": device_name(lm.device),
            "threads": torch.get_num_threads() if lm.device.type == "cpu" else None}


def device_name(device: torch.device | str | None = None) -> str:
    """``NVIDIA H200`` for a CUDA device, else the CPU with its core count."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores)"


def stage_card_metrics(model_dir: str | Path, settings: CardSettings, *, stems=None, device: str = "auto",
                       lm=None) -> dict:
    """The card's numbers for one stage's model: perplexity per word and the prompt set's answers.

    ``stems`` (``corpus.lexicon.load_stems()``) may be None where the lexicon cannot be had (offline):
    the share is then left out and said so.
    """
    from ..lm import DiffusionLM

    began = time.perf_counter()
    if lm is None:
        lm = DiffusionLM.from_pretrained(str(model_dir), device=device)
    out: dict = {"model": str(model_dir), "device": device_name(lm.device)}
    if settings.perplexity_data:
        out["perplexity"] = perplexity_per_word(lm, settings.perplexity_data, max_length=settings.max_length,
                                                draws=settings.draws, seed=settings.seed,
                                                batch_size=settings.batch_size, max_documents=settings.max_documents)
    rows = load_prompt_set(settings.prompt_set)[: settings.max_prompts]
    out["prompt_set"] = prompt_set_metrics(lm, rows, stems, batch_size=settings.batch_size)
    if stems is None:
        out["prompt_set"]["turkish_share"] = None
        out["note"] = "no Turkish lexicon here: the Turkish-word share was not computed"
    out["seconds"] = time.perf_counter() - began
    return out
