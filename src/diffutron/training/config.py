"""Training settings: dataclasses with typed defaults and help text, loaded strictly from YAML.

One stage of training is a :class:`TrainConfig`; its data is a :class:`DataConfig`, its LoRA
settings a :class:`LoraSettings` and, for training from scratch, its fresh model an
:class:`InitConfig`. :func:`build` makes any of them from a mapping, rejecting unknown
keys (with a "did you mean") and wrong types, and names the file, line and key of every error::

    stage.yaml:7: lora.rank: unknown key (did you mean 'r'?); allowed: r, alpha, ...

pydantic checks the types strictly: ``"8"`` is no int and ``1`` no bool, but an int is a float.
:func:`read_yaml` reads ``1e-4`` as a float, as YAML 1.2 does (YAML 1.1 wants ``1.0e-4``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic_core import core_schema

from ..errors import DiffutronError
from ..objective import IMPLS, WEIGHTINGS
from ..schedules import SCHEDULES, T_SAMPLING

KINDS = ("auto", "pretrain", "instruct")
FORMATS = ("auto", "alpaca", "instructurca", "chat")
PADDINGS = ("pad_as_target", "exclude", "longest_as_target")
SAMPLE_BY = ("line", "paragraph", "document")
METHODS = ("full", "lora")
LR_SCHEDULES = ("cosine", "linear", "constant")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
NOISE_SCHEDULES = tuple(SCHEDULES)
LOSS_WEIGHTINGS = WEIGHTINGS
FUSED_LOSS_IMPLS = ("auto", *IMPLS)
MODERNBERT_LORA_TARGETS = ["Wqkv", "Wo", "Wi"]


class SettingError(DiffutronError):
    """A bad value for one setting; the loader prefixes the file, line and full key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _help(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


class Settings:
    """Base of settings dataclasses: :func:`build` makes them from a mapping (null: an empty one), each
    field's type checked strictly (``"8"`` is no int, ``1`` no bool); other dataclasses get pydantic's lax types."""

    __pydantic_config__ = ConfigDict(strict=True, extra="forbid")

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        schema = handler(source)
        schema["strict"] = False  # strict would want an instance of the dataclass, not a mapping
        return core_schema.no_info_before_validator_function(lambda v: {} if v is None else v, schema)


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise SettingError(key, f"{value!r} is not one of {', '.join(map(str, choices))}")


def _check_range(key: str, value, *, low=None, high=None, low_open=False, allow_none=False) -> None:
    if value is None and allow_none:
        return
    ok = value is not None and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or value <= high)
    if not ok:
        bound = []
        if low is not None:
            bound.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            bound.append(f"<= {high}")
        raise SettingError(key, f"{value!r} must be {' and '.join(bound)}")


# ---------------------------------------------------------------------------------------------
# the settings


