"""Sampler benchmark: the optimised sampler vs the reference algorithm, and the fast modes.

    .venv/bin/python benchmarks/sampler.py            # full run (~10 min on 2 CPU cores)
    .venv/bin/python benchmarks/sampler.py --quick    # smaller shapes, a smoke run
    .venv/bin/python benchmarks/sampler.py --base-only  # parts 1, 4 and 5: the DiffutronLM-0.3B-shaped answer (~5 min)

Reports times measured in this one run and their ratios, since absolute speed on a shared
machine varies. Part 1 measures this machine's limits (matmul FLOP/s, streaming the 256k-row
output matrix), part 2 compares ours with the reference on an mmBERT-small-shaped random model
(greedy, repetition penalty 1.2: tokens must be identical), part 3 the approximate modes (threshold, bf16 / int8
weights, the dual and delayed caches), part 4 the user-facing figure: one 64-token answer with the paper's settings on DiffutronLM-0.3B's shape,
part 5 how many forwards the threshold saves on a trained model (the embedded one) and what part 4's times become at that rate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import EOS_ID, MASK_ID, random_mmbert  # noqa: E402
from reference_sampler import oracle  # noqa: E402

from diffutron import backbone  # noqa: E402
from diffutron.backbone import make_fast  # noqa: E402
from diffutron.sampling import SamplerConfig, generate, policies  # noqa: E402


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def machine_limits(hidden: int, vocab: int) -> dict:
    a = torch.randn(2048, 2048)
    t, _ = best_of(lambda: a @ a, 5)
    fp32 = 2 * 2048**3 / t
    ab = a.bfloat16()
    t, _ = best_of(lambda: ab @ ab, 5)
    bf16 = 2 * 2048**3 / t
    w = torch.randn(vocab, hidden)
    x32 = torch.randn(32, hidden)
    t_stream, _ = best_of(lambda: w.sum(), 5)
    t_head, _ = best_of(lambda: x32 @ w.T, 5)
    wb = w.bfloat16()
    t_head_bf16, _ = best_of(lambda: x32.bfloat16() @ wb.T, 5)
    return {"fp32_gflops": fp32 / 1e9, "bf16_gflops": bf16 / 1e9, "stream_ms": t_stream * 1e3,
            "head32_ms": t_head * 1e3, "head32_bf16_ms": t_head_bf16 * 1e3,
            "head32_peak_ms": 2 * 32 * hidden * vocab / fp32 * 1e3}


TRAINED_PROMPTS = [
    "Türkiye'nin başkenti neresidir?", "“kitap” sözcüğünü İngilizceye çevir.", "İstanbul hakkında kısa bir bilgi ver.",
    "Aşağıdaki metni bir cümleyle devam ettir.\n\nKış gelince köydeki herkes odun toplamaya başladı.",
    "“güzel” kelimesinin zıt anlamlısı nedir?", "Bir hafta kaç gündür?", "Ankara'da hangi müzeler var?",
    "Şu cümleyi özetle: Dün akşam yağan yoğun kar nedeniyle şehirdeki okullar bugün tatil edildi.",
    "İngilizce “water” kelimesinin Türkçe karşılığı nedir?", "Ilık bir yaz gününü anlatan bir cümle yaz.",
]


def ours(model, prompt, cfg):
    return generate(model, torch.tensor([prompt]), cfg, mask_token_id=MASK_ID, eos_token_id=EOS_ID, pad_token_id=0)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small vocab and steps: a smoke run")
    ap.add_argument("--skip-base", action="store_true", help="skip parts 4 and 5 (mmBERT-base shape)")
    ap.add_argument("--base-only", action="store_true", help="skip parts 2 and 3 (mmBERT-small shape)")
    args = ap.parse_args()
    torch.manual_seed(0)
    vocab = 32000 if args.quick else 256000
    prompt_len, new, block, steps = (16, 16, 8, 16) if args.quick else (64, 64, 32, 64)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu count {os.cpu_count()}")

    lim = machine_limits(384, vocab)
    print("\n## 1. machine limits")
    print(f"fp32 matmul {lim['fp32_gflops']:.0f} GFLOP/s, bf16 {lim['bf16_gflops']:.0f} GFLOP/s")
    print(f"{vocab}x384 output matrix: stream once {lim['stream_ms']:.1f} ms; 32-row product "
          f"{lim['head32_ms']:.1f} ms fp32 (peak-FLOP bound {lim['head32_peak_ms']:.1f} ms), {lim['head32_bf16_ms']:.1f} ms bf16")

    # random models give near-zero logits; a trained one spreads them (the embedded model: std 2.2), and
    # at temperature 0.1 most of the vocabulary then lands where exp() leaves float32's normal range
    logits = torch.randn(32, vocab, generator=torch.Generator().manual_seed(2)) * 2.2
    u = torch.rand(32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def straightforward(temperature):  # argmax / softmax(l / T) weights, then softmax(l)[x0]
        x0 = logits.argmax(-1) if temperature == 0 else policies.inverse_cdf(
            logits.sub(logits.amax(-1, keepdim=True)).mul_(1.0 / temperature).exp_(), torch.rand(32, dtype=torch.float64))
        return (logits.gather(-1, x0[:, None]).squeeze(-1) - logits.logsumexp(-1)).exp()

    print(f"decoding rule on [32, {vocab}] logits spread like a trained model's (std 2.2):")
    for temperature in (0.0, 0.1):
        t_plain, _ = best_of(lambda: straightforward(temperature), 3)
        t_rule, _ = best_of(lambda: policies.propose(logits, u, temperature=temperature, top_k=0, top_p=1.0,
                                                     remasking="low_confidence", forbid=MASK_ID), 3)
        print(f"  temperature {temperature}: straightforward {t_plain * 1e3:.1f} ms, ours {t_rule * 1e3:.1f} ms "
              f"({t_plain / t_rule:.1f}x)")

    def full_sort_top_p(scaled, top_p=0.9):  # the nucleus from one sort of every id
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = torch.zeros_like(scaled, dtype=torch.bool).scatter(-1, order, probs.cumsum(-1) - probs >= top_p)
        return scaled.masked_fill(drop, float("-inf"))

    scaled = logits / 0.1
    t_plain, _ = best_of(lambda: full_sort_top_p(scaled), 3)
    t_rule, _ = best_of(lambda: policies.filter_top_k_top_p(scaled, 0, 0.9), 3)
    print(f"  top-p 0.9 filter at temperature 0.1: full sort {t_plain * 1e3:.1f} ms, ours {t_rule * 1e3:.1f} ms "
          f"({t_plain / t_rule:.1f}x)")

    prompt = torch.randint(10, vocab, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    if not args.base_only:
        model = random_mmbert("mmbert-small", vocab_size=vocab)
        exact = SamplerConfig(max_new_tokens=new, steps=steps, block_length=block, temperature=0.0,
                              repetition_penalty=1.2, stop_at_eos=False)
        print(f"\n## 2. ours vs reference: mmBERT-small shape, vocab {vocab}, prompt {prompt_len}, "
              f"{new} new tokens, block {block}, {steps} steps, greedy, repetition penalty 1.2")
        with torch.inference_mode():  # warm-up: first calls allocate and pick kernels
            model(input_ids=torch.tensor([prompt + [MASK_ID] * new]))
            ours(model, prompt, exact.replace(steps=2, max_new_tokens=block))
            t_ref, (ref_tokens, ref_nfe) = best_of(lambda: oracle(
                model, prompt, mask_id=MASK_ID, eos_id=EOS_ID, steps=steps, gen_length=new, block_length=block,
                repetition_penalty=1.2), 1)
        t_ours, out = best_of(lambda: ours(model, prompt, exact), 2)
        same = out.sequences[0].tolist() == ref_tokens
        print(f"reference {t_ref:.2f} s ({ref_nfe} forwards, {t_ref / ref_nfe * 1e3:.0f} ms each)")
        print(f"ours      {t_ours:.2f} s ({out.nfe} forwards, {t_ours / out.nfe * 1e3:.0f} ms each)")
        print(f"speed-up  {t_ref / t_ours:.2f}x, tokens identical: {same}")
        x = torch.tensor([prompt + [MASK_ID] * new])
        with torch.inference_mode():
            t_enc, _ = best_of(lambda: model.model(input_ids=x), 3)
        print(f"encoder alone per forward {t_enc * 1e3:.0f} ms: our forward is {t_ours / out.nfe / t_enc:.2f}x the encoder")

        print("\n## 3. approximate modes (same model and prompt; agreement = share of tokens equal to the exact output)")
        print(f"{'mode':28s} {'NFE':>5s} {'time s':>8s} {'speed-up':>9s} {'agreement':>10s}")
        base_seq = out.sequences[0]
        rows = [("exact", model, exact)]
        rows.append(("threshold 0.9", model, exact.replace(threshold=0.9)))
        bf16 = make_fast(random_mmbert("mmbert-small", vocab_size=vocab), "bf16")
        rows.append(("bf16 weights", bf16, exact))
        rows.append(("bf16 + threshold 0.9", bf16, exact.replace(threshold=0.9)))
        rows.append(("dual cache", model, exact.replace(cache="dual")))
        rows.append(("bf16 + dual cache", bf16, exact.replace(cache="dual")))
        int8 = make_fast(random_mmbert("mmbert-small", vocab_size=vocab), "int8")
        rows.append(("int8 dynamic", int8, exact))
        rows.append(("int8 + dual cache", int8, exact.replace(cache="dual")))
        rows.append(("delayed cache", model, exact.replace(cache="delayed")))
        rows.append(("int8 + delayed cache", int8, exact.replace(cache="delayed")))
        for name, m, cfg in rows:
            t, o = best_of(lambda: ours(m, prompt, cfg), 2)
            print(f"{name:28s} {o.nfe:5d} {t:8.2f} {t_ours / t:8.2f}x {agreement(o.sequences[0], base_seq):10.3f}")
        del bf16, int8

    if args.skip_base:
        return
    print("\n## 4. user-facing: one 64-token answer, paper settings (64 steps, block 32, temperature 0.1, "
          "repetition penalty 1.2) on DiffutronLM-0.3B's shape (mmBERT-base, random weights)")
    base = random_mmbert("mmbert-base", vocab_size=vocab)
    paper = SamplerConfig(max_new_tokens=new, steps=steps, block_length=block, stop_at_eos=False)
    x = torch.tensor([prompt + [MASK_ID] * new])
    with torch.inference_mode():
        t_full, _ = best_of(lambda: base(input_ids=x), 2)
        t_enc, _ = best_of(lambda: base.model(input_ids=x), 2)
    print(f"one forward with full logits (reference) {t_full:.2f} s -> ~{t_full * steps:.0f} s per answer; "
          f"encoder alone {t_enc:.2f} s")
    ours(base, prompt, paper.replace(steps=2, max_new_tokens=block))  # warm-up
    t_exact, o = best_of(lambda: ours(base, prompt, paper), 2)
    print(f"ours, exact:                  {t_exact:6.1f} s ({o.nfe} forwards)")
    exact_seq = o.sequences[0]
    backbone.PACKED_HEAD = False  # the same, with the plain output layer (DIFFUTRON_PACKED_HEAD=0)
    t_plain, o = best_of(lambda: ours(base, prompt, paper), 1)
    backbone.PACKED_HEAD = True
    print(f"ours, exact, plain output layer: {t_plain:6.1f} s (the packed one is {t_plain / t_exact:.2f}x faster; "
          f"tokens identical: {o.sequences[0].tolist() == exact_seq.tolist()})")
    t_thr, o = best_of(lambda: ours(base, prompt, paper.replace(threshold=0.9)), 1)
    print(f"ours, threshold 0.9:          {t_thr:6.1f} s ({o.nfe} forwards)")
    t_dual, o = best_of(lambda: ours(base, prompt, paper.replace(cache="dual")), 1)
    print(f"ours, dual cache (fp32):      {t_dual:6.1f} s ({o.nfe} forwards, agreement with exact "
          f"{agreement(o.sequences[0], exact_seq):.3f})")
    fast = paper.replace(threshold=0.9, cache="dual")
    base = make_fast(base, "bf16")
    ours(base, prompt, fast.replace(steps=2, max_new_tokens=block))  # warm-up
    t_fast, o = best_of(lambda: ours(base, prompt, fast), 1)
    print(f"ours, --fast bf16 --cache dual + threshold 0.9: {t_fast:6.1f} s ({o.nfe} forwards, agreement "
          f"{agreement(o.sequences[0], exact_seq):.3f}); bf16 alone below")
    t_bf, o = best_of(lambda: ours(base, prompt, paper.replace(threshold=0.9)), 1)
    print(f"ours, bf16 weights + threshold 0.9 (no cache): {t_bf:6.1f} s ({o.nfe} forwards)")
    del base
    base = make_fast(random_mmbert("mmbert-base", vocab_size=vocab), "int8")
    ours(base, prompt, fast.replace(steps=2, max_new_tokens=block))  # warm-up
    t_int8, o = best_of(lambda: ours(base, prompt, fast), 3)  # a few seconds each: best of 3 on a shared machine
    per_int8 = t_int8 / o.nfe
    print(f"ours, --fast int8 --cache dual + threshold 0.9: {t_int8:6.1f} s ({o.nfe} forwards, agreement "
          f"{agreement(o.sequences[0], exact_seq):.3f})")
    t_del, o = best_of(lambda: ours(base, prompt, fast.replace(cache="delayed")), 3)
    per_del = t_del / o.nfe
    print(f"ours, --fast int8 (+ delayed cache) + threshold 0.9: {t_del:6.1f} s ({o.nfe} forwards, agreement "
          f"{agreement(o.sequences[0], exact_seq):.3f}; {t_int8 / t_del:.2f}x the dual cache's speed)")
    t_ref, o = best_of(lambda: ours(base, prompt, fast.replace(cache="delayed", cache_refresh=2)), 1)
    print(f"ours, --fast int8 --cache-refresh 2 + threshold 0.9: {t_ref:6.1f} s ({o.nfe} forwards, a refresh after "
          f"every 2 window steps)")
    del base

    print(f"\n## 5. the threshold on a trained model: random weights are never 0.9 confident, so part 4 runs all "
          f"{steps} forwards; the embedded model (trained by this project, 8 M parameters) at the paper's settings:")
    from diffutron import DiffusionLM
    from diffutron.lm import default_model_path

    lm = DiffusionLM.from_pretrained(default_model_path())
    settings = SamplerConfig(stop_at_eos=False, threshold=0.9)
    nfe = [c.nfe for p in TRAINED_PROMPTS for c in lm.generate(p, settings)]
    mean = sum(nfe) / len(nfe)
    print(f"forwards per answer over {len(nfe)} prompts: mean {mean:.1f} of {settings.steps} "
          f"(min {min(nfe)}, max {max(nfe)})")
    print(f"estimate at that rate (part 4's time per forward x these forwards): --fast int8 (delayed cache) "
          f"{per_del * mean:.1f} s, --fast int8 --cache dual {per_int8 * mean:.1f} s")


if __name__ == "__main__":
    main()
