"""Cost of multiple-choice scoring: diffutron's estimator vs the reference adapter's scheme.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/eval_cost.py            # ~6 min on 2 CPU cores
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/eval_cost.py --quick    # smaller, a smoke run

A small random ModernBERT (4 layers, hidden 256, vocab 256,000: the mmBERT vocabulary, whose
output layer dominates the cost) scores two task shapes over 20 items:

- Belebele-shaped: a long passage + question, four single-token choices (" A" .. " D");
- XCOPA-shaped: a short premise, two multi-token choices (4 to 9 tokens).

Ours: :func:`diffutron.likelihood.loglikelihood` with its defaults (64 draws, 32 rows per
forward, keyed draws). Reference: dLLM's adapter as the Diffutron authors ran it, replayed by
``diffutron.evaluation.reference_scheme`` (128 draws per choice in forwards of 32 copies, full
logits). The reference is timed on the first ``--ref-items`` items (it is slow; its forward
count per item does not depend on the item) and reported per item. The tokenizer wraps text as
[CLS] ... [SEP] like mmBERT's, so the reference's off-by-one also shows: its single-letter
choices all tie.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import random_mmbert  # noqa: E402

from diffutron.evaluation.reference_scheme import reference_loglikelihood  # noqa: E402
from diffutron.lm import DiffusionLM  # noqa: E402
from diffutron.likelihood import loglikelihood  # noqa: E402

VOCAB = 256_000
SPECIALS = {"[PAD]": 0, "[SEP]": 1, "[CLS]": 2, "[UNK]": 3, "[MASK]": 4}


def build_model(layers: int, hidden: int, seed: int = 0):
    """A ModernBertForMaskedLM with random N(0, 0.02) weights, built without the slow HF init."""
    shape = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                 intermediate_size=2 * hidden)
    return random_mmbert(shape, vocab_size=VOCAB, max_position_embeddings=1024, seed=seed)


def build_tokenizer():
    """A word-level tokenizer over 256,000 ids ("w5" ... "w255999", " A" .. " D" are words too),
    wrapping encodings as [CLS] ... [SEP] like mmBERT's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIALS)
    for letter, tid in zip("ABCD", range(5, 9)):
        vocab[letter] = tid
    for i in range(9, VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]", model_max_length=1024)


def words(g: torch.Generator, n: int) -> str:
    return " ".join(f"w{int(i)}" for i in torch.randint(9, VOCAB, (n,), generator=g))


def tasks(items: int, passage: int, seed: int = 0) -> dict[str, list[list[tuple[str, str]]]]:
    g = torch.Generator().manual_seed(seed)
    belebele = []
    for _ in range(items):
        context = words(g, passage) + " A"  # ... "Answer:"
        belebele.append([(context, " " + letter) for letter in "ABCD"])
    xcopa = []
    for _ in range(items):
        premise = words(g, 16)
        xcopa.append([(premise, " " + words(g, int(torch.randint(4, 10, (1,), generator=g)))) for _ in range(2)])
    return {"belebele-shaped (4 x 1-token choices)": belebele, "xcopa-shaped (2 x 4-9-token choices)": xcopa}


class Counter:
    def __init__(self, model):
        self.n = 0
        self.rows = 0
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.n += 1
        self.rows += kwargs["input_ids"].shape[0]


def measure(fn, lm, items, repeat=1):
    """Forwards, rows and seconds per item (the best of ``repeat`` runs: the machine is shared)."""
    pairs = [p for item in items for p in item]
    seconds = float("inf")
    for _ in range(repeat):
        counter = Counter(lm.model)
        start = time.perf_counter()
        scores = fn(lm, pairs)
        seconds = min(seconds, time.perf_counter() - start)
        counter.handle.remove()
    ties = 0
    at = 0
    for item in items:
        values = [s.value for s in scores[at : at + len(item)]]
        at += len(item)
        ties += len(set(values)) == 1
    n = len(items)
    return {"forwards": counter.n / n, "rows": counter.rows / n, "seconds": seconds / n, "ties": ties, "items": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--ref-items", type=int, default=1, help="items the (slow) reference scheme is timed on")
    parser.add_argument("--passage", type=int, default=96, help="tokens of the Belebele-shaped passage")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="5 items, 1 reference item, a 48-token passage")
    args = parser.parse_args()
    if args.quick:
        args.items, args.ref_items, args.passage = 5, 1, 32

    t0 = time.perf_counter()
    lm = DiffusionLM(build_model(args.layers, args.hidden), build_tokenizer(), name="random-256k")
    params = sum(p.numel() for p in lm.model.parameters())
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {VOCAB} ({params / 1e6:.1f} M parameters), "
          f"built in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")

    def ours(lm, pairs):
        return loglikelihood(lm, pairs, mc_samples=64, batch_size=32, deterministic=True, check_greedy=False)

    def reference(lm, pairs):
        return reference_loglikelihood(lm, pairs, mc_samples=128, batch_size=32)

    header = f"{'task':40} {'scheme':10} {'items':>5} {'fwd/item':>9} {'rows/item':>10} {'s/item':>9} {'tied':>5}"
    print(header)
    print("-" * len(header))
    for name, items in tasks(args.items, args.passage).items():
        loglikelihood(lm, items[0][:1], check_greedy=False)  # warm-up
        a = measure(ours, lm, items, repeat=3)
        b = measure(reference, lm, items[: args.ref_items])
        for scheme, r in (("ours", a), ("reference", b)):
            print(f"{name:40} {scheme:10} {r['items']:>5} {r['forwards']:>9.2f} {r['rows']:>10.1f} "
                  f"{r['seconds']:>9.3f} {r['ties']:>5}")
        print(f"{'':40} {'ratio':10} {'':>5} {b['forwards'] / a['forwards']:>8.0f}x {b['rows'] / a['rows']:>9.0f}x "
              f"{b['seconds'] / a['seconds']:>8.0f}x")


if __name__ == "__main__":
    main()
