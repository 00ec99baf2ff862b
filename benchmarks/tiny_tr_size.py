"""How big may the embedded model be? One 64-token answer at the paper's settings, by model shape.

    .venv/bin/python benchmarks/tiny_tr_size.py                 # the shapes below, 2 threads
    .venv/bin/python benchmarks/tiny_tr_size.py --quick         # two shapes, one repeat

The issue's limit: a 64-token answer (64 steps, blocks of 32, temperature 0.1, repetition penalty 1.2)
must stay under ~3 s on 2 CPU cores. Random float32 weights (speed does not depend on the values;
answers run to the full 64 tokens because ``stop_at_eos`` is off). The corpus tokenizer (16,384) is
used for every vocabulary: a model's vocabulary may be larger than the tokenizer's, so the 24k/32k
rows only price the wider output layer. Prints the best of ``--repeat`` runs per shape and, since
this machine is shared, the ratio to the first shape measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = [  # name, vocab, hidden, layers, heads, intermediate
    ("v1 (shipped)", 16384, 256, 6, 4, 512),
    ("cpu-13M", 16384, 320, 8, 5, 640),
    ("gpu-20M", 16384, 384, 8, 6, 1024),
    ("gpu-20M vocab 24k", 24576, 384, 8, 6, 1024),
    ("gpu-20M vocab 32k", 32768, 384, 8, 6, 1024),
    ("gpu-25M", 16384, 448, 8, 7, 1024),
    ("30M", 16384, 512, 8, 8, 1280),
]


def build(tokenizer, vocab: int, hidden: int, layers: int, heads: int, inter: int):
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from diffutron.lm import DiffusionLM

    cfg = ModernBertConfig(vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=inter, max_position_embeddings=256,
                           local_attention=64, global_attn_every_n_layers=3, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                           cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(cfg).eval()
    return DiffusionLM(model, tokenizer, name="random")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the corpus tokenizer in the cache)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffutron.corpus.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    prompt = "Türkiye'nin başkenti neresidir?"
    shapes = SHAPES[:3:2] if args.quick else SHAPES
    repeat = 1 if args.quick else args.repeat
    first = None
    print(f"{'shape':<20} {'params':>8} {'64-token answer':>16} {'ratio':>6}")
    for name, vocab, hidden, layers, heads, inter in shapes:
        lm = build(tok, vocab, hidden, layers, heads, inter)
        params = sum(p.numel() for p in lm.model.parameters())
        kwargs = dict(max_new_tokens=64, steps=64, block_length=32, temperature=0.1, repetition_penalty=1.2,
                      stop_at_eos=False)
        lm.generate(prompt, **kwargs)  # warm-up
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            lm.generate(prompt, **kwargs)
            best = min(best, time.perf_counter() - t0)
        first = first or best
        print(f"{name:<20} {params / 1e6:>7.1f}M {best:>15.2f}s {best / first:>6.2f}")


if __name__ == "__main__":
    main()
