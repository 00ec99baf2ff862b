"""Training-step benchmark: MLM head only at the masked positions vs logits at every position.

    .venv/bin/python benchmarks/train_step.py                 # mmBERT-small shape, batch 2 x 512
    .venv/bin/python benchmarks/train_step.py --steps 2 --repeat 1   # shorter

One MDLM training step = draw t and masks, forward, weighted masked cross-entropy, backward,
fused AdamW step (fp32), as ``diffutron train`` runs it. Three variants run on the same random
mmBERT-small-shaped model (vocab 256,000, built under ``no_init_weights``) with the same noise,
and must give the same loss:

- ``full``: logits at every position, then the masked ones picked (research code);
- ``masked``: ``objective.mdlm_loss``, the MLM head only at the masked positions;
- ``fused``: ``objective.fused_mdlm_loss``, masked positions only and the output layer fused with the
  cross-entropy in chunks (no [N, V] tensor kept): what ``diffutron train`` runs by default.

Each variant runs in its own subprocess, so its peak resident memory (RSS) is its own; variants
alternate over ``--repeat`` rounds and the best of each is kept. Speed is reported both per wall
second and per CPU second of the process (the latter is steadier on a shared machine).

Reported: tokens/s (batch tokens per second), peak RSS, and the step's own memory (peak RSS minus
the RSS once model, gradients and AdamW state exist, i.e. what the step adds on top of them).
Target: masked >= 1.4x the tokens/s of full logits, and <= 0.6x its memory.

Device mode (``--device auto``, the default, on a machine with CUDA; ``--table`` anywhere)::

    python benchmarks/train_step.py --quick           # on a GPU: the core variants (budget: 90 s)
    python benchmarks/train_step.py --budget-s 85     # on a GPU: core + extra variants, as the budget allows
    .venv/bin/python benchmarks/train_step.py --table --quick   # the same code on CPU, tiny shape

Two setups at DiffutronLM-0.3B's shape (random mmBERT-base weights, vocab 256,000), as ``diffutron
train`` runs them (accelerate, bf16 autocast on GPUs, fused AdamW, gradient clipping at 1.0):
``lora-cpt`` (LoRA r=256, alpha 256, dropout 0.05 on Wqkv/Wo/Wi of every layer, 16 x 512) and
``full-sft`` (all weights, 16 x 256); on CPU a tiny shape (``--shape tiny``: 4 layers, hidden 64,
vocab 4096, LoRA r=16, 4 x 128 / 4 x 64). Every row is maskable; the noise is the same in every
variant. Variants (``DEVICE_VARIANTS``): ``full`` (logits everywhere), ``masked`` (``mdlm_loss``),
``fused-v1`` / ``fused-v2`` / ``fused-v2c`` (``fused_mdlm_loss`` with impl ``v1`` / ``v2`` /
``v2-compiled``), ``+compile`` (``compile: true``: the encoder layers under ``torch.compile``),
``+ckpt`` (gradient checkpointing, eager), ``lora-dropout-0`` (informative: another model).
They run in ONE process, one after another: model built on the device, ``warmup`` steps (>= 3;
compile happens here: ``compile s`` = their time minus ``warmup`` x the median step), then the
median of ``steps`` (>= 5) timed steps (``torch.cuda.synchronize`` around each); peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (model, gradients and AdamW state
included). A time budget (``--budget-s``, default 90 s) skips the variants that would not fit,
most important first; a failing variant is reported and the run goes on.

MFU = model FLOPs per step / step time / peak rate. The peak is measured in the same run (an
8192^3 bf16 matmul on a GPU; 1024^3 in the training dtype on CPU); the datasheet column uses
989 TFLOP/s (H200 SXM, dense bf16). Model FLOPs, T = batch x length tokens, N masked tokens (the
mean over the timed steps), d hidden, f intermediate, n layers, V vocab, r LoRA rank, k_l the keys
a query of layer l attends (L for global layers, min(L, local_attention + 1) for sliding ones)::

    linear   = 2 T n (4 d^2 + 3 d f)          Wqkv d->3d, Wo d->d, Wi d->2f, Wo f->d
    attn     = 4 T d sum_l k_l                QK^T and AV
    head     = N (2 d^2 + 2 d V)              dense + output layer at masked positions only
    lora     = 2 T n r (8 d + 3 f)            A and B of the four adapted matmuls
    full SFT : 3 (linear + attn + head)       forward, input gradients, weight gradients
    LoRA CPT : 2 linear + 2 head + 3 attn + 3 lora
               (frozen weights: forward and input gradients only, no weight gradients)

Embedding lookups, norms and activations are not counted. The full-logits variant computes the
head at all T positions but is credited the same model FLOPs.
Use ``gpu_training_table(quick)`` from another script (``benchmarks/gpu.py``): it returns the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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


def full_logits_loss(model, input_ids, maskable, *, mask_token_id, t, noise_mask, attention_mask=None):
    """The same objective as ``mdlm_loss``, computed the way research code does: all logits, then pick."""
    from diffutron.schedules import get_schedule

    noisy = torch.where(noise_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    logits = model(input_ids=noisy, attention_mask=attention_mask).logits  # [B, L, V]
    ce = torch.nn.functional.cross_entropy(logits[noise_mask].float(), input_ids[noise_mask], reduction="none")
    rows = noise_mask.nonzero()[:, 0]
    term = get_schedule("linear").weight(t.to(ce.device))[rows] * ce
    b = input_ids.shape[0]
    per_seq = torch.zeros(b, dtype=term.dtype, device=term.device).index_add(0, rows, term)
    return (per_seq / maskable.sum(1).clamp(min=1)).sum() / b


def worker(args) -> None:
    """One variant: build, warm up, time ``steps`` steps; print one JSON line."""
    from _models import MASK_ID, random_mmbert

    from diffutron.objective import draw_noise, fused_mdlm_loss, mdlm_loss
    from diffutron.schedules import sample_t

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


# ---------------------------------------------------------------------------------------------
# device mode: every variant in one process (a GPU; or CPU with a tiny shape)

DATASHEET_TFLOPS = 989.0  # H200 SXM, dense bf16
# name -> how the step is built: loss (full / masked / fused), impl (fused_mdlm_loss's), compile (the
# stage setting), ckpt (gradient checkpointing), lora_dropout (a LoRA setting other than the recipe's)
DEVICE_VARIANTS = {
    "full": dict(loss="full"),
    "masked": dict(loss="masked"),
    "fused-v1": dict(loss="fused", impl="v1"),
    "fused-v2": dict(loss="fused", impl="v2"),
    "fused-v2c": dict(loss="fused", impl="v2-compiled"),
    "masked+compile": dict(loss="masked", compile=True),
    "fused-v1+compile": dict(loss="fused", impl="v1", compile=True),
    "fused-v2+compile": dict(loss="fused", impl="v2", compile=True),
    "fused-v2c+compile": dict(loss="fused", impl="v2-compiled", compile=True),
    "fused-v2+ckpt": dict(loss="fused", impl="v2", ckpt=True),
    "fused-v2+compile, lora-dropout-0": dict(loss="fused", impl="v2", compile=True, lora_dropout=0.0),
    "fused-v2, lora-dropout-0": dict(loss="fused", impl="v2", lora_dropout=0.0),
}
# (setup, variant), most important first: the budget drops the tail
QUICK_PLAN = [("lora-cpt", "masked"), ("lora-cpt", "fused-v1"), ("lora-cpt", "fused-v2"),
              ("lora-cpt", "fused-v2+compile"), ("full-sft", "masked"), ("full-sft", "fused-v1"),
              ("full-sft", "fused-v2"), ("full-sft", "fused-v2+compile"), ("lora-cpt", "fused-v2c"),
              ("full-sft", "fused-v2c"), ("lora-cpt", "fused-v2c+compile"), ("full-sft", "fused-v2c+compile"),
              ("lora-cpt", "full"), ("full-sft", "full")]
FULL_PLAN = QUICK_PLAN + [("lora-cpt", "masked+compile"), ("full-sft", "masked+compile"),
                          ("lora-cpt", "fused-v1+compile"), ("lora-cpt", "fused-v2+ckpt"),
                          ("full-sft", "fused-v2+ckpt"), ("lora-cpt", "fused-v2, lora-dropout-0"),
                          ("lora-cpt", "fused-v2+compile, lora-dropout-0")]


def device_setups(device: torch.device, shape: str | None = None) -> dict[str, dict]:
    """The two training setups at ``shape`` (default: mmbert-base on a GPU, tiny on CPU)."""
    shape = shape or ("mmbert-base" if device.type == "cuda" else "tiny")
    if shape == "tiny":
        vocab, rank, (cpt, sft) = 4096, 16, ((4, 128), (4, 64))
    else:
        vocab, rank, (cpt, sft) = 256000, 256, ((16, 512), (16, 256))
    return {"lora-cpt": dict(shape=shape, vocab=vocab, method="lora", r=rank, batch=cpt[0], length=cpt[1]),
            "full-sft": dict(shape=shape, vocab=vocab, method="full", r=None, batch=sft[0], length=sft[1])}


def step_flops(config, *, batch: int, length: int, masked: float, lora_r: int | None) -> float:
    """Model FLOPs of one training step (the formula in the module docstring)."""
    d, f, n, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    tokens = batch * length
    types = getattr(config, "layer_types", None) or [
        "full_attention" if i % config.global_attn_every_n_layers == 0 else "sliding_attention" for i in range(n)]
    keys = [length if kind == "full_attention" else min(length, 2 * (config.local_attention // 2) + 1)
            for kind in types]
    linear = 2 * tokens * n * (4 * d * d + 3 * d * f)
    attn = 4 * tokens * d * sum(keys)
    head = masked * (2 * d * d + 2 * d * vocab)
    if lora_r is None:
        return 3.0 * (linear + attn + head)
    lora = 2 * tokens * n * lora_r * (8 * d + 3 * f)
    return 2.0 * linear + 2.0 * head + 3.0 * attn + 3.0 * lora


def measured_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's matmul rate in this run: best of 3 rounds of 10 (CPU: 3) n^3 products."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    reps = 10 if device.type == "cuda" else 3
    best = float("inf")
    for _ in range(4):  # the first round warms up
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    del a, b
    return 2 * n**3 / best / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _estimate_s(device: torch.device, setup: str, variant: dict, done: list[dict]) -> float:
    """A rough cost of one variant, for the time budget: the same kind of run measured earlier in
    this run when there is one (compiling dominates), else a guess."""
    cuda = device.type == "cuda"
    ok = [r for r in done if r.get("status") == "ok"]
    eager = [r["wall_s"] for r in ok if r["setup"] == setup and not r.get("compiled")
             and (r["variant"] == "full") == (variant["loss"] == "full")]
    cost = eager[-1] if eager else (10.0 if variant["loss"] == "full" else 4.0) * (1 if cuda else 2)
    if variant.get("compile"):
        same = [r["compile_s"] for r in ok if r["setup"] == setup and r.get("layers_compiled")]
        other = [r["compile_s"] for r in ok if r.get("layers_compiled")]
        cost += 0.6 * same[0] if same else (other[0] if other else 45.0)  # a warm inductor cache: faster
    if variant.get("impl") == "v2-compiled":
        cost += 3.0 if any(r.get("v2c_compiled") for r in ok) else 12.0
    return cost


def run_device_variant(device: torch.device, setup: dict, variant: dict, *, warmup: int, steps: int) -> dict:
    """One (setup, variant) in this process: build, prepare (accelerate), warm up, time; one row."""
    import gc

    from _models import MASK_ID, random_mmbert
    from accelerate import Accelerator

    from diffutron.backbone import unwrap
    from diffutron.objective import draw_noise, fused_mdlm_loss, mdlm_loss
    from diffutron.schedules import sample_t
    from diffutron.training.compiled import compile_encoder_layers
    from diffutron.training.config import LoraSettings
    from diffutron.training.lora import apply_lora
    from diffutron.training.loop import _reset_accelerate, resolve_mixed_precision

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    if cuda:
        torch.cuda.manual_seed_all(0)
    b, length, kind = setup["batch"], setup["length"], variant["loss"]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, setup["vocab"], (b, length), generator=gen).to(device)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    attention = torch.ones_like(ids)
    held: dict = {}  # everything a failure must release too

    def build():
        model = random_mmbert(setup["shape"], vocab_size=setup["vocab"], max_position_embeddings=1024, device=device)
        held["config"] = model.config
        if setup["method"] == "lora":
            dropout = variant.get("lora_dropout", 0.05)
            model = apply_lora(model, LoraSettings(r=setup["r"], alpha=float(setup["r"]), dropout=dropout))
        model.train()
        if variant.get("ckpt"):
            unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if variant.get("compile"):
            held["undo"] = compile_encoder_layers(model)  # as the loop: before accelerate's prepare
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0, fused=True)  # as diffutron train
        held["accelerator"] = Accelerator(mixed_precision=resolve_mixed_precision("auto", cpu=not cuda), cpu=not cuda)
        held["model"], held["optimizer"] = held["accelerator"].prepare(model, optimizer)

    def step(i: int) -> tuple[float, int]:
        model, optimizer, accelerator = held["model"], held["optimizer"], held["accelerator"]
        g = torch.Generator().manual_seed(100 + i)  # the same noise in every variant
        t = sample_t(b, generator=g)
        noise = draw_noise(maskable.cpu(), t, generator=g).to(device)
        common = dict(mask_token_id=MASK_ID, t=t.to(device), noise_mask=noise, attention_mask=attention)
        if kind == "full":
            loss = full_logits_loss(model, ids, maskable, **common)
        elif kind == "masked":
            loss = mdlm_loss(model, ids, maskable, **common)
        else:
            loss = fused_mdlm_loss(model, ids, maskable, impl=variant["impl"], **common)
        accelerator.backward(loss)
        norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(norm)  # the loop reads both (a host sync, as there)
        return float(loss.detach()), int(noise.sum())

    times, losses, masked = [], [], []
    peak = None
    try:
        build()
        for i in range(warmup + steps):
            if i == warmup and cuda:
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            loss, n_masked = step(i)
            _sync(device)
            times.append(time.perf_counter() - t0)
            losses.append(loss)
            masked.append(n_masked)
        if cuda:
            peak = torch.cuda.max_memory_allocated(device) / 2**30
    finally:
        if "undo" in held:
            held["undo"]()
        config = held.get("config")
        held.clear()
        _reset_accelerate()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    step_s = statistics.median(times[warmup:])
    mean_masked = sum(masked[warmup:]) / steps
    flops = step_flops(config, batch=b, length=length, masked=mean_masked, lora_r=setup["r"])
    compiled = bool(variant.get("compile")) or variant.get("impl") == "v2-compiled"
    return {"step_ms": step_s * 1e3, "tokens_per_s": b * length / step_s, "peak_gib": peak,
            "tflops": flops / step_s / 1e12, "model_tflop_per_step": flops / 1e12,
            "compile_s": max(0.0, sum(times[:warmup]) - warmup * step_s) if compiled else None,
            "loss_first": losses[0], "masked_tokens": mean_masked, "compiled": compiled,
            "layers_compiled": bool(variant.get("compile")), "v2c_compiled": variant.get("impl") == "v2-compiled"}


def gpu_training_table(quick: bool, *, device: str | torch.device | None = None, shape: str | None = None,
                       plan: list[tuple[str, str]] | None = None, budget_s: float = 90.0, warmup: int = 3,
                       steps: int | None = None, log=None) -> list[dict]:
    """The training-step table on ``device`` (default: CUDA when present, else CPU with the tiny shape).

    Returns one dict per (setup, variant): setup, variant, method, batch, length, step_ms,
    tokens_per_s, peak_gib (None on CPU), mfu (of the rate measured here), mfu_datasheet (of 989
    TFLOP/s, CUDA only), tflops, compile_s, loss_first, masked_tokens, status ("ok", "skipped: ...",
    "failed: ..."), plus one first row (setup "peak") with the measured matmul rate. ``quick``: the
    core variants (else also the extra ones, as far as the budget allows); ``steps`` timed steps
    (default 5) after ``warmup`` (3). ``log``: a
    callable for progress lines (e.g. ``print``), silent when None.
    """
    started = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    steps = steps or 5
    setups = device_setups(device, shape)
    plan = plan or (QUICK_PLAN if quick else FULL_PLAN)
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    peak_tflops = measured_peak_tflops(device, dtype)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    rows = [{"setup": "peak", "variant": f"{'8192' if cuda else '1024'}^3 matmul, {str(dtype).replace('torch.', '')}",
             "device": name, "tflops": peak_tflops, "datasheet_tflops": DATASHEET_TFLOPS if cuda else None,
             "status": "ok"}]
    if log:
        log(f"{name}: measured matmul peak {peak_tflops:.1f} TFLOP/s ({dtype}); budget {budget_s:.0f} s")
    for setup_name, variant_name in plan:
        setup, variant = setups[setup_name], DEVICE_VARIANTS[variant_name]
        row = {"setup": setup_name, "variant": variant_name, "method": setup["method"], "batch": setup["batch"],
               "length": setup["length"], "device": name}
        if variant.get("lora_dropout") is not None and setup["method"] != "lora":
            continue
        elapsed = time.perf_counter() - started
        estimate = _estimate_s(device, setup_name, variant, rows)
        if elapsed + estimate > budget_s:
            row["status"] = f"skipped: time budget ({elapsed:.0f} s used, ~{estimate:.0f} s needed)"
            rows.append(row)
            if log:
                log(f"  {setup_name:9s} {variant_name:34s} {row['status']}")
            continue
        t0 = time.perf_counter()
        try:
            row.update(run_device_variant(device, setup, variant, warmup=warmup, steps=steps))
            row["mfu"] = row["tflops"] / peak_tflops
            row["mfu_datasheet"] = row["tflops"] / DATASHEET_TFLOPS if cuda else None
            row["status"] = "ok"
        except Exception as err:  # report and go on: one variant must not cost the others
            first = (str(err).strip().splitlines() or [""])[0][:200]
            row["status"] = f"failed: {type(err).__name__}: {first}"
            if cuda:
                torch.cuda.empty_cache()
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        if log:
            log("  " + format_row(row))
    if log:
        log(f"training table: {time.perf_counter() - started:.0f} s in all")
    return rows


def format_row(row: dict) -> str:
    if row.get("status") != "ok":
        return f"{row['setup']:9s} {row['variant']:34s} {row.get('status')}"

    def opt(value, fmt, none="-"):
        return none if value is None else format(value, fmt)

    return (f"{row['setup']:9s} {row['variant']:34s} {row['step_ms']:8.1f} {row['tokens_per_s']:11,.0f} "
            f"{opt(row['peak_gib'], '8.2f', '       -')} {row['mfu'] * 100:6.1f}% "
            f"{opt(row.get('mfu_datasheet') and row['mfu_datasheet'] * 100, '5.1f', '     -')}% "
            f"{opt(row['compile_s'], '8.1f', '       -')} {row['loss_first']:9.5f}")


def print_training_table(rows: list[dict]) -> None:
    peak = next((r for r in rows if r["setup"] == "peak"), None)
    if peak:
        sheet = f", datasheet {peak['datasheet_tflops']:.0f}" if peak.get("datasheet_tflops") else ""
        print(f"device {peak['device']}: matmul peak measured {peak['tflops']:.1f} TFLOP/s ({peak['variant']}{sheet})")
    print(f"{'setup':9s} {'variant':34s} {'ms/step':>8s} {'tokens/s':>11s} {'peak GiB':>8s} {'MFU':>7s} "
          f"{'MFU989':>7s} {'compile':>8s} {'loss@0':>9s}")
    for row in rows:
        if row["setup"] != "peak":
            print(format_row(row))
    for setup in sorted({r["setup"] for r in rows} - {"peak"}):
        losses = [r["loss_first"] for r in rows if r["setup"] == setup and r.get("status") == "ok"]
        if losses:
            spread = (max(losses) - min(losses)) / max(abs(min(losses)), 1e-9)
            print(f"{setup}: first-step losses agree to {spread:.1e} (relative) over {len(losses)} variants")


def device_main(args) -> None:
    import json

    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    plan = None
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(";") if v.strip()]
        plan = []
        for item in wanted:
            setup, _, variant = item.rpartition(":")
            if variant not in DEVICE_VARIANTS:
                raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(DEVICE_VARIANTS)}")
            plan += [(s, variant) for s in ((setup,) if setup else ("lora-cpt", "full-sft"))]
    import transformers

    print(f"MDLM training step, device mode: {device}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; {'quick' if args.quick else 'full'} plan; setups: "
          + "; ".join(f"{k} {v['method']} {v['batch']} x {v['length']} ({v['shape']}, vocab {v['vocab']}"
                      + (f", LoRA r={v['r']}" if v['r'] else "") + ")"
                      for k, v in device_setups(device, args.shape).items()), flush=True)
    rows = gpu_training_table(args.quick, device=device, shape=args.shape, plan=plan, budget_s=args.budget_s,
                              warmup=args.warmup_device, steps=args.steps_device, log=lambda s: print(s, flush=True))
    print()
    print_training_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default=None, choices=["mmbert-small", "mmbert-base", "tiny"],
                   help="CPU comparison: default mmbert-small; device mode: mmbert-base on a GPU, tiny on CPU")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant and round (CPU comparison: 3; "
                   "device mode: 5)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (CPU comparison: 1; device mode: 3)")
    p.add_argument("--repeat", type=int, default=2, help="rounds (variants alternate; best time kept)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: the device mode on a GPU when there is one, else the CPU comparison")
    p.add_argument("--table", action="store_true", help="the device mode even on CPU (tiny shape by default)")
    p.add_argument("--quick", action="store_true", help="device mode: the core variants only")
    p.add_argument("--variants", default=None,
                   help="device mode: 'SETUP:VARIANT;VARIANT;...' (a bare variant runs in both setups)")
    p.add_argument("--budget-s", type=float, default=90.0, help="device mode: skip variants past this many seconds")
    p.add_argument("--json", default=None, help="device mode: write the rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.worker and (args.table or (args.device != "cpu" and torch.cuda.is_available())):
        args.warmup_device = max(3, args.warmup or 3)
        args.steps_device = max(5, args.steps or 5)
        device_main(args)
        return
    args.shape = args.shape or "mmbert-small"
    args.steps = args.steps or 3
    args.warmup = args.warmup if args.warmup is not None else 1
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
