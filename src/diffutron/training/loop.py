"""The training loop: one code path on accelerate for CPU, one GPU, DDP, FSDP and DeepSpeed.

``train(config)`` runs one stage. Launch it plainly (CPU / one GPU), under ``torchrun`` or
``accelerate launch --config_file ...`` (multi-GPU, multi-node); ``Accelerator`` picks the setup
up from the launcher.

A stage is ``setup -> (train_step, log_window, evaluate, save)* -> save_final``: ``setup`` builds a
:class:`TrainSetup` (model, optimizer, data, schedule: fixed while it trains) and a
:class:`~diffutron.training.state.TrainState` (step, data position, metric window: what moves and
what a checkpoint saves); each step function takes both and can be called on its own.

Reproducibility. The data is one endless stream (epoch e: a permutation seeded by ``seed`` and
e); a global micro-batch is the next processes x batch_size samples, each process taking its own
consecutive share, and sample q of the stream draws its ``t`` and its mask from a generator seeded
by ``seed`` and q alone (``training.stream``). So:

- a run on N processes with batch b, one process with batch N*b, and gradient accumulation in any
  split see the same data and noise; their losses agree up to floating-point reduction order;
- the data position is a counter, and a checkpoint (model, optimizer, scaler, every process's RNG
  state via accelerate, plus that counter) resumes bit for bit: on CPU, a run killed with SIGKILL
  and resumed ends with exactly the weights of a run that was never interrupted.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` sequences per process; the
learning rate is warmed up linearly, then follows the cosine / linear / constant schedule.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..backbone import pad_token_id
from ..data.rows import check_sources
from ..errors import DiffutronError
from ..likelihood import elbo_perplexity
from ..lm import DiffusionLM, default_model_path
from ..objective import fused_mdlm_loss, mdlm_loss
from . import checkpoint as ckpt
from .builders import StageData, adapt_model, build_optimizer, count_parameters, stage_data, start_model
from .checkpoint import RUN_RECORD, check_output
from .config import TrainConfig
from .final import save_final
from .inputs import check_start
from .metrics_log import MetricsWriter, format_eval, say
from .plot import draw_quietly, plot_stage
from .state import TrainState, check_resumable, run_record
from .stream import DataStream, draw_training_noise

Evaluator = Callable[..., dict]
REPEAT_WARNING = 10  # warn when the run shows each training sequence more often than this


@dataclass
class TrainResult:
    """What a stage produced: its directory, steps, and every held-out evaluation."""

    output_dir: Path
    steps: int
    resumed_from: int | None = None
    final_loss: float | None = None
    heldout: list[dict] = field(default_factory=list)
    data_report: dict = field(default_factory=dict)
    already_finished: bool = False


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - min_ratio) * progress


def resolve_mixed_precision(setting: str, cpu: bool) -> str | None:
    if setting != "auto":
        return setting
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # accelerate launch --mixed_precision ... decides
    if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def evaluate_heldout(model, dataset, config: TrainConfig, mask_token_id: int, pad_token_id: int) -> dict:
    """The held-out ELBO (``likelihood.elbo_perplexity``: total weighted masked CE / total
    maskable tokens), its Monte Carlo standard error and the perplexity bound exp(loss).

    Every process scores the whole (``eval_sequences``-capped) held-out set through the prepared
    model with the same seeded draws, so all make the same forward calls (safe under DDP, FSDP and
    DeepSpeed) and get the same number, whatever the number of processes.
    """
    result = elbo_perplexity(
        model, dataset, mask_token_id=mask_token_id, seed=config.eval_seed, mc_samples=config.eval_draws,
        batch_size=config.batch_size, schedule=config.noise_schedule, eps=config.eps, pad_token_id=pad_token_id,
        max_sequences=config.eval_sequences,
    )
    return {"heldout_loss": result.loss, "heldout_ppl": result.ppl, "heldout_loss_stderr": result.stderr,
            "heldout_tokens": result.tokens, "heldout_sequences": result.sequences}


@dataclass
class TrainSetup:
    """What ``setup`` builds for the steps: fixed while the stage trains (``TrainState`` moves)."""

    config: TrainConfig  # with data.max_length settled
    accelerator: object
    out: Path
    model: object  # prepared by accelerate
    optimizer: torch.optim.Optimizer
    tokenizer: object
    data: StageData
    stream: DataStream
    metrics: MetricsWriter
    record: dict  # OUTPUT/run.json
    total_steps: int
    warmup: int
    evaluators: Sequence[Evaluator] = ()
    uncompile: Callable[[], None] | None = None

    @property
    def mask_token_id(self) -> int:
        return self.tokenizer.mask_token_id

    @property
    def global_batch(self) -> int:
        """Rows of one micro-batch over all processes."""
        return self.config.batch_size * self.accelerator.num_processes

    @property
    def rank_rows(self) -> slice:
        """This process's rows of a global micro-batch."""
        first = self.accelerator.process_index * self.config.batch_size
        return slice(first, first + self.config.batch_size)

    def epoch(self, state: TrainState) -> float:
        return state.micro_step * self.global_batch / len(self.data.train)


