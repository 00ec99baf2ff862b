"""The embedded default model: shipped in the package, and reproducible by the tiny-tr recipe."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffutron import DiffusionLM
from diffutron.lm import default_model_path

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "src" / "diffutron" / "embedded" / "tiny-tr"


def test_embedded_model_is_shipped_small_and_default():
    assert default_model_path() == str(EMBEDDED)
    weights = EMBEDDED / "model.safetensors"
    assert weights.stat().st_size <= 40 * 1000 * 1000  # the bound for the shipped weights
    config = json.loads((EMBEDDED / "config.json").read_text())
    assert config["model_type"] == "modernbert" and config["dtype"] == "float16"
    lm = DiffusionLM.from_pretrained()
    assert lm.device.type in ("cpu", "cuda", "mps") and lm.name == "tiny-tr"
    # the toy model's answers are fragments (README); this prompt gets some
    (answer,) = lm.generate("“kitap” sözcüğünü İngilizceye çevir.")
    assert answer.text.strip() and answer.finish_reason in ("stop", "length")
    card = json.loads((EMBEDDED / "card.json").read_text())
    assert [s["name"] for s in card["stages"]] == ["scratch", "cpt", "sft-general", "sft-specific"]
    readme = (EMBEDDED / "README.md").read_text()
    for needle in ("Data sources", "sadedegel", "MIT", "held-out ELBO ppl", "Samples"):
        assert needle in readme


def test_generate_without_model_uses_the_embedded_one():
    r = subprocess.run([sys.executable, "-m", "diffutron", "generate", "--format", "json", "İstanbul nerededir?"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "RANDOM" not in r.stderr
    row = json.loads(r.stdout)
    (same,) = DiffusionLM.from_pretrained(str(EMBEDDED)).generate("İstanbul nerededir?")  # the paper's settings
    assert row["token_ids"] == same.token_ids and row["text"] == same.text and row["nfe"] == same.nfe >= 1


@pytest.mark.slow
def test_quick_recipe_trains_every_stage_and_exports_a_loadable_model(tmp_path, monkeypatch):
    """Downloads the two pinned PyPI sources (skipped, with the reason, when PyPI is unreachable)."""
    from diffutron.corpus.archives import SourceError
    from diffutron.corpus.sources import SOURCES, fetch
    from diffutron.training import run_recipe

    monkeypatch.setenv("DIFFUTRON_CACHE", str(tmp_path / "cache"))
    for source in (s for s in SOURCES if s.registry == "pypi" and s.name in ("sadedegel", "turkish-treebanks")):
        try:
            fetch(source, tmp_path / "cache" / "downloads", timeout=120)
        except SourceError as err:
            pytest.skip(f"PyPI not reachable: {err}")
    monkeypatch.chdir(tmp_path)
    shipped = (EMBEDDED / "model.safetensors").stat().st_mtime_ns
    results = run_recipe(ROOT / "recipes" / "tiny-tr.yaml", quick=True)
    assert [r.output_dir.name for r in results] == ["scratch", "cpt", "sft-general", "sft-specific"]
    export = tmp_path / "runs" / "tiny-tr-quick" / "export"
    card = json.loads((export / "card.json").read_text())
    stages = {s["name"]: s for s in card["stages"]}
    assert stages["cpt"]["method"] == "lora" and stages["cpt"]["lora"]["merge"]
    for name in stages:
        assert stages[name]["heldout_ppl_before"] > 1 and stages[name]["heldout_ppl_after"] > 1
    assert stages["scratch"]["heldout_ppl_after"] < stages["scratch"]["heldout_ppl_before"]
    assert "general_score" in stages["sft-general"]["metrics_before"]
    assert "specific_score" in stages["sft-specific"]["metrics_after"]
    assert card["samples"] and card["sampler"]["steps"] == 64
    lm = DiffusionLM.from_pretrained(export)
    (c,) = lm.generate("Merhaba", max_new_tokens=8, steps=8, block_length=8)
    assert c.completion_tokens <= 8
    assert (EMBEDDED / "model.safetensors").stat().st_mtime_ns == shipped  # --quick never touches the shipped model
