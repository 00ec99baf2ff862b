"""A recipe stage's instruction metric: answer held-out task rows and score them.

::

    metric:                        # in a stage of a recipe
      tasks: general               # general | specific (the offline instruction sets)
      split: validation
      limit: 200                   # rows (evenly over the task families, fixed order)
      max_new_tokens: 32
      steps: 16
      block_length: 32

The evaluator runs at every held-out evaluation of the stage (at its start and its end, so the
model before and after the stage), greedy (temperature 0), and logs ``eval/<tasks>_score`` and one
``eval/<tasks>_<task>`` per family. Scoring is ``diffutron.corpus.tasks.score``, the one metric
function the evaluation uses too.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..sampling import SamplerConfig
from .config import Settings


@dataclass(frozen=True)
class MetricConfig(Settings):
    tasks: str = "general"
    split: str = "validation"
    limit: int = 200
    max_new_tokens: int = 32
    steps: int = 16
    block_length: int = 32
    batch_size: int = 32
    tasks_dir: str | None = None


def balanced(rows: list[dict], limit: int) -> list[dict]:
    """Up to ``limit`` rows, taken round-robin over task families (file order within each)."""
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row.get("task", ""), []).append(row)
    out, i = [], 0
    while len(out) < limit and any(i < len(v) for v in by_task.values()):
        for task in sorted(by_task):
            if i < len(by_task[task]) and len(out) < limit:
                out.append(by_task[task][i])
        i += 1
    return out


def task_evaluator(cfg: MetricConfig):
    """An evaluator ``fn(lm, step) -> {name: value}`` for ``diffutron.training.train``."""
    from ..corpus.tasks import load_tasks, score

    rows = balanced(load_tasks(cfg.tasks, cfg.split, cfg.tasks_dir), cfg.limit)
    sampler = SamplerConfig(max_new_tokens=cfg.max_new_tokens, steps=cfg.steps, block_length=cfg.block_length,
                            temperature=0.0, repetition_penalty=1.0)

    def evaluate(lm, step: int) -> dict:
        # rows whose prompt leaves no room for the answer are skipped (and counted), as in training
        prompts = [[m for m in r["messages"] if m["role"] != "assistant"] for r in rows]
        room = lm.context_length - cfg.max_new_tokens
        sizes = [len(lm.encode(lm.render(p))) for p in prompts]
        fits = [n <= room for n in sizes]
        kept = [r for r, ok in zip(rows, fits) if ok]
        prompts = [p for p, ok in zip(prompts, fits) if ok]
        lengths = [n for n, ok in zip(sizes, fits) if ok]
        # batches of similar prompt length (greedy answers do not depend on the batch), answers in row order
        order = sorted(range(len(prompts)), key=lengths.__getitem__)
        answers = [""] * len(prompts)
        for i in range(0, len(order), cfg.batch_size):
            chunk = order[i : i + cfg.batch_size]
            for k, c in zip(chunk, lm.generate([prompts[k] for k in chunk], sampler)):
                answers[k] = c.text
        result = score(kept, answers) if kept else {"score": 0.0, "tasks": {}}
        out = {f"{cfg.tasks}_score": result["score"], f"{cfg.tasks}_rows": len(kept),
               f"{cfg.tasks}_skipped": len(rows) - len(kept)}
        out.update({f"{cfg.tasks}_{t}": v["score"] for t, v in result["tasks"].items()})
        return out

    evaluate.rows = rows  # for the model card: what was scored
    return evaluate
