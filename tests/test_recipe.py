"""Progressive recipes: a LoRA CPT -> full SFT pipeline, training from scratch, validation, resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from diffutron.cli import main as cli_main
from diffutron.errors import DiffutronError
from diffutron.lm import DiffusionLM
from diffutron.tiny import SAMPLE_TEXTS, tiny_model, tiny_tokenizer
from diffutron.training import load_recipe, run_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=1)
    with torch.no_grad():  # spread the random logits (the default init keeps them near uniform, and
        g = torch.Generator().manual_seed(0)  # LoRA, which trains no norm or bias, could barely move them)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3, generator=g)
    DiffusionLM(model, tok).save_pretrained(d / "base")
    tok.save_pretrained(d / "tokenizer")
    rng = random.Random(1)
    with open(d / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for _ in range(240):
            fh.write(json.dumps({"text": " ".join(rng.sample(SAMPLE_TEXTS, 3))}, ensure_ascii=False) + "\n")
    rows = [{"instruction": SAMPLE_TEXTS[i % 6], "input": "", "output": SAMPLE_TEXTS[6 + i % 6]} for i in range(80)]
    (d / "alpaca.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, ensure_ascii=False).encode("utf-8"))
    return d


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def two_stage(files, out) -> str:
    return f"""
name: tiny-pipeline
output_dir: {out}
defaults:
  seed: 3
  progress: false
  log_every: 5
  batch_size: 8
stages:
  - name: cpt
    start: {files / 'base'}
    data: {{train: {files / 'corpus.jsonl'}, kind: pretrain, max_length: 32, heldout_fraction: 0.1}}
    method: lora
    lora: {{r: 8, alpha: 16, dropout: 0.0, merge: true}}
    max_steps: 30
    lr: 2.0e-2
    eval_every: 15
  - name: sft
    start: previous
    data: {{train: {files / 'alpaca.json'}, kind: instruct, max_length: 40, heldout_fraction: 0.1, split_seed: 42}}
    method: full
    max_steps: 20
    lr: 1.0e-2
    eval_every: 10
"""


def test_lora_cpt_then_full_sft_runs_end_to_end_and_heldout_loss_falls(files, tmp_path):
    out = tmp_path / "runs"
    recipe = write(tmp_path / "recipe.yaml", two_stage(files, out))
    calls = []

    def answer_length(lm, step):
        calls.append(step)
        return {"answer_tokens": float(lm.generate(SAMPLE_TEXTS[0], steps=4, max_new_tokens=4)[0].completion_tokens)}

    cpt, sft = run_recipe(recipe, evaluators={"sft": [answer_length]})
    for result in (cpt, sft):
        losses = [r["heldout_loss"] for r in result.heldout]
        assert len(losses) == 3 and losses[-1] < losses[0] - 0.2, losses
    assert calls == [0, 10, 20] and all("eval/answer_tokens" in r for r in sft.heldout)
    # stage 1 was merged into a plain checkpoint; stage 2 trained all of its weights from it
    assert (out / "cpt" / "model.safetensors").is_file() and not (out / "cpt" / "adapter_config.json").exists()
    record = json.loads((out / "sft" / "diffutron_training.json").read_text())
    assert record["start"] == str((out / "cpt").resolve()) and record["saved_as"] == "full"
    assert record["data_report"]["formats"] == {"alpaca": 80} and record["data_report"]["heldout_examples"] == 8
    assert DiffusionLM.from_pretrained(out / "sft", device="cpu").generate("Bugün hava", steps=2, max_new_tokens=2)
    # a second run skips both finished stages
    again = run_recipe(recipe)
    assert all(r.already_finished for r in again) and again[1].heldout[-1] == sft.heldout[-1]


def test_stages_in_fresh_processes_train_exactly_what_one_process_trains(files, tmp_path):
    """The CLI runs each stage in a spawned process (memory given back between stages): same
    held-out numbers and bit-identical weights as the stages run in this process."""
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    isolated = run_recipe(write(tmp_path / "a.yaml", two_stage(files, a)), isolate=True)
    inline = run_recipe(write(tmp_path / "b.yaml", two_stage(files, b)), isolate=False)
    assert [r.heldout for r in isolated] == [r.heldout for r in inline] and len(isolated[1].heldout) == 3
    wa, wb = load_file(str(a / "sft" / "model.safetensors")), load_file(str(b / "sft" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_an_isolated_stage_reports_its_error_as_one_line(tmp_path):
    from diffutron.training import TrainConfig
    from diffutron.training.recipe import _run_isolated

    with pytest.raises(DiffutronError, match=r"^data\.train: missing"):
        _run_isolated(TrainConfig(output_dir=str(tmp_path / "x"), model="m"), False, None)


def test_a_stage_trains_a_fresh_model_from_a_config_and_a_tokenizer(files, tmp_path):
    out = tmp_path / "scratch"
    recipe = write(tmp_path / "scratch.yaml", f"""
