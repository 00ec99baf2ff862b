"""The loss plot: every stage and every recipe ends with a PNG of training loss and held-out
perplexity against step; ``diffutron plot RUN_DIR`` redraws it; TensorBoard events when installed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from diffutron.cli import main as cli_main
from diffutron.errors import DiffutronError
from diffutron.training import DataConfig, TrainConfig, run_recipe, train
from diffutron.training.plot import PLOT, plot_recipe, plot_run, plot_stage, read_metrics, recipe_stages
from tiny_runs import tiny_run_inputs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    """A complete PNG that matplotlib reads back as an 800 x 600 picture with something drawn on it."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    assert pixels.shape[:2] == (600, 800), pixels.shape
    assert pixels[..., :3].std() > 0.05  # lines, labels and axes, not a blank canvas
    assert not list(path.parent.glob(f".{path.name}.tmp-*"))  # written through a temporary name


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("plot")
    tiny_run_inputs(d, seed=0, rows=120)
    return d


def tiny_config(files, out, **kw) -> TrainConfig:
    base = dict(model=str(files / "base"), output_dir=str(out), max_steps=6, batch_size=4, lr=1e-2, warmup_steps=1,
                log_every=2, eval_every=3, eval_sequences=4, eval_draws=2, save_every=None, progress=False,
                data=DataConfig(train=str(files / "corpus.jsonl"), max_length=32, heldout_fraction=0.1))
    base.update(kw)
    return TrainConfig(**base)


def write_metrics(d: Path, records: list[dict], *, start: str | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    if start is not None:
        (d / "run.json").write_text(json.dumps({"start": start}), encoding="utf-8")
    return d


def records(steps: int, *, loss0: float = 9.0, ppl0: float = 8000.0) -> list[dict]:
    out = [{"step": 0, "kind": "eval", "heldout_loss": 9.0, "heldout_ppl": ppl0}]
    for s in range(1, steps + 1):
        out.append({"step": s, "kind": "train", "loss": loss0 / (1 + 0.2 * s), "lr": 1e-3, "grad_norm": None})
        if s % 5 == 0:
            out.append({"step": s, "kind": "eval", "heldout_loss": 9.0 / (1 + 0.2 * s), "heldout_ppl": ppl0 / (1 + s)})
    return out


def test_a_training_stage_ends_with_its_loss_plot(files, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(files, out))
    assert_png(out / PLOT)
    drawn = read_metrics(out)
    assert [r["step"] for r in drawn if r["kind"] == "eval"] == [0, 3, 6]
    # a finished stage's directory with its plot is still ours: resume says "finished", not "foreign"
    assert train(tiny_config(files, out), resume=True).already_finished


def test_the_plot_of_hand_written_metrics(tmp_path):
    stage = write_metrics(tmp_path / "stage", records(20))
    with open(stage / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"step": 21, "kind": "tra')  # a line cut short by a kill
    assert len(read_metrics(stage)) == 20 + 5  # 20 train lines, 5 evaluations
    assert plot_stage(stage) == stage / PLOT
    assert_png(stage / PLOT)

    # metrics.csv alone (the CSV the loop writes: empty cells for missing values), no evaluation
    only_csv = tmp_path / "csv"
    only_csv.mkdir()
    (only_csv / "metrics.csv").write_text("step,epoch,kind,loss,lr,grad_norm,heldout_ppl\n"
                                          "1,0.1,train,5.0,0.001,,\n2,0.2,train,4.0,0.001,,\n", encoding="utf-8")
    assert [r["loss"] for r in read_metrics(only_csv)] == [5.0, 4.0]
    assert_png(plot_stage(only_csv, tmp_path / "elsewhere" / "csv.png"))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DiffutronError, match="holds no metrics.jsonl"):
        plot_stage(empty)


def test_a_recipe_plot_puts_its_stages_one_after_another(tmp_path):
    root = tmp_path / "recipe"
    cpt = write_metrics(root / "b-cpt", records(30), start="jhu-clsp/mmBERT-base")
    sft = write_metrics(root / "a-sft", records(10, loss0=4.0, ppl0=90.0), start=str(cpt))
    (root / "data").mkdir()  # a recipe's prepared data: not a stage
    os.utime(sft / "run.json", (1_000, 1_000))  # started "before" cpt by the clock: its start decides
    assert recipe_stages(root) == [("b-cpt", cpt), ("a-sft", sft)]
    assert_png(plot_recipe(recipe_stages(root), root / PLOT, title="tiny"))
    assert plot_run(root) == root / PLOT and plot_run(cpt) == cpt / PLOT
    with pytest.raises(DiffutronError, match="none of the stages"):
        plot_recipe([("x", tmp_path / "nothing")], tmp_path / "x.png")


def test_a_recipe_ends_with_one_plot_of_all_its_stages(files, tmp_path):
    out = tmp_path / "runs"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
name: tiny-plot
output_dir: {out}
defaults: {{seed: 3, progress: false, log_every: 1, batch_size: 4, max_steps: 3, eval_sequences: 4, save_every: null,
           data: {{train: {files / 'corpus.jsonl'}, kind: pretrain, max_length: 32, heldout_fraction: 0.1}}}}
stages:
  - name: first
    start: {files / 'base'}
  - name: second
    start: previous
""", encoding="utf-8")
    run_recipe(recipe, isolate=False)
    for png in (out / "first" / PLOT, out / "second" / PLOT, out / PLOT):
        assert_png(png)
    assert [name for name, _ in recipe_stages(out)] == ["first", "second"]


def test_the_plot_command_redraws_a_run(tmp_path, capsys):
    stage = write_metrics(tmp_path / "stage", records(12))
    assert cli_main(["plot", str(stage)]) == 0
    assert capsys.readouterr().out.strip() == f"loss plot written to {stage / PLOT}"
    assert_png(stage / PLOT)
    assert cli_main(["plot", str(stage), "--output", str(tmp_path / "pngs" / "mine.png")]) == 0
    assert_png(tmp_path / "pngs" / "mine.png")
    # user errors: one line each, exit code 2, nothing drawn
    (tmp_path / "plain").mkdir()
    for argv, message in ((["plot", str(tmp_path / "missing")], "no such directory"),
                          (["plot", str(tmp_path / "plain")], "holds no metrics.jsonl"),
                          (["plot", str(stage), "--output", str(tmp_path)], "is a directory")):
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_tensorboard_is_skipped_silently_when_it_is_not_installed(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    out = tmp_path / "run"
    train(tiny_config(files, out, max_steps=2, eval_every=None, tensorboard=True))
    assert not (out / "tensorboard").exists() and (out / PLOT).is_file()
    err = capsys.readouterr().err
    assert "warning" not in err and "Traceback" not in err, err


def test_tensorboard_events_when_it_is_installed(files, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(tiny_config(files, out, tensorboard=True))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in events.Scalars("eval/heldout_ppl")] == [0, 3, 6]


def test_import_diffutron_does_not_import_matplotlib():
    import subprocess

    code = "import sys, diffutron, diffutron.training, diffutron.cli; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
