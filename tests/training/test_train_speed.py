"""Training-step speed paths: the v2 fused loss, compiled encoder layers, the device benchmark."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from diffutron import objective
from diffutron.errors import DiffutronError
from diffutron.objective import mdlm_loss
from diffutron.training.compiled import compile_encoder_layers, encoder_layers
from diffutron.tiny import tiny_model, tiny_tokenizer
from tiny_runs import loss_batch, tiny_run_inputs
from diffutron.training import DataConfig, LoraSettings, TrainConfig, apply_lora, train

ROOT = Path(__file__).resolve().parents[2]


def _model(tok, arch="modernbert", lora=False):
    model = tiny_model(tok, arch=arch, seed=3).eval()  # no dropout: every path sees the same network
    if lora:
        model = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    return model


def _loss_and_grads(model, fn, tok, batch, *, autocast=False, **kw):
    ids, maskable, att, t, noise = batch
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(model, ids, maskable, mask_token_id=tok.mask_token_id, attention_mask=att, t=t, noise_mask=noise,
                  **kw)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch, lora, autocast, weighting", [
    ("modernbert", False, False, "elbo"), ("modernbert", True, False, "flat"), ("bert", False, False, "elbo"),
    ("modernbert", False, True, "elbo"), ("modernbert", True, True, "elbo")])
@pytest.mark.parametrize("impl", ["v2", "v2-compiled"])
def test_v2_fused_loss_equals_mdlm_loss(arch, lora, autocast, weighting, impl, monkeypatch):
    monkeypatch.setattr(objective, "_COMPILE_BACKEND", "aot_eager")  # the traced graph, no code generation
    tok = tiny_tokenizer()
    model = _model(tok, arch, lora)
    batch = loss_batch(tok)
    weight = torch.rand(batch[0].shape, generator=torch.Generator().manual_seed(5))
    ref, ref_g = _loss_and_grads(model, mdlm_loss, tok, batch, autocast=autocast, weighting=weighting,
                                 target_weight=weight)
    monkeypatch.setattr(objective, "_V2_CHUNK_ELEMENTS", len(tok) * 4)  # blocks of <= 4 rows: several, balanced
    monkeypatch.setattr(objective, "_V2_SUB_ELEMENTS", len(tok) * 3)  # fp32 sub-blocks of 3 rows (one left over)
    got, got_g = _loss_and_grads(model, objective.fused_mdlm_loss, tok, batch, autocast=autocast, weighting=weighting,
                                 target_weight=weight, impl=impl)
    assert got == pytest.approx(ref, rel=1e-5)
    assert ref_g.keys() == got_g.keys() and ref_g
    for n in ref_g:
        if autocast:  # mdlm_loss rounds the output layer's whole gradient to bf16; v2 sums its blocks in fp32
            scale = ref_g[n].abs().max().clamp(min=1e-12)
            assert float((ref_g[n] - got_g[n]).abs().max() / scale) < 1e-2, n
        else:
            assert torch.allclose(ref_g[n], got_g[n], atol=1e-6, rtol=1e-4), n
    assert "forward" not in vars(objective.output_layer(model))  # the swap is undone


def test_v2_with_inductor_equals_v2_eager():
    tok = tiny_tokenizer()
    model = _model(tok)
    batch = loss_batch(tok, seed=1)
    ref, ref_g = _loss_and_grads(model, objective.fused_mdlm_loss, tok, batch, impl="v2")
    got, got_g = _loss_and_grads(model, objective.fused_mdlm_loss, tok, batch, impl="v2-compiled")
    assert got == pytest.approx(ref, rel=1e-5)
    for n in ref_g:
        assert torch.allclose(ref_g[n], got_g[n], atol=1e-6, rtol=1e-4), n


def test_v2_with_nothing_masked_is_an_exact_zero_that_reaches_every_parameter():
    tok = tiny_tokenizer()
    model = _model(tok, lora=True)
    ids, maskable, att, t, noise = loss_batch(tok)
    zero = objective.fused_mdlm_loss(model, ids, maskable, mask_token_id=tok.mask_token_id, t=t,
                              noise_mask=torch.zeros_like(noise), impl="v2")
    zero.backward()
    assert zero.item() == 0.0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_impl_names_blocks_and_settings():
    assert objective.resolve_impl(None, "cpu") == objective.AUTO_IMPL["cpu"] == "v1"  # CPU keeps the measured v1
    assert objective.resolve_impl("auto", torch.device("cpu")) == "v1"
    assert objective.resolve_impl("v2-compiled", "cpu") == "v2-compiled"
    with pytest.raises(DiffutronError, match="unknown fused loss implementation 'v3'"):
        objective.resolve_impl("v3", "cpu")
    rows = objective._V2_CHUNK_ELEMENTS // 256000
    assert objective.v2_chunk(100, 256000) == 100 and objective.v2_chunk(0, 256000) == 1
    assert objective.v2_chunk(rows + 1, 256000) == (rows + 2) // 2  # two balanced blocks, not rows + 1
    assert all(objective.v2_chunk(n, 256000) <= rows for n in (rows, 3 * rows - 1, 4096, 10_000))
    assert TrainConfig().fused_loss_impl == "auto" and TrainConfig().compile is False
    with pytest.raises(DiffutronError, match="fused_loss_impl"):
        TrainConfig(fused_loss_impl="fast")


@pytest.mark.parametrize("lora", [False, True])
def test_compiled_layers_give_eager_losses_and_gradients_and_undo(lora):
    from torch._dynamo.utils import counters

    tok = tiny_tokenizer()
    model = _model(tok, lora=lora).train()  # the tiny model has no dropout: compiled == eager
    batch = loss_batch(tok, seed=2)
    ref, ref_g = _loss_and_grads(model, objective.fused_mdlm_loss, tok, batch, impl="v2")
    torch._dynamo.reset()
    counters.clear()
    undo = compile_encoder_layers(model, backend="aot_eager")  # the traced graph, no code generation
    layers = encoder_layers(model)
    assert len(layers) == 2 and all("forward" in vars(layer) for layer in layers)
    got, got_g = _loss_and_grads(model, objective.fused_mdlm_loss, tok, batch, impl="v2")
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the layers ran compiled
    assert got == pytest.approx(ref, rel=1e-6)
    for n in ref_g:
        assert torch.allclose(ref_g[n], got_g[n], atol=1e-6, rtol=1e-5), n
    model.eval()  # evaluation runs the eager layers: nothing new is compiled
    with torch.no_grad():
        objective.fused_mdlm_loss(model, *batch[:2], mask_token_id=tok.mask_token_id, t=batch[3], noise_mask=batch[4])
    assert counters["stats"]["unique_graphs"] == graphs
    undo()
    assert not any("forward" in vars(layer) for layer in layers)


def test_compile_refuses_a_model_without_known_layers():
    with pytest.raises(DiffutronError, match="encoder layers"):
        compile_encoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):

    d = tmp_path_factory.mktemp("speed")
    tiny_run_inputs(d, seed=0, rows=64)
    return d


def _stage(files, out, **kw) -> TrainConfig:
    return TrainConfig(model=str(files / "base"), output_dir=str(out), max_steps=4, batch_size=4, lr=1e-2,
                       warmup_steps=1, log_every=1, save_every=None, progress=False, eval_at_start=False,
                       mixed_precision="no", tensorboard=False, cpu=True,
                       data=DataConfig(train=str(files / "corpus.jsonl"), max_length=32, heldout_fraction=0.0), **kw)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r.get("kind") == "train"]


@pytest.mark.slow
def test_compile_setting_trains_as_eager_on_cpu(run_files, tmp_path):
    """``compile: true`` (inductor, CPU) and ``fused_loss_impl: v2`` train as the eager v1 stage does."""
    from safetensors.torch import load_file

    train(_stage(run_files, tmp_path / "eager"))
    train(_stage(run_files, tmp_path / "compiled", compile=True, fused_loss_impl="v2"))
    a, b = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=1e-4)
    wa, wb = load_file(str(tmp_path / "eager" / "model.safetensors")), load_file(
        str(tmp_path / "compiled" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-4, rtol=1e-3), k
    assert not any(torch._dynamo.utils.counters["recompiles"].values()) if "recompiles" in \
        torch._dynamo.utils.counters else True


def test_benchmark_flop_count_matches_a_hand_count():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    train_step = importlib.import_module("train_step")

    class Cfg:  # DiffutronLM-0.3B
        hidden_size, intermediate_size, num_hidden_layers, vocab_size = 768, 1152, 22, 256000
        local_attention, global_attn_every_n_layers = 128, 3
        layer_types = None

    d, n, V, T, N = 768, 22, 256000, 16 * 512, 4096
    linear = T * n * 2 * (768 * 2304 + 768 * 768 + 768 * 2304 + 1152 * 768)
    attn = 4 * T * d * (8 * 512 + 14 * 129)  # 8 global layers (0, 3, ..., 21), 14 sliding ones
    head = N * (2 * d * d + 2 * d * V)
    lora = T * n * 2 * 256 * ((768 + 2304) + (768 + 768) + (768 + 2304) + (1152 + 768))
    assert train_step.step_flops(Cfg, batch=16, length=512, masked=N, lora_r=256) == \
        pytest.approx(2 * linear + 2 * head + 3 * attn + 3 * lora)
    assert train_step.step_flops(Cfg, batch=16, length=512, masked=N, lora_r=None) == \
        pytest.approx(3 * (linear + attn + head))
    assert 9.5e12 < 2 * linear + 2 * head + 3 * attn + 3 * lora < 10.5e12  # ~10 TFLOP per LoRA CPT step


@pytest.mark.slow
def test_benchmark_device_mode_runs_on_cpu():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    train_step = importlib.import_module("train_step")
    rows = train_step.gpu_training_table(True, device="cpu", plan=[("lora-cpt", "fused-v2"), ("full-sft", "masked"),
                                                                   ("lora-cpt", "full")], budget_s=600)
    assert rows[0]["setup"] == "peak" and rows[0]["tflops"] > 0
    assert [r["status"] for r in rows[1:]] == ["ok"] * 3
    for r in rows[1:]:
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["peak_gib"] is None
    assert rows[1]["loss_first"] == pytest.approx(rows[3]["loss_first"], rel=1e-5)  # fused == full logits
    skipped = train_step.gpu_training_table(True, device="cpu", plan=[("full-sft", "fused-v2+compile")], budget_s=0)
    assert skipped[1]["status"].startswith("skipped: time budget")


def test_benchmark_rows_format_with_every_gpu_field():
    """A CUDA row carries peak memory and the datasheet MFU, which a CPU run never fills in."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    train_step = importlib.import_module("train_step")
    row = dict(setup="lora-cpt", variant="fused-v2", status="ok", step_ms=70.5, tokens_per_s=116200.0, peak_gib=8.71,
               mfu=0.183, mfu_datasheet=0.144, compile_s=None, loss_first=12.45)
    line = train_step.format_row(row)
    assert "116,200" in line and "8.71" in line and "18.3%" in line and "14.4%" in line
    assert train_step.format_row(dict(row, status="failed: boom")).endswith("failed: boom")
