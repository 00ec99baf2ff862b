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

ROOT = Path(__file__).resolve().parents[2]


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


def test_quick_shrinks_the_metric_and_the_card_but_not_the_cards_sampler():
    full, quick = (load_recipe(ROOT / "recipes" / "tiny-tr.yaml", quick=q) for q in (False, True))
    metrics = [(s.metric.limit, s.metric.max_new_tokens, s.metric.block_length, s.metric.steps)
               for s in quick.stages if s.metric]
    assert metrics == [(8, 16, 16, 8)] * 2
    assert [s.metric.limit for s in full.stages if s.metric] == [210, 210]
    card = quick.export.card
    assert (card.max_documents, card.max_prompts, card.draws, card.timing_repeat) == (4, 2, 1, 1)
    assert (full.export.card.draws, full.export.card.timing_repeat) == (4, 3)
    assert quick.export.prompts == full.export.prompts[:2]
    from diffutron.training.card_metrics import CardSettings
    from diffutron.training.config import build

    with pytest.raises(DiffutronError, match=r"export.card.timing_repeat: 0 must be >= 1"):
        build(CardSettings, {"timing_repeat": 0}, None, "export.card")


def test_shipped_recipe_is_valid_and_holds_the_paper_settings(tmp_path, monkeypatch):
    recipe = load_recipe(ROOT / "recipes" / "diffutron-0.3b.yaml")
    cpt, sft1, sft2 = recipe.stages
    assert cpt.config.model == "jhu-clsp/mmBERT-base" and cpt.config.method == "lora"
    assert (cpt.config.lora.r, cpt.config.lora.alpha, cpt.config.lora.merge) == (256, 256.0, True)
    assert cpt.config.data.train == "diffutron/DiffutronLM-Pretraining-Corpus" and cpt.config.data.max_length == 512
    assert (sft1.config.epochs, sft1.config.batch_size, sft1.config.lr, sft1.config.data.max_length) == (20, 16, 1e-4, 256)
    assert sft1.config.method == "full" and sft1.config.data.heldout_fraction == 0.1 and sft1.config.data.split_seed == 42
    assert sft2.start == "previous" and "InstrucTurca" in sft2.config.data.train
    # the reference's training (the authors' dLLM fork): padding to the batch's longest row with
    # length grouping, Alpaca fields stripped each, LoRA on all-linear as peft resolves it
    for sft in (sft1, sft2):
        assert sft.config.data.padding == "longest_as_target" and sft.config.data.group_by_length
        assert sft.config.data.pad_weight == 1.0
    assert sft1.config.data.format == "alpaca" and sft1.config.data.alpaca_strip
    assert cpt.config.lora.target_modules == "all-linear"
    from diffutron.tiny import tiny_model, tiny_tokenizer
    from diffutron.training import LoraSettings, apply_lora

    wrapped = apply_lora(tiny_model(tiny_tokenizer()), LoraSettings(r=2, target_modules=cpt.config.lora.target_modules))
    adapted = {name.split(".base_layer")[0].split("base_model.model.")[-1]
               for name, _ in wrapped.named_modules() if name.endswith(".base_layer")}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"Wqkv", "Wo", "Wi", "dense"}
    assert "head.dense" in adapted and not any(n.endswith("decoder") for n in adapted)
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

    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")  # the "Stage settings" table
    for cls, prefix in ((TrainConfig, ""), (DataConfig, "data."), (LoraSettings, "lora.")):
        for f in dataclasses.fields(cls):
            if f.name not in ("data", "lora"):
                assert f"`{prefix}{f.name}`" in text, f"docs/training.md does not describe {prefix}{f.name}"


def test_a_variant_merges_into_the_recipe_key_by_key(files, tmp_path):
    body = two_stage(files, tmp_path / "runs") + """
variants:
  small:
    defaults: {batch_size: 4}
    stages:
      cpt: {lora: {r: 4}, max_steps: 6}
      sft: {data: {max_length: 24}}
"""
    recipe = write(tmp_path / "recipe.yaml", body)
    base, small = load_recipe(recipe), load_recipe(recipe, variant="small")
    assert base.variant is None and small.variant == "small"
    assert small.output_dir == Path(str(tmp_path / "runs") + "-small")
    cpt, sft = small.stages
    assert (cpt.config.lora.r, cpt.config.lora.alpha, cpt.config.max_steps, cpt.config.batch_size) == (4, 16.0, 6, 4)
    assert (sft.config.data.max_length, sft.config.data.kind, sft.config.max_steps) == (24, "instruct", 20)
    assert [s.config.batch_size for s in base.stages] == [8, 8]
    assert load_recipe(recipe, variant="auto").variant is None  # auto picks only a variant named cpu
    with pytest.raises(DiffutronError, match="no variant 'big'.*it has: small"):
        load_recipe(recipe, variant="big")
    bad = write(tmp_path / "bad.yaml", two_stage(files, tmp_path / "runs") + "variants:\n  x:\n    stages:\n      nope: {}\n")
    with pytest.raises(DiffutronError, match="no stage 'nope'"):
        load_recipe(bad, variant="x")


