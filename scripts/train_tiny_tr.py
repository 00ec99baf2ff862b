"""Train tiny-tr (recipes/tiny-tr.yaml) on this machine's device, publishing every finished stage.

    # on a lent GPU machine, from the project root (after ../shared/device/prepare.sh --cache and
    # `python scripts/train_tiny_tr.py device-files`, see below): the GPU recipe in ~4-5 minutes
    bash .device/on-gpu.sh py scripts/train_tiny_tr.py run --out "$OUT"

    # here (2 CPU cores): the cpu variant, ~2.4 h (estimated); --install then makes it the embedded model
    .venv/bin/python scripts/train_tiny_tr.py run --install
    .venv/bin/python scripts/train_tiny_tr.py run --quick            # smoke run (~4 min)

    # back here: install a GPU run's returned files as the embedded model and write its card
    .venv/bin/python scripts/train_tiny_tr.py install DIR_OF_RETURNED_FILES

    # before going to the GPU: put the Turkish lexicon next to .device/cache.tgz
    .venv/bin/python scripts/train_tiny_tr.py device-files

``run`` trains with ``--variant auto`` (the GPU recipe where CUDA is present, the ``cpu`` variant
elsewhere). After EACH stage it writes that stage's model into ``--out`` (default ``$OUT``, else
``runs/tiny-tr-out``) as float16 safetensors shards of at most 15 MB (``save_pretrained(...,
max_shard_size="15MB")``) plus ``tiny-tr-meta.tgz`` (config, shard index, tokenizer, every finished
stage's settings and numbers in ``stages.json``, the run's device and times in ``run.json``, and the
shards' sha256). Each stage replaces the previous stage's files, so the folder always holds the
newest finished stage and the numbers of all finished stages in 4 files (3 shards + 1 archive for
the 19.4 M-parameter GPU model); with ``on-gpu.sh``'s three logs that is 7 of the 8 files a GPU run
may return, none over 16 MiB. A run cut short still returns its finished stages' numbers and the
newest finished weights. ``--budget-min`` (default 5 on a GPU): a stage not started by then is left out.

On the GPU machine (offline) the corpus, tasks and tokenizer come from ``.device/cache.tgz``
(``prepare.sh --cache``, unpacked here into a temporary cache when ``$DIFFUTRON_CACHE`` is unset) and
the hunspell-tr lexicon from ``.device/tr_TR.dic`` (``device-files``); without it the Turkish-word share
is left out on the GPU and computed by ``install``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from diffutron.files import file_sha256  # noqa: E402

RECIPE = ROOT / "recipes" / "tiny-tr.yaml"
META = "tiny-tr-meta.tgz"
SHARD = "15MB"
MAX_FILES = 8 - 3  # on-gpu.sh returns pip.txt, gpu.txt and py.txt besides ours
MAX_BYTES = 16 * 1024 * 1024


def say(text: str) -> None:
    print(f"train_tiny_tr: {text}", flush=True)


def _device_inputs() -> None:
    """The carried cache and lexicon of ``.device/`` when nothing else is set, on the (offline) GPU machine."""
    import torch

    tgz = ROOT / ".device" / "cache.tgz"
    if not torch.cuda.is_available():
        return
    if not os.environ.get("DIFFUTRON_CACHE") and tgz.is_file():
        cache = Path(tempfile.mkdtemp(prefix="diffutron-cache-"))
        with tarfile.open(tgz) as tar:
            tar.extractall(cache, filter="data")
        os.environ["DIFFUTRON_CACHE"] = str(cache)
        say(f"corpus, tasks and tokenizer from {tgz} in {cache}")
    dic = ROOT / ".device" / "tr_TR.dic"
    if not os.environ.get("DIFFUTRON_LEXICON") and dic.is_file():
        os.environ["DIFFUTRON_LEXICON"] = str(dic)
    elif not os.environ.get("DIFFUTRON_LEXICON") and tgz.is_file():  # offline: never wait for apt-get
        os.environ["DIFFUTRON_LEXICON"] = "none"
        say("no .device/tr_TR.dic (run device-files before going): the Turkish-word share is left to install")


class Publisher:
    """Writes each finished stage (weights + numbers) into ``out``, replacing the previous one."""

    def __init__(self, out: Path, run_info: dict):
        self.out = out
        self.run_info = run_info
        self.stages: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)

    def __call__(self, stage, result, card_metrics) -> None:
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        from diffutron.training.export import stage_record

        began = time.perf_counter()
        self.stages.append(stage_record(stage, result, card_metrics))
        with tempfile.TemporaryDirectory(prefix="tiny-tr-stage-") as tmp:
            tmp = Path(tmp)
            model = AutoModelForMaskedLM.from_pretrained(str(result.output_dir), dtype=torch.float16)
            model.save_pretrained(tmp / "model", max_shard_size=SHARD, safe_serialization=True)
            AutoTokenizer.from_pretrained(str(result.output_dir)).save_pretrained(tmp / "model")
            shards = sorted(p for p in (tmp / "model").glob("*.safetensors"))
            info = dict(self.run_info, stage=stage.name, stages_finished=[s["name"] for s in self.stages],
                        elapsed_s=time.perf_counter() - self.run_info["began"],
                        shards={p.name: file_sha256(p) for p in shards},
                        parameters=sum(p.numel() for p in model.parameters()))
            info.pop("began", None)
            meta = tmp / META
            with tarfile.open(meta, "w:gz") as tar:
                for path in sorted((tmp / "model").iterdir()):
                    if path.suffix != ".safetensors":
                        tar.add(path, arcname=f"model/{path.name}")
                for name, data in (("stages.json", self.stages), ("run.json", info)):
                    blob = json.dumps(data, ensure_ascii=False, indent=2, default=str).encode()
                    entry = tarfile.TarInfo(name)
                    entry.size = len(blob)
                    tar.addfile(entry, io.BytesIO(blob))
            files = shards + [meta]
            too_big = [p.name for p in files if p.stat().st_size > MAX_BYTES]
            if too_big or len(files) > MAX_FILES:
                say(f"warning: {len(files)} files ({', '.join(too_big) or 'sizes fine'}): over what a GPU run returns")
            for old in self.out.glob("*.safetensors"):
                if old.name not in {p.name for p in shards}:
                    old.unlink()
            for path in files:  # each file whole (copied beside, then renamed); the archive, naming the stage, last
                part = self.out / f".{path.name}.part"
                shutil.copyfile(path, part)
                os.chmod(part, 0o644)
                os.replace(part, self.out / path.name)
        c = card_metrics or {}
        ppl = (c.get("perplexity") or {}).get("ppl_per_word")
        share = ((c.get("prompt_set") or {}).get("turkish_share") or {}).get("share")
        key = next((k for k in self.stages[-1]["metrics_after"] if k.endswith("_score")), None)
        metric = f", {key} {self.stages[-1]['metrics_before'].get(key, 0):.3f} -> {self.stages[-1]['metrics_after'][key]:.3f}" \
            if key else ""
        say(f"stage {stage.name} published to {self.out} in {time.perf_counter() - began:.1f} s: "
            f"{result.steps} steps, trained in {(c.get('train_seconds') or 0):.0f} s, perplexity per word "
            f"{ppl if ppl is None else f'{ppl:,.1f}'}, Turkish-word share {share if share is None else f'{share:.3f}'}"
            f"{metric}; {time.perf_counter() - self.run_info['began']:.0f} s since the start")


def cmd_run(args) -> int:
    _device_inputs()
    import torch

    from diffutron.training import load_recipe, run_recipe
    from diffutron.training.card_metrics import device_name

    began = time.perf_counter()
    cuda = torch.cuda.is_available()
    budget = args.budget_min if args.budget_min is not None else (5.0 if cuda else None)
    out = Path(args.out or os.environ.get("OUT") or ROOT / "runs" / "tiny-tr-out").absolute()
    variant = load_recipe(RECIPE, quick=args.quick, variant=args.variant).variant  # "auto" resolved here, recorded
    info = {"began": began, "device": device_name(), "variant": variant, "quick": args.quick,
            "recipe": str(RECIPE.relative_to(ROOT)), "budget_min": budget,
            "versions": {"torch": torch.__version__}}
    say(f"{info['device']}: recipe {info['recipe']} (variant {variant}{', quick' if args.quick else ''}), "
        f"stages published to {out}" + (f", stages start within {budget:g} min" if budget else ""))
    deadline = began + budget * 60 if budget else None
    publisher = Publisher(out, info)
    results = run_recipe(RECIPE, quick=args.quick, variant=variant, on_stage_end=publisher, deadline=deadline,
                         export_model=False)
    wall = time.perf_counter() - began
    say(f"done: {len(results)} stages in {wall / 60:.1f} min")
    if args.install:
        install(out, Path(args.target), wall_seconds=wall if len(results) == 4 else None)
    return 0 if results else 1


def _extract(files: Path, into: Path) -> tuple[Path, list[dict], dict]:
    meta = files / META
    if not meta.is_file():
        raise SystemExit(f"no {META} in {files}: give the folder a run published to (its returned files)")
    with tarfile.open(meta) as tar:
        tar.extractall(into, filter="data")
    stages = json.loads((into / "stages.json").read_text(encoding="utf-8"))
    info = json.loads((into / "run.json").read_text(encoding="utf-8"))
    for name, digest in info["shards"].items():
        path = files / name
        if not path.is_file() or file_sha256(path) != digest:
            raise SystemExit(f"{path}: missing or not the shard of stage {info['stage']} (sha256 differs): the run "
                             "was cut while writing; nothing installed")
        shutil.copy(path, into / "model" / name)
    return into / "model", stages, info


def install(files: Path, target: Path, wall_seconds: float | None = None) -> None:
    """A published stage (``run``'s output folder, or a GPU run's returned files) as ``target`` with its card."""
    from diffutron.corpus.lexicon import load_stems
    from diffutron.errors import DiffutronError
    from diffutron.training import load_recipe
    from diffutron.training.export import export_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, stages, info = _extract(files, Path(tmp))
        recipe = load_recipe(RECIPE, quick=info.get("quick", False), variant=info.get("variant"))
        if stages[-1]["name"] != recipe.stages[-1].name:
            say(f"warning: the newest finished stage is {stages[-1]['name']!r}, not the recipe's last")
        try:
            stems = load_stems()
        except DiffutronError as err:
            stems = None
            say(f"no Turkish-word share on the card ({err})")
        source = recipe.source if not recipe.variant else f"{recipe.source} --variant {recipe.variant}"
        wall = wall_seconds if wall_seconds is not None else (info.get("elapsed_s") if len(stages) == 4 else None)
        export_model(model_dir, target, recipe.export, name=recipe.name, recipe_source=source, stages=stages,
                     corpus_dir=recipe.where.get("corpus"), wall_seconds=wall, device=info.get("device"), stems=stems,
                     log=say)


def cmd_install(args) -> int:
    install(Path(args.files), Path(args.target))
    return 0


def cmd_device_files(args) -> int:
    from diffutron.corpus.lexicon import fetch_lexicon

    dev = ROOT / ".device"
    if not (dev / "cache.tgz").is_file():
        raise SystemExit("no .device/cache.tgz: run `bash ../shared/device/prepare.sh --cache` first "
                         "(it rebuilds .device/, so run this after it)")
    shutil.copy(fetch_lexicon(), dev / "tr_TR.dic")
    say(f"{dev / 'tr_TR.dic'} ({(dev / 'tr_TR.dic').stat().st_size / 1e6:.1f} MB) goes to the GPU with .device/")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the recipe here, publishing each finished stage")
    run.add_argument("--variant", default="auto", help="auto (cpu variant without CUDA), cpu, or none for the GPU recipe")
    run.add_argument("--quick", action="store_true", help="the recipe's smoke run")
    run.add_argument("--out", default=None, help="publish folder (default $OUT, else runs/tiny-tr-out)")
    run.add_argument("--budget-min", type=float, default=None, help="start no stage after this many minutes "
                                                                    "(default 5 on a GPU, none on a CPU)")
    run.add_argument("--install", action="store_true", help="install the final stage as the embedded model")
    run.add_argument("--target", default=str(ROOT / "src" / "diffutron" / "embedded" / "tiny-tr"))
    run.set_defaults(func=cmd_run)
    ins = sub.add_parser("install", help="install published files as the embedded model and write its card")
    ins.add_argument("files", help="the folder holding the shards and tiny-tr-meta.tgz")
    ins.add_argument("--target", default=str(ROOT / "src" / "diffutron" / "embedded" / "tiny-tr"))
    ins.set_defaults(func=cmd_install)
    dev = sub.add_parser("device-files", help="copy the hunspell-tr lexicon into .device/ for the GPU machine")
    dev.set_defaults(func=cmd_device_files)
    args = ap.parse_args(argv)
    if getattr(args, "variant", None) == "none":
        args.variant = None
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
