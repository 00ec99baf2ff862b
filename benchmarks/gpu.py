"""Decoding and training speed on the device at hand (a GPU when there is one), in one run.

    python benchmarks/gpu.py                  # CUDA: DiffutronLM-0.3B's shape (random mmBERT-base weights)
    python benchmarks/gpu.py --quick          # fewer rows (CPU: a small shape, a smoke run)
    python benchmarks/gpu.py --json out.json  # every figure, with device, versions and settings

Settings: the paper's (prompt 32, 64 new tokens, 64 steps, block 32, temperature 0.1, repetition
penalty 1.2; answers run to full length), bf16 weights on GPUs. Each time is the median of 3 runs
after a warm-up; compiling and graph capture happen in the warm-up and are reported apart. Modes:

- ``plain``: a straightforward loop (full logits at every position, softmax / argmax / multinomial);
- ``eager``: ``sampling.generate``, the eager loop (logits at masked positions only);
- ``graphs``: ``sampling.engine`` with every step a CUDA graph (eager kernels);
- ``compiled``: the engine with torch.compile'd steps inside the graphs (``DiffusionLM.compile()``).

Parts: 1. decoding rules on [32, 256k] logits (plain torch vs the CPU kernels); 2. float32 greedy
tokens of every mode against the plain loop; 3. one answer and batches of 8/32/128 (tokens/s);
4. ``--fast`` (bf16 + the dual cache) and the delayed cache; 5. the threshold; 6. training steps
(``benchmarks/train_step.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import EOS_ID, MASK_ID, random_mmbert  # noqa: E402

from diffutron.sampling import SamplerConfig, generate, policies  # noqa: E402
from diffutron.sampling.engine import Engine  # noqa: E402

RESULTS: list[dict] = []


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, runs=3):
    """(median seconds of ``runs`` calls after one warm-up, warm-up seconds, last result)."""
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), warm, out


def record(part: str, what: str, **figures) -> None:
    RESULTS.append({"part": part, "what": what, **figures})
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
    print(f"  {what:58s} {shown}", flush=True)


# ------------------------------------------------------------------------------------------- loops
@torch.inference_mode()
def plain_loop(model, prompts: torch.Tensor, cfg: SamplerConfig, generator=None) -> torch.Tensor:
    """The straightforward batched loop: full logits over the whole canvas every step, the
    penalty over every present id, softmax / argmax / multinomial, top-k confidences per row."""
    b, p = prompts.shape
    x = torch.cat([prompts, torch.full((b, cfg.max_new_tokens), MASK_ID, device=prompts.device)], 1)
    blocks = policies.blocks_of(p, p + cfg.max_new_tokens, cfg.block_length)
    spb = policies.steps_per_block(cfg.steps, len(blocks))
    for s, e in blocks:
        for k in policies.block_schedule(e - s, spb):
            if k == 0:
                continue
            logits = model(input_ids=x).logits.float()  # [b, W, V]
            if cfg.repetition_penalty != 1.0:
                present = torch.zeros(b, logits.shape[-1], dtype=torch.bool, device=x.device)
                seen = (x != MASK_ID) & (x != EOS_ID)
                present[torch.arange(b, device=x.device)[:, None].expand_as(x)[seen], x[seen]] = True
                logits = policies.penalize(logits, present[:, None, :], cfg.repetition_penalty)
            logits[..., MASK_ID] = float("-inf")
            if cfg.temperature == 0:
                x0 = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / cfg.temperature, -1)
                x0 = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator).view(b, -1)
            conf = torch.softmax(logits, -1).gather(-1, x0[..., None]).squeeze(-1)
            inside = torch.zeros_like(x, dtype=torch.bool)
            inside[:, s:e] = True
            conf = torch.where(inside & (x == MASK_ID), conf, float("-inf"))
            idx = conf.topk(k, dim=-1).indices
            x.scatter_(1, idx, x0.gather(1, idx))
    return x


def eager(model, prompts, cfg):
    att = torch.ones_like(prompts)
    return generate(model, prompts, cfg, mask_token_id=MASK_ID, eos_token_id=EOS_ID, pad_token_id=0,
                    attention_mask=att).sequences


def make_engine(model, cfg, *, graphs, compile, max_batch=128):
    return Engine(model, cfg, mask_token_id=MASK_ID, eos_token_id=EOS_ID, pad_token_id=0, max_batch=max_batch,
                  graphs=graphs, compile=compile)


def engine_run(engine, prompts):
    return engine.generate(prompts, torch.ones_like(prompts)).sequences


# ------------------------------------------------------------------------------------------- parts
def decoding_rules(device, vocab):
    print(f"\n## 1. decoding rules on [32, {vocab}] float32 logits spread like a trained model's (std 2.2)")
    logits = torch.randn(32, vocab, generator=torch.Generator().manual_seed(2)).mul_(2.2).to(device)
    u = torch.rand(32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    for name, kw in (("temperature 0", dict(temperature=0.0, top_p=1.0)),
                     ("temperature 0.1", dict(temperature=0.1, top_p=1.0)),
                     ("temperature 0.1, top-p 0.9", dict(temperature=0.1, top_p=0.9))):
        row = {}
        for impl, plain in (("plain", True), ("cpu kernels", False)):
            if impl == "cpu kernels" and device.type != "cpu":
                continue
            t, _, _ = timed(lambda: policies.propose(logits, u, temperature=kw["temperature"], top_k=0,
                                                     top_p=kw["top_p"], remasking="low_confidence", forbid=MASK_ID,
                                                     plain=plain), device, runs=5)
            row[f"{impl} ms"] = t * 1e3
        record("rules", name, **row)


def exactness(device, shape, vocab, prompt_len, new):
    print("\n## 2. float32 greedy (penalty 1.2): tokens of every mode against the plain full-logits loop")
    model = random_mmbert(shape, vocab_size=vocab).to(device)
    cfg = SamplerConfig(max_new_tokens=new, steps=new, block_length=32, temperature=0.0, repetition_penalty=1.2,
                        stop_at_eos=False)
    prompts = torch.randint(10, vocab, (2, prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    t_plain, _, want = timed(lambda: plain_loop(model, prompts, cfg), device, runs=1)
    record("exact fp32", "plain loop, batch 2", ms=t_plain * 1e3)
    modes = [("eager", lambda: eager(model, prompts, cfg))]
    if device.type == "cuda":
        graphs = make_engine(model, cfg, graphs=True, compile=False)
        modes.append(("graphs", lambda: engine_run(graphs, prompts)))
    for name, fn in modes:
        try:
            t, warm, got = timed(fn, device, runs=1)
        except Exception as err:  # noqa: BLE001
            record("exact fp32", f"{name}, batch 2", error=f"{type(err).__name__}: {err}"[:300])
            continue
        record("exact fp32", f"{name}, batch 2", ms=t * 1e3, warmup_s=warm,
               identical=bool(torch.equal(got[:, : want.shape[1]], want)))
    del model


PROFILE: set[int] = set()  # batch sizes whose compiled runs are also profiled (--profile)


def profile(fn, what: str, rows: int = 18) -> None:
    """One more call of ``fn`` under torch.profiler: where the GPU time goes, kernel by kernel."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"  -- profile: {what}")
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)
    print("\n".join("  | " + line for line in table.splitlines()), flush=True)


