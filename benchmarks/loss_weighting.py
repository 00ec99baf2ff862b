"""Loss weighting benchmark: how fast a tiny ModernBERT learns to read its context, ELBO vs flat.

    .venv/bin/python benchmarks/loss_weighting.py            # ~4 min on 2 CPU cores
    .venv/bin/python benchmarks/loss_weighting.py --steps 50 # a smoke run

Two synthetic tasks whose answers are only in the context: ``repeat`` (every position holds the
same random token) and ``copy`` (the second half of each sequence repeats the first). A 4-layer
ModernBERT is trained from the same initialisation with the same noise draws by
``objective.mdlm_loss`` under ``weighting="elbo"`` (the MDLM bound) and ``weighting="flat"``
(BERT's masked-LM weighting), and also by transformers' own ``labels=`` loss. Reported: the
cross-entropy of masked second-half tokens while 70% of them and the whole first half are
visible (lower = the model reads its context; uniform guessing is log(V - 5)).
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM

from diffutron.objective import draw_noise, mdlm_loss
from diffutron.schedules import sample_t

VOCAB, LENGTH, MASK, BATCH = 512, 64, 1, 32


def sequences(task: str, b: int, g: torch.Generator) -> torch.Tensor:
    if task == "repeat":
        return torch.randint(5, VOCAB, (b, 1), generator=g).expand(b, LENGTH).clone()
    half = torch.randint(5, VOCAB, (b, LENGTH // 2), generator=g)
    return torch.cat([half, half], 1)


def train_and_score(loss_kind: str, task: str, steps: int) -> float:
    torch.manual_seed(0)
    config = ModernBertConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=256, local_attention=64, global_attn_every_n_layers=3, pad_token_id=0,
        mask_token_id=MASK, cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3)
    model = ModernBertForMaskedLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = sequences(task, BATCH, g)
        maskable = torch.ones_like(x, dtype=torch.bool)
        t = sample_t(BATCH, eps=1e-3, method="iid", generator=g)
        noise = draw_noise(maskable, t, generator=g)
        if loss_kind == "transformers":
            loss = model(input_ids=x.masked_fill(noise, MASK), labels=x.masked_fill(~noise, -100)).loss
        else:
            loss = mdlm_loss(model, x, maskable, mask_token_id=MASK, t=t, noise_mask=noise, weighting=loss_kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        x = sequences(task, 64, g)
        noise = torch.zeros_like(x, dtype=torch.bool)
        noise[:, LENGTH // 2:] = torch.rand(64, LENGTH // 2, generator=g) < 0.3
        logp = model(input_ids=x.masked_fill(noise, MASK)).logits.log_softmax(-1)
        return float(-logp.gather(-1, x[..., None]).squeeze(-1)[noise].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run (batch 32)")
    args = ap.parse_args()
    print(f"{args.steps} steps of batch {BATCH}, vocabulary {VOCAB}, length {LENGTH}; "
          f"uniform guessing: {math.log(VOCAB - 5):.2f} nats")
    print(f"{'task':8s} {'elbo':>8s} {'flat':>8s} {'transformers':>13s}")
    for task in ("repeat", "copy"):
        ce = {kind: train_and_score(kind, task, args.steps) for kind in ("elbo", "flat", "transformers")}
        print(f"{task:8s} {ce['elbo']:8.2f} {ce['flat']:8.2f} {ce['transformers']:13.2f}", flush=True)


if __name__ == "__main__":
    main()
