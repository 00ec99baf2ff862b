"""Two processes under torchrun (DDP) train like one process with the doubled batch.

With 2 or more GPUs the processes take one GPU each (NCCL) and the one-process reference runs on the
first GPU; with fewer, CUDA is hidden from the processes, they run DDP over gloo on the CPU, and the
reference trains on the CPU too, so the two runs always compare like with like. Both run in fp32:
the test compares summation orders, which bf16's rounding would swamp.

On CPU, ``accelerate launch`` starts a single process (it expects MPI for multi-CPU), while
``Accelerator`` inside torchrun's processes runs DDP: the test launches the real CLI with torchrun
on a free port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_runs import tiny_run_inputs
from diffutron.training import train
from diffutron.training.config import load_train_config

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    on_gpus = torch.cuda.device_count() >= 2  # else: CPU processes over gloo (one GPU cannot host two ranks)
    tiny_run_inputs(tmp_path, seed=2, rows=160)
    stage = tmp_path / "stage.yaml"
    stage.write_text("max_steps: 8\nlr: 1.0e-2\nwarmup_steps: 1\nlog_every: 2\neval_every: 4\nsave_every: 4\n"
                     "progress: false\nmixed_precision: 'no'\ndata: {max_length: 32, heldout_fraction: 0.1}\n",
                     encoding="utf-8")
    common = ["--model", str(tmp_path / "base"), "--data", str(tmp_path / "corpus.jsonl"), "--config", str(stage)]

    path = [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path))
    if not on_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""  # no CUDA in the processes: the loop then runs DDP over gloo
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "diffutron", "train", *common, "--batch-size", "2", "--output", str(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one = tmp_path / "one"
    config = load_train_config(stage, model=str(tmp_path / "base"), output_dir=str(one), batch_size=4,
                               cpu=not on_gpus, **{"data.train": str(tmp_path / "corpus.jsonl")})
    train(config)

    run_two, run_one = (json.loads((d / "run.json").read_text()) for d in (two, one))
    assert run_two["world_size"] == 2 and run_one["world_size"] == 1
    w2, w1 = load_file(str(two / "model.safetensors")), load_file(str(one / "model.safetensors"))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=2e-5, rtol=1e-4), (k, (w1[k] - w2[k]).abs().max())
    assert any((w1[k] - base[k]).abs().max() > 1e-3 for k in w1)  # both trained

    def metrics(d):
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]

    m2, m1 = metrics(two), metrics(one)
    assert [(r["kind"], r["step"]) for r in m2] == [(r["kind"], r["step"]) for r in m1]
    for a, b in zip(m1, m2):
        key = "loss" if a["kind"] == "train" else "heldout_loss"
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a, b)
        if a["kind"] == "train":
            assert a["tokens"] == b["tokens"]  # tokens of both processes counted
    evals = [r["heldout_loss"] for r in m2 if r["kind"] == "eval"]
    assert evals[-1] < evals[0]