def batches(device, model, cfg, sizes, modes, prompt_len, vocab, part, label):
    """tokens/s of each mode at each batch size (prompts of ``prompt_len`` random ids)."""
    engines = {}
    for b in sizes:
        prompts = torch.randint(10, vocab, (b, prompt_len), generator=torch.Generator().manual_seed(b)).to(device)
        tokens = b * cfg.max_new_tokens
        for mode in modes:
            if mode == "plain":
                if b > 32:
                    continue  # full logits at 128 x 96 positions: 12 GB per step, minutes per run
                fn = lambda: plain_loop(model, prompts, cfg)  # noqa: E731
            elif mode == "eager":
                fn = lambda: eager(model, prompts, cfg)  # noqa: E731
            else:
                if mode not in engines:
                    engines[mode] = make_engine(model, cfg, graphs=device.type == "cuda",
                                                compile=mode == "compiled")
                fn = lambda e=engines[mode]: engine_run(e, prompts)  # noqa: E731
            before = engines[mode].capture_s if mode in engines else 0.0
            try:
                t, warm, _ = timed(fn, device)
            except Exception as err:  # noqa: BLE001 - one failing mode must not hide the others' figures
                record(part, f"{label}, {mode}, batch {b}", error=f"{type(err).__name__}: {err}"[:300])
                continue
            extra = {"compile_capture_s": engines[mode].capture_s - before} if mode in engines else {}
            record(part, f"{label}, {mode}, batch {b}", ms=t * 1e3, tokens_per_s=tokens / t, warmup_s=warm, **extra)
            if b in PROFILE and mode == "compiled" and device.type == "cuda":
                profile(fn, f"{label}, {mode}, batch {b}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows; on CPU a small shape")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--parts", default="1,2,3,4,5,6", help="which parts to run (comma-separated)")
    ap.add_argument("--sizes", default=None, help="batch sizes of parts 3 and 4 (default 1,8,32,128 and 1,32,128)")
    ap.add_argument("--modes", default="plain,eager,graphs,compiled", help="modes to time in parts 3-5")
    ap.add_argument("--compiled-parts", default="3,4", help="parts that also time the compiled engine (each "
                    "sampler configuration compiles once: tens of seconds)")
    ap.add_argument("--profile", default="", help="batch sizes whose compiled runs are also profiled (CUDA)")
    args = ap.parse_args()
    PROFILE.update(int(x) for x in args.profile.split(",") if x)
    parts = {int(p) for p in args.parts.split(",")}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (part 2)
    shape = "mmbert-base" if cuda else dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                            intermediate_size=256)
    vocab = 256000 if cuda else 32000
    prompt_len, new = 32, 64
    name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    print(f"device {name}; torch {torch.__version__}; shape {shape if isinstance(shape, str) else 'small'}, "
          f"vocab {vocab}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    paper = SamplerConfig(max_new_tokens=new, steps=new, block_length=32, stop_at_eos=False)

    if 1 in parts:
        decoding_rules(device, vocab)
    if 2 in parts:
        exactness(device, shape, vocab, prompt_len, new)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = random_mmbert(shape, vocab_size=vocab).to(device, dtype) if parts & {3, 4, 5} else None
    compiled_parts = {int(p) for p in args.compiled_parts.split(",") if p}

    wanted = set(args.modes.split(","))

    def engine_modes(part):  # on CPU "graphs" is the engine's eager steps
        return ["graphs", "compiled"] if cuda and part in compiled_parts else ["graphs"]

    def modes(*names):
        return [m for m in names if m in wanted]

    def sizes(default):
        return [int(x) for x in args.sizes.split(",")] if args.sizes else default

    if 3 in parts:
        print(f"\n## 3. paper settings, {dtype}: one answer and batches (tokens/s = batch x {new} / time)")
        batches(device, model, paper, sizes([1, 8, 32, 128] if not args.quick else [1, 8]),
                modes("plain", "eager", *engine_modes(3)), prompt_len, vocab, "exact", "exact")
    if 4 in parts:
        print("\n## 4. --fast: bf16 weights + the dual cache (the engine's), and the delayed cache (eager only)")
        batches(device, model, paper.replace(cache="dual"), sizes([1, 32, 128] if not args.quick else [1, 8]),
                modes("eager", *engine_modes(4)), prompt_len, vocab, "fast", "dual cache")
        batches(device, model, paper.replace(cache="delayed"), [1, 32] if not args.quick else [1], modes("eager"),
                prompt_len, vocab, "fast", "delayed cache")
    if 5 in parts:
        print("\n## 5. threshold 0.9 (random weights: it never fires, every forward runs)")
        batches(device, model, paper.replace(threshold=0.9), [1, 32] if not args.quick else [1],
                modes("eager", *engine_modes(5)), prompt_len, vocab, "threshold", "threshold 0.9")
    del model
    if cuda:
        torch.cuda.empty_cache()
    if 6 in parts and not args.skip_training:
        print("\n## 6. training steps (benchmarks/train_step.py)")
        from train_step import gpu_training_table

        for row in gpu_training_table(quick=args.quick or not cuda):
            RESULTS.append({"part": "training", **row})
            print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  flush=True)
    if args.json:
        import transformers

        meta = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
                "dtype": str(dtype), "date": time.strftime("%Y-%m-%d"), "sampler": paper.to_dict(),
                "prompt_len": prompt_len, "shape": shape, "vocab": vocab}
        args.json.write_text(json.dumps({"meta": meta, "results": RESULTS}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
