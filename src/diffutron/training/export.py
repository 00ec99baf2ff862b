"""A recipe's ``export:`` section: ship the last stage's model as a small checkpoint with a card.

::

    export:
      dir: src/diffutron/embedded/tiny-tr     # --quick writes to OUTPUT_DIR/export instead
      dtype: float16                          # stored weights (loaded back as float32 on CPU)
      prompts: ["Türkiye'nin başkenti neresidir?", ...]   # sample outputs on the card
      card: {perplexity_data: ${data}/cpt/validation.jsonl}   # the card's numbers (card_metrics.py)

The model card (README.md next to the weights) lists parameters, training device and time, data
sources and licenses, each stage's settings, held-out ELBO perplexity (per token on the stage's own
split, per word on the CPT validation split) and instruction metrics before and after each stage,
the Turkish-word share and lengths of the answers to the committed prompt set, what the model
cannot do, and sample outputs with the sampler settings used; ``card.json`` holds the same numbers.

``export_model`` does the same for a model trained elsewhere (a GPU run's returned weights and its
``stages.json``): see ``scripts/train_tiny_tr.py``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .card_metrics import CardSettings
from .config import SettingError, Settings

__all__ = ["ExportConfig", "stage_record", "write_card", "final_numbers", "export", "export_model"]


@dataclass
class ExportConfig(Settings):
    """The ``export:`` mapping of a recipe (loaded strictly by ``config.build``)."""

    dir: str | None = None
    dtype: str = "float16"
    prompts: list[str] = field(default_factory=list)
    card: CardSettings | None = None

    def __post_init__(self):
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise SettingError("dtype", f"{self.dtype!r} is not one of float16, bfloat16, float32")


def stage_record(stage, result, card_metrics: dict | None = None) -> dict:
    """A stage's settings and numbers as the card lists them (JSON-ready)."""
    evals = [r for r in result.heldout if r.get("kind", "eval") == "eval"]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    cfg = stage.config
    return {
        "name": stage.name, "start": stage.start, "method": cfg.method,
        "data": cfg.data.train, "heldout": cfg.data.heldout, "max_length": cfg.data.max_length,
        "steps": result.steps, "epochs": cfg.epochs, "max_steps": cfg.max_steps, "batch_size": cfg.batch_size,
        "lr": cfg.lr, "mixed_precision": cfg.mixed_precision,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "merge": cfg.lora.merge} if cfg.method == "lora" else None,
        "heldout_ppl_before": first.get("heldout_ppl"), "heldout_ppl_after": last.get("heldout_ppl"),
        "heldout_loss_stderr_after": last.get("heldout_loss_stderr"),
        "metrics_before": {k[5:]: v for k, v in first.items() if k.startswith("eval/")},
        "metrics_after": {k[5:]: v for k, v in last.items() if k.startswith("eval/")},
        "card": card_metrics,
    }


def _score_key(metrics: dict) -> str | None:
    return next((k for k in metrics if k.endswith("_score")), None)


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def final_numbers(lm, card: CardSettings | None, stems, corpus_dir: str | None) -> dict:
    """The shipped weights' numbers: prompt-set answers, their share and lengths, the corpus ceiling,
    the time of one 64-token answer on this machine."""
    from .card_metrics import answer_seconds, corpus_word_share, load_prompt_set, prompt_set_metrics

    out: dict = {}
    rows = load_prompt_set(card.prompt_set if card else None)[: card.max_prompts if card else None]
    out["prompt_set"] = prompt_set_metrics(lm, rows, stems)
    if stems is not None:
        try:
            out["corpus_ceiling"] = corpus_word_share(stems, corpus_dir)
        except Exception as err:  # no corpus here (a GPU run installed elsewhere): say so on the card
            out["corpus_ceiling"] = {"share": None, "error": str(err)}
    out["answer_time"] = answer_seconds(lm, repeat=card.timing_repeat if card else 3)
    return out


# Below the prompt set's figures: what the card's perplexity and instruction metrics are.
_METRICS_NOTE = [
    "", "Perplexity per word: the held-out ELBO bound (`diffutron.likelihood.elbo_perplexity`, fixed seed) "
    "summed over the CPT stage's validation documents packed as in pre-training, divided by their words, "
    "so that tokenizers compare. Instruction metrics: greedy answers to held-out task rows scored by "
    "`diffutron.corpus.tasks.score` (exact match / token F1 by family)."]


