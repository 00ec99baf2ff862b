"""A recipe's ``prepare:`` section: build the offline Turkish corpus, tasks and tokenizer when
they are missing, and export domain groups of the corpus as training files.

::

    prepare:
      corpus: null                 # directory (default: the cache, ~/.cache/diffutron/corpus)
      tasks: null                  # directory (default: the cache)
      tokenizer: null              # directory (default: the cache)
      vocab_size: 16384
      include_debian: true
      exclude_licenses: []
      groups:                      # name -> corpus domains or domain groups
        scratch: [technical, lexical]
        cpt: [prose]
      quick: {include_debian: false, vocab_size: 4000, max_train_per_task: 300}

Stage settings may then use ``${corpus}``, ``${tasks}``, ``${tokenizer}`` and ``${data}`` (the
folder of the exported groups: ``${data}/cpt/train.jsonl``, ``${data}/cpt/validation.jsonl``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DiffutronError
from .config import Settings


@dataclass
class PrepareConfig(Settings):
    """The ``prepare:`` mapping of a recipe (loaded strictly by ``config.build``)."""

    corpus: str | None = None
    tasks: str | None = None
    tokenizer: str | None = None
    vocab_size: int = 16384
    include_debian: bool = True
    exclude_licenses: list[str] = field(default_factory=list)
    max_train_per_task: int = 4000
    max_heldout_per_task: int = 400
    groups: dict[str, list[str]] = field(default_factory=dict)
    quick: dict = field(default_factory=dict)


def paths(cfg: PrepareConfig, data_dir: Path, *, quick: bool = False) -> dict[str, str]:
    """The placeholder values: where corpus, tasks, tokenizer and exported groups live."""
    from ..corpus.build import default_corpus_dir
    from ..corpus.tasks import default_tasks_dir
    from ..corpus.tokenizer import default_tokenizer_dir

    suffix = "-quick" if quick else ""

    def pick(value, default: Path) -> str:
        return str(Path(value).expanduser()) if value else str(default.with_name(default.name + suffix))

    return {
        "corpus": pick(cfg.corpus, default_corpus_dir()),
        "tasks": pick(cfg.tasks, default_tasks_dir()),
        "tokenizer": pick(cfg.tokenizer, default_tokenizer_dir()),
        "data": str(data_dir),
    }


def prepare(cfg: PrepareConfig, where: dict[str, str], *, log=print) -> None:
    """Build whatever is missing: corpus, tokenizer, tasks, exported groups (each atomically)."""
    from ..corpus.build import build_corpus, iter_corpus
    from ..corpus.tasks import TASKS_FORMAT, build_tasks
    from ..corpus.tokenizer import is_outdated, load_tokenizer, train_tokenizer

    corpus, tasks, tok_dir, data = (Path(where[k]) for k in ("corpus", "tasks", "tokenizer", "data"))
    if not (corpus / "stats.json").is_file():
        log(f"prepare: building the Turkish corpus in {corpus}")
        build_corpus(corpus, exclude_licenses=cfg.exclude_licenses, include_debian=cfg.include_debian)
    have_tokenizer = (tok_dir / "tokenizer.json").is_file()
    retrain = not have_tokenizer or is_outdated(tok_dir)
    if retrain:
        why = "is of an older format; retraining it" if have_tokenizer else "is missing"
        log(f"prepare: the tokenizer in {tok_dir} {why} ({cfg.vocab_size} tokens)")
        train_tokenizer(corpus, tok_dir, vocab_size=cfg.vocab_size)
    stats = tasks / "stats.json"
    outdated = stats.is_file() and json.loads(stats.read_text(encoding="utf-8")).get("format") != TASKS_FORMAT
    if not stats.is_file() or retrain or outdated:  # tasks drop rows by their token count
        log(f"prepare: writing the instruction tasks in {tasks}" + (" (of an older format)" if outdated else ""))
        build_tasks(corpus, tasks, tokenizer=load_tokenizer(tok_dir), max_train_per_task=cfg.max_train_per_task,
                    max_heldout_per_task=cfg.max_heldout_per_task)
    for name, domains in cfg.groups.items():
        for split in ("train", "validation", "test"):
            target = data / name / f"{split}.jsonl"
            if target.is_file():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            rows = [{"text": d["text"], "domain": d["domain"], "source": d["source"]}
                    for d in iter_corpus(split, corpus, domains)]
            if not rows:
                raise DiffutronError(f"prepare.groups.{name}: no {split} documents of domains {domains} in {corpus}")
            tmp = target.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            tmp.replace(target)


def substitute(value, where: dict[str, str]):
    """Replace ``${corpus}``, ``${tasks}``, ``${tokenizer}``, ``${data}`` in every string of a YAML tree."""
    if isinstance(value, str):
        for key, path in where.items():
            value = value.replace("${" + key + "}", path)
        return value
    if isinstance(value, list):
        return [substitute(v, where) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, where) for k, v in value.items()}
    return value
