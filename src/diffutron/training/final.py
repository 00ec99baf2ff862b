"""A stage's final model: merged, adapter or full weights + tokenizer + run record, in place at once.

Everything is written to ``OUTPUT/.final-tmp`` and moved into ``OUTPUT``; ``train_state.json``
(written last) then marks the stage finished.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from . import checkpoint as ckpt
from .checkpoint import RUN_RECORD, STATE_FILE
from .config import TrainConfig
from .lora import merge_lora
from .metrics_log import say


def save_final(config: TrainConfig, accelerator, model, tokenizer, out: Path, record: dict, *, heldout: list[dict],
               final_loss: float | None, steps: int) -> None:
    """Model (merged, adapter or full) + tokenizer + run record into ``out``; train_state.json last.

    Every process calls it (gathering the weights is collective); the main process writes.
    """
    accelerator.wait_for_everyone()
    state_dict = final_state_dict(accelerator, model)
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
        final_record = dict(record, saved_as=saved_as, heldout=heldout, final_loss=final_loss, steps=steps)
        (tmp / RUN_RECORD).write_text(json.dumps(final_record, indent=2, ensure_ascii=False, default=str),
                                      encoding="utf-8")
        for item in tmp.iterdir():
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        tmp.rmdir()
        ckpt.write_json_atomic(out / STATE_FILE, {"finished": True, "steps": steps, "saved_as": saved_as,
                                                   "final_loss": final_loss})
        if not config.keep_checkpoints:  # after the finished mark: a kill here leaves a finished run
            shutil.rmtree(out / ckpt.CHECKPOINTS, ignore_errors=True)
        say(f"finished: {saved_as} model in {out}")
    accelerator.wait_for_everyone()


def final_state_dict(accelerator, model) -> dict:
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
