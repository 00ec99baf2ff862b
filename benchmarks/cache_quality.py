"""Cache quality benchmark: what the approximate key/value caches do to a trained model's answers.

    .venv/bin/python benchmarks/cache_quality.py              # ~2 min on 2 CPU cores
    .venv/bin/python benchmarks/cache_quality.py --steps 300  # a smoke run

Random benchmark models cannot say whether ``cache="dual"`` or ``"delayed"`` hurts answers, and
no trained DiffutronLM can be downloaded here. So a tiny ModernBERT (4 layers, sliding and global
attention) is trained, by ``objective.mdlm_loss`` on the answer only, on a task whose answer
tokens depend on each other: the prompt holds two 8-token halves, and the answer is one of them,
picked at random. A decoder must commit to one half and keep to it; an answer that mixes them is
wrong. Reported per decoding setting (greedy): the share of answers that equal one half
(coherent) and the share of answer tokens equal to exact decoding's, for exact decoding, each
cache, and the delayed cache refreshed after every window step or two (``cache_refresh``).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM

from diffutron.objective import draw_noise, mdlm_loss
from diffutron.sampling import SamplerConfig, generate
from diffutron.schedules import sample_t

VOCAB, HALF, MASK, EOS, BATCH = 256, 8, 1, 3, 32


def examples(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts [b, 2 * HALF] and answers [b, HALF]: each answer is its prompt's first or second half."""
    prompt = torch.randint(5, VOCAB, (b, 2 * HALF), generator=g)
    first = torch.rand(b, 1, generator=g) < 0.5
    return prompt, torch.where(first, prompt[:, :HALF], prompt[:, HALF:])


def train(steps: int) -> ModernBertForMaskedLM:
    torch.manual_seed(0)
    config = ModernBertConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=128, local_attention=16, global_attn_every_n_layers=2, pad_token_id=0,
        mask_token_id=MASK, cls_token_id=2, sep_token_id=EOS, bos_token_id=2, eos_token_id=EOS)
    model = ModernBertForMaskedLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps):
        prompt, answer = examples(BATCH, g)
        x = torch.cat([prompt, answer], 1)
        maskable = torch.zeros_like(x, dtype=torch.bool)
        maskable[:, 2 * HALF:] = True
        t = sample_t(BATCH, eps=1e-3, method="iid", generator=g)
        loss = mdlm_loss(model, x, maskable, mask_token_id=MASK, t=t, noise_mask=draw_noise(maskable, t, generator=g),
                         weighting="flat")  # BERT's weighting learns to read context faster (loss_weighting.py)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if (step + 1) % 500 == 0 or step + 1 == steps:
            print(f"  step {step + 1}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2500, help="optimizer steps (batch 32)")
    ap.add_argument("--prompts", type=int, default=256, help="test prompts")
    args = ap.parse_args()
    print(f"training: {args.steps} steps of batch {BATCH}, vocabulary {VOCAB}, prompt {2 * HALF}, answer {HALF}")
    model = train(args.steps)
    prompt, _ = examples(args.prompts, torch.Generator().manual_seed(123))
    print(f"\n{args.prompts} test prompts, greedy, repetition penalty 1 "
          "(coherent = the answer equals one half of its prompt; agreement = answer tokens equal to exact's)")
    print(f"{'block':>5s} {'steps':>5s} {'cache':>8s} {'refresh':>8s} {'coherent':>9s} {'agreement':>10s}")
    for block, steps in ((8, 8), (8, 4), (4, 8)):
        exact = None
        for cache, refresh in (("none", 0), ("dual", 0), ("delayed", 0), ("delayed", 1), ("delayed", 2)):
            cfg = SamplerConfig(max_new_tokens=HALF, steps=steps, block_length=block, temperature=0.0,
                                repetition_penalty=1.0, stop_at_eos=False, cache=cache, cache_refresh=refresh)
            out = generate(model, prompt, cfg, mask_token_id=MASK, eos_token_id=EOS, pad_token_id=0).sequences
            answer = out[:, 2 * HALF:]
            exact = answer if exact is None else exact
            coherent = ((answer == prompt[:, :HALF]).all(1) | (answer == prompt[:, HALF:]).all(1)).float().mean()
            agree = (answer == exact).float().mean()
            print(f"{block:5d} {steps:5d} {cache:>8s} {refresh or '-':>8} {coherent.item():9.3f} {agree.item():10.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
