"""scripts/train_tiny_tr.py: each finished stage is published (float16 shards <= 15 MB + one archive
of config, tokenizer and every finished stage's numbers), replacing the previous stage's files."""

from __future__ import annotations

import importlib.util
import json
import tarfile
import time
from pathlib import Path

import pytest

from diffutron.lm import DiffusionLM
from diffutron.training import run_recipe
from tiny_runs import tiny_run_inputs

ROOT = Path(__file__).resolve().parents[2]


def script():
    spec = importlib.util.spec_from_file_location("train_tiny_tr", ROOT / "scripts" / "train_tiny_tr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_finished_stage_replaces_the_published_files(tmp_path, monkeypatch):
    mod = script()
    monkeypatch.setattr(mod, "SHARD", "20KB")  # several shards from a tiny model (49 KB in float16)
    base, corpus = tiny_run_inputs(tmp_path, seed=0, rows=60)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
output_dir: {tmp_path / 'runs'}
defaults: {{progress: false, batch_size: 4, max_steps: 2, save_every: null}}
stages:
  - name: one
    start: {base}
    data: {{train: {corpus}, kind: pretrain, max_length: 16, heldout_fraction: 0.1}}
  - name: two
    start: previous
    data: {{train: {corpus}, kind: pretrain, max_length: 16, heldout_fraction: 0.1}}
""", encoding="utf-8")
    out = tmp_path / "out"
    seen = []
    publisher = mod.Publisher(out, {"began": time.perf_counter(), "device": "cpu", "variant": None, "quick": False})

    def publish(stage, result, metrics):
        publisher(stage, result, metrics)
        seen.append(sorted(p.name for p in out.iterdir()))

    run_recipe(recipe, on_stage_end=publish)
    assert len(seen) == 2 and seen[0] == seen[1]  # the same names, rewritten
    files = sorted(out.iterdir())
    shards = [p for p in files if p.suffix == ".safetensors"]
    assert len(shards) >= 2 and sum(p.stat().st_size for p in shards) < 60_000
    with tarfile.open(out / mod.META) as tar:
        names = set(tar.getnames())
        stages = json.load(tar.extractfile("stages.json"))
        info = json.load(tar.extractfile("run.json"))
    assert {"model/config.json", "model/model.safetensors.index.json", "model/tokenizer.json"} <= names
    assert [s["name"] for s in stages] == ["one", "two"] and info["stage"] == "two"
    assert set(info["shards"]) == {p.name for p in shards} and info["stages_finished"] == ["one", "two"]
    model_dir, stages2, _ = mod._extract(out, tmp_path / "x")
    assert stages2 == stages
    lm = DiffusionLM.from_pretrained(model_dir, device="cpu")
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "float16" and lm.generate("Bugün", steps=2,
                                                                                                     max_new_tokens=2)
    # a shard that is not the archive's stage (a run cut while writing) is refused
    data = bytearray(shards[0].read_bytes())
    data[-1] ^= 1
    shards[0].write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="sha256 differs"):
        mod._extract(out, tmp_path / "y")
