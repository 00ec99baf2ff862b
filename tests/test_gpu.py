"""What only a CUDA machine can check (every test is skipped without CUDA): fp32 decoding on the GPU
gives the CPU's tokens, the engine's CUDA graphs (and torch.compile) give the eager loop's, --fast
there means bf16 weights, a bf16 training stage runs on the GPU, and
the FSDP and DeepSpeed ZeRO-2 accelerate configs train with one process.

On the GPU machine: ``bash .device/on-gpu.sh tests tests/test_gpu.py tests/training/test_ddp.py`` (DeepSpeed
comes from ``scripts/gpu-extra-wheels.sh``; without it that test is skipped with its reason).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffutron import SamplerConfig
from diffutron.cli import main
from diffutron.lm import DiffusionLM
from tiny_runs import tiny_run_inputs
from diffutron.training import DataConfig, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
CUDA = "cuda"
LAUNCH_EXTRA: list[str] = []  # more `accelerate launch` flags (none on a GPU)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [
    "Çay",
    "Türkiye'nin başkenti neresidir?",
    [{"role": "system", "content": "Kısa cevap ver."},
     {"role": "user", "content": "İstanbul Boğazı iki kıtayı birbirine bağlar. Bugün hava çok güzel, ne yapalım?"}],
]


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    """A tiny ModernBERT directory and a small pre-training corpus (seeded)."""
    return tiny_run_inputs(tmp_path_factory.mktemp("gpu-train"), seed=1, rows=160)


def _env() -> dict:
    path = [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# ------------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=0.5, seed=7)],
                         ids=["greedy", "sampled"])
def test_fp32_decoding_on_cuda_equals_the_cpu_token_for_token(lm, settings):
    """Same float32 weights on both devices; the token draws come from per-row CPU generators, so a
    seeded sampled run must match too."""
    gpu = DiffusionLM(copy.deepcopy(lm.model).to(CUDA), lm.tokenizer, name="tiny")
    assert gpu.device.type == torch.device(CUDA).type and gpu.model.dtype == torch.float32
    config = SamplerConfig(max_new_tokens=24, steps=24, block_length=8, repetition_penalty=1.2, **settings)
    want = lm.generate(PROMPTS, config)
    got = gpu.generate(PROMPTS, config)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [(c.finish_reason, c.nfe) for c in got] == [(c.finish_reason, c.nfe) for c in want]
    assert sum(c.completion_tokens for c in want) >= 8  # something was decoded
    for prompt, c in zip(PROMPTS, want):  # each row alone (its seed: config.seed) as in the batch
        if isinstance(prompt, str) and settings["temperature"] == 0:
            assert gpu.generate(prompt, config)[0].token_ids == c.token_ids


ENGINE_SETTINGS = [dict(temperature=0.0), dict(temperature=0.7, top_p=0.9, seed=3), dict(temperature=0.0, cache="dual"),
                   dict(temperature=0.0, threshold=0.3), dict(temperature=0.0, cfg_scale=1.0)]


@pytest.mark.parametrize("settings", ENGINE_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_cuda_graphs_and_compiled_steps_decode_as_the_eager_loop(lm, settings):
    """float32 on CUDA: the engine's steps replayed from CUDA graphs, with and without torch.compile,
    give the eager loop's tokens (ragged prompts, early stops retiring rows between blocks)."""
    gpu = DiffusionLM(copy.deepcopy(lm.model).to(CUDA), lm.tokenizer, name="tiny")
    config = SamplerConfig(max_new_tokens=24, steps=24, block_length=8, repetition_penalty=1.2, **settings)
    want = gpu.generate(PROMPTS, config)
    for inductor in (False, True):
        if inductor and settings.get("cfg_scale"):
            continue  # one compiled configuration per cache kind is enough here
        gpu.compile(inductor=inductor)
        got = gpu.generate(PROMPTS, config)
        assert [c.token_ids for c in got] == [c.token_ids for c in want], inductor
        assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
        engine = gpu.engine_for(config, [[1]])
        assert engine is not None and engine.graphs and any(lay.graphs for lay in engine.layouts.values())
        assert gpu.compile_seconds > 0
        gpu.compile(False)