# ---------------------------------------------------------------------------------------------
# the stage


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    evaluators: Sequence[Evaluator] = (),
    model=None,
    tokenizer=None,
) -> TrainResult:
    """Train one stage as ``config`` says; the final model lands in ``config.output_dir``.

    Args:
        config: the stage (start model, data, method, hyper-parameters, output directory); with
            neither ``model`` nor ``init`` it starts from the embedded model, as every command does.
        resume: continue the interrupted run in ``output_dir`` from its newest complete checkpoint.
        evaluators: extra held-out metrics, called at every evaluation on every process as
            ``fn(lm=DiffusionLM, step=int)`` and returning ``{name: float}`` (logged as ``eval/name``).
        model, tokenizer: an already loaded start (instead of ``config.model`` / ``config.init``).

    Returns:
        a :class:`TrainResult`.

    Raises:
        DiffutronError: bad settings or data, a missing start, an output directory that holds
            something else, ``resume`` without a complete checkpoint. Nothing is written to the
            output directory before these checks pass.
    """
    from transformers.utils import logging as hf_logging

    if not config.output_dir:
        raise DiffutronError("output_dir: missing: say where the trained model goes (--output DIR)")
    if config.data.train is None:
        raise DiffutronError("data.train: missing: name the training data (--data FILE or a hub dataset id)")
    if model is None and config.model is None and config.init is None:  # as every command: the embedded model
        config = config.replace(model=default_model_path())
        say(f"no start model given (--model, model:): training the embedded model ({config.model})")
    out = Path(os.path.expanduser(config.output_dir))
    output_state = check_output(out, resume)
    if output_state == "finished":
        say(f"{out} already holds the finished model: nothing to resume")
        return finished_result(out)
    if model is None:
        check_start(config.model, config.init)
    check_sources(config.data.train, "data.train")
    check_sources(config.data.heldout, "data.heldout")

    accelerator = make_accelerator(config)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # per-file load/save bars would drown the training log
    try:
        stage, state = setup(config, accelerator, out, output_state=output_state, resume=resume,
                             evaluators=evaluators, model=model, tokenizer=tokenizer)
        return _run(stage, state, resumed=resume)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        _reset_accelerate()


def make_accelerator(config: TrainConfig):
    """The stage's ``Accelerator``: its mixed precision and accumulation, the launcher's processes."""
    from accelerate import Accelerator

    # several processes and no GPU (torchrun on CPU): accelerate runs DDP over gloo only when told cpu=True
    cpu = config.cpu or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
    return Accelerator(mixed_precision=resolve_mixed_precision(config.mixed_precision, cpu),
                       gradient_accumulation_steps=config.grad_accum, cpu=cpu)


