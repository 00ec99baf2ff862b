"""LoRA through peft: wrap a masked-LM encoder, merge adapters back into plain checkpoints.

The paper trains LoRA on "all linear layers (attention + MLP)"; the authors' code does it with
dLLM's default ``target_modules="all-linear"``, the default here too. peft resolves it to every
``nn.Linear`` but the output layer: for ModernBERT/mmBERT ``Wqkv``, ``Wo`` (attention output and
MLP output), ``Wi`` (MLP input) and the MLM head's ``head.dense`` (the output layer ``decoder`` is
left out). ``[Wqkv, Wo, Wi]`` (``MODERNBERT_LORA_TARGETS``) adapts the encoder alone.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from ..backbone import load_backbone, unwrap
from ..errors import DiffutronError
from .config import MODERNBERT_LORA_TARGETS, LoraSettings  # noqa: F401 (the encoder-only option)


def default_target_modules(model: nn.Module) -> list[str] | str:
    """peft's ``all-linear`` (the reference's targets) for every encoder."""
    return "all-linear"


PAPER_RANK = 256  # the paper's rank, on mmBERT-base (hidden 768)


def default_rank(model: nn.Module) -> int:
    """The rank when none is given: the paper's 256 from mmBERT-base's width (768) up; a quarter of
    the width below (64 on the embedded 256-wide model, whose 8 M weights a rank of 256 would
    double)."""
    hidden = getattr(getattr(unwrap(model), "config", None), "hidden_size", None) or 768
    return PAPER_RANK if hidden >= 768 else max(1, hidden // 4)


def _linear_names(model: nn.Module) -> list[str]:
    names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    return names


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """``model`` wrapped in a peft ``PeftModel`` with fresh LoRA adapters; only they train.

    Raises:
        DiffutronError: target modules that the model does not have (the message lists its linear layers).
    """
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules if settings.target_modules is not None else default_target_modules(model)
    r = settings.r if settings.r is not None else default_rank(model)
    alpha = settings.alpha if settings.alpha is not None else float(r)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=settings.dropout, target_modules=targets,
        modules_to_save=settings.modules_to_save, bias="none",
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations peft still calls
            return get_peft_model(model, config)
    except ValueError as err:
        first = str(err).strip().splitlines()[0]
        raise DiffutronError(
            f"lora.target_modules {targets!r}: {first}; this model's linear layers are named "
            f"{', '.join(_linear_names(model))}") from None


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain model with the adapter weights added in (``W + B A * alpha / r``)."""
    if not is_peft(model):
        return model
    merged = model.merge_and_unload()
    # an adapter loaded from disk is frozen (peft's inference mode): the plain model trains like any other
    merged.requires_grad_(True)
    return merged


def merge_adapter(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                  trust_remote_code: bool = False) -> Path:
    """Write the merged model of an adapter directory as a plain checkpoint (+ tokenizer).

    ``adapter_dir`` holds ``adapter_config.json`` (whose ``base_model_name_or_path`` is loaded) and
    the adapter weights. The output is written to a temporary directory and renamed into place, so
    it is never half-written.

    Raises:
        DiffutronError: no adapter there, a base model that cannot be loaded, or an output
            directory that already holds files.
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise DiffutronError(f"{adapter_dir} holds no adapter_config.json: point merge at a LoRA adapter directory")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise DiffutronError(f"{output_dir} is not empty: choose a new --output directory")
    model, tokenizer = load_backbone(str(adapter_dir), device=torch.device("cpu"), dtype=dtype,
                                     trust_remote_code=trust_remote_code)
    merged = merge_lora(model)
    save_model(merged, tokenizer, output_dir)
    return output_dir


def save_model(model: nn.Module, tokenizer, output_dir: Path) -> None:
    """Save model (safetensors) and tokenizer to ``output_dir`` through a temporary sibling + rename."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if output_dir.exists():
        output_dir.rmdir()  # empty (checked by the caller)
    os.replace(tmp, output_dir)
