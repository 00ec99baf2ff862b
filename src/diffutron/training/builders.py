"""The parts ``loop.setup`` builds, in this order: the start model, the stage's data, the model as it
trains (LoRA, compiled layers) and its optimizer, prepared by accelerate.

The order is part of reproducibility: ``setup`` seeds every RNG first, and LoRA's initial weights
come from the same seeded stream whatever the data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..backbone import context_length
from ..errors import DiffutronError
from .checkpoint import clean_stale
from .compiled import compile_encoder_layers
from .config import TrainConfig
from .inputs import CACHE, build_data, data_fingerprint, load_cached, load_start, resolve_kind, save_cache
from .lora import apply_lora, is_peft, merge_lora
from .metrics_log import say

PRETRAIN_LENGTH, INSTRUCT_LENGTH = 512, 256  # the paper's sequence lengths


@dataclass
class StageData:
    """The stage's tokenized data: training rows, held-out rows (or None) and the data report."""

    train: object
    heldout: object | None
    report: dict
    kind: str  # "pretrain" or "instruct"


def start_model(config: TrainConfig, model=None, tokenizer=None) -> tuple[object, object, str]:
    """``(model, tokenizer, start)``: ``config``'s start model, or the one given (merged when it is a
    LoRA model and this stage is not); ``start`` names it for the run record."""
    if model is None:
        model, tokenizer, start = load_start(config)
    else:
        start = "a model given in Python"
        if is_peft(model) and config.method != "lora":
            model = merge_lora(model)
    if tokenizer.mask_token_id is None:
        raise DiffutronError("the tokenizer has no mask token; a masked diffusion LM needs one")
    return model, tokenizer, start


def stage_data(config: TrainConfig, accelerator, out: Path, output_state: str, model,
               tokenizer) -> tuple[TrainConfig, StageData]:
    """The data, and ``config`` with ``data.max_length`` settled (the paper's length, capped by the
    model's context). The main process builds or reads the cache first; the others then read it."""
    main = accelerator.is_main_process
    kind = resolve_kind(config.data)
    ctx = context_length(model, tokenizer)
    if config.data.max_length is None:
        default = PRETRAIN_LENGTH if kind == "pretrain" else INSTRUCT_LENGTH
        config = config.replace(data=dataclasses.replace(config.data, max_length=min(default, ctx)))
    if config.data.max_length > ctx:
        raise DiffutronError(f"data.max_length={config.data.max_length} exceeds the model's context of {ctx} tokens")
    cache_dir = out / CACHE / data_fingerprint(config.data, kind, tokenizer) if config.data.cache else None
    if output_state == "stale" and main:
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
    return config, StageData(train_set, heldout_set, report, kind)


def adapt_model(config: TrainConfig, accelerator, model) -> tuple[object, Callable[[], None] | None]:
    """``(model, uncompile)``: the model in training mode, with LoRA adapters for ``method: lora``
    and its encoder layers compiled for ``compile: true`` (``uncompile`` undoes that, or is None)."""
    from accelerate.utils import DistributedType

    if config.method == "lora":
        model = apply_lora(model, config.lora)
    model.train()
    uncompile = None
    if config.compile:  # the encoder layers, compiled for training steps (compiled.compile_encoder_layers)
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            if accelerator.is_main_process:
                say("compile: not supported under FSDP / DeepSpeed here; training runs eager")
        else:
            uncompile = compile_encoder_layers(model)
    return model, uncompile


def count_parameters(model) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (before accelerate shards or flattens them)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def build_optimizer(config: TrainConfig, accelerator, model) -> tuple[object, torch.optim.Optimizer]:
    """``(model, optimizer)`` prepared by accelerate: AdamW, weight decay on matrices only."""
    from accelerate.utils import DistributedType

    trainable = [p for p in model.parameters() if p.requires_grad]
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
    return model, optimizer
