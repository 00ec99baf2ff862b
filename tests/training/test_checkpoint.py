"""training/checkpoint.py, tested directly: when a checkpoint counts as complete, listing and
pruning checkpoints, atomic writes, the stage directory's states and the messages that refuse one,
the settings that may change on resume, and a save -> load round trip through accelerate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffutron.errors import DiffutronError
from diffutron.training import checkpoint as ckpt
from diffutron.training.checkpoint import (
    CKPT_STATE, RESUME_FREE, STATE_FILE, changed_settings, check_output, delete_checkpoint, is_complete,
    latest_checkpoint, list_checkpoints, load_checkpoint, output_state, remove_partial, save_checkpoint,
    write_json_atomic,
)


def make_checkpoint(out: Path, step: int | str, files: dict[str, bytes] | None = None, *, manifest: bool = True) -> Path:
    """A checkpoint directory as save_checkpoint leaves it: its files, then the state file listing them."""
    path = out / "checkpoints" / (step if isinstance(step, str) else f"step-{step:08d}")
    path.mkdir(parents=True)
    files = {"model.safetensors": b"weights", "optimizer.bin": b"moments!"} if files is None else files
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    state = {"step": step}
    if manifest:
        state["files"] = {name: len(data) for name, data in files.items()}
    (path / CKPT_STATE).write_text(json.dumps(state))
    return path


# ---------------------------------------------------------------------------------------------
# complete checkpoints


def test_a_checkpoint_is_complete_when_every_listed_file_has_its_size(tmp_path):
    path = make_checkpoint(tmp_path, 3, {"model.safetensors": b"abc", "sub/random_states_0.pkl": b"12345"})
    assert is_complete(path)
    (path / "notes.txt").write_text("not listed")  # files the manifest does not list do not matter
    assert is_complete(path)
    (path / "sub" / "random_states_0.pkl").write_bytes(b"1234")  # truncated
    assert not is_complete(path)
    (path / "sub" / "random_states_0.pkl").write_bytes(b"123456")  # grown
    assert not is_complete(path)
    (path / "sub" / "random_states_0.pkl").write_bytes(b"12345")
    assert is_complete(path)
    (path / "model.safetensors").unlink()  # lost
    assert not is_complete(path)


def test_a_checkpoint_without_a_readable_state_file_is_incomplete(tmp_path):
    path = make_checkpoint(tmp_path, 1)
    (path / CKPT_STATE).write_text('{"step": 1, "files": {')  # a kill while writing it
    assert not is_complete(path)
    (path / CKPT_STATE).write_text("[]")  # valid JSON, but not a state
    assert not is_complete(path)
    (path / CKPT_STATE).unlink()
    assert not is_complete(path)
    assert not is_complete(tmp_path / "never-made")
    older = make_checkpoint(tmp_path, 2, manifest=False)  # written before checkpoints listed their files
    (older / "model.safetensors").unlink()
    assert is_complete(older)


def test_list_checkpoints_sorts_complete_ones_by_step_and_ignores_the_rest(tmp_path):
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None  # no checkpoints/ at all
    made = {step: make_checkpoint(tmp_path, step) for step in (30, 4, 120, 1000)}
    broken = make_checkpoint(tmp_path, 500)
    (broken / "optimizer.bin").write_bytes(b"")  # truncated: incomplete
    (make_checkpoint(tmp_path, 600) / CKPT_STATE).unlink()  # no state file yet
    make_checkpoint(tmp_path, "step-7")  # not eight digits
    make_checkpoint(tmp_path, ".tmp-step-00002000")
    make_checkpoint(tmp_path, ".del-step-00003000")
    make_checkpoint(tmp_path, "final")
    (tmp_path / "checkpoints" / "step-00004000").write_text("a file, not a directory")
    want = [(4, made[4]), (30, made[30]), (120, made[120]), (1000, made[1000])]
    assert list_checkpoints(tmp_path) == want and list_checkpoints(str(tmp_path)) == want
    assert latest_checkpoint(tmp_path) == (1000, made[1000])


def test_delete_checkpoint_renames_first_then_deletes(tmp_path, monkeypatch):
    keep, doomed = make_checkpoint(tmp_path, 1), make_checkpoint(tmp_path, 2)
    hidden = tmp_path / "checkpoints" / ".del-step-00000002"
    hidden.mkdir()
    (hidden / "left-by-a-kill").write_text("x")  # an earlier deletion killed between rename and delete
    seen = []
    real_rmtree = ckpt.shutil.rmtree

    def rmtree(path, ignore_errors=False):
        seen.append((Path(path).name, doomed.exists(), sorted(p.name for p in Path(path).iterdir())
                     if Path(path).exists() else None))
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    delete_checkpoint(doomed)
    monkeypatch.undo()
    # the stale .del- copy goes first; then the checkpoint is renamed (gone from the list) before its files go
    assert seen == [(".del-step-00000002", True, ["left-by-a-kill"]),
                    (".del-step-00000002", False, ["model.safetensors", "optimizer.bin", CKPT_STATE])]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]
    assert list_checkpoints(tmp_path) == [(1, keep)]


def test_remove_partial_clears_half_written_and_half_deleted_checkpoints_only(tmp_path):
    remove_partial(tmp_path)  # nothing to do, no error
    make_checkpoint(tmp_path, 5)
    make_checkpoint(tmp_path, ".tmp-step-00000010")
    make_checkpoint(tmp_path, ".del-step-00000001")
    make_checkpoint(tmp_path, "other")
    remove_partial(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["other", "step-00000005"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]


def test_write_json_atomic_round_trips_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "state.json"
    data = {"step": 12, "note": "çay ve şeker", "nested": {"a": [1, 2.5, None, True]}}
    write_json_atomic(target, data)
    assert json.loads(target.read_text(encoding="utf-8")) == data
    assert "çay ve şeker" in target.read_text(encoding="utf-8")  # readable, not \u-escaped
    write_json_atomic(target, {"step": 13})  # over an existing file
    assert json.loads(target.read_text(encoding="utf-8")) == {"step": 13}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


# ---------------------------------------------------------------------------------------------
# the stage directory


def test_a_new_or_empty_directory_may_start_a_run_but_not_resume_one(tmp_path):
    for out in (tmp_path / "new" / "stage", tmp_path):
        assert output_state(out) == "empty"
        assert check_output(out, resume=False) == "empty"
        with pytest.raises(DiffutronError) as err:
            check_output(out, resume=True)
        assert str(err.value) == f"--resume: {out / 'checkpoints'} holds no complete checkpoint to resume from"
    assert list(tmp_path.iterdir()) == []  # checking writes nothing (not even "new")


def test_an_existing_file_is_refused(tmp_path):
    out = tmp_path / "out"
    out.write_text("x")
    for resume in (False, True):
        with pytest.raises(DiffutronError) as err:
            check_output(out, resume=resume)
        assert str(err.value) == f"--output {out} is a file, not a directory: name a directory (new or empty)"


def test_a_directory_with_other_files_is_foreign_and_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "metrics.jsonl").write_text("")
    assert output_state(tmp_path) == "foreign"
    with pytest.raises(DiffutronError) as err:
        check_output(tmp_path, resume=False)
    assert str(err.value) == f"{tmp_path} is not empty and holds no diffutron run: choose a new output directory"
    with pytest.raises(DiffutronError, match="^--resume: .* holds no complete checkpoint to resume from$"):
        check_output(tmp_path, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "notes.txt"]


def test_a_run_killed_before_its_first_checkpoint_is_stale(tmp_path):
    for name in ("metrics.jsonl", "run.json", ".hidden-probe"):
        (tmp_path / name).write_text("")
    make_checkpoint(tmp_path, ".tmp-step-00000002")
    (tmp_path / "cache").mkdir()
    assert output_state(tmp_path) == "stale"
    assert check_output(tmp_path, resume=False) == "stale"
    with pytest.raises(DiffutronError, match="holds no complete checkpoint to resume from"):
        check_output(tmp_path, resume=True)
    ckpt.clean_stale(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # the data cache stays


def test_an_interrupted_run_needs_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    make_checkpoint(tmp_path, 40)
    make_checkpoint(tmp_path, 20)
    (make_checkpoint(tmp_path, 60) / "model.safetensors").unlink()  # incomplete: not the one named
    assert output_state(tmp_path) == "interrupted"
    with pytest.raises(DiffutronError) as err:
        check_output(tmp_path, resume=False)
    assert str(err.value) == (f"{tmp_path} holds an interrupted run (checkpoint at step 40): pass --resume to "
                              "continue it, or choose another output directory")
    assert check_output(tmp_path, resume=True) == "interrupted"
    (tmp_path / STATE_FILE).write_text("{not json")  # an unreadable state file does not mark it finished
    assert output_state(tmp_path) == "interrupted"
    (tmp_path / STATE_FILE).write_text('["finished"]')  # nor does valid JSON that is not a state
    assert output_state(tmp_path) == "interrupted"


def test_a_finished_stage_is_refused_without_resume_and_passed_with_it(tmp_path):
    make_checkpoint(tmp_path, 8)
    write_json_atomic(tmp_path / STATE_FILE, {"finished": True, "steps": 8})
    assert output_state(tmp_path) == "finished"
    with pytest.raises(DiffutronError) as err:
        check_output(tmp_path, resume=False)
    assert str(err.value) == f"{tmp_path} already holds a finished model: choose another output directory"
    assert check_output(tmp_path, resume=True) == "finished"
    write_json_atomic(tmp_path / STATE_FILE, {"finished": False})
    assert output_state(tmp_path) == "interrupted"
    # keep_checkpoints: false marks the run finished, then removes checkpoints/: a kill in between
    # or after leaves the model files and the mark, a finished run (not a foreign directory)
    write_json_atomic(tmp_path / STATE_FILE, {"finished": True, "steps": 8})
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_text("{}")
    ckpt.delete_checkpoint(tmp_path / "checkpoints" / "step-00000008")
    assert output_state(tmp_path) == "finished"


def test_changed_settings_compares_nested_settings_key_by_key_apart_from_resume_free_ones():
    before = {"lr": 1e-2, "seed": 0, "log_every": 10, "save_every": 50, "fused_loss": True,
              "data": {"train": "a.jsonl", "max_length": 128, "cache": True, "skip_bad_rows": False},
              "lora": {"r": 8, "alpha": 16}, "config": {"hidden_size": 32, "rope": {"theta": 1.0}}}
    now = {"lr": 1e-2, "seed": 0, "log_every": 1, "save_every": 5, "fused_loss": False,
           "data": {"train": "a.jsonl", "max_length": 64, "cache": False, "skip_bad_rows": True, "extra": 1},
           "lora": {"r": 16, "alpha": 16}, "config": {"hidden_size": 32, "rope": {"theta": 2.0}}}
    assert changed_settings(before, now) == [
        ("config", before["config"], now["config"]),  # a fresh model's config: compared as a whole
        ("data.extra", None, 1),
        ("data.max_length", 128, 64),
        ("lora.r", 8, 16),
    ]
    assert changed_settings(before, before) == []
    assert {"log_every", "save_every", "fused_loss", "data.cache", "data.skip_bad_rows"} <= RESUME_FREE
    assert changed_settings({"cache": 1}, {"cache": 2}) == [("cache", 1, 2)]  # only data.cache is free
    assert changed_settings({"lr": 1}, {}) == [("lr", 1, None)]


# ---------------------------------------------------------------------------------------------
# save and load through accelerate


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    from diffutron.training.loop import _reset_accelerate

    _reset_accelerate()
    yield Accelerator(cpu=True)
    _reset_accelerate()


def test_save_then_load_restores_weights_optimizer_and_rng_exactly(tmp_path, accelerator):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)

    def step():
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()

    def snapshot():
        return ({k: v.clone() for k, v in model.state_dict().items()},
                {k: {n: t.clone() for n, t in s.items() if torch.is_tensor(t)}
                 for k, s in optimizer.state_dict()["state"].items()})

    out = tmp_path / "stage"
    for n in (5, 10, 15):
        step()
        path = save_checkpoint(accelerator, out, n, {"step": n, "note": "ç"}, keep_last=2)
        assert path == out / "checkpoints" / f"step-{n:08d}" and is_complete(path)
    weights, moments = snapshot()
    after_save = torch.rand(4)
    # keep_last=2: the oldest went; no temporary or half-deleted directory is left
    assert [s for s, _ in list_checkpoints(out)] == [10, 15]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000010", "step-00000015"]
    saved = json.loads((path / CKPT_STATE).read_text(encoding="utf-8"))
    assert {k: saved[k] for k in ("step", "note")} == {"step": 15, "note": "ç"}
    listed = {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != CKPT_STATE}
    assert saved["files"] == listed and listed  # the manifest lists every file at its size
    step()
    step()  # move on: weights, moments and the RNG all change
    assert not torch.equal(model.state_dict()["0.weight"], weights["0.weight"])
    assert load_checkpoint(accelerator, path) == saved
    now_weights, now_moments = snapshot()
    assert now_weights.keys() == weights.keys() and all(torch.equal(now_weights[k], weights[k]) for k in weights)
    assert all(torch.equal(now_moments[k][n], moments[k][n]) for k in moments for n in moments[k])
    assert torch.equal(torch.rand(4), after_save)  # the RNG state came back too
    # the same step saved again (after a resume) replaces the old copy
    step()
    again = save_checkpoint(accelerator, out, 15, {"step": 15, "note": "again"}, keep_last=2)
    assert again == path and json.loads((path / CKPT_STATE).read_text())["note"] == "again"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000010", "step-00000015"]