def setup(config: TrainConfig, accelerator, out: Path, *, output_state: str = "empty", resume: bool = False,
          evaluators: Sequence[Evaluator] = (), model=None, tokenizer=None) -> tuple[TrainSetup, TrainState]:
    """Build a stage: seed every RNG, then the start model, the data, LoRA / compiled layers, the
    prepared optimizer and the step schedule; with ``resume``, the newest checkpoint's weights,
    optimizer and RNG states and its ``TrainState``.

    Args:
        config, evaluators, model, tokenizer: as for :func:`train` (whose checks come first).
        accelerator: from :func:`make_accelerator`.
        out: the output directory; ``output_state`` is ``checkpoint.check_output(out, resume)``.

    Returns:
        ``(stage, state)``; the main process has written ``out/run.json`` and opened the metric files.
    """
    from accelerate.utils import DistributedType, set_seed

    if accelerator.distributed_type == DistributedType.FSDP and config.method == "lora" and config.lora.merge:
        raise DiffutronError("lora.merge under FSDP: the in-process merge needs unsharded weights; train with "
                             "merge: false and run `diffutron merge OUTPUT --output MERGED` afterwards")
    set_seed(config.seed)
    model, tokenizer, start = start_model(config, model, tokenizer)
    config, data = stage_data(config, accelerator, out, output_state, model, tokenizer)
    model, uncompile = adapt_model(config, accelerator, model)
    n_trainable, n_total = count_parameters(model)
    model, optimizer = build_optimizer(config, accelerator, model)

    world = accelerator.num_processes
    per_step = config.batch_size * world * config.grad_accum
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * len(data.train) / per_step))
    warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_ratio * total_steps)
    record = run_record(config, data.kind, data.report, world, start, n_trainable, n_total, total_steps,
                        len(data.train))
    state = _resume(accelerator, out, record) if resume else TrainState()
    main = accelerator.is_main_process
    if main:
        ckpt.remove_partial(out)
        ckpt.write_json_atomic(out / "run.json", record)
        _announce(config, record, per_step, accelerator.mixed_precision)
    metrics = MetricsWriter(out, enabled=main, resume_step=state.step if resume else None,
                            tensorboard=config.tensorboard)
    widths = data.train.widths() if config.data.group_by_length and hasattr(data.train, "widths") else None
    stream = DataStream(len(data.train), config.seed, widths, per_step)  # grouped per optimizer step
    stage = TrainSetup(config, accelerator, out, model, optimizer, tokenizer, data, stream, metrics, record, total_steps,
                  warmup, evaluators, uncompile)
    return stage, state


def _resume(accelerator, out: Path, record: dict) -> TrainState:
    """Load the newest complete checkpoint (weights, optimizer, RNG states) and return its state."""
    _, path = ckpt.latest_checkpoint(out)
    saved = ckpt.read_state(path)
    check_resumable(saved, record, path)
    ckpt.load_checkpoint(accelerator, path)
    state = TrainState.from_checkpoint(saved)
    if accelerator.is_main_process:
        say(f"resuming from {path} (step {state.step} of {record['total_steps']})")
    return state


def _announce(config: TrainConfig, record: dict, per_step: int, mixed_precision: str) -> None:
    world, total_steps, n_train = record["world_size"], record["total_steps"], record["train_sequences"]
    say(f"training {record['start']}: {config.method}, {record['trainable_parameters']:,} of "
        f"{record['parameters']:,} parameters trainable, {total_steps} steps of {per_step} sequences "
        f"({world} process{'es' if world > 1 else ''}, mixed precision {mixed_precision})")
    seen = total_steps * per_step / max(1, n_train)
    if seen > REPEAT_WARNING:
        say(f"warning: each of the {n_train:,} training sequences will be seen about {seen:.0f} times "
            f"({total_steps} steps of {per_step}): the model will learn them by heart; give more data, or "
            "fewer steps or epochs")


