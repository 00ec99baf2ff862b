"""What a stage starts from: the model (checkpoint, adapter, hub id or fresh) and its data.

Tokenized data is cached under ``OUTPUT/cache/<fingerprint>/`` (a directory written under a
temporary name and renamed), so a resumed run reads exactly the sequences the interrupted one
trained on, without tokenizing again, and the processes of a distributed run tokenize once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from ..backbone import check_tokenizer, install_chat_template, load_backbone
from ..data.instruct import InstructDataset, build_instruct, dataset_kwargs, detect_format
from ..data.pretrain import PackedDataset, build_pretrain
from ..data.rows import ReadReport, is_local, iter_rows, local_files
from ..errors import DiffutronError
from .config import DataConfig, InitConfig, TrainConfig
from .lora import is_peft, merge_lora

CACHE = "cache"
_CACHE_VERSION = 1


def _log(message: str) -> None:
    print(f"diffutron: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# the start model


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(name)) or name.count("/") != 1


def check_start(model: str | None, init: InitConfig | None, key: str = "model") -> None:
    """Fail early on a start that cannot exist (a missing directory, config or tokenizer path)."""
    if model is not None and looks_like_path(model) and not os.path.isdir(os.path.expanduser(model)):
        raise DiffutronError(f"{key}: start model directory {model} does not exist")
    if init is not None:
        if isinstance(init.config, str) and not os.path.exists(os.path.expanduser(init.config)):
            raise DiffutronError(f"{key}.config: model config {init.config} does not exist")
        if looks_like_path(init.tokenizer) and not os.path.isdir(os.path.expanduser(init.tokenizer)):
            raise DiffutronError(f"{key}.tokenizer: tokenizer directory {init.tokenizer} does not exist")


def load_start(config: TrainConfig):
    """``(model, tokenizer, description)`` for the stage's start, on CPU in float32.

    An unmerged LoRA adapter directory is loaded on its base and merged in memory.
    """
    if config.init is not None:
        model, tokenizer = fresh_model(config.init, seed=config.seed, trust_remote_code=config.trust_remote_code)
        return model, tokenizer, "a fresh random model"
    name = config.model
    local = os.path.isdir(os.path.expanduser(name))
    if local:  # absolute, so an adapter trained on it records a base path that works from anywhere
        name = str(Path(os.path.expanduser(name)).resolve())
    model, tokenizer = load_backbone(name, device=torch.device("cpu"), dtype=torch.float32,
                                     trust_remote_code=config.trust_remote_code, revision=config.revision)
    description = name
    if is_peft(model):
        if config.method == "lora" and not config.lora.merge:
            raise DiffutronError(
                f"model: {config.model} is an unmerged LoRA adapter; a new adapter on top of it could not be loaded "
                "on its own: merge it first (diffutron merge DIR --output MERGED) or set lora.merge: true")
        _log(f"{config.model} is a LoRA adapter: merging it into its base before training")
        model = merge_lora(model)
        description = f"{name} (adapter merged)"
    return model, tokenizer, description


def fresh_model(init: InitConfig, *, seed: int, trust_remote_code: bool = False):
    """A randomly initialised masked LM sized for the tokenizer (vocab and special ids from it)."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(init.tokenizer), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise DiffutronError(f"init.tokenizer: cannot load {init.tokenizer}: {str(err).splitlines()[0]}") from None
    check_tokenizer(tokenizer, f"the tokenizer in {init.tokenizer}")
    install_chat_template(tokenizer)
    fields = _config_fields(init.config)
    model_type = fields.pop("model_type", "modernbert")
    fields["vocab_size"] = len(tokenizer)
    for name in ("pad", "bos", "eos", "cls", "sep", "mask"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None and name != "mask":
            fields[f"{name}_token_id"] = tid
    if fields.get("bos_token_id") is None and tokenizer.cls_token_id is not None:
        fields["bos_token_id"] = tokenizer.cls_token_id
    try:
        config = AutoConfig.for_model(model_type, **fields)
        torch.manual_seed(seed)
        model = AutoModelForMaskedLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError) as err:
        raise DiffutronError(f"init.config: cannot build a {model_type} masked LM: {str(err).splitlines()[0]}") from None
    limit = getattr(tokenizer, "model_max_length", None)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos and (not isinstance(limit, int) or limit > max_pos):
        tokenizer.model_max_length = max_pos
    return model, tokenizer


def _config_fields(source) -> dict:
    if isinstance(source, dict):
        return dict(source)
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DiffutronError(f"init.config: cannot read {path}: {err}") from None
    for key in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        data.pop(key, None)
    return data


# ---------------------------------------------------------------------------------------------
# the data


def resolve_kind(cfg: DataConfig) -> str:
    """``pretrain`` or ``instruct``: from the setting, else from the fields of the first row."""
    if cfg.kind != "auto":
        return cfg.kind
    spec = cfg.train if isinstance(cfg.train, str) else cfg.train[0]
    rows = iter_rows(spec, report=ReadReport(), skip_bad_rows=True, sample_by=cfg.sample_by, split=cfg.split,
                     hub_config=cfg.hub_config, revision=cfg.revision, streaming=True, max_rows=20)
    for row in rows:
        try:
            detect_format(row)
            return "instruct"
        except DiffutronError:
            return "pretrain"
    return "pretrain"


def _source_stamp(spec: str) -> list:
    if is_local(spec):
        return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in local_files(spec)]
    return [spec]


def _tokenizer_stamp(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def data_fingerprint(cfg: DataConfig, kind: str, tokenizer) -> str:
    relevant = dataclasses.asdict(cfg)
    relevant.pop("cache")
    relevant["kind"] = kind
    sources = [_source_stamp(s) for s in ([cfg.train] if isinstance(cfg.train, str) else cfg.train)]
    if cfg.heldout is not None:
        sources += [_source_stamp(s) for s in ([cfg.heldout] if isinstance(cfg.heldout, str) else cfg.heldout)]
    blob = json.dumps([_CACHE_VERSION, relevant, sources, _tokenizer_stamp(tokenizer)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def build_data(cfg: DataConfig, tokenizer, *, kind: str):
    """``(train, heldout or None, report dict)`` for ``kind`` pretrain or instruct."""
    if kind == "pretrain":
        train, held, report = build_pretrain(tokenizer, cfg)
    else:
        train, held, report = build_instruct(tokenizer, cfg)
    return train, held, dataclasses.asdict(report) | {"kind": kind, "summary": report.summary()}


def load_cached(directory: Path, cfg: DataConfig, tokenizer, kind: str):
    """The data saved by :func:`save_cache`, or None when there is none."""
    if not (directory / "report.json").is_file():
        return None
    report = json.loads((directory / "report.json").read_text(encoding="utf-8"))
    if kind == "pretrain":
        train = PackedDataset.load(directory, "train")
        held = PackedDataset.load(directory, "heldout") if (directory / "heldout_ids.npy").exists() else None
    else:
        kw = dataset_kwargs(cfg, tokenizer)
        train = InstructDataset.load(directory, "train", **kw)
        held = InstructDataset.load(directory, "heldout", **kw) if (directory / "heldout_ids.npy").exists() else None
    return train, held, report


def save_cache(directory: Path, train, held, report: dict) -> None:
    """Write the tokenized data under a temporary name, then rename it into place."""
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train.save(tmp, "train")
    if held is not None:
        held.save(tmp, "heldout")
    (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
