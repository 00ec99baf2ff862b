"""Evaluation: the CETVEL tasks, their metrics, the runner, ELBO perplexity and an lm-eval adapter.

The lm-eval adapter (``diffutron.evaluation.lm_eval_adapter``) needs the optional ``eval``
extra and is not imported here.
"""

from .metrics import f1_binary, f1_macro, score_task
from .perplexity_run import read_texts, run_perplexity
from .runner import CetvelConfig, format_table, prepare_cetvel, run_cetvel
from .cetvel import TASK_NAMES, TASKS, Example, Task, get_tasks, load_task

__all__ = [
    "CetvelConfig", "Example", "Task", "TASKS", "TASK_NAMES", "f1_binary", "f1_macro", "format_table",
    "get_tasks", "load_task", "prepare_cetvel", "read_texts", "run_cetvel", "run_perplexity",
    "score_task",
]
