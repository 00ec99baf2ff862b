"""A recipe's ``export:`` section: ship the last stage's model as a small checkpoint with a card.

::

    export:
      dir: src/diffutron/embedded/tiny-tr     # --quick writes to OUTPUT_DIR/export instead
      dtype: float16                          # stored weights (loaded back as float32 on CPU)
      prompts: ["Türkiye'nin başkenti neresidir?", ...]   # sample outputs on the card

The model card (README.md next to the weights) lists parameters, data sources and licenses, each
stage's settings, held-out ELBO perplexity and instruction metrics before and after each stage,
and sample outputs with the sampler settings used; ``card.json`` holds the same numbers.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import SettingError


@dataclass
class ExportConfig:
    """The ``export:`` mapping of a recipe (loaded strictly by ``config.build``)."""

    dir: str | None = None
    dtype: str = "float16"
    prompts: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise SettingError("dtype", f"{self.dtype!r} is not one of float16, bfloat16, float32")


def _metric_cells(first: dict, last: dict) -> tuple[str, str]:
    keys = [k for k in last if k.startswith("eval/") and k.endswith("_score")]
    if not keys:
        return "-", "-"
    k = keys[0]
    return f"{first.get(k, float('nan')):.3f}", f"{last[k]:.3f}"


def write_card(directory: Path, *, recipe, results, corpus_stats: dict | None, samples: list[dict],
               sampler: dict, params: int, wall_seconds: float | None) -> dict:
    """README.md (the model card) and card.json in ``directory``; returns the card's numbers."""
    stages = []
    for stage, res in zip(recipe.stages, results):
        evals = [r for r in res.heldout if r.get("kind", "eval") == "eval"]
        first, last = (evals[0], evals[-1]) if evals else ({}, {})
        cfg = stage.config
        stages.append({
            "name": stage.name, "start": stage.start, "method": cfg.method,
            "data": cfg.data.train, "heldout": cfg.data.heldout, "max_length": cfg.data.max_length,
            "steps": res.steps, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "merge": cfg.lora.merge} if cfg.method == "lora" else None,
            "heldout_ppl_before": first.get("heldout_ppl"), "heldout_ppl_after": last.get("heldout_ppl"),
            "heldout_loss_stderr_after": last.get("heldout_loss_stderr"),
            "metrics_before": {k[5:]: v for k, v in first.items() if k.startswith("eval/")},
            "metrics_after": {k[5:]: v for k, v in last.items() if k.startswith("eval/")},
        })
    card = {"parameters": params, "stages": stages, "sampler": sampler, "samples": samples,
            "sources": (corpus_stats or {}).get("sources", []), "wall_seconds": wall_seconds}
    (directory / "card.json").write_text(json.dumps(card, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    lines = [
        f"# {recipe.name}: a tiny Turkish masked diffusion LM",
        "",
        f"Trained by `diffutron recipe run {recipe.source}` (diffutron's own progressive recipe, at toy scale) "
        "on Turkish text that package registries ship. It exists so that `diffutron generate` works with no "
        "download; its answers are those of a model with a few million parameters trained for minutes on CPU.",
        "",
        f"- parameters: {params:,} (ModernBERT encoder + tied MLM head), stored as {recipe_dtype(directory)}",
        f"- full recipe wall time: {wall_seconds / 60:.1f} min on this machine" if wall_seconds else "- wall time: n/a",
        "- no pretrained Turkish encoder is available offline, so stage 0 trains one from scratch with the MDLM objective",
        "",
        "## Data sources",
        "",
        "| source | registry | version | license | domains | documents |",
        "|---|---|---|---|---|---:|",
    ]
    for s in card["sources"]:
        lines.append(f"| {s.get('name')} | {s.get('registry')} | {s.get('version')} | {s.get('license')} | "
                     f"{', '.join(s.get('domains', []))} | {s.get('documents', '')} |")
    lines += ["", "## Stages", "",
              "| stage | start | method | data | steps | batch | lr | held-out ELBO ppl before -> after | "
              "instruction metric before -> after |",
              "|---|---|---|---|---:|---:|---:|---|---|"]
    for st, res in zip(stages, results):
        evals = [r for r in res.heldout if r.get("kind", "eval") == "eval"]
        before, after = _metric_cells(evals[0], evals[-1]) if evals else ("-", "-")
        data = st["data"] if isinstance(st["data"], str) else ", ".join(st["data"] or [])
        ppl = (f"{st['heldout_ppl_before']:.2f} -> {st['heldout_ppl_after']:.2f}"
               if st["heldout_ppl_before"] is not None and st["heldout_ppl_after"] is not None else "-")
        method = st["method"] + (f" r={st['lora']['r']} alpha={st['lora']['alpha']}" if st["lora"] else "")
        lines.append(f"| {st['name']} | {st['start']} | {method} | `{Path(str(data)).parent.name}/{Path(str(data)).name}` | "
                     f"{st['steps']} | {st['batch_size']} | {st['lr']:g} | {ppl} | {before} -> {after} |")
    lines += ["", "Held-out ELBO perplexity is the bound of the reference's definition on each stage's own "
              "held-out split (fixed seed, 2 draws per sequence). Instruction metrics: greedy answers to held-out "
              "task rows scored by `diffutron.data.tasks.score` (exact match / token F1 by family).", ""]
    for st in stages:
        if st["metrics_after"]:
            fams = {k: v for k, v in st["metrics_after"].items()
                    if not k.endswith(("_score", "_rows", "_skipped"))}
            if fams:
                lines.append(f"- {st['name']} per family after the stage: "
                             + ", ".join(f"{k} {v:.3f}" for k, v in sorted(fams.items())))
    lines += ["", "## Samples", "", "Sampler: " + ", ".join(f"{k}={v}" for k, v in sampler.items()), ""]
    for s in samples:
        lines += [f"**{s['prompt']}**", "", "> " + (s["text"].replace("\n", "\n> ") or "(empty)"), ""]
    (directory / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return card


def recipe_dtype(directory: Path) -> str:
    try:
        return json.loads((directory / "config.json").read_text()).get("dtype") or "float32"
    except (OSError, ValueError):
        return "?"


def export(cfg: ExportConfig, target: Path, *, recipe, results, corpus_dir: str | None,
           wall_seconds: float | None, log=print) -> dict:
    """Write the last stage's model (cast to ``cfg.dtype``), tokenizer and card to ``target`` atomically."""
    from ..lm import DiffusionLM
    from ..sampling import SamplerConfig

    source = results[-1].output_dir
    lm = DiffusionLM.from_pretrained(source, device="cpu")
    sampler = SamplerConfig(max_new_tokens=64, steps=64, block_length=32)
    params = sum(p.numel() for p in lm.model.parameters())
    stats = None
    if corpus_dir and (Path(corpus_dir) / "stats.json").is_file():
        stats = json.loads((Path(corpus_dir) / "stats.json").read_text(encoding="utf-8"))
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        lm.model.to(getattr(torch, cfg.dtype))
        lm.save_pretrained(tmp)
        shipped = DiffusionLM.from_pretrained(tmp, device="cpu")  # samples from the stored weights, as users load them
        samples = [{"prompt": p, "text": c.text, "finish_reason": c.finish_reason}
                   for p, c in zip(cfg.prompts, shipped.generate(cfg.prompts, sampler))] if cfg.prompts else []
        card = write_card(tmp, recipe=recipe, results=results, corpus_stats=stats, samples=samples,
                          sampler=sampler.to_dict(), params=params, wall_seconds=wall_seconds)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"export: {target} ({sum(f.stat().st_size for f in target.iterdir()) / 1e6:.1f} MB)")
    return card
