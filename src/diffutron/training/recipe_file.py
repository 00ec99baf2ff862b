"""Reading a recipe file: ``load_recipe`` checks the whole YAML (top-level keys, variants,
``--quick``, ``prepare:``, ``export:`` and every stage's settings, start and data) into a
``Recipe`` of ``Stage``s before anything runs. The file's format: ``recipe.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..data.rows import check_sources
from ..errors import DiffutronError
from .config import InitConfig, SettingError, TrainConfig, Where, build, read_yaml
from .export import ExportConfig
from .inputs import check_start
from .prepare import PrepareConfig, paths, substitute
from .task_metric import MetricConfig

TOP_KEYS = ("name", "description", "output_dir", "defaults", "quick", "stages", "prepare", "export", "variants")
PREVIOUS = "previous"
# what --quick changes in every stage unless the recipe's quick: mapping says otherwise
QUICK_DEFAULTS = {"max_steps": 4, "batch_size": 2, "grad_accum": 1, "log_every": 1, "eval_sequences": 8,
                  "save_every": 2, "data": {"max_rows": 200, "heldout_fraction": 0.1}}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Stage:
    """One stage of a recipe: its name, where it starts (for messages) and its training config."""

    name: str
    start: str
    config: TrainConfig
    metric: MetricConfig | None = None


@dataclass
class Recipe:
    name: str
    output_dir: Path
    stages: list[Stage] = field(default_factory=list)
    source: str = ""
    prepare: PrepareConfig | None = None
    where: dict = field(default_factory=dict)  # ${corpus}, ${tasks}, ${tokenizer}, ${data}
    export: ExportConfig | None = None
    quick: bool = False
    variant: str | None = None

    def pending(self, path) -> bool:
        """A path that ``prepare`` will create but that does not exist yet (not checked now)."""
        return (path is not None and self.prepare is not None and not Path(str(path)).exists()
                and any(str(path).startswith(v) for v in self.where.values()))


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "config":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _deep_merge(base, over):
    """``over`` merged into ``base`` key by key at every depth (lists and scalars replace)."""
    if not isinstance(base, dict) or not isinstance(over, dict):
        return copy.deepcopy(over)
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if key in out else copy.deepcopy(value)
    return out


def resolve_variant(data: dict, variant: str | None) -> str | None:
    """``auto``: the recipe's ``cpu`` variant where no CUDA device is present, else none."""
    if variant != "auto":
        return variant
    import torch

    has_cpu = isinstance(data.get("variants"), dict) and "cpu" in data["variants"]
    return "cpu" if has_cpu and not torch.cuda.is_available() else None


def _apply_variant(data: dict, variant: str, where: Where) -> dict:
    variants = data.get("variants") or {}
    if not isinstance(variants, dict) or variant not in variants:
        raise where.error("variants", f"variants: no variant {variant!r} in this recipe; it has: "
                                      f"{', '.join(variants) if isinstance(variants, dict) and variants else 'none'}")
    over = variants[variant] or {}
    allowed = ("output_dir", "defaults", "quick", "stages", "prepare", "export", "description")
    for key in over:
        if key not in allowed:
            raise where.error(f"variants.{variant}.{key}", f"variants.{variant}.{key}: unknown key; allowed: "
                                                           f"{', '.join(allowed)}")
    out = {k: v for k, v in data.items() if k != "variants"}
    out["output_dir"] = over.get("output_dir") or f"{data.get('output_dir')}-{variant}"
    for key in ("defaults", "quick", "prepare", "export"):
        if over.get(key) is not None:
            out[key] = _deep_merge(data.get(key) or {}, over[key])
    stages = over.get("stages") or {}
    names = [s.get("name") for s in data.get("stages") or [] if isinstance(s, dict)]
    unknown = [n for n in stages if n not in names]
    if unknown:
        raise where.error(f"variants.{variant}.stages", f"variants.{variant}.stages: no stage {unknown[0]!r} in the "
                                                        f"recipe (stages: {', '.join(map(str, names))})")
    out["stages"] = [_deep_merge(s, stages[s["name"]]) if isinstance(s, dict) and s.get("name") in stages else s
                     for s in data.get("stages") or []]
    return out