@dataclass
class DataConfig(Settings):
    """Where a stage's text comes from and how it becomes training sequences."""

    train: Union[str, list[str], None] = _help(
        "training data: local .txt/.jsonl/.json/.parquet files or directories, or a Hugging Face dataset id", None)
    kind: str = _help("pretrain (packed raw text), instruct (chat / Alpaca / InstrucTurca rows) or auto "
                      "(decided from the first row)", "auto")
    heldout: Union[str, list[str], None] = _help("held-out data (same forms as train); overrides heldout_fraction", None)
    heldout_split: str | None = _help("for hub datasets: a split to hold out (e.g. validation)", None)
    heldout_fraction: float | None = _help(
        "share held out when no heldout is given: pretrain by document (hash of the text), instruct by row "
        "(seeded permutation, as datasets.train_test_split); default 0.01 pretrain, 0.1 instruct; 0 = none", None)
    split_seed: int = _help("seed of the held-out split (the paper's SFT: 42)", 42)
    max_length: int | None = _help("tokens per training sequence; default the paper's: 512 pre-training, 256 "
                                   "instruction tuning (or the model's context when smaller)", None)
    text_column: str = _help("pretrain: the text field / column (the paper's corpus: text)", "text")
    hub_config: str | None = _help("hub datasets: the configuration (subset) name", None)
    split: str = _help("hub datasets: the split to train on", "train")
    revision: str | None = _help("hub datasets: a branch, tag or commit to pin", None)
    streaming: bool = _help("hub datasets: stream rows instead of downloading the whole dataset first", False)
    sample_by: str = _help(".txt files: one document per line, per blank-line paragraph, or per file", "line")
    format: str = _help("instruct rows: alpaca, instructurca, chat or auto (from each file's first row)", "auto")
    alpaca_strip: bool = _help("alpaca rows: strip instruction and input each before joining them with a blank "
                               "line (the reference); false: join them as given (the template strips only the "
                               "whole turn)", True)
    padding: str = _help("instruct: longest_as_target (the reference: each batch padded to its longest row, the "
                         "padding after the answer a target and attended), pad_as_target (every row padded to "
                         "max_length, the padding a target and attended) or exclude (padding neither target nor "
                         "attended)", "pad_as_target")
    pad_weight: float = _help("pad_as_target / longest_as_target: weight of each padding target in the loss "
                              "(1 = reference)", 1.0)
    answer_window: int | None = _help(
        "pad_as_target: train on the prompt plus exactly this many answer positions (answer, end marker, "
        "padding), the canvas the sampler fills with max_new_tokens of the same value; None = pad to max_length",
        None)
    group_by_length: bool = _help(
        "instruct: batch rows of similar width (each run of 16 optimizer steps' rows of the shuffled stream is "
        "sorted by width, then those steps are shuffled): less padding computed, every row once per epoch", False)
    max_rows: int | None = _help("read at most this many rows / documents per source (smoke runs)", None)
    skip_bad_rows: bool = _help("skip (and count and report) rows that are not valid instead of failing", False)
    cache: bool = _help("keep the tokenized data in OUTPUT/cache so a resumed run does not tokenize again", True)

    def __post_init__(self):
        _check_choice("kind", self.kind, KINDS)
        _check_choice("format", self.format, FORMATS)
        _check_choice("padding", self.padding, PADDINGS)
        _check_choice("sample_by", self.sample_by, SAMPLE_BY)
        _check_range("max_length", self.max_length, low=2, allow_none=True)
        _check_range("heldout_fraction", self.heldout_fraction, low=0.0, high=0.5, allow_none=True)
        _check_range("pad_weight", self.pad_weight, low=0.0)
        _check_range("answer_window", self.answer_window, low=1, allow_none=True)
        if self.answer_window is not None and self.padding != "pad_as_target":
            raise SettingError("answer_window", "only works with padding: pad_as_target (exclude pads to the longest "
                               "row); remove answer_window or set padding: pad_as_target")
        _check_range("max_rows", self.max_rows, low=1, allow_none=True)
        for key in ("train", "heldout"):
            value = getattr(self, key)
            if isinstance(value, list) and not value:
                raise SettingError(key, "an empty list: name at least one file or dataset")


@dataclass
class LoraSettings(Settings):
    """LoRA adapters through peft (method: lora)."""

    r: Optional[int] = _help("rank; default the paper's 256 from mmBERT-base's size (hidden 768) up, hidden_size "
                             "// 4 below (64 on the embedded model)", None)
    alpha: Optional[float] = _help("scaling numerator lora_alpha; default the rank (the paper: 256 = r)", None)
    dropout: float = _help("dropout on the adapter input (our choice: 0.05, dLLM's default)", 0.05)
    target_modules: Union[str, list[str], None] = _help(
        "module names to adapt; default peft's all-linear, the reference's (dLLM's default): every linear layer "
        "but the output layer, for ModernBERT/mmBERT Wqkv, Wo, Wi and the MLM head's head.dense; a list such "
        "as [Wqkv, Wo, Wi] adapts the encoder's attention and MLP only", None)
    modules_to_save: list[str] | None = _help("modules trained fully and saved with the adapter (e.g. [head])", None)
    merge: bool = _help("merge the adapter into the weights at the end of the stage (plain checkpoint)", False)

    def __post_init__(self):
        if self.r is not None:
            _check_range("r", self.r, low=1)
        if self.alpha is not None:
            _check_range("alpha", self.alpha, low=0.0, low_open=True)
        _check_range("dropout", self.dropout, low=0.0, high=0.99)
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise SettingError("target_modules", "an empty list: leave it out for the default or name modules")