output_dir: {out}
stages:
  - name: stage0
    start:
      config: {{model_type: modernbert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2,
               intermediate_size: 64, max_position_embeddings: 64, global_attn_every_n_layers: 2, local_attention: 16}}
      tokenizer: {files / 'tokenizer'}
    data: {{train: {files / 'corpus.jsonl'}, max_length: 32, heldout_fraction: 0.1}}
    max_steps: 20
    lr: 1.0e-2
    batch_size: 8
    progress: false
""")
    (result,) = run_recipe(recipe)
    assert result.heldout[-1]["heldout_loss"] < result.heldout[0]["heldout_loss"]
    lm = DiffusionLM.from_pretrained(out / "stage0", device="cpu")
    assert lm.model.config.vocab_size == len(lm.tokenizer) and lm.model.config.hidden_size == 32
    assert lm.context_length == 64
    assert json.loads((out / "stage0" / "diffutron_training.json").read_text())["start"] == "a fresh random model"


@pytest.mark.parametrize("body, message", [
    ("output_dir: OUT\nstages:\n  - name: a\n    start: BASE\n    data: {train: CORPUS}\n    learning_rate: 0.1\n",
     r"recipe\.yaml:6: stages\[0\]\.learning_rate: unknown key \(did you mean 'lr'\?\)"),
    ("output_dir: OUT\nstage:\n  - name: a\n", r"recipe\.yaml:2: stage: unknown key \(did you mean 'stages'\?\)"),
    ("output_dir: OUT\nstages:\n  - name: a\n    start: previous\n    data: {train: CORPUS}\n",
     r"recipe\.yaml:4: stages\[0\]\.start: the first stage has no previous stage"),
    ("output_dir: OUT\nstages:\n  - name: a\n    start: ./no/such/model\n    data: {train: CORPUS}\n",
     r"recipe\.yaml:4: stages\[0\]\.start: start model directory \./no/such/model does not exist"),
    ("output_dir: OUT\nstages:\n  - name: a\n    start: BASE\n    data: {train: missing.jsonl}\n",
     r"recipe\.yaml:5: stages\[0\]\.data\.train: data file missing\.jsonl does not exist"),
    ("output_dir: OUT\nstages:\n  - name: a\n    start: BASE\n    data: {train: CORPUS}\n    max_steps: many\n",
     r"recipe\.yaml:6: stages\[0\]\.max_steps: expected int or null, got str 'many'"),
    ("output_dir: OUT\ndefaults:\n  batch: 4\nstages:\n  - name: a\n    start: BASE\n    data: {train: CORPUS}\n",
     r"recipe\.yaml:3: defaults\.batch: unknown key"),
    ("output_dir: OUT\nstages:\n  - name: a\n    start: BASE\n    data: {train: CORPUS}\n  - name: a\n    start: previous\n"
     "    data: {train: CORPUS}\n", r"recipe\.yaml:6: stages\[1\]\.name: 'a' is used by an earlier stage"),
    ("output_dir: OUT\nstages:\n  - name: a\n    start: {config: {hidden_size: 8}, tokenizer: BASE}\n    method: lora\n"
     "    data: {train: CORPUS}\n", r"stages\[0\]\.method: a fresh model trains with method: full"),
    ("output_dir: OUT\nstages:\n  - name: a\n    start: BASE\n    data: {train: CORPUS, padding: left}\n",
     r"recipe\.yaml:5: stages\[0\]\.data\.padding: 'left' is not one of pad_as_target, exclude"),
])
def test_invalid_recipes_fail_before_anything_runs(files, tmp_path, body, message, capsys):
    out = tmp_path / "out"
    body = body.replace("OUT", str(out)).replace("BASE", str(files / "base")).replace("CORPUS", str(files / "corpus.jsonl"))
    recipe = write(tmp_path / "recipe.yaml", body)
    with pytest.raises(DiffutronError, match=message):
        load_recipe(recipe)
    assert cli_main(["recipe", "run", str(recipe)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not out.exists()


def test_quick_shrinks_every_stage_and_writes_elsewhere(files, tmp_path):
    recipe = write(tmp_path / "recipe.yaml", two_stage(files, tmp_path / "runs") + "quick:\n  max_steps: 3\n")
    full, quick = load_recipe(recipe), load_recipe(recipe, quick=True)
    assert [s.config.max_steps for s in full.stages] == [30, 20]
    assert [s.config.max_steps for s in quick.stages] == [3, 3]
    assert all(s.config.batch_size == 2 and s.config.data.max_rows == 200 for s in quick.stages)
    assert quick.output_dir == Path(str(tmp_path / "runs") + "-quick")
    assert quick.stages[1].config.model == str(quick.output_dir / "cpt")
    assert quick.stages[0].config.lora.r == 8  # quick shrinks the run, not the method


def test_shipped_recipe_is_valid_and_holds_the_paper_settings(tmp_path, monkeypatch):
    recipe = load_recipe(ROOT / "recipes" / "diffutron-0.3b.yaml")
    cpt, sft1, sft2 = recipe.stages
    assert cpt.config.model == "jhu-clsp/mmBERT-base" and cpt.config.method == "lora"
    assert (cpt.config.lora.r, cpt.config.lora.alpha, cpt.config.lora.merge) == (256, 256.0, True)
    assert cpt.config.data.train == "diffutron/DiffutronLM-Pretraining-Corpus" and cpt.config.data.max_length == 512
    assert (sft1.config.epochs, sft1.config.batch_size, sft1.config.lr, sft1.config.data.max_length) == (20, 16, 1e-4, 256)
    assert sft1.config.method == "full" and sft1.config.data.heldout_fraction == 0.1 and sft1.config.data.split_seed == 42
    assert sft2.start == "previous" and "InstrucTurca" in sft2.config.data.train
    assert cli_main(["recipe", "check", str(ROOT / "recipes" / "diffutron-0.3b.yaml")]) == 0


def test_an_interrupted_stage_needs_resume_and_then_continues(files, tmp_path, capsys):
    out = tmp_path / "runs"
    recipe = write(tmp_path / "r.yaml", f"""