def _quick(settings: dict, quick: dict) -> dict:
    out = copy.deepcopy(settings)
    for key, value in quick.items():
        if isinstance(value, dict):
            out[key] = _quick(out.get(key) or {}, value)
        elif key in ("max_steps", "batch_size", "eval_sequences", "max_rows") and isinstance(out.get(key), int):
            out[key] = min(out[key], value)  # shrink, never grow
        else:
            out[key] = value
    return out


def load_recipe(path: str | Path, *, quick: bool = False, variant: str | None = None) -> Recipe:
    """Read and check a recipe YAML; every stage becomes a validated :class:`TrainConfig`.

    ``variant`` merges one of the recipe's ``variants`` into it (``auto``: see ``resolve_variant``).

    Raises:
        DiffutronError: unknown keys, wrong types, duplicate stage names, ``previous`` in the first
            stage, a start or data file that does not exist (with file, line and key).
    """
    data, where = read_yaml(path)
    data, variant = _checked_top(data, where, path, variant)
    stages_raw = data["stages"]
    defaults = data.get("defaults") or {}
    quick_over = _merge(QUICK_DEFAULTS, data.get("quick") or {})
    out_root = Path(data["output_dir"] + ("-quick" if quick else ""))
    recipe = Recipe(name=str(data.get("name") or Path(path).stem), output_dir=out_root, source=str(path), quick=quick,
                    variant=variant)
    if data.get("prepare") is not None:
        recipe.prepare = build(PrepareConfig, data["prepare"], where, "prepare")
        if quick and recipe.prepare.quick:  # --quick overrides, checked as strictly as the rest
            recipe.prepare = build(PrepareConfig, {**data["prepare"], **recipe.prepare.quick, "quick": {}},
                                   where, "prepare")
    if recipe.prepare is not None:
        recipe.where = paths(recipe.prepare, out_root / "data", quick=quick)
        defaults = substitute(defaults, recipe.where)
        stages_raw = substitute(stages_raw, recipe.where)
    if data.get("export") is not None:
        recipe.export = build(ExportConfig, substitute(data["export"], recipe.where), where, "export")
        if quick and recipe.export.card is not None:  # --quick: a few documents and prompts, one timing
            recipe.export.card = dataclasses.replace(recipe.export.card, max_documents=4, max_prompts=2,
                                                     draws=1, timing_repeat=1)
        if quick:
            recipe.export.prompts = recipe.export.prompts[:2]
    names: set[str] = set()
    for i, raw in enumerate(stages_raw):
        recipe.stages.append(_stage(raw, i, recipe, where, defaults=defaults, quick_over=quick_over, names=names))
    return recipe


def _checked_top(data, where: Where, path, variant: str | None) -> tuple[dict, str | None]:
    """The recipe's top level checked (keys, ``output_dir``, ``stages``, ``defaults``, ``quick``),
    with ``variant`` merged in; returns ``(data, variant)`` (``auto`` resolved)."""
    if not isinstance(data, dict):
        raise DiffutronError(f"{path}: a recipe is a mapping with output_dir and stages")
    for key in data:
        if key not in TOP_KEYS:
            import difflib

            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise where.error(str(key), f"{key}: unknown key{hint}; allowed: {', '.join(TOP_KEYS)}")
    variant = resolve_variant(data, variant)
    if variant is not None:
        data = _apply_variant(data, variant, where)
    if not data.get("output_dir") or not isinstance(data["output_dir"], str):
        raise where.error("output_dir", "output_dir: missing: say where the stages write (a directory)")
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise where.error("stages", "stages: give a list of at least one stage")
    for key in ("defaults", "quick"):
        if data.get(key) is not None:
            if not isinstance(data[key], dict):
                raise where.error(key, f"{key}: expected a mapping of stage settings")
            build(TrainConfig, data[key], where, key)  # unknown keys and wrong types, with their own lines
    return data, variant


