"""The training loop: one code path on accelerate for CPU, one GPU, DDP, FSDP and DeepSpeed.

``train(config)`` runs one stage. Launch it plainly (CPU / one GPU), under ``torchrun`` or
``accelerate launch --config_file ...`` (multi-GPU, multi-node); ``Accelerator`` picks the setup
up from the launcher.

Reproducibility. The data is one endless stream (epoch e: a permutation seeded by ``seed`` and
e); a global micro-batch is the next processes x batch_size samples, each process taking its own
consecutive share, and sample q of the stream draws its ``t`` and its mask from a generator seeded
by ``seed`` and q alone. So:

- a run on N processes with batch b, one process with batch N*b, and gradient accumulation in any
  split see the same data and noise; their losses agree up to floating-point reduction order;
- the data position is a counter, and a checkpoint (model, optimizer, scaler, every process's RNG
  state via accelerate, plus that counter) resumes bit for bit: on CPU, a run killed with SIGKILL
  and resumed ends with exactly the weights of a run that was never interrupted.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` sequences per process; the
learning rate is warmed up linearly, then follows the cosine / linear / constant schedule.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..backbone import context_length
from ..data.instruct import pad_id
from ..data.rows import check_sources
from ..errors import DiffutronError
from ..likelihood import elbo_perplexity
from ..objective import mdlm_loss
from ..schedules import get_schedule, sample_t
from . import checkpoint as ckpt
from .checkpoint import RUN_RECORD, STATE_FILE, check_output, clean_stale
from .config import TrainConfig
from .fused_loss import compile_encoder_layers, fused_mdlm_loss
from .inputs import (CACHE, build_data, check_start, data_fingerprint, load_cached, load_start, resolve_kind,
                     save_cache)
from .lora import apply_lora, is_peft, merge_lora
from .metrics import MetricsWriter, format_eval, say
from .plot import draw_quietly, plot_stage

PRETRAIN_LENGTH, INSTRUCT_LENGTH = 512, 256  # the paper's sequence lengths
# settings that may differ between a run and its resumption
_RESUME_FREE = {"log_every", "eval_every", "eval_at_start", "eval_sequences", "eval_draws", "eval_seed", "save_every",
                "keep_last", "keep_checkpoints", "progress", "tensorboard", "output_dir", "model", "cpu", "fused_loss",
                "fused_loss_impl", "compile", "data.cache", "data.skip_bad_rows"}

Evaluator = Callable[..., dict]


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


# ---------------------------------------------------------------------------------------------
# small pieces


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


def seed_for(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


class DataStream:
    """Global batches as index lists: epoch e is a seeded permutation, epochs follow each other.

    With ``widths`` (each row's width) the permutation is grouped by length: every run of
    ``GROUP_BATCHES`` batches of ``batch`` rows (one optimizer step's rows, so accumulation and
    process splits still see the same data) is sorted by width and its batches are put in a
    seeded random order. Each epoch still holds every row once; a batch then pads to a width
    close to its rows' own (the SFT stages of tiny-tr compute ~0.55x the positions).
    """

    GROUP_BATCHES = 16

    def __init__(self, n: int, seed: int, widths: np.ndarray | None = None, batch: int = 1):
        self.n, self.seed, self.widths, self.batch = n, seed, widths, batch
        self._perm: tuple[int, np.ndarray] | None = None

    def perm(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            if self.widths is not None:
                order = self._grouped(order, np.random.default_rng([self.seed, epoch, 1]))
            self._perm = (epoch, order)
        return self._perm[1]

    def _grouped(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size = self.batch * self.GROUP_BATCHES
        out = []
        for start in range(0, len(order), size):
            group = order[start : start + size]
            group = group[np.argsort(self.widths[group], kind="stable")]
            full = len(group) // self.batch  # an epoch's short last batch stays last
            batches = [group[i * self.batch : (i + 1) * self.batch] for i in range(full)]
            out += [batches[i] for i in rng.permutation(full)] + [group[full * self.batch :]]
        return np.concatenate(out)

    def indices(self, start: int, count: int) -> list[int]:
        """Sample positions ``start .. start+count`` of the endless stream, as dataset indices."""
        out = []
        for q in range(start, start + count):
            out.append(int(self.perm(q // self.n)[q % self.n]))
        return out


def draw_training_noise(maskable: torch.Tensor, positions: Sequence[int], micro: int, config: TrainConfig,
                        rank_rows: slice, global_batch: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t [b], noise mask [b, L])`` of this process's rows.

    Sample q of the stream (its position counted over all processes) draws its time (iid) and its
    mask from a generator seeded by (seed, q) alone, over ``max_length`` positions: one process
    with batch N*b, N processes with batch b and gradient accumulation in any split all see the
    same noise. Antithetic / stratified times couple a batch, so they come from a generator per
    global micro-batch instead.
    """
    width = maskable.shape[1]
    sched = get_schedule(config.noise_schedule)
    gens = [torch.Generator().manual_seed(seed_for(config.seed, 0, q)) for q in positions]
    if config.t_sampling == "iid":
        t = torch.cat([sample_t(1, eps=config.eps, method="iid", generator=g) for g in gens])  # [b]
    else:
        g = torch.Generator().manual_seed(seed_for(config.seed, 1, micro))
        t = sample_t(global_batch, eps=config.eps, method=config.t_sampling, generator=g)[rank_rows]
    u = torch.stack([torch.rand(max_length, generator=g)[:width] for g in gens])  # [b, L]
    return t, (u < sched.mask_prob(t)[:, None]) & maskable


REPEAT_WARNING = 10  # warn when the run shows each training sequence more often than this


def resolve_mixed_precision(setting: str, cpu: bool) -> str | None:
    if setting != "auto":
        return setting
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # accelerate launch --mixed_precision ... decides
    if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "config":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------------------------
# held-out evaluation


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
        config: the stage (start model, data, method, hyper-parameters, output directory).
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
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers.utils import logging as hf_logging

    if not config.output_dir:
        raise DiffutronError("output_dir: missing: say where the trained model goes (--output DIR)")
    if config.data.train is None:
        raise DiffutronError("data.train: missing: name the training data (--data FILE or a hub dataset id)")
    if model is None and config.model is None and config.init is None:
        raise DiffutronError("model: missing: give a start model (--model DIR or hub id) or init: for a fresh one")
    out = Path(os.path.expanduser(config.output_dir))
    state = check_output(out, resume)
    if state == "finished":
        say(f"{out} already holds the finished model: nothing to resume")
        return finished_result(out)
    if model is None:
        check_start(config.model, config.init)
    check_sources(config.data.train, "data.train")
    check_sources(config.data.heldout, "data.heldout")

    # several processes and no GPU (torchrun on CPU): accelerate runs DDP over gloo only when told cpu=True
    cpu = config.cpu or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(config.mixed_precision, cpu),
        gradient_accumulation_steps=config.grad_accum,
        cpu=cpu,
    )
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # per-file load/save bars would drown the training log
    try:
        return _run(config, accelerator, out, state, resume, evaluators, model, tokenizer, set_seed)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        _reset_accelerate()