def write_card(directory: Path, *, name: str, source: str, stages: list[dict], corpus_stats: dict | None,
               samples: list[dict], sampler: dict, params: int, wall_seconds: float | None,
               numbers: dict | None = None, device: str | None = None) -> dict:
    """README.md (the model card) and card.json in ``directory``; returns the card's numbers."""
    numbers = numbers or {}
    card = {"parameters": params, "device": device, "wall_seconds": wall_seconds, "stages": stages,
            "final": numbers, "sampler": sampler, "samples": samples,
            "sources": (corpus_stats or {}).get("sources", [])}
    (directory / "card.json").write_text(json.dumps(card, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    ps = numbers.get("prompt_set") or {}
    lines = (_card_intro(name=name, source=source, params=params, dtype=recipe_dtype(directory),
                         wall_seconds=wall_seconds, device=device)
             + _numbers_table(stages) + _prompt_set_lines(numbers) + _METRICS_NOTE
             + _stages_table(stages) + _sources_and_samples(card["sources"], sampler, samples, ps))
    (directory / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return card


def _card_intro(*, name: str, source: str, params: int, dtype: str, wall_seconds: float | None,
                device: str | None) -> list[str]:
    """The card's title, what the model cannot do, its size and cost, and the numbers table's head."""
    where = f"on {device}" if device else "on this machine"
    return [
        f"# {name}: a tiny Turkish masked diffusion LM",
        "",
        f"Trained by `diffutron recipe run {source}` (diffutron's own progressive recipe, at toy scale) on "
        "Turkish text that package registries ship. It exists so that `diffutron generate` works with no "
        "download.",
        "",
        "**What it cannot do.** It knows only its training corpus (the data sources below: news, web and "
        "Wikipedia sentences, software help, manual pages, UI strings, an English-Turkish dictionary) and "
        f"has {params / 1e6:.1f} M parameters. It is not DiffutronLM-0.3B: it has no general knowledge, follows "
        "only the instruction templates it was tuned on, and its answers to anything else are Turkish-looking "
        "sentences of that corpus's kind, often wrong or off-topic. Use `--model diffutron/DiffutronLM-0.3B-Instruct` "
        "for real answers.",
        "",
        f"- parameters: {params:,} (ModernBERT encoder + tied MLM head), stored as {dtype}",
        f"- full recipe wall time: {wall_seconds / 60:.1f} min {where}" if wall_seconds else f"- trained {where}",
        "- no pretrained Turkish encoder is available offline, so stage 0 trains one from scratch with the MDLM objective",
        "",
        "## Numbers",
        "",
        "| stage | held-out ELBO perplexity per word (CPT validation) | instruction metric before -> after | "
        "Turkish-word share of the prompt set's answers | words per answer | training time |",
        "|---|---:|---|---:|---:|---:|",
    ]


def _numbers_table(stages: list[dict]) -> list[str]:
    """One row of the numbers table per stage."""
    lines = []
    for st in stages:
        c = st.get("card") or {}
        ppl = (c.get("perplexity") or {}).get("ppl_per_word")
        ps = c.get("prompt_set") or {}
        share = (ps.get("turkish_share") or {}).get("share")
        key = _score_key(st.get("metrics_after") or {})
        metric = (f"{_fmt(st['metrics_before'].get(key), '.3f')} -> {_fmt(st['metrics_after'].get(key), '.3f')}"
                  if key else "")
        secs = c.get("train_seconds")
        lines.append(f"| {st['name']} | {_fmt(ppl, ',.1f')} | {metric} | {_fmt(share, '.3f')} | "
                     f"{_fmt((ps.get('lengths') or {}).get('mean_words'), '.1f')} | "
                     f"{_fmt(secs and secs / 60, '.1f')}{' min' if secs else ''} |")
    return lines


def _prompt_set_lines(numbers: dict) -> list[str]:
    """The shipped weights' figures on the committed prompt set (none without them)."""
    lines = []
    ps = numbers.get("prompt_set") or {}
    if ps:
        share = ps.get("turkish_share") or {}
        open_share = ps.get("turkish_share_open") or {}
        ceiling = numbers.get("corpus_ceiling") or {}
        lengths = ps["lengths"]
        timing = numbers.get("answer_time") or {}
        lines += [
            "",
            f"The shipped weights on the committed prompt set (`diffutron/embedded/card-prompts.jsonl`: "
            f"{ps['prompts']} prompts, {ps['open_prompts']} of them open questions outside the task templates; "
            "sampler: the paper's settings, below):",
            "",
            f"- Turkish-word share of the answers: **{_fmt(share.get('share'), '.3f')}** "
            f"({share.get('turkish', '-')} of {share.get('words', '-')} words; open questions alone "
            f"{_fmt(open_share.get('share'), '.3f')}); real text, the corpus's {ceiling.get('split', 'test')} split, "
            f"scores {_fmt(ceiling.get('share'), '.3f')} (the ceiling). A word counts when the longest stem of "
            "Debian hunspell-tr's `tr_TR.dic` that is a prefix of it (Turkish lower case, letters only) covers at "
            "least half of its letters (`diffutron.corpus.lexicon`).",
            f"- answer lengths: {lengths['mean_words']:.1f} words on average (shortest {lengths['min_words']}); "
            f"{lengths['long_enough']} of {lengths['answers']} answers have >= 5 words of which >= 60% are "
            f"distinct (mean distinct share {lengths['mean_distinct']:.2f}).",
        ]
        if timing:
            threads = f", {timing['threads']} threads" if timing.get("threads") else ""
            lines.append(f"- one 64-token answer at these settings: {timing['seconds']:.2f} s on "
                         f"{timing['device']}{threads} (all 64 tokens decoded, best of 3)")
    return lines


def _stages_table(stages: list[dict]) -> list[str]:
    """The stages table (start, method, data, settings, held-out ELBO) and each stage's metric per family."""
    lines = ["", "## Stages", "",
             "| stage | start | method | data | steps | batch | lr | held-out ELBO ppl per token (own split) "
             "before -> after |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for st in stages:
        data = st["data"] if isinstance(st["data"], str) else ", ".join(st["data"] or [])
        ppl = (f"{st['heldout_ppl_before']:.2f} -> {st['heldout_ppl_after']:.2f}"
               if st["heldout_ppl_before"] is not None and st["heldout_ppl_after"] is not None else "-")
        method = st["method"] + (f" r={st['lora']['r']} alpha={st['lora']['alpha']}" if st["lora"] else "")
        lines.append(f"| {st['name']} | {st['start']} | {method} | `{Path(str(data)).parent.name}/{Path(str(data)).name}` | "
                     f"{st['steps']} | {st['batch_size']} | {st['lr']:g} | {ppl} |")
    lines.append("")
    for st in stages:
        fams = {k: v for k, v in (st["metrics_after"] or {}).items() if not k.endswith(("_score", "_rows", "_skipped"))}
        if fams:
            lines.append(f"- {st['name']} per family after the stage: "
                         + ", ".join(f"{k} {v:.3f}" for k, v in sorted(fams.items())))
    return lines


def _sources_and_samples(sources: list[dict], sampler: dict, samples: list[dict], ps: dict) -> list[str]:
    """The data sources table, the sample answers with their sampler, and the prompt set's answers."""
    lines = ["", "## Data sources", "",
             "| source | registry | version | license | domains | documents |", "|---|---|---|---|---|---:|"]
    for s in sources:
        lines.append(f"| {s.get('name')} | {s.get('registry')} | {s.get('version')} | {s.get('license')} | "
                     f"{', '.join(s.get('domains', []))} | {s.get('documents', '')} |")
    lines += ["", "## Samples", "", "Sampler: " + ", ".join(f"{k}={v}" for k, v in sampler.items()), ""]
    for s in samples:
        lines += [f"**{s['prompt']}**", "", "> " + (s["text"].replace("\n", "\n> ") or "(empty)"), ""]
    if ps.get("answers"):
        lines += ["## The prompt set's answers", ""]
        for a in ps["answers"]:
            prompt = a["prompt"].replace("\n", " ")
            lines.append(f"- ({a.get('kind')}) {prompt} -> {a['answer'].replace(chr(10), ' ') or '(empty)'}")
    return lines


def recipe_dtype(directory: Path) -> str:
    try:
        return json.loads((directory / "config.json").read_text()).get("dtype") or "float32"
    except (OSError, ValueError):
        return "?"


def export_model(source, target: Path, cfg: ExportConfig, *, name: str, recipe_source: str, stages: list[dict],
                 corpus_dir: str | None, wall_seconds: float | None, device: str | None = None, stems=None,
                 log=print) -> dict:
    """Write ``source``'s model (cast to ``cfg.dtype``), tokenizer and card to ``target`` atomically."""
    from ..lm import DiffusionLM
    from ..sampling import SamplerConfig

    lm = DiffusionLM.from_pretrained(str(source), device="cpu")
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
        numbers = final_numbers(shipped, cfg.card, stems, corpus_dir) if cfg.card is not None else None
        card = write_card(tmp, name=name, source=recipe_source, stages=stages, corpus_stats=stats, samples=samples,
                          sampler=sampler.to_dict(), params=params, wall_seconds=wall_seconds, numbers=numbers,
                          device=device)
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"export: {target} ({sum(f.stat().st_size for f in target.iterdir()) / 1e6:.1f} MB)")
    return card


def export(cfg: ExportConfig, target: Path, *, recipe, results, corpus_dir: str | None,
           wall_seconds: float | None, log=print, stems=None) -> dict:
    """Write the last stage's model, tokenizer and card to ``target`` (see ``export_model``)."""
    from .card_metrics import CARD_METRICS, device_name

    stages = []
    for stage, res in zip(recipe.stages, results):
        path = Path(res.output_dir) / CARD_METRICS
        stages.append(stage_record(stage, res, json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None))
    devices = {(s["card"] or {}).get("device") for s in stages} - {None}
    device = devices.pop() if len(devices) == 1 else device_name()
    source = recipe.source + (f" --variant {recipe.variant}" if recipe.variant else "")
    return export_model(results[-1].output_dir, target, cfg, name=recipe.name, recipe_source=source, stages=stages,
                        corpus_dir=corpus_dir, wall_seconds=wall_seconds, device=device, stems=stems, log=log)