def _stage(raw, i: int, recipe: Recipe, where: Where, *, defaults: dict, quick_over: dict, names: set[str]) -> Stage:
    """Stage ``i`` of the recipe, checked: its name (unique, added to ``names``), start, metric,
    settings (``defaults`` and, with --quick, ``quick_over`` merged in) and data."""
    key = f"stages[{i}]"
    if not isinstance(raw, dict):
        raise where.error(key, f"{key}: expected a mapping with name, start, data, ...")
    raw = dict(raw)
    name = raw.pop("name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise where.error(f"{key}.name" if name is not None else key,
                          f"{key}.name: give each stage a name of letters, digits, '.', '_' or '-'")
    if name in names:
        raise where.error(f"{key}.name", f"{key}.name: {name!r} is used by an earlier stage")
    names.add(name)
    start = raw.pop("start", None)
    metric = raw.pop("metric", None)
    if metric is not None:
        metric = build(MetricConfig, metric, where, f"{key}.metric")
        metric = dataclasses.replace(metric, tasks_dir=metric.tasks_dir or recipe.where.get("tasks"))
        if recipe.quick:  # a smoke run: a few rows, short greedy answers
            new = min(metric.max_new_tokens, 16)
            metric = dataclasses.replace(metric, limit=min(metric.limit, 8), max_new_tokens=new,
                                         block_length=min(metric.block_length, new), steps=min(metric.steps, 8))
    for forbidden in ("model", "init", "output_dir"):
        if forbidden in raw:
            raise where.error(f"{key}.{forbidden}", f"{key}.{forbidden}: set the start with start: (and the "
                              "output with the recipe's output_dir)")
    settings = _merge(defaults, raw)
    if recipe.quick:
        settings = _quick(settings, quick_over)
    config = build(TrainConfig, settings, where, key)
    model, init, start_text = _start(start, i, recipe, where, key)
    try:
        config = config.replace(model=model, init=init, output_dir=str(recipe.output_dir / name))
    except SettingError as err:
        raise where.error(f"{key}.{err.key}", f"{key}.{err.key}: {err.message}") from None
    if config.data.train is None:
        raise where.error(f"{key}.data", f"{key}.data.train: missing: name the stage's training data")
    try:
        tok = config.init.tokenizer if config.init is not None else None
        if start_text != PREVIOUS and not recipe.pending(tok):
            check_start(config.model, config.init, key=f"{key}.start")
        if not any(recipe.pending(p) for p in _as_list(config.data.train)):
            check_sources(config.data.train, f"{key}.data.train")
        if not any(recipe.pending(p) for p in _as_list(config.data.heldout)):
            check_sources(config.data.heldout, f"{key}.data.heldout")
    except DiffutronError as err:
        sub = str(err).split(":", 1)[0]
        raise where.error(sub, str(err)) from None
    return Stage(name, start_text, config, metric)


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _start(start, i: int, recipe: Recipe, where: Where, key: str):
    """``(model, init, text)`` of a stage's start."""
    if start is None:
        raise where.error(key, f"{key}.start: missing: a model directory, a hub id, 'previous' or "
                               "{config: ..., tokenizer: ...} for a fresh model")
    if isinstance(start, dict):
        return None, build(InitConfig, start, where, f"{key}.start"), "fresh"
    if not isinstance(start, str):
        raise where.error(f"{key}.start", f"{key}.start: expected a path, a hub id, 'previous' or a mapping")
    if start == PREVIOUS:
        if i == 0:
            raise where.error(f"{key}.start", f"{key}.start: the first stage has no previous stage to start from")
        return recipe.stages[i - 1].config.output_dir, None, PREVIOUS
    return start, None, start