@dataclass
class InitConfig(Settings):
    """A fresh, randomly initialised model: training from scratch."""

    config: Union[str, dict, None] = _help(
        "model config: a config.json, a directory holding one, or a mapping of its fields "
        "(model_type defaults to modernbert; vocab size and special token ids come from the tokenizer)", None)
    tokenizer: str | None = _help("tokenizer directory (or hub id); it needs a mask token", None)

    def __post_init__(self):
        if self.config is None:
            raise SettingError("config", "missing: give a config.json path or a mapping of config fields")
        if not self.tokenizer:
            raise SettingError("tokenizer", "missing: give the tokenizer directory of the fresh model")


@dataclass
class TrainConfig(Settings):
    """One training stage: start model, data, method and hyper-parameters."""

    model: str | None = _help("start: a model directory (or an unmerged LoRA adapter directory) or a hub id", None)
    init: InitConfig | None = _help("start from a fresh random model instead (training from scratch)", None)
    output_dir: str | None = _help("where checkpoints, metrics and the final model go", None)
    data: DataConfig = _help("the data (see DataConfig)", factory=DataConfig)
    method: str = _help("full (all weights) or lora (adapters through peft)", "full")
    lora: LoraSettings = _help("LoRA settings (method: lora)", factory=LoraSettings)

    epochs: float = _help("passes over the training data (ignored when max_steps is set)", 1.0)
    max_steps: int | None = _help("optimizer steps in total (overrides epochs)", None)
    batch_size: int = _help("sequences per device per micro-batch", 8)
    grad_accum: int = _help("micro-batches per optimizer step", 1)
    lr: float = _help("peak learning rate (dLLM's default 1e-4)", 1e-4)
    lr_schedule: str = _help("cosine, linear or constant, after warm-up", "cosine")
    warmup_ratio: float = _help("share of the steps spent warming up linearly (dLLM's default 0.1)", 0.1)
    warmup_steps: int | None = _help("warm-up in steps (overrides warmup_ratio)", None)
    min_lr_ratio: float = _help("final learning rate as a share of lr (cosine / linear)", 0.0)
    weight_decay: float = _help("AdamW decoupled weight decay (not on biases and norms)", 0.0)
    adam_beta1: float = _help("AdamW beta1", 0.9)
    adam_beta2: float = _help("AdamW beta2", 0.999)
    adam_eps: float = _help("AdamW epsilon", 1e-8)
    max_grad_norm: float | None = _help("clip the global gradient norm to this (None = off)", 1.0)
    mixed_precision: str = _help("auto (bf16 on GPUs that support it, else fp32), no, bf16 or fp16", "auto")
    seed: int = _help("seed of data order, noise draws and initialisation", 42)

    noise_schedule: str = _help("masking schedule alpha(t): linear (the paper), loglinear, cosine", "linear")
    t_sampling: str = _help("diffusion times per batch: iid (the paper), antithetic or stratified", "iid")
    loss_weighting: str = _help("elbo: each masked token weighs w(t) / its sequence's length, the MDLM bound "
                                "(the paper); flat: every masked token of the batch weighs the same "
                                "(BERT's masked-LM loss, not a bound)", "elbo")
    eps: float = _help("t = eps + (1 - eps) * u", 1e-3)
    fused_loss: bool = _help("compute the output layer and the cross-entropy together, in chunks: the same loss "
                             "and gradients with far less memory (false: objective.mdlm_loss)", True)
    fused_loss_impl: str = _help("the fused loss's implementation: auto (per device, objective.AUTO_IMPL), v1, v2 "
                                 "(larger blocks kept in bf16 under autocast) or v2-compiled (v2 with each block's "
                                 "softmax and gradient compiled); the same loss and gradients", "auto")
    compile: bool = _help("compile the encoder layers with torch.compile for the training steps (evaluation runs "
                          "eager); the first steps pay the compile time; ignored under FSDP and DeepSpeed", False)

    log_every: int = _help("optimizer steps between metric lines", 10)
    eval_every: int | None = _help("optimizer steps between held-out evaluations (None: at start and end only)", None)
    eval_at_start: bool = _help("evaluate the held-out set before the first step", True)
    eval_sequences: int | None = _help("held-out sequences used per evaluation (None = all)", 256)
    eval_draws: int = _help("noise draws per held-out sequence (>= 2 gives a standard error; more lowers it)", 2)
    eval_seed: int = _help("seed of the held-out noise draws (fixed, so evaluations compare)", 1234)
    save_every: int | None = _help("optimizer steps between checkpoints (None: only at the end)", 500)
    keep_last: int = _help("complete checkpoints kept (older ones are deleted)", 2)
    keep_checkpoints: bool = _help("keep the checkpoints once the final model is written", True)
    progress: bool = _help("show a progress bar (loss, tokens/s, ETA) on the main process", True)
    tensorboard: bool = _help("also log to OUTPUT/tensorboard when tensorboard is installed", True)
    cpu: bool = _help("train on CPU even when a GPU is present", False)
    trust_remote_code: bool = _help("allow custom model code from the hub", False)
    revision: str | None = _help("hub models: a branch, tag or commit to pin", None)

    def __post_init__(self):
        _check_choice("method", self.method, METHODS)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _check_choice("noise_schedule", self.noise_schedule, NOISE_SCHEDULES)
        _check_choice("t_sampling", self.t_sampling, T_SAMPLING)
        _check_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        _check_choice("fused_loss_impl", self.fused_loss_impl, FUSED_LOSS_IMPLS)
        _check_range("epochs", self.epochs, low=0.0, low_open=True)
        _check_range("max_steps", self.max_steps, low=1, allow_none=True)
        _check_range("batch_size", self.batch_size, low=1)
        _check_range("grad_accum", self.grad_accum, low=1)
        _check_range("lr", self.lr, low=0.0, low_open=True)
        _check_range("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        _check_range("warmup_steps", self.warmup_steps, low=0, allow_none=True)
        _check_range("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        _check_range("weight_decay", self.weight_decay, low=0.0)
        _check_range("adam_beta1", self.adam_beta1, low=0.0, high=0.9999)
        _check_range("adam_beta2", self.adam_beta2, low=0.0, high=0.99999)
        _check_range("adam_eps", self.adam_eps, low=0.0, low_open=True)
        _check_range("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True, allow_none=True)
        _check_range("eps", self.eps, low=0.0, high=0.5)
        _check_range("log_every", self.log_every, low=1)
        _check_range("eval_every", self.eval_every, low=1, allow_none=True)
        _check_range("eval_sequences", self.eval_sequences, low=1, allow_none=True)
        _check_range("eval_draws", self.eval_draws, low=1)
        _check_range("save_every", self.save_every, low=1, allow_none=True)
        _check_range("keep_last", self.keep_last, low=1)
        if self.model is not None and self.init is not None:
            raise SettingError("init", "give either model (a start checkpoint) or init (a fresh model), not both")
        if self.init is not None and self.method == "lora":
            raise SettingError("method", "a fresh model trains with method: full (LoRA needs pretrained weights)")

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# strict loading from mappings and YAML


@dataclass
class Where:
    """Where settings came from: a file name and the line of every key path, for error messages."""

    source: str = "settings"
    lines: dict[str, int] = field(default_factory=dict)

    def error(self, path: str, message: str) -> DiffutronError:
        """``file:line: message``, with the line of ``path`` or of its nearest parent that has one."""
        line, key = None, path
        while key:
            line = self.lines.get(key)
            if line is not None:
                break
            key = re.sub(r"(\.[^.\[\]]+|\[\d+\]|^[^.\[\]]+)$", "", key)
        head = f"{self.source}:{line}" if line else self.source
        return DiffutronError(f"{head}: {message}")


def _join(prefix: str, key) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping of settings"
    return getattr(origin or tp, "__name__", str(tp))


def _describe(value) -> str:
    if isinstance(value, (dict, list)):
        return type(value).__name__.replace("dict", "a mapping").replace("list", "a list")
    return f"{type(value).__name__} {value!r}"


# names other trainers (HF Trainer, peft, dLLM) use, for the "did you mean" of an unknown key
_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs", "max_seq_length": "max_length",
    "model_max_length": "max_length", "lr_scheduler_type": "lr_schedule", "max_grad_norm_clip": "max_grad_norm",
    "save_steps": "save_every", "eval_steps": "eval_every", "logging_steps": "log_every",
    "save_total_limit": "keep_last", "bf16": "mixed_precision", "fp16": "mixed_precision",
    "model_name_or_path": "model", "dataset": "train", "dataset_name": "train", "path": "train",
}
@functools.cache
def _adapter(cls) -> TypeAdapter:
    return TypeAdapter(list[cls], config=ConfigDict(extra="forbid"))  # a dataclass takes no config: its list does


def _locate(cls, loc: tuple) -> tuple[list, Any]:
    """The keys and the type of the setting at a pydantic error location (a union's member tags dropped)."""
    keys, tp = [], cls
    for part in loc:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
            tp = args[0]  # X | None: pydantic puts no member tag in the location
        if dataclasses.is_dataclass(tp) and part in typing.get_type_hints(tp):
            tp = typing.get_type_hints(tp)[part]
        elif typing.get_origin(tp) in (list, dict) and typing.get_args(tp):
            tp = typing.get_args(tp)[-1]
        else:
            break
        keys.append(part)
    return keys, tp


def build(cls, data, where: Where | None = None, path: str = ""):
    """An instance of the settings dataclass ``cls`` from a mapping, strictly (through pydantic).

    Raises:
        DiffutronError: an unknown key (with a "did you mean"), a value of the wrong type or out
            of range; one line, starting with ``file:line:`` when ``where`` knows them.
    """
    try:
        return _adapter(cls).validate_python([{} if data is None else data])[0]
    except ValidationError as err:
        errors = err.errors(include_url=False)
    error = next((e for e in errors if e["type"] == "unexpected_keyword_argument"), errors[0])  # unknown keys first
    loc = error["loc"][1:]  # [0] is the index in the list
    keys, tp = _locate(cls, loc)
    cause = (error.get("ctx") or {}).get("error")  # an exception __post_init__ raised
    if error["type"] == "unexpected_keyword_argument":
        key, names = str(loc[len(keys)]), [f.name for f in dataclasses.fields(tp)]
        close = [_ALIASES[key]] if _ALIASES.get(key) in names else difflib.get_close_matches(key, names, n=1)
        keys.append(key)
        message = f"unknown key{f' (did you mean {close[0]!r}?)' if close else ''}; allowed: {', '.join(names)}"
    elif isinstance(cause, SettingError):
        keys.append(cause.key)
        message = cause.message
    elif cause is not None or error["type"] == "missing":
        message = str(cause or "missing")
    else:
        message = f"expected {_type_name(tp)}, got {_describe(error['input'])}"
    full = functools.reduce(_join, keys, path)
    raise (where or Where()).error(full, f"{full or 'settings'}: {message}") from None


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-4`` and ``1.5E3`` as floats (YAML 1.2)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def read_yaml(path: str | Path) -> tuple[Any, Where]:
    """Parse a YAML file; returns the data and a :class:`Where` with the line of every key.

    Raises:
        DiffutronError: a missing or unreadable file, bad UTF-8 or a YAML syntax error (with its line).
    """
    path = Path(path)
    if not path.is_file():
        raise DiffutronError(f"settings file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DiffutronError(f"{path}: not valid UTF-8 (byte {err.start}): save it as UTF-8") from None
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise DiffutronError(f"{path}{line}: not valid YAML: {problem}") from None
    lines: dict[str, int] = {}
    _record_lines(node, "", lines)
    return data, Where(str(path), lines)


def _record_lines(node, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = _join(prefix, key_node.value)
            lines[key] = key_node.start_mark.line + 1
            _record_lines(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = _join(prefix, i)
            lines[key] = item.start_mark.line + 1
            _record_lines(item, key, lines)


def load_train_config(path: str | Path, **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from a stage YAML file; ``overrides`` (non-None values) win."""
    data, where = read_yaml(path)
    config = build(TrainConfig, data, where)
    return apply_overrides(config, overrides)


def apply_overrides(config: TrainConfig, overrides: dict) -> TrainConfig:
    """Set top-level or ``data.``/``lora.`` fields (keys like ``data.max_length``) that are not None."""
    top, data, lora = {}, {}, {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("data."):
            data[key[5:]] = value
        elif key.startswith("lora."):
            lora[key[5:]] = value
        else:
            top[key] = value
    try:
        if data:
            top["data"] = dataclasses.replace(config.data, **data)
        if lora:
            top["lora"] = dataclasses.replace(config.lora, **lora)
        return dataclasses.replace(config, **top) if top else config
    except SettingError as err:
        raise DiffutronError(f"{err.key}: {err.message}") from None
