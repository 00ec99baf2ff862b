"""The training loop's parts on their own: setup, train_step, log_window, evaluate, save, TrainState.

tests/training/test_training.py runs whole stages (exact resume, accumulation); here each part is called
alone on a tiny model and compared with a direct call of what it wraps.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from diffutron.backbone import pad_token_id
from diffutron.likelihood import elbo_perplexity
from diffutron.objective import fused_mdlm_loss
from diffutron.training import DataConfig, LoraSettings, TrainConfig
from diffutron.training.checkpoint import check_output, is_complete, latest_checkpoint, list_checkpoints, read_state
from diffutron.training.loop import (_reset_accelerate, evaluate, log_window, lr_factor, make_accelerator, save, setup,
                                     train_step)
from diffutron.training.state import TrainState
from diffutron.training.stream import draw_training_noise
from tiny_runs import tiny_run_inputs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("steps")
    tiny_run_inputs(d, seed=0, rows=80)
    return d


def stage_config(files, out, **kw) -> TrainConfig:
    base = dict(model=str(files / "base"), output_dir=str(out), max_steps=4, batch_size=4, lr=1e-2, warmup_steps=2,
                progress=False, cpu=True, mixed_precision="no", eval_sequences=8,
                data=DataConfig(train=str(files / "corpus.jsonl"), max_length=32, heldout_fraction=0.1))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def make_stage():
    """``make_stage(config, resume=False) -> (stage, state)``; accelerate's settings are reset after."""
    def make(config, resume=False, **kw):
        out = Path(config.output_dir)
        return setup(config, make_accelerator(config), out, output_state=check_output(out, resume), resume=resume,
                     **kw)

    yield make
    _reset_accelerate()


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_setup_builds_the_stage_and_writes_its_run_record(files, tmp_path, make_stage):
    config = stage_config(files, tmp_path / "o", method="lora", lora=LoraSettings(r=4, alpha=8, dropout=0.0),
                          data=DataConfig(train=str(files / "corpus.jsonl"), heldout_fraction=0.1))
    stage, state = make_stage(config)
    assert state == TrainState()
    assert stage.config.data.max_length == 128  # the paper's 512, capped by the tiny model's context
    assert (stage.total_steps, stage.warmup) == (4, 2)
    assert stage.global_batch == 4 and stage.rank_rows == slice(0, 4)
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert record == json.loads(json.dumps(stage.record, default=str))
    assert 0 < record["trainable_parameters"] < record["parameters"]  # LoRA: the adapters only
    assert record["train_sequences"] == len(stage.data.train) and stage.data.heldout is not None
    assert all(g["lr"] == config.lr for g in stage.optimizer.param_groups)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_train_step_loss_is_the_objective_on_the_streams_rows_and_noise(files, tmp_path, make_stage, grad_accum):
    config = stage_config(files, tmp_path / "o", batch_size=4 // grad_accum, grad_accum=grad_accum)
    stage, state = make_stage(config)
    rows, model = stage.data.train, stage.model
    # what the step's micro-batches see: stream positions 0..3 and their seeded noise, on the start weights
    rng, direct, tokens = torch.get_rng_state(), [], 0
    with torch.no_grad():
        for micro in range(grad_accum):
            first = micro * config.batch_size
            batch = rows.batch(stage.stream.indices(first, config.batch_size))
            t, noise = draw_training_noise(batch.maskable, range(first, first + config.batch_size), micro, config,
                                           stage.rank_rows, stage.global_batch, rows.max_length)
            direct.append(fused_mdlm_loss(model, batch.input_ids, batch.maskable, mask_token_id=stage.mask_token_id,
                                          attention_mask=batch.attention_mask, t=t, noise_mask=noise,
                                          target_weight=batch.target_weight).item())
            tokens += batch.tokens
    torch.set_rng_state(rng)
    before = trainable(model)
    loss = train_step(stage, state)
    assert loss == sum(direct) / grad_accum  # the same computation: bit for bit
    assert (state.step, state.micro_step, state.window_n, state.window_tokens) == (1, grad_accum, grad_accum, tokens)
    assert state.window_loss == sum(direct)
    assert state.lr == config.lr * lr_factor(0, 4, 2, config.lr_schedule, config.min_lr_ratio) == 5e-3
    assert state.grad_norm is not None and state.grad_norm > 0
    after = trainable(model)
    assert all(not torch.equal(before[n], after[n]) for n in before)  # one optimizer step moved every weight
    # the unfused objective (fused_loss: false) gives the same loss
    torch.set_rng_state(rng)
    plain, plain_state = make_stage(dataclasses.replace(config, fused_loss=False,
                                                        output_dir=str(tmp_path / "plain")))
    assert train_step(plain, plain_state) == pytest.approx(loss, rel=1e-5)


def test_log_window_reports_the_mean_step_loss_and_starts_a_new_window(files, tmp_path, make_stage):
    stage, state = make_stage(stage_config(files, tmp_path / "o"))
    state.start_clock(0.0)
    losses = [train_step(stage, state) for _ in range(2)]
    tokens = state.window_tokens
    rec = log_window(stage, state)
    assert rec["loss"] == pytest.approx(sum(losses) / 2, rel=1e-12)
    assert (rec["step"], rec["kind"], rec["tokens"], rec["lr"]) == (2, "train", tokens, state.lr)
    assert rec["epoch"] == 8 / len(stage.data.train) and rec["grad_norm"] == state.grad_norm
    assert (state.window_loss, state.window_n, state.window_tokens, state.tokens) == (0.0, 0, 0, tokens)


def test_evaluate_gives_the_heldout_elbo_of_elbo_perplexity_and_evaluator_metrics(files, tmp_path, make_stage):
    calls = []

    def evaluator(lm, step):
        calls.append((lm.model is stage.model, step))
        return {"accuracy": 0.25}

    stage, state = make_stage(stage_config(files, tmp_path / "o", eval_draws=3), evaluators=[evaluator])
    config = stage.config
    rec = evaluate(stage, state)
    direct = elbo_perplexity(stage.model, stage.data.heldout, mask_token_id=stage.mask_token_id,
                             seed=config.eval_seed, mc_samples=3, batch_size=config.batch_size,
                             schedule=config.noise_schedule, eps=config.eps, pad_token_id=pad_token_id(stage.tokenizer),
                             max_sequences=8)
    assert (rec["step"], rec["kind"], rec["epoch"]) == (0, "eval", 0.0)
    assert (rec["heldout_loss"], rec["heldout_ppl"], rec["heldout_loss_stderr"]) == (direct.loss, direct.ppl,
                                                                                      direct.stderr)
    assert (rec["heldout_tokens"], rec["heldout_sequences"]) == (direct.tokens, direct.sequences) and direct.sequences == 8
    assert rec["eval/accuracy"] == 0.25 and calls == [(True, 0)]
    assert evaluate(stage, state)["heldout_loss"] == rec["heldout_loss"]  # seeded: the same draws each time
    bare = dataclasses.replace(stage, data=dataclasses.replace(stage.data, heldout=None), evaluators=())
    assert evaluate(bare, state) is None


def test_save_writes_a_complete_checkpoint_that_resume_reads_back(files, tmp_path, make_stage):
    config = stage_config(files, tmp_path / "o", save_every=1)
    stage, state = make_stage(config)
    state.start_clock(0.0)
    train_step(stage, state)
    path = save(stage, state)
    assert list_checkpoints(stage.out) == [(1, path)] and latest_checkpoint(stage.out) == (1, path)
    assert is_complete(path)
    saved = read_state(path)
    assert saved["record"] == json.loads(json.dumps(stage.record, default=str))
    assert {k: saved[k] for k in ("step", "micro_step", "tokens", "window")} == {
        "step": 1, "micro_step": 1, "tokens": 0, "window": state.window()}
    weights = trainable(stage.model)
    _reset_accelerate()
    assert check_output(stage.out, True) == "interrupted"
    again, resumed = make_stage(config, resume=True)
    assert (resumed.step, resumed.micro_step, resumed.window()) == (1, 1, state.window())
    assert resumed == TrainState.from_checkpoint(saved)
    now = trainable(again.model)
    assert all(torch.equal(weights[n], now[n]) for n in weights)
    assert again.optimizer.state_dict()["state"]  # AdamW's moments came back too


def test_train_state_round_trips_through_a_checkpoint():
    state = TrainState(step=7, micro_step=14, tokens=900, elapsed_before=2.5, window_loss=3.25, window_n=2,
                       window_tokens=60, grad_norm=1.0, lr=1e-3, run_start=10.0)
    saved = json.loads(json.dumps(state.checkpoint({"r": 1}, now=11.5)))
    assert saved == {"step": 7, "micro_step": 14, "tokens": 900, "window": {"loss": 3.25, "n": 2, "tokens": 60},
                     "elapsed_s": 4.0, "record": {"r": 1}}
    back = TrainState.from_checkpoint(saved)
    assert back == TrainState(step=7, micro_step=14, tokens=900, elapsed_before=4.0, window_loss=3.25, window_n=2,
                              window_tokens=60)
    assert TrainState.from_checkpoint({"step": 3, "micro_step": 3}) == TrainState(step=3, micro_step=3)  # older files
