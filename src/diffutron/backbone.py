"""The encoder behind a diffusion LM: loading, the tokenizer's special ids, the chat template, and
logits at chosen positions.

Everything model-specific lives here, so the objective, the sampler, the likelihood estimator
and the server share one forward helper, :func:`logits_at`, which runs the encoder over the
whole canvas but the (256k-wide) MLM head only at the positions that will be read, and one rule
each for the end-of-text id, the pad id and right-padding ragged rows (:func:`end_of_text_id`,
:func:`pad_token_id`, :func:`right_pad`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import DiffutronError

# The Diffutron chat template (plain-text markers, content stripped). Written with Jinja string
# expressions only, so whitespace control can never eat the newlines the checkpoints were trained on.
# Edges, against the reference's template: a generation prompt after a conversation that already
# ends with the assistant's answer adds nothing (as the reference); a system message after the first
# message, which the reference drops without a word, and a role other than system / user /
# assistant, which it skips, raise an error naming the message instead.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}"
    "{{ raise_exception('messages[' ~ loop.index0 ~ '] is a system message after the first message: the "
    "Diffutron template has a system message only at the start; move it to the start or make it a user message') }}"
    "{%- endif -%}"
    "{{ '[SYS]\\n' + (message['content'] | trim) + '\\n[/SYS]\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '[Question]\\n' + (message['content'] | trim) + '\\n[/Question]\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '[Answer]\\n' + (message['content'] | trim) + '\\n[/Answer]\\n\\n' }}"
    "{%- else -%}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and (messages | length == 0 or messages[-1]['role'] != 'assistant') -%}"
    "{{ '[Answer]\\n' }}"
    "{%- endif -%}"
)
END_OF_TURN = "[/Answer]"
ROLES = ("system", "user", "assistant")

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
# tokenizer


def install_chat_template(tokenizer, *, force: bool = False) -> None:
    """Install the Diffutron chat template on a tokenizer that has none (or always, with force)."""
    if force or not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE


def check_tokenizer(tokenizer, where: str = "the tokenizer") -> None:
    """A diffusion LM needs a mask token; everything else has a fallback."""
    if tokenizer.mask_token_id is None:
        raise DiffutronError(
            f"{where} has no mask token; a masked diffusion LM needs one "
            "(add it with tokenizer.add_special_tokens({'mask_token': '[MASK]'}) and resize the embeddings)"
        )


def end_of_text_id(tokenizer) -> int | None:
    """The id that ends a text: EOS, else SEP (BERT-style tokenizers), else None. Pre-training
    appends it to every document; the sampler stops at it."""
    for tid in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if tid is not None:
            return int(tid)
    return None


def choose_pad_id(pad: int | None, end_of_text: int | None, mask: int | None) -> int:
    """The padding rule on ids: ``pad``, else ``end_of_text``, else ``mask`` (see pad_token_id).

    Raises:
        DiffutronError: all three are None.
    """
    for tid in (pad, end_of_text, mask):
        if tid is not None:
            return int(tid)
    raise DiffutronError("the tokenizer has no pad, EOS or SEP token to pad with")


def pad_token_id(tokenizer, *, mask_fallback: bool = True) -> int:
    """The id that pads ragged rows: the pad token, else the end of text (EOS, then SEP), else the
    mask token. Padding is never attended, and sampled answers are cut before it, so any id works
    there; training data trains its padding as a target (``pad_as_target``), where the mask token
    would make no sense, so it passes ``mask_fallback=False``.

    Raises:
        DiffutronError: the tokenizer has none of these tokens.
    """
    mask = tokenizer.mask_token_id if mask_fallback else None
    return choose_pad_id(tokenizer.pad_token_id, end_of_text_id(tokenizer), mask)


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists as ``(input_ids, attention_mask)``, LongTensors [B, longest row]: each row
    left-aligned and filled up with ``pad_id``, the mask 1 on its real tokens; on ``device``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        att[r, : len(row)] = 1
    return ids.to(device), att.to(device)


def stop_token_sequences(tokenizer) -> list[list[int]]:
    """Token-id sequences that end an answer: the end-of-turn marker as it appears after a newline."""
    seqs = []
    for text in (END_OF_TURN, "\n" + END_OF_TURN):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if text.startswith("\n"):
            nl = tokenizer.encode("\n", add_special_tokens=False)
            if ids[: len(nl)] == nl:
                ids = ids[len(nl):]
        if ids and ids not in seqs:
            seqs.append(ids)
    return seqs


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


def context_length(model, tokenizer) -> int:
    """Positions the model can attend to: its position limit, or the tokenizer's if smaller."""
    config = unwrap(model).config
    limit = getattr(config, "max_position_embeddings", None) or 512
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < limit:
        limit = tok_max
    return int(limit)


# ---------------------------------------------------------------------------------------------
# the forward helper


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face masked-LM module inside DDP/FSDP, torch.compile and peft wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        else:
            return model


def encoder_of(model: nn.Module) -> nn.Module | None:
    """The encoder whose output the MLM head reads (``model.model`` for ModernBERT, ``.bert``...)."""
    inner = unwrap(model)
    encoder = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    return encoder if isinstance(encoder, nn.Module) and encoder is not inner else None