def test_fast_on_cuda_means_bf16_and_int8_is_refused_in_one_line(saved_model_dir, capsys):
    lm = DiffusionLM.from_pretrained(saved_model_dir, device=CUDA).make_fast()
    assert lm.model.dtype == torch.bfloat16 and lm.defaults.cache == "dual"
    (c,) = lm.generate("Merhaba", max_new_tokens=8, steps=8, block_length=4, stop_at_eos=False)
    assert c.nfe == 8 and c.completion_tokens <= 8
    rc = main(["generate", "--model", str(saved_model_dir), "--device", CUDA, "--fast", "--format", "json",
               "--max-new-tokens", "8", "--steps", "8", "--block-length", "4", "Merhaba"])
    assert rc == 0 and len(json.loads(capsys.readouterr().out)["token_ids"]) <= 8
    rc = main(["generate", "--model", str(saved_model_dir), "--device", CUDA, "--fast-mode", "int8", "Merhaba"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "runs on CPU only" in err[0] and "--fast-mode bf16" in err[0], err


# ------------------------------------------------------------------------------------------ training
def test_a_bf16_training_stage_runs_on_cuda(run_inputs, tmp_path, capfd):
    base, corpus = run_inputs
    seen = []

    def probe(lm, step):  # inside the stage: where the model runs and the dtype its layers compute in
        out = {}

        def note(module, args, output) -> None:
            out.setdefault("dtype", output.dtype)

        layer = next(m for m in lm.model.modules() if isinstance(m, torch.nn.Linear))
        hook = layer.register_forward_hook(note)
        try:
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([[5, 6, 7, 8]], device=lm.device))
        finally:
            hook.remove()
        seen.append((lm.device.type, out["dtype"]))
        return {}

    out = tmp_path / "bf16"
    result = train(TrainConfig(model=str(base), output_dir=str(out), max_steps=12, batch_size=8, lr=1e-2,
                               warmup_steps=1, log_every=4, eval_every=6, save_every=None, progress=False,
                               mixed_precision="bf16",
                               data=DataConfig(train=str(corpus), max_length=32, heldout_fraction=0.1)),
                   evaluators=[probe])
    assert "mixed precision bf16" in capfd.readouterr().err
    assert seen and set(seen) == {(torch.device(CUDA).type, torch.bfloat16)}, seen
    losses = [r["heldout_loss"] for r in result.heldout]
    assert [r["step"] for r in result.heldout] == [0, 6, 12]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert result.final_loss is not None and math.isfinite(result.final_loss)
    assert json.loads((out / "run.json").read_text())["config"]["mixed_precision"] == "bf16"
    trained, start = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert trained.keys() == start.keys() and any(not torch.equal(trained[k], start[k]) for k in start)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["8gpu-fsdp.yaml", "2x8gpu-deepspeed-zero2.yaml"])
def test_accelerate_launch_trains_with_one_process(run_inputs, tmp_path, config):
    """The shipped configs as docs/training.md runs them, shrunk to one process on one machine."""
    base, corpus = run_inputs
    env = _env()
    if "deepspeed" in config:
        probe = subprocess.run([sys.executable, "-c", "import deepspeed"], env=env, capture_output=True, text=True,
                               timeout=180)
        if probe.returncode != 0:
            why = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
            pytest.skip(f"DeepSpeed ZeRO-2 unverified: `import deepspeed` fails here ({why}); "
                        "scripts/gpu-extra-wheels.sh carries a wheel to the GPU machine")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate" / config),
           "--num_processes", "1", "--num_machines", "1", "--machine_rank", "0", "--main_process_port", "0",
           *LAUNCH_EXTRA,
           "-m", "diffutron", "train", "--model", str(base), "--data", str(corpus), "--output", str(out),
           "--max-steps", "4", "--batch-size", "4", "--max-length", "32", "--lr", "1e-2", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "(1 process, mixed precision bf16)" in proc.stderr, proc.stderr[-2000:]
    assert json.loads((out / "train_state.json").read_text())["finished"] is True
    trained, start = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert trained.keys() == start.keys()  # whole, gathered from shards, the tied output layer once
    assert all(trained[k].shape == start[k].shape and trained[k].dtype == start[k].dtype for k in start)  # float32
    assert all(torch.isfinite(trained[k]).all() for k in start)
    assert any((trained[k].float() - start[k].float()).abs().max() > 1e-4 for k in start)  # it trained
    (c,) = DiffusionLM.from_pretrained(out, device="cpu").generate("Merhaba", max_new_tokens=4, steps=4)
    assert c.completion_tokens <= 4
