"""Checkpoints that are complete or absent: temp directory, fsync, rename; keep the last K.

Layout under a stage's output directory::

    checkpoints/step-00000120/     complete: accelerate state (model, optimizer, scaler, RNG of every
                                   process) + trainer_state.json (step, data position, config)
    checkpoints/.tmp-step-00000140 being written; never read, removed at the next start

``trainer_state.json`` is the last file written before the rename, and only directories named
``step-NNNNNNNN`` that contain it count, so a run killed at any moment (SIGKILL included) resumes
from the newest complete checkpoint.

The stage directory itself is ``finished`` once ``train_state.json`` says so (written last, after
the final model), ``interrupted`` while it holds a complete checkpoint, ``stale`` when a run died
before its first checkpoint, and ``foreign`` when it holds files that are not ours: a run never
writes into a foreign directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from ..errors import DiffutronError
from ..outputs import check_output_dir

CHECKPOINTS = "checkpoints"
CKPT_STATE = "trainer_state.json"  # in a checkpoint: written last, lists its files (a manifest)
STATE_FILE = "train_state.json"  # in the stage directory: written last, marks a finished stage
RUN_RECORD = "diffutron_training.json"  # in the final model directory: config, data report, metrics
_OWN_NAMES = {CHECKPOINTS, "cache", "metrics.jsonl", "metrics.csv", "tensorboard", "run.json", ".final-tmp",
              "loss.png"}
_NAME = re.compile(r"^step-(\d{8})$")
# Settings that may differ between a run and its resumption (or a finished stage and its recipe now):
# how a run is watched, saved, placed and computed, not what it learns. Keys of the flattened config
# (``changed_settings``). The loss variant (``fused_loss``, ``fused_loss_impl``) and ``compile`` give
# the same loss up to rounding.
RESUME_FREE = frozenset({
    "log_every", "eval_every", "eval_at_start", "eval_sequences", "eval_draws", "eval_seed", "save_every",
    "keep_last", "keep_checkpoints", "progress", "tensorboard", "output_dir", "model", "cpu", "fused_loss",
    "fused_loss_impl", "compile", "data.cache", "data.skip_bad_rows",
})


def changed_settings(before: dict, now: dict) -> list[tuple[str, object, object]]:
    """``(key, before, now)`` of every setting two stage configs (``TrainConfig.to_dict()``) set
    differently, sorted by key, apart from ``RESUME_FREE``. Nested settings (``data``, ``lora``)
    are compared key by key (``data.max_length``); a fresh model's ``config`` mapping as a whole."""
    before, now = _flatten(before), _flatten(now)
    return [(k, before.get(k), now.get(k)) for k in sorted(set(before) | set(now))
            if k not in RESUME_FREE and before.get(k) != now.get(k)]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "config":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS


def _manifest(checkpoint: Path) -> dict[str, int]:
    """Every file of a checkpoint (but its state file) with its size in bytes."""
    return {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*"))
            if p.is_file() and p.name != CKPT_STATE}


def is_complete(checkpoint: Path) -> bool:
    """A checkpoint is complete when its state file (written last) is readable and every file it
    lists is there at its recorded size: a kill while an old checkpoint was deleted, or a copy
    that lost a file, leaves one that is not."""
    try:
        state = json.loads((checkpoint / CKPT_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict):
        return False
    files = state.get("files")
    if files is None:  # written before checkpoints listed their files: the state file vouches alone
        return True
    for name, size in files.items():
        try:
            if (checkpoint / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints as ``(step, path)``, oldest first (incomplete ones are ignored)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _NAME.match(entry.name)
        if m and entry.is_dir() and is_complete(entry):
            found.append((int(m.group(1)), entry))
    return sorted(found)


def delete_checkpoint(checkpoint: Path) -> None:
    """Rename first (one atomic step: the checkpoint is gone from the list), then delete; a kill
    in between leaves a hidden ``.del-`` directory that ``remove_partial`` clears."""
    doomed = checkpoint.with_name(f".del-{checkpoint.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(checkpoint, doomed)
    _fsync_dir(checkpoint.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def latest_checkpoint(output_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_partial(output_dir: str | os.PathLike) -> None:
    """Delete half-written and half-deleted checkpoints left by a killed run."""
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith((".tmp-", ".del-")):
                shutil.rmtree(entry, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temporary file + fsync + rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, state: dict, keep_last: int) -> Path:
    """Save the accelerate state and ``state`` as checkpoint ``step`` (every process must call this).

    Returns the checkpoint directory. Older complete checkpoints beyond ``keep_last`` are deleted
    after the new one is in place.
    """
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    # the tied input/output embedding is stored once; accelerate warns about that on every save
    quiet = logging.getLogger("accelerate.utils.other")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        accelerator.save_state(str(tmp))
    finally:
        quiet.setLevel(level)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        write_json_atomic(tmp / CKPT_STATE, {**state, "files": _manifest(tmp)})
        if final.exists():  # the same step saved again after a resume: the old copy is identical
            delete_checkpoint(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in list_checkpoints(output_dir)[:-keep_last]:
            delete_checkpoint(old)
    accelerator.wait_for_everyone()
    return final


def read_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / CKPT_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DiffutronError(f"{checkpoint}: unreadable {CKPT_STATE} ({err}): delete this checkpoint") from None


def load_checkpoint(accelerator, checkpoint: Path) -> dict:
    """Restore model, optimizer, scaler and RNG states; returns the trainer state."""
    state = read_state(checkpoint)
    accelerator.load_state(str(checkpoint))
    return state


# ---------------------------------------------------------------------------------------------
# the stage directory


def output_state(out: Path) -> str:
    """``empty``, ``finished``, ``interrupted`` (a complete checkpoint), ``stale`` (our files, no
    checkpoint: killed before the first one) or ``foreign`` (other files)."""
    if not out.exists() or not any(out.iterdir()):
        return "empty"
    state = out / STATE_FILE
    if state.is_file():
        try:
            record = json.loads(state.read_text(encoding="utf-8"))
        except ValueError:
            record = None
        if isinstance(record, dict) and record.get("finished"):
            return "finished"
    if latest_checkpoint(out) is not None:
        return "interrupted"
    names = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    return "stale" if names <= _OWN_NAMES else "foreign"


def check_output(out: Path, resume: bool) -> str:
    """Decide, before anything is written, whether this run may use ``out``; returns its state."""
    check_output_dir(out)
    state = output_state(out)
    if resume:
        if state == "finished":
            return state
        if state != "interrupted":
            where = out / CHECKPOINTS
            raise DiffutronError(f"--resume: {where} holds no complete checkpoint to resume from")
        return state
    if state == "finished":
        raise DiffutronError(f"{out} already holds a finished model: choose another output directory")
    if state == "interrupted":
        step = latest_checkpoint(out)[0]
        raise DiffutronError(f"{out} holds an interrupted run (checkpoint at step {step}): pass --resume to "
                             "continue it, or choose another output directory")
    if state == "foreign":
        raise DiffutronError(f"{out} is not empty and holds no diffutron run: choose a new output directory")
    return state


def clean_stale(out: Path) -> None:
    """Remove what a run killed before its first checkpoint left (the data cache stays)."""
    for entry in out.iterdir():
        if entry.name == "cache":
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