@contextlib.contextmanager
def _gather_hidden(encoder: nn.Module, flat_index: torch.Tensor):
    """Within the block, the encoder returns its hidden states at ``flat_index`` only, [N, H]."""

    def hook(module, args, output):
        hidden = output[0]
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_index)
        if isinstance(output, tuple):
            return (picked,) + tuple(output[1:])
        output["last_hidden_state"] = picked
        return output

    handle = encoder.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# CPU inference in float32 runs the output layer through oneDNN with a prepacked copy of its weight:
# at the 1-32 rows a sampler step reads, that is ~1.3-2x faster than the plain addmm for a 256k
# vocabulary, at the cost of a second copy of the output matrix while a generation runs (+0.8 GB
# for mmBERT-base). DIFFUTRON_PACKED_HEAD=0 turns it off.
PACKED_HEAD = os.environ.get("DIFFUTRON_PACKED_HEAD", "1") != "0"
_PACK_ROWS = 32  # the row count oneDNN lays the packed weight out for (a sampler block's width)


def _can_pack(layer) -> bool:
    return (PACKED_HEAD and isinstance(layer, nn.Linear) and not torch.is_grad_enabled()
            and "forward" not in vars(layer)  # already swapped (the fused training loss, an outer call)
            and layer.weight.device.type == "cpu" and layer.weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@contextlib.contextmanager
def packed_head(model: nn.Module):
    """Within the block, the model's output layer multiplies by a copy of its weight that oneDNN
    packed on entry (CPU, float32, no autograd; otherwise nothing changes). The values are those
    of the plain layer up to float rounding. The weights must not change inside the block: the
    sampler holds it for one generation."""
    get = getattr(unwrap(model), "get_output_embeddings", None)
    layer = get() if callable(get) else None
    if not _can_pack(layer):
        yield
        return
    packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), _PACK_ROWS)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):  # e.g. evaluation inside a bf16 run
            return torch.nn.functional.linear(x, layer.weight, layer.bias)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(flat, packed, layer.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])

    layer.forward = forward  # an instance attribute: the class's forward is untouched
    try:
        yield
    finally:
        layer.__dict__.pop("forward", None)


def logits_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor | dict | None = None,
) -> torch.Tensor:
    """Logits [N, V] at the ``True`` entries of ``positions`` (bool [B, L]), in row-major order,
    or at ``positions`` given as a flat index into [B * L] (a fixed N: no host read, as CUDA
    graphs need).

    The encoder runs over the whole canvas; the MLM head (the costly 256k-wide matmul for mmBERT)
    runs only at the N chosen positions. The gather happens inside the model's own forward
    (a hook on its encoder), so DDP/FSDP/peft wrappers see one ordinary forward call.
    ``attention_mask``: [B, L] (1 = real token), or ModernBERT's prepared per-layer-type masks
    (``modernbert_masks``).
    """
    flat_index = positions if positions.dtype != torch.bool else positions.reshape(-1).nonzero().squeeze(-1)
    encoder = encoder_of(model)
    if encoder is None:  # unknown layout: full logits, then pick
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits.reshape(-1, logits.shape[-1]).index_select(0, flat_index)
    with _gather_hidden(encoder, flat_index):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def is_modernbert(model: nn.Module) -> bool:
    return type(unwrap(model)).__name__ == "ModernBertForMaskedLM"


def modernbert_masks(q_pos: torch.Tensor, keys_att: torch.Tensor, half_window: int) -> dict[str, torch.Tensor]:
    """ModernBERT's boolean attention masks [b, 1, n, L] per layer type (True = attend), for queries
    at positions ``q_pos`` [b, n] over keys ``keys_att`` [b, L] (True = a real token): every real
    key for global layers, real keys within ``half_window`` of the query for sliding ones (the
    model's ``local_attention // 2``). Built from tensors alone (no host read)."""
    k_pos = torch.arange(keys_att.shape[1], device=q_pos.device)
    full = keys_att[:, None, None, :].expand(-1, 1, q_pos.shape[1], -1)
    near = (q_pos[:, :, None] - k_pos[None, None, :]).abs() <= half_window  # [b, n, L]
    return {"full_attention": full, "sliding_attention": full & near[:, None]}


def modernbert_logits_at(model: nn.Module, input_ids: torch.Tensor, flat_index: torch.Tensor,
                         masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """``logits_at`` for ModernBERT inference with prepared ``modernbert_masks`` and a flat index,
    written as plain calls of the model's modules (no hook: torch.compile traces it whole)."""
    inner = unwrap(model)
    hidden = inner.model(input_ids=input_ids, attention_mask=masks).last_hidden_state
    return modernbert_head(inner, hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_index))


def modernbert_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """ModernBERT's MLM head (prediction head, then the output layer) on hidden states [..., H]."""
    inner = unwrap(model)
    return inner.decoder(inner.head(hidden))


def full_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, L, V] at every position (what the research code computes; for references)."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


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