def test_stage_card_metrics_callback_deadline_and_card(files, tmp_path, monkeypatch):
    """With export.card, every finished stage gets its card numbers (perplexity per word, the prompt
    set's answers); on_stage_end sees them; the export writes them into the card; a deadline that has
    passed starts no stage."""
    import time

    dic = write(tmp_path / "tr_TR.dic", "3\nbugün\nhava\nkitap\n")
    monkeypatch.setenv("DIFFUTRON_LEXICON", str(dic))
    prompts = write(tmp_path / "prompts.jsonl", '{"prompt": "Bugün hava nasıl?", "kind": "open"}\n'
                                                 '{"prompt": "Kitap hakkında bir cümle yaz.", "kind": "task"}\n')
    body = two_stage(files, tmp_path / "runs") + f"""
export:
  dir: {tmp_path / 'export'}
  card: {{perplexity_data: {files / 'corpus.jsonl'}, prompt_set: {prompts}, max_length: 32, draws: 2,
          max_documents: 20}}
"""
    recipe = write(tmp_path / "recipe.yaml", body)
    assert run_recipe(recipe, deadline=time.perf_counter() - 1) == []
    seen = []
    results = run_recipe(recipe, on_stage_end=lambda stage, result, m: seen.append((stage.name, m)))
    assert [name for name, _ in seen] == ["cpt", "sft"] and len(results) == 2
    for (name, m), result in zip(seen, results):
        assert m == json.loads((result.output_dir / "card_metrics.json").read_text())
        p = m["perplexity"]
        assert p["words"] > 0 and p["ppl_per_word"] == pytest.approx(torch.exp(torch.tensor(p["loss_per_word"])).item())
        assert p["loss_per_word"] == pytest.approx(p["loss"] * p["tokens"] / p["words"])
        ps = m["prompt_set"]
        assert ps["prompts"] == 2 and ps["open_prompts"] == 1 and len(ps["answers"]) == 2
        assert set(ps["turkish_share"]) == {"share", "words", "turkish"} and m["train_seconds"] > 0
    card = json.loads((tmp_path / "export" / "card.json").read_text())
    assert [s["name"] for s in card["stages"]] == ["cpt", "sft"] and card["stages"][0]["card"] == seen[0][1]
    assert card["final"]["prompt_set"]["prompts"] == 2 and card["final"]["answer_time"]["seconds"] > 0
    readme = (tmp_path / "export" / "README.md").read_text()
    for needle in ("## Numbers", "What it cannot do", "perplexity per word", "Turkish-word share", "tr_TR.dic"):
        assert needle in readme
    # a second run skips the finished stages and keeps their numbers
    again = []
    run_recipe(recipe, on_stage_end=lambda stage, result, m: again.append(m))
    assert again == [m for _, m in seen]


def test_shipped_tiny_tr_recipe_sizes_its_two_variants():
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    def params(stage) -> int:
        cfg = ModernBertConfig(**{k: v for k, v in stage.config.init.config.items() if k != "model_type"},
                               vocab_size=16384, pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=2,
                               sep_token_id=1)
        with torch.device("meta"):
            return sum(p.numel() for p in ModernBertForMaskedLM(cfg).parameters())

    gpu, cpu = load_recipe(ROOT / "recipes" / "tiny-tr.yaml"), load_recipe(ROOT / "recipes" / "tiny-tr.yaml", variant="cpu")
    for recipe in (gpu, cpu):
        assert [s.name for s in recipe.stages] == ["scratch", "cpt", "sft-general", "sft-specific"]
        scratch, cpt, general, specific = recipe.stages
        assert scratch.config.init is not None and cpt.config.method == "lora" and cpt.config.lora.merge
        assert scratch.config.init.config["mlp_dropout"] > 0 and scratch.config.epochs >= 3
        assert general.metric.tasks == "general" and specific.metric.tasks == "specific"
        assert recipe.export.card.perplexity_data.endswith("cpt/validation.jsonl")
    assert 15e6 <= params(gpu.stages[0]) <= 25e6 and params(gpu.stages[0]) * 2 <= 40e6  # fp16 <= 40 MB
    assert params(cpu.stages[0]) <= 15e6 and cpu.output_dir != gpu.output_dir
    assert cli_main(["recipe", "check", str(ROOT / "recipes" / "tiny-tr.yaml"), "--variant", "cpu"]) == 0
