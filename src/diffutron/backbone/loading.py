"""Loading the encoder: devices and dtypes (``resolve_device``, ``check_device``,
``resolve_dtype``), ``load_backbone`` (any ``AutoModelForMaskedLM`` with its tokenizer,
safetensors only, LoRA adapters unmerged) and faster inference weights (``make_fast``: bf16 or
int8; ``fast_defaults``). Re-exported by ``backbone``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .tokenizer import check_tokenizer, install_chat_template
from ..errors import DiffutronError

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


# ---------------------------------------------------------------------------------------------
# devices and dtypes


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` = CUDA, then MPS, else CPU."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DiffutronError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    check_device(dev)
    return dev


def check_device(dev: torch.device) -> None:
    """A device this torch can use, or a one-line error naming what is missing."""
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise DiffutronError(f"device {dev}: this torch ({torch.__version__}) has no CUDA support; use --device "
                                 "cpu, or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise DiffutronError(f"device {dev}: no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES?); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DiffutronError(f"device {dev}: only {torch.cuda.device_count()} CUDA GPU(s) here (cuda:0 to "
                                 f"cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                    and torch.backends.mps.is_available()):
        raise DiffutronError(f"device {dev}: Apple's MPS is not available here; use --device cpu")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` = float32 on CPU, bfloat16 on GPUs."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise DiffutronError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}") from None


# ---------------------------------------------------------------------------------------------
# loading


def _is_local(path: str) -> bool:
    return os.path.isdir(os.path.expanduser(path))


def _check_local_dir(path: Path) -> None:
    if (path / "adapter_config.json").exists():
        return
    if not (path / "config.json").exists():
        raise DiffutronError(f"{path} has no config.json: point --model at a saved model directory")
    if not any((path / f).exists() for f in _WEIGHT_FILES):
        if (path / "pytorch_model.bin").exists():
            raise DiffutronError(
                f"{path} holds only pytorch_model.bin; diffutron loads safetensors only "
                "(convert it with transformers: model.save_pretrained(dir, safe_serialization=True))"
            )
        raise DiffutronError(f"{path} has no model.safetensors: the directory holds no weights")


def load_backbone(
    name_or_path: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """Load an ``AutoModelForMaskedLM`` encoder and its tokenizer (safetensors only).

    ``name_or_path`` is a local directory or a hub id; a directory holding a peft LoRA adapter
    (``adapter_config.json``) loads its base model and applies the adapter (unmerged).
    Returns ``(model, tokenizer)`` with the model in eval mode on ``device``.

    Raises:
        DiffutronError: no weights, no mask token, an architecture that is not a masked LM, or a
            hub id that cannot be reached.
    """
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar on every load is noise

    local = _is_local(name_or_path)
    path = Path(os.path.expanduser(name_or_path)) if local else None
    if local:
        _check_local_dir(path)
    elif name_or_path.count("/") > 1 or name_or_path.startswith((".", "~", "/")):
        raise DiffutronError(f"model directory {name_or_path} does not exist")

    adapter_dir = path if local and (path / "adapter_config.json").exists() else None
    base = name_or_path
    if adapter_dir is not None:
        base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise DiffutronError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path")

    common = {"trust_remote_code": trust_remote_code, "revision": revision}
    try:
        config = AutoConfig.from_pretrained(base, **common)
    except (OSError, ValueError) as err:
        raise _load_error(base, err) from None
    if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not trust_remote_code:
        raise DiffutronError(
            f"{base}: architecture {config.model_type!r} has no masked-LM head in transformers "
            "(use a ModernBERT/mmBERT, BERT or XLM-R encoder, or pass trust_remote_code for custom code)"
        )
    tok_source = adapter_dir if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").exists() else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_source, **common)
        model = AutoModelForMaskedLM.from_pretrained(
            base, config=config, dtype=dtype, use_safetensors=True, **common
        )
    except (OSError, ValueError) as err:
        raise _load_error(base, err) from None
    except Exception as err:  # noqa: BLE001 - safetensors' own error type: a truncated or garbled file
        if type(err).__name__ != "SafetensorError":
            raise
        where = path if local else base
        raise DiffutronError(f"{where}: the model's safetensors weights are corrupt or truncated ({err}); copy or "
                             "download them again") from None
    check_tokenizer(tokenizer, f"the tokenizer of {name_or_path}")
    install_chat_template(tokenizer)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.to(device)
    model.eval()
    return model, tokenizer


def _load_error(name: str, err: Exception) -> DiffutronError:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in text.lower() or "offline" in text.lower()
    if not _is_local(name) and offline:
        return DiffutronError(
            f"cannot reach the Hugging Face hub to fetch {name!r} (offline?): download it where you are "
            "online and pass the local directory"
        )
    if not _is_local(name):
        return DiffutronError(f"cannot load {name!r}: not a local directory and the hub says: {text}")
    return DiffutronError(f"cannot load {name}: {text}")


# ---------------------------------------------------------------------------------------------
# fast inference weights


FAST_MODES = ("bf16", "int8")


def fast_defaults(device: torch.device | str) -> tuple[str, str]:
    """What ``--fast`` means for a model on ``device`` when nothing more is said: (weights, cache).
    On CPUs int8 weights and the delayed cache (a step runs only the block's masks and new tokens:
    fewer columns is less work there); on GPUs bf16 weights and the dual cache, the one the compiled
    engine runs (its steps keep a fixed shape; see sampling.engine)."""
    cpu = torch.device(device).type == "cpu"
    return ("int8", "delayed") if cpu else ("bf16", "dual")


# The int8 output layer is packed for oneDNN's kernels where this torch has them (x86 CPUs): at a
# sampler step's 1-32 rows it then streams its 197 MB at about memory speed (measured here, 32 rows
# of mmBERT's 256k x 768: 31-41 ms with the default engine's packing, 13 ms with oneDNN's), with
# the same per-tensor quantization. The encoder's small layers stay on the default engine, which is
# as fast or faster for them.
HEAD_INT8_ENGINE = "onednn"


def make_fast(model: nn.Module, mode: str | None = None) -> nn.Module:
    """Approximate, faster inference weights: ``bf16`` (all weights in bfloat16) or ``int8``
    (dynamic int8 quantization of every Linear layer, the MLM output layer included; CPU only);
    ``None`` picks by the model's device (see fast_defaults). Returns the model to use (int8
    builds a new module)."""
    if mode is None:
        mode = fast_defaults(next(model.parameters()).device)[0]
    if mode == "bf16":
        return model.to(torch.bfloat16)
    if mode == "int8":
        import warnings

        if next(model.parameters()).device.type != "cpu":
            raise DiffutronError(f"int8 dynamic quantization runs on CPU only, and the model is on "
                                 f"{next(model.parameters()).device}: use --fast-mode bf16 (mode='bf16') "
                                 "there, or load the model with --device cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

            model = model.float()
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            name = next((n for n, m in model.named_modules() if m is head and isinstance(m, nn.Linear)), None)
            if name is not None and HEAD_INT8_ENGINE in torch.backends.quantized.supported_engines:
                engine = torch.backends.quantized.engine
                torch.backends.quantized.engine = HEAD_INT8_ENGINE  # the engine that packs a layer runs it
                try:
                    model = quantize_dynamic(model, {name: default_dynamic_qconfig})
                finally:
                    torch.backends.quantized.engine = engine
                return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
            return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    raise DiffutronError(f"unknown fast mode {mode!r}; choose one of {', '.join(FAST_MODES)}")