def train_step(stage: TrainSetup, state: TrainState) -> float:
    """One optimizer step at the scheduled learning rate: ``grad_accum`` micro-batches of this
    process's rows, each with its seeded noise (``stream.draw_training_noise``), backward, gradient
    clipping, optimizer step.

    Advances ``state`` (step, data position, metric window, gradient norm, learning rate) and
    returns the mean loss of the step's micro-batches on this process.
    """
    config, accelerator, model, rows = stage.config, stage.accelerator, stage.model, stage.data.train
    factor = lr_factor(state.step, stage.total_steps, stage.warmup, config.lr_schedule, config.min_lr_ratio)
    state.lr = config.lr * factor
    for group in stage.optimizer.param_groups:
        group["lr"] = state.lr
    loss_fn = fused_mdlm_loss if config.fused_loss else mdlm_loss
    impl = {"impl": config.fused_loss_impl} if config.fused_loss else {}
    losses = []
    for _ in range(config.grad_accum):
        with accelerator.accumulate(model):
            # [b, L] this process's rows of the global batch, and their noise
            first = state.micro_step * stage.global_batch + accelerator.process_index * config.batch_size
            positions = list(range(first, first + config.batch_size))
            batch = rows.batch(stage.stream.indices(first, config.batch_size))
            t, noise = draw_training_noise(batch.maskable, positions, state.micro_step, config, stage.rank_rows,
                                           stage.global_batch, rows.max_length)
            state.window_tokens += batch.tokens
            batch = batch.to(accelerator.device)
            loss = loss_fn(
                model, batch.input_ids, batch.maskable, mask_token_id=stage.mask_token_id,
                attention_mask=batch.attention_mask, t=t, noise_mask=noise.to(accelerator.device),
                schedule=config.noise_schedule, target_weight=batch.target_weight,
                weighting=config.loss_weighting, **impl,
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                norm = accelerator.clip_grad_norm_(
                    model.parameters(), config.max_grad_norm if config.max_grad_norm else float("inf"))
                state.grad_norm = float(norm) if norm is not None else None
            stage.optimizer.step()
            stage.optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            state.window_loss += losses[-1]
            state.window_n += 1
            state.micro_step += 1
    state.step += 1
    return sum(losses) / len(losses)


def log_window(stage: TrainSetup, state: TrainState) -> dict:
    """The ``train`` metric record of the window since the last one (mean loss over all processes,
    tokens, tokens/s, learning rate, gradient norm); the window then starts anew."""
    accelerator = stage.accelerator
    world = accelerator.num_processes
    mean_loss = state.window_loss / max(state.window_n, 1)
    if world > 1:
        both = torch.tensor([mean_loss, float(state.window_tokens)], dtype=torch.float64, device=accelerator.device)
        both = accelerator.reduce(both, "sum")
        mean_loss, state.window_tokens = float(both[0]) / world, int(both[1])
    now = time.perf_counter()
    state.tokens += state.window_tokens
    tok_s = state.window_tokens / max(now - state.window_start, 1e-9)
    rec = {"step": state.step, "kind": "train", "epoch": stage.epoch(state), "loss": mean_loss, "lr": state.lr,
           "grad_norm": state.grad_norm, "tokens": state.tokens, "tokens_per_s": tok_s,
           "elapsed_s": state.elapsed_before + now - state.run_start}
    state.reset_window(now)
    return rec


def evaluate(stage: TrainSetup, state: TrainState) -> dict | None:
    """The ``eval`` metric record at ``state.step``: the held-out ELBO numbers (``evaluate_heldout``)
    and every evaluator's ``eval/NAME``; None when the stage has neither. Every process calls it."""
    heldout = stage.data.heldout
    if heldout is None and not stage.evaluators:
        return None
    rec = {"step": state.step, "kind": "eval", "epoch": stage.epoch(state)}
    if heldout is not None:
        rec.update(evaluate_heldout(stage.model, heldout, stage.config, stage.mask_token_id,
                                    pad_token_id(stage.tokenizer)))
    if stage.evaluators:
        lm = DiffusionLM(stage.model, stage.tokenizer, name=str(stage.out))
        for fn in stage.evaluators:
            for key, value in (fn(lm=lm, step=state.step) or {}).items():
                rec[f"eval/{key}"] = value
    return rec


def save(stage: TrainSetup, state: TrainState) -> Path:
    """A complete checkpoint at ``state.step`` (model, optimizer, scaler, RNG states, ``TrainState``
    and run record) under ``OUTPUT/checkpoints``, keeping the newest ``keep_last``. Every process
    calls it."""
    saved = state.checkpoint(stage.record, time.perf_counter())
    return ckpt.save_checkpoint(stage.accelerator, stage.out, state.step, saved, stage.config.keep_last)


def _run(stage: TrainSetup, state: TrainState, *, resumed: bool) -> TrainResult:
    """Steps until ``total_steps``, logging, evaluating and saving when due; then the final model."""
    config, main = stage.config, stage.accelerator.is_main_process
    result = TrainResult(stage.out, stage.total_steps, resumed_from=state.step if resumed else None,
                         data_report=stage.data.report)
    result.heldout = [r for r in stage.metrics.records if r.get("kind") == "eval"]
    bar = tqdm(total=stage.total_steps, initial=state.step, disable=not (main and config.progress), unit="step",
               dynamic_ncols=True, file=sys.stderr)
    if state.step == 0 and config.eval_at_start:
        _log_eval(stage, state, result, bar)
    state.start_clock(time.perf_counter())
    while state.step < stage.total_steps:
        train_step(stage, state)
        bar.update(1)
        step, last = state.step, state.step == stage.total_steps
        if step % config.log_every == 0 or last:
            rec = log_window(stage, state)
            stage.metrics.log(rec)
            result.final_loss = rec["loss"]
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:,.0f}", refresh=False)
            if main and not config.progress:
                say(f"step {step}/{stage.total_steps}: loss {rec['loss']:.4f}, lr {rec['lr']:.3g}, "
                    f"{rec['tokens_per_s']:,.0f} tokens/s")
        if (config.eval_every and step % config.eval_every == 0) or last:
            _log_eval(stage, state, result, bar)
        if (config.save_every and step % config.save_every == 0) or last:
            save(stage, state)
    bar.close()
    stage.metrics.close()
    if main:  # OUTPUT/loss.png: training loss and held-out perplexity against step
        draw_quietly(plot_stage, stage.out)
    if stage.uncompile is not None:
        stage.uncompile()
    save_final(config, stage.accelerator, stage.model, stage.tokenizer, stage.out, stage.record,
               heldout=result.heldout, final_loss=result.final_loss, steps=result.steps)
    return result


def _log_eval(stage: TrainSetup, state: TrainState, result: TrainResult, bar) -> None:
    rec = evaluate(stage, state)
    if rec is None:
        return
    stage.metrics.log(rec)
    result.heldout.append(rec)
    if stage.accelerator.is_main_process and "heldout_loss" in rec:
        _write(bar, format_eval(rec))


def _write(bar, text: str) -> None:
    if bar.disable:
        say(text)
    else:
        bar.write(f"diffutron: {text}", file=sys.stderr)


def finished_result(out: Path) -> TrainResult:
    steps, heldout, final_loss = 0, [], None
    record = out / RUN_RECORD
    if record.is_file():
        data = json.loads(record.read_text(encoding="utf-8"))
        steps, heldout, final_loss = data.get("steps", 0), data.get("heldout", []), data.get("final_loss")
    return TrainResult(out, steps, heldout=heldout, final_loss=final_loss, already_finished=True)


def _reset_accelerate() -> None:
    """Forget this stage's accelerate settings so the next stage in this process may differ
    (mixed precision, accumulation); the process group itself stays."""
    try:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    except Exception:  # pragma: no cover - private API moved: the next Accelerator complains clearly
        pass
