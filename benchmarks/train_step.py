"""Training-step benchmark: MLM head only at the masked positions vs logits at every position.

    .venv/bin/python benchmarks/train_step.py                 # mmBERT-small shape, batch 2 x 512
    .venv/bin/python benchmarks/train_step.py --steps 2 --repeat 1   # shorter

One MDLM training step = draw t and masks, forward, weighted masked cross-entropy, backward,
fused AdamW step (fp32), as ``diffutron train`` runs it. Three variants run on the same random
mmBERT-small-shaped model (vocab 256,000, built under ``no_init_weights``) with the same noise,
and must give the same loss:

- ``full``: logits at every position, then the masked ones picked (research code);
- ``masked``: ``objective.mdlm_loss``, the MLM head only at the masked positions;
- ``fused``: ``training.fused_loss``, masked positions only and the output layer fused with the
  cross-entropy in chunks (no [N, V] tensor kept): what ``diffutron train`` runs by default.

Each variant runs in its own subprocess, so its peak resident memory (RSS) is its own; variants
alternate over ``--repeat`` rounds and the best of each is kept. Speed is reported both per wall
second and per CPU second of the process (the latter is steadier on a shared machine).

Reported: tokens/s (batch tokens per second), peak RSS, and the step's own memory (peak RSS minus
the RSS once model, gradients and AdamW state exist, i.e. what the step adds on top of them).
Target: masked >= 1.4x the tokens/s of full logits, and <= 0.6x its memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def full_logits_loss(model, input_ids, maskable, *, mask_token_id, t, noise_mask):
    """The same objective as ``mdlm_loss``, computed the way research code does: all logits, then pick."""
    from diffutron.schedules import get_schedule

    noisy = torch.where(noise_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    logits = model(input_ids=noisy).logits  # [B, L, V]
    ce = torch.nn.functional.cross_entropy(logits[noise_mask].float(), input_ids[noise_mask], reduction="none")
    rows = noise_mask.nonzero()[:, 0]
    term = get_schedule("linear").weight(t)[rows] * ce
    b = input_ids.shape[0]
    per_seq = torch.zeros(b, dtype=term.dtype).index_add(0, rows, term)
    return (per_seq / maskable.sum(1).clamp(min=1)).sum() / b


def worker(args) -> None:
    """One variant: build, warm up, time ``steps`` steps; print one JSON line."""
    from _models import MASK_ID, random_mmbert

    from diffutron.objective import draw_noise, mdlm_loss
    from diffutron.schedules import sample_t
    from diffutron.training.fused_loss import fused_mdlm_loss

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = random_mmbert(args.shape).train()
    build_s = time.perf_counter() - t0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)  # as diffutron train
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (args.batch, args.length), generator=gen)
    maskable = torch.ones_like(ids, dtype=torch.bool)

    def step(i: int):
        g = torch.Generator().manual_seed(100 + i)  # the same noise in every variant
        t = sample_t(args.batch, generator=g)
        noise = draw_noise(maskable, t, generator=g)
        if args.variant == "masked":
            loss = mdlm_loss(model, ids, maskable, mask_token_id=MASK_ID, t=t, noise_mask=noise)
        elif args.variant == "fused":
            loss = fused_mdlm_loss(model, ids, maskable, mask_token_id=MASK_ID, t=t, noise_mask=noise)
        else:
            loss = full_logits_loss(model, ids, maskable, mask_token_id=MASK_ID, t=t, noise_mask=noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss), float(noise.float().mean())

    # AdamW state exists after one step; measure the baseline without a step's activations
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # lr * 0 update: allocates exp_avg / exp_avg_sq
    optimizer.zero_grad(set_to_none=False)
    baseline = rss_mb()
    optimizer.zero_grad(set_to_none=True)
    losses, fractions, times, cpu = [], [], [], []
    for i in range(args.warmup + args.steps):
        s, c = time.perf_counter(), time.process_time()
        loss, frac = step(i)
        times.append(time.perf_counter() - s)
        cpu.append(time.process_time() - c)
        losses.append(loss)
        fractions.append(frac)
    timed = times[args.warmup:]
    timed_cpu = cpu[args.warmup:]
    print(json.dumps({
        "tokens_per_cpu_s": args.batch * args.length / (sum(timed_cpu) / len(timed_cpu)),
        "variant": args.variant, "build_s": build_s, "step_s": sum(timed) / len(timed), "step_min_s": min(timed),
        "tokens_per_s": args.batch * args.length / (sum(timed) / len(timed)),
        "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline, "step_mem_mb": peak_rss_mb() - baseline,
        "losses": losses, "masked_fraction": sum(fractions) / len(fractions), "threads": torch.get_num_threads(),
    }))


VARIANTS = ("full", "masked", "fused")


def run_variant(variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--length", str(args.length), "--shape", args.shape]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{variant} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="mmbert-small", choices=["mmbert-small", "mmbert-base"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2, help="rounds (variants alternate; best time kept)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    print(f"MDLM training step, {args.shape} shape (vocab 256000), batch {args.batch} x {args.length}, fp32 + AdamW, "
          f"{torch.get_num_threads()} threads; {args.repeat} rounds x {args.steps} timed steps per variant")
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.repeat):
        for variant in VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS)):
            res = run_variant(variant, args)
            runs[variant].append(res)
            print(f"  round {r + 1} {variant:6s}: {res['tokens_per_s']:6.1f} tok/s wall, {res['tokens_per_cpu_s']:6.1f} "
                  f"tok/CPU-s, peak RSS {res['peak_rss_mb']:6.0f} MB, step memory {res['step_mem_mb']:6.0f} MB", flush=True)
    best = {v: max(rs, key=lambda x: x["tokens_per_s"]) for v, rs in runs.items()}
    best_cpu = {v: max(rs, key=lambda x: x["tokens_per_cpu_s"]) for v, rs in runs.items()}
    mem = {v: min(rs, key=lambda x: x["peak_rss_mb"]) for v, rs in runs.items()}
    full = best["full"]
    print()
    print(f"{'':26s}" + "".join(f"{v:>12s}" for v in VARIANTS) + "   ratios vs full (masked, fused)")
    rows = [("tokens/s (wall)", best, "tokens_per_s", "{:12.1f}", False),
            ("tokens/s (CPU time)", best_cpu, "tokens_per_cpu_s", "{:12.1f}", False),
            ("peak RSS (MB)", mem, "peak_rss_mb", "{:12.0f}", True),
            ("step memory (MB)", mem, "step_mem_mb", "{:12.0f}", True)]
    ratios = {}
    for label, table, key, fmt, lower in rows:
        vals = [table[v][key] for v in VARIANTS]
        rs = [table[v][key] / table["full"][key] for v in ("masked", "fused")]
        ratios[key] = rs
        print(f"{label:26s}" + "".join(fmt.format(x) for x in vals) + f"   {rs[0]:.2f}x, {rs[1]:.2f}x")
    print(f"{'model+grads+AdamW (MB)':26s}" + "".join(f"{mem[v]['baseline_rss_mb']:12.0f}" for v in VARIANTS))
    same = {v: all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(best[v]["losses"], full["losses"]))
            for v in ("masked", "fused")}
    print(f"losses identical to full: masked {same['masked']}, fused {same['fused']} "
          f"(full {[round(x, 5) for x in full['losses']]}); masked share of tokens {full['masked_fraction']:.2f}")
    for v, i in (("masked", 0), ("fused", 1)):
        speed = max(ratios["tokens_per_s"][i], ratios["tokens_per_cpu_s"][i])
        print(f"{v}: >= 1.4x tokens/s {'met' if speed >= 1.4 else 'NOT met'} ({speed:.2f}x); <= 0.6x memory: "
              f"peak RSS {'met' if ratios['peak_rss_mb'][i] <= 0.6 else 'not met'} ({ratios['peak_rss_mb'][i]:.2f}x), "
              f"step memory {'met' if ratios['step_mem_mb'][i] <= 0.6 else 'not met'} ({ratios['step_mem_mb'][i]:.2f}x)")


if __name__ == "__main__":
    main()
