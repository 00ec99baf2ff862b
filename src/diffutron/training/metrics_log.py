"""Training metrics: JSONL + CSV files (and TensorBoard when installed) that survive resumes.

On resume the files are cut back to the checkpoint's step, so a killed and resumed run leaves
the same metric lines as one that was never interrupted.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

JSONL = "metrics.jsonl"
CSV = "metrics.csv"
CSV_COLUMNS = ["step", "epoch", "kind", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s",
               "heldout_loss", "heldout_ppl", "heldout_loss_stderr", "heldout_tokens"]


class MetricsWriter:
    """Append metric records (dicts with ``step`` and ``kind``) to OUTPUT/metrics.{jsonl,csv}."""

    def __init__(self, output_dir: Path, *, enabled: bool, resume_step: int | None, tensorboard: bool):
        self.enabled = enabled
        self.jsonl = Path(output_dir) / JSONL
        self.csv = Path(output_dir) / CSV
        self.records: list[dict] = []
        self.tb = None
        if not enabled:
            return
        kept: list[dict] = []
        if resume_step is not None and self.jsonl.exists():
            for line in self.jsonl.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut short by the kill
                    continue
                if rec.get("step", 0) <= resume_step:
                    kept.append(rec)
        self.records = kept
        with open(self.jsonl, "w", encoding="utf-8") as fh:
            for rec in kept:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        with open(self.csv, "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for rec in kept:
                writer.writerow(_csv_row(rec))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: after a resume, TensorBoard drops the killed run's events past the checkpoint
                purge = resume_step + 1 if resume_step is not None else None
                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=purge)
            except ImportError:  # the tensorboard package is an extra: pip install "diffutron[tensorboard]"
                self.tb = None

    def log(self, record: dict) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        with open(self.jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        with open(self.csv, "a", encoding="utf-8", newline="") as fh:
            csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore").writerow(_csv_row(record))
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "kind", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _csv_row(rec: dict) -> dict:
    return {k: ("" if rec.get(k) is None else rec.get(k)) for k in CSV_COLUMNS}


def format_eval(rec: dict) -> str:
    line = (f"step {rec['step']}: held-out loss {rec['heldout_loss']:.4f} "
            f"(+- {rec['heldout_loss_stderr']:.4f}), perplexity bound {rec['heldout_ppl']:.2f}")
    extra = [f"{k} {v:.4g}" for k, v in rec.items() if k.startswith("eval/") and isinstance(v, (int, float))]
    return line + (", " + ", ".join(extra) if extra else "")


def say(message: str) -> None:
    print(f"diffutron: {message}", file=sys.stderr, flush=True)