output_dir: {out}
stages:
  - name: only
    start: {files / 'base'}
    data: {{train: {files / 'corpus.jsonl'}, max_length: 32, heldout_fraction: 0.0}}
    max_steps: 4
    save_every: 2
    progress: false
""")
    run_recipe(recipe)
    (out / "only" / "train_state.json").unlink()  # as if killed after its last checkpoint
    assert cli_main(["recipe", "run", str(recipe)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert cli_main(["recipe", "run", str(recipe), "--resume"]) == 0
    assert json.loads((out / "only" / "train_state.json").read_text())["finished"]


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in sorted((ROOT / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        kinds[path.name] = (str(config.distributed_type).split(".")[-1], config.num_processes, config.mixed_precision)
    assert kinds == {"1gpu.yaml": ("NO", 1, "bf16"), "8gpu-ddp.yaml": ("MULTI_GPU", 8, "bf16"),
                     "2x8gpu-deepspeed-zero2.yaml": ("DEEPSPEED", 16, "bf16"), "8gpu-fsdp.yaml": ("FSDP", 8, "bf16")}


def test_docs_describe_every_stage_setting():
    import dataclasses

    from diffutron.training import DataConfig, LoraSettings, TrainConfig

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for cls, prefix in ((TrainConfig, ""), (DataConfig, "data."), (LoraSettings, "lora.")):
        for f in dataclasses.fields(cls):
            if f.name not in ("data", "lora"):
                assert f"`{prefix}{f.name}`" in text, f"README.md does not describe {prefix}{f.name}"