def _run(config, accelerator, out, state, resume, evaluators, model, tokenizer, set_seed) -> TrainResult:
    from accelerate.utils import DistributedType

    main = accelerator.is_main_process
    world = accelerator.num_processes
    if accelerator.distributed_type == DistributedType.FSDP and config.method == "lora" and config.lora.merge:
        raise DiffutronError("lora.merge under FSDP: the in-process merge needs unsharded weights; train with "
                             "merge: false and run `diffutron merge OUTPUT --output MERGED` afterwards")
    set_seed(config.seed)

    # 1. the start model and tokenizer
    if model is None:
        model, tokenizer, start = load_start(config)
    else:
        start = "a model given in Python"
        if is_peft(model) and config.method != "lora":
            model = merge_lora(model)
    mask_token_id = tokenizer.mask_token_id
    if mask_token_id is None:
        raise DiffutronError("the tokenizer has no mask token; a masked diffusion LM needs one")

    # 2. the data (the main process builds or reads the cache first; the others then read it)
    kind = resolve_kind(config.data)
    ctx = context_length(model, tokenizer)
    if config.data.max_length is None:
        default = PRETRAIN_LENGTH if kind == "pretrain" else INSTRUCT_LENGTH
        config = config.replace(data=dataclasses.replace(config.data, max_length=min(default, ctx)))
    if config.data.max_length > ctx:
        raise DiffutronError(f"data.max_length={config.data.max_length} exceeds the model's context of {ctx} tokens")
    cache_dir = out / CACHE / data_fingerprint(config.data, kind, tokenizer) if config.data.cache else None
    if state == "stale" and main:
        clean_stale(out)
    with accelerator.main_process_first():
        loaded = load_cached(cache_dir, config.data, tokenizer, kind) if cache_dir is not None else None
        if loaded is None:
            loaded = build_data(config.data, tokenizer, kind=kind)
            if main:
                out.mkdir(parents=True, exist_ok=True)
                if cache_dir is not None:
                    save_cache(cache_dir, *loaded)
    train_set, heldout_set, report = loaded
    if main:
        out.mkdir(parents=True, exist_ok=True)
        say(f"data ({kind}): {report['summary']}")
        if heldout_set is None:
            say("no held-out data: held-out evaluation is off")

    # 3. LoRA or full fine-tuning
    if config.method == "lora":
        model = apply_lora(model, config.lora)
    model.train()
    uncompile = None
    if config.compile:  # the encoder layers, compiled for training steps (fused_loss.compile_encoder_layers)
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            if main:
                say("compile: not supported under FSDP / DeepSpeed here; training runs eager")
        else:
            uncompile = compile_encoder_layers(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused AdamW kernel: faster and without foreach's step-sized temporaries (plain and DDP runs)
    fused = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU) \
        and accelerator.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, fused=fused or None,
    )
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size  # no dataloader to infer it from
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.gradient_accumulation_steps != config.grad_accum:  # a DeepSpeed config that fixes its own
        raise DiffutronError(f"the accelerate/DeepSpeed config accumulates {accelerator.gradient_accumulation_steps} "
                             f"micro-batches, the stage grad_accum={config.grad_accum}: set gradient_accumulation_steps "
                             "to auto in the DeepSpeed config (or make them equal)")

    # 4. steps and schedule
    global_batch = config.batch_size * world
    per_step = global_batch * config.grad_accum
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * len(train_set) / per_step))
    warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_ratio * total_steps)

    # 5. resume
    step, micro, tokens_seen, elapsed_before = 0, 0, 0, 0.0
    window = {"loss": 0.0, "n": 0, "tokens": 0}  # the metric window since the last log line
    resumed_from = None
    record = _run_record(config, kind, report, world, start, n_trainable, n_total, total_steps, len(train_set))
    if resume:
        ckpt_step, path = ckpt.latest_checkpoint(out)
        saved = ckpt.read_state(path)
        _check_resumable(saved, record, path)
        ckpt.load_checkpoint(accelerator, path)
        step, micro = saved["step"], saved["micro_step"]
        tokens_seen, elapsed_before = saved.get("tokens", 0), saved.get("elapsed_s", 0.0)
        window.update(saved.get("window", {}))
        resumed_from = step
        if main:
            say(f"resuming from {path} (step {step} of {total_steps})")
    if main:
        ckpt.remove_partial(out)
        ckpt.write_json_atomic(out / "run.json", record)
        say(f"training {start}: {config.method}, {n_trainable:,} of {n_total:,} parameters trainable, "
            f"{total_steps} steps of {per_step} sequences ({world} process{'es' if world > 1 else ''}, "
            f"mixed precision {accelerator.mixed_precision})")
        seen = total_steps * per_step / max(1, len(train_set))
        if seen > REPEAT_WARNING:
            say(f"warning: each of the {len(train_set):,} training sequences will be seen about {seen:.0f} times "
                f"({total_steps} steps of {per_step}): the model will learn them by heart; give more data, or "
                "fewer steps or epochs")
    metrics = MetricsWriter(out, enabled=main, resume_step=step if resume else None, tensorboard=config.tensorboard)
    widths = train_set.widths() if config.data.group_by_length and hasattr(train_set, "widths") else None
    stream = DataStream(len(train_set), config.seed, widths, per_step)  # grouped per optimizer step
    result = TrainResult(out, total_steps, resumed_from=resumed_from, data_report=report)
    result.heldout = [r for r in metrics.records if r.get("kind") == "eval"]

    def run_eval(at_step: int) -> None:
        if heldout_set is None and not evaluators:
            return
        rec = {"step": at_step, "kind": "eval", "epoch": micro * global_batch / len(train_set)}
        if heldout_set is not None:
            rec.update(evaluate_heldout(model, heldout_set, config, mask_token_id, pad_id(tokenizer)))
        if evaluators:
            from ..lm import DiffusionLM

            lm = DiffusionLM(model, tokenizer, name=str(out))
            for fn in evaluators:
                for key, value in (fn(lm=lm, step=at_step) or {}).items():
                    rec[f"eval/{key}"] = value
        metrics.log(rec)
        result.heldout.append(rec)
        if main and "heldout_loss" in rec:
            _write(bar, format_eval(rec))

    # 6. the loop
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not (main and config.progress), unit="step",
               dynamic_ncols=True, file=sys.stderr)
    if step == 0 and config.eval_at_start:
        run_eval(0)
    window_start = time.perf_counter()
    run_start = time.perf_counter()
    rank_rows = slice(accelerator.process_index * config.batch_size, (accelerator.process_index + 1) * config.batch_size)
    grad_norm = None
    while step < total_steps:
        factor = lr_factor(step, total_steps, warmup, config.lr_schedule, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * factor
        for _ in range(config.grad_accum):
            with accelerator.accumulate(model):
                # [b, L] this process's rows of the global batch, and their noise
                first = micro * global_batch + accelerator.process_index * config.batch_size
                positions = list(range(first, first + config.batch_size))
                batch = train_set.batch(stream.indices(first, config.batch_size))
                t, noise = draw_training_noise(batch.maskable, positions, micro, config, rank_rows, global_batch,
                                               train_set.max_length)
                window["tokens"] += batch.tokens
                batch = batch.to(accelerator.device)
                loss_fn = fused_mdlm_loss if config.fused_loss else mdlm_loss
                impl = {"impl": config.fused_loss_impl} if config.fused_loss else {}
                loss = loss_fn(
                    model, batch.input_ids, batch.maskable, mask_token_id=mask_token_id,
                    attention_mask=batch.attention_mask, t=t, noise_mask=noise.to(accelerator.device),
                    schedule=config.noise_schedule, target_weight=batch.target_weight,
                    weighting=config.loss_weighting, **impl,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(
                        model.parameters(), config.max_grad_norm if config.max_grad_norm else float("inf"))
                    grad_norm = float(norm) if norm is not None else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                window["loss"] += float(loss.detach())
                window["n"] += 1
                micro += 1
        step += 1
        bar.update(1)

        if step % config.log_every == 0 or step == total_steps:
            mean_loss = window["loss"] / max(window["n"], 1)
            if world > 1:
                both = torch.tensor([mean_loss, float(window["tokens"])], dtype=torch.float64, device=accelerator.device)
                both = accelerator.reduce(both, "sum")
                mean_loss, window["tokens"] = float(both[0]) / world, int(both[1])
            now = time.perf_counter()
            tokens_seen += window["tokens"]
            tok_s = window["tokens"] / max(now - window_start, 1e-9)
            rec = {"step": step, "kind": "train", "epoch": micro * global_batch / len(train_set), "loss": mean_loss,
                   "lr": config.lr * factor, "grad_norm": grad_norm, "tokens": tokens_seen, "tokens_per_s": tok_s,
                   "elapsed_s": elapsed_before + now - run_start}
            metrics.log(rec)
            result.final_loss = mean_loss
            bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if main and not config.progress:
                say(f"step {step}/{total_steps}: loss {mean_loss:.4f}, lr {config.lr * factor:.3g}, {tok_s:,.0f} tokens/s")
            window.update(loss=0.0, n=0, tokens=0)
            window_start = now
        if (config.eval_every and step % config.eval_every == 0) or step == total_steps:
            run_eval(step)
        if (config.save_every and step % config.save_every == 0) or step == total_steps:
            state = {"step": step, "micro_step": micro, "tokens": tokens_seen, "window": dict(window),
                     "elapsed_s": elapsed_before + time.perf_counter() - run_start, "record": record}
            ckpt.save_checkpoint(accelerator, out, step, state, config.keep_last)
    bar.close()
    metrics.close()
    if main:  # OUTPUT/loss.png: training loss and held-out perplexity against step
        draw_quietly(plot_stage, out)
    if uncompile is not None:
        uncompile()

    # 7. the final model
    _save_final(config, accelerator, model, tokenizer, out, record, result)
    return result


def _write(bar, text: str) -> None:
    if bar.disable:
        say(text)
    else:
        bar.write(f"diffutron: {text}", file=sys.stderr)


def _run_record(config, kind, report, world, start, n_trainable, n_total, total_steps, n_train) -> dict:
    import accelerate
    import transformers

    return {
        "config": config.to_dict(), "data_kind": kind, "data_report": report, "world_size": world,
        "start": start, "trainable_parameters": n_trainable, "parameters": n_total, "total_steps": total_steps,
        "train_sequences": n_train,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__},
    }


def _check_resumable(saved: dict, record: dict, path: Path) -> None:
    old = saved.get("record", {})
    if old.get("world_size") != record["world_size"]:
        raise DiffutronError(f"{path} was written by {old.get('world_size')} processes, this run has "
                             f"{record['world_size']}: resume with the same number of processes")
    if old.get("train_sequences") != record["train_sequences"]:
        raise DiffutronError(f"{path}: the training data changed since the checkpoint "
                             f"({old.get('train_sequences')} sequences then, {record['train_sequences']} now)")
    before, now = _flatten(old.get("config", {})), _flatten(record["config"])
    changed = sorted(k for k in set(before) | set(now) if k not in _RESUME_FREE and before.get(k) != now.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise DiffutronError(f"{path} was trained with other settings ({diffs}): resume with the same settings, "
                             "or start a new output directory")


def _save_final(config, accelerator, model, tokenizer, out: Path, record: dict, result: TrainResult) -> None:
    """Model (merged, adapter or full) + tokenizer + run record into ``out``; train_state.json last."""
    accelerator.wait_for_everyone()
    state_dict = _final_state_dict(accelerator, model)
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model)
        tmp = out / ".final-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if config.method == "lora" and config.lora.merge:
            merge_lora(inner).save_pretrained(tmp, safe_serialization=True)
            saved_as = "merged"
        else:
            inner.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            saved_as = "adapter" if config.method == "lora" else "full"
        tokenizer.save_pretrained(tmp)
        final_record = dict(record, saved_as=saved_as, heldout=result.heldout, final_loss=result.final_loss,
                            steps=result.steps)
        (tmp / RUN_RECORD).write_text(json.dumps(final_record, indent=2, ensure_ascii=False, default=str),
                                      encoding="utf-8")
        for item in tmp.iterdir():
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        tmp.rmdir()
        if not config.keep_checkpoints:
            shutil.rmtree(out / ckpt.CHECKPOINTS, ignore_errors=True)
        ckpt.write_json_atomic(out / STATE_FILE, {"finished": True, "steps": result.steps, "saved_as": saved_as,
                                                   "final_loss": result.final_loss})
        say(f"finished: {saved_as} model in {out}")
    accelerator.wait_for_everyone()


def _final_state_dict(accelerator, model) -> dict:
    """The weights to save, gathered from every process: under DeepSpeed the float32 master copies
    of the trained parameters (its bf16 mode keeps the module itself in bf16), and an output layer
    tied to the embeddings once (a gathered state dict holds both names as separate copies)."""
    from accelerate.utils import DistributedType

    state = accelerator.get_state_dict(model)
    inner = accelerator.unwrap_model(model)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from deepspeed.utils import safe_get_full_fp32_param

        for name, param in inner.named_parameters():  # collective under ZeRO-3: every process calls it
            full = safe_get_full_fp32_param(param) if param.requires_grad else None
            if full is not None and state is not None and name in state:
                state[name] = full.detach().cpu()
    if state is not None:
        first: dict[int, str] = {}
        for name, param in inner.named_parameters(remove_duplicate=False):
            if first.setdefault(id(param), name) != name:
                state.pop(name, None)  # a tied duplicate: from_pretrained ties it again
    return state


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

