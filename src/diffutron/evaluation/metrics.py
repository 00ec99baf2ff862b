"""Multiple-choice metrics as lm-eval computes them, with standard errors.

- acc: argmax of the summed log-likelihoods is the gold index (first of equals wins).
- acc_norm: the same after dividing each log-likelihood by its choice's length in characters.
- f1: F1 of (gold, predicted) indices, named ``f1`` as in CETVEL whichever the average, which
  each task states (``f1_average``): ``binary``, the F1 of the positive class 1 (scikit-learn's
  ``f1_score``; ironytr), or ``macro``, the unweighted mean of the per-class F1 over the classes
  seen in gold or predictions (scikit-learn's ``f1_score(average="macro")``; news_cat).

Standard errors: sqrt(sample variance / n) for accuracies (lm-eval's ``mean_stderr``), a
seeded bootstrap for the F1 scores.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

METRICS = ("acc", "acc_norm", "f1")
F1_AVERAGES = ("binary", "macro")
BOOTSTRAP_ITERS = 1000


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one among equals (as numpy.argmax)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def predictions(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """``(pred, pred_norm)``: argmax of the log-likelihoods, and of them per character of choice."""
    norm = [ll / max(len(c), 1) for ll, c in zip(lls, choices)]
    return argmax(lls), argmax(norm)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def f1_binary(golds: Sequence[int], preds: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class: 2 TP / (2 TP + FP + FN), 0 when there is no positive at all."""
    tp = sum(1 for g, p in zip(golds, preds) if g == positive and p == positive)
    fp = sum(1 for g, p in zip(golds, preds) if g != positive and p == positive)
    fn = sum(1 for g, p in zip(golds, preds) if g == positive and p != positive)
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def f1_macro(golds: Sequence[int], preds: Sequence[int]) -> float:
    """Mean F1 over every class that occurs in ``golds`` or ``preds``."""
    labels = sorted(set(golds) | set(preds))
    if not labels:
        return 0.0
    return sum(f1_binary(golds, preds, positive=c) for c in labels) / len(labels)


def bootstrap_stderr(fn, golds: Sequence[int], preds: Sequence[int], *, iters: int = BOOTSTRAP_ITERS,
                     seed: int = 1234) -> float:
    """Standard deviation of ``fn`` over resamples (with replacement) of the (gold, pred) pairs."""
    n = len(golds)
    if n < 2:
        return float("nan")
    rng = random.Random(seed)
    values = []
    for _ in range(iters):
        idx = [rng.randrange(n) for _ in range(n)]
        values.append(fn([golds[i] for i in idx], [preds[i] for i in idx]))
    mean = sum(values) / iters
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (iters - 1))


def score_task(
    lls: Sequence[Sequence[float]], choices: Sequence[Sequence[str]], golds: Sequence[int], metrics: Sequence[str],
    *, f1_average: str = "binary",
) -> dict[str, dict[str, float]]:
    """Metrics of a task from each example's choice log-likelihoods.

    Returns ``{metric: {"value": ..., "stderr": ...}}`` for the requested metrics (fractions in
    [0, 1]); ``f1`` is binary (class 1 positive) or macro as ``f1_average`` says. An example whose
    gold index is not a valid choice counts as wrong.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}: choose from {', '.join(METRICS)}")
    if f1_average not in F1_AVERAGES:
        raise ValueError(f"unknown f1_average {f1_average!r}: choose from {', '.join(F1_AVERAGES)}")
    preds, preds_norm = [], []
    for ll, ch in zip(lls, choices):
        p, pn = predictions(ll, ch)
        preds.append(p)
        preds_norm.append(pn)
    out: dict[str, dict[str, float]] = {}
    if "acc" in metrics:
        v, se = mean_and_stderr([float(p == g) for p, g in zip(preds, golds)])
        out["acc"] = {"value": v, "stderr": se}
    if "acc_norm" in metrics:
        v, se = mean_and_stderr([float(p == g) for p, g in zip(preds_norm, golds)])
        out["acc_norm"] = {"value": v, "stderr": se}
    if "f1" in metrics:
        fn = f1_macro if f1_average == "macro" else f1_binary
        out["f1"] = {"value": fn(golds, preds), "stderr": bootstrap_stderr(fn, golds, preds)}
    return out
