"""``diffutron train``, ``diffutron recipe run|check`` and ``diffutron merge``."""

from __future__ import annotations

import argparse

from ..errors import DiffutronError


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train one stage (continual pre-training or instruction tuning, full or LoRA)",
        description="Train one stage. Settings come from --config (a stage YAML, see docs/training.md); "
                    "the flags below override it. Multi-GPU: launch with torchrun or accelerate launch.")
    p.add_argument("--model", default=None, help="start model: directory, LoRA adapter directory or hub id "
                   "(default: the embedded tiny Turkish model)")
    p.add_argument("--data", default=None, help="training data: .txt/.jsonl/.json/.parquet files, a directory, "
                                               "or a hub dataset id")
    p.add_argument("--output", default=None, help="output directory (checkpoints, metrics, final model)")
    p.add_argument("--config", default=None, help="stage settings YAML (any TrainConfig key)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --output")
    p.add_argument("--heldout", default=None, help="held-out data (default: a share of --data)")
    p.add_argument("--kind", choices=["auto", "pretrain", "instruct"], default=None,
                   help="pretrain (packed text) or instruct (chat/Alpaca/InstrucTurca rows); default auto")
    p.add_argument("--method", choices=["full", "lora"], default=None, help="full fine-tuning or LoRA")
    p.add_argument("--max-length", type=int, default=None, help="tokens per sequence")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per device per micro-batch")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lora-r", type=int, default=None)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--merge", action="store_true", default=None, help="LoRA: merge the adapter at the end")
    p.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"], default=None)
    p.add_argument("--save-every", type=int, default=None, help="optimizer steps between checkpoints")
    p.add_argument("--eval-every", type=int, default=None, help="optimizer steps between held-out evaluations")
    p.add_argument("--skip-bad-rows", action="store_true", default=None,
                   help="skip (count and report) invalid data rows instead of failing")
    p.add_argument("--cpu", action="store_true", default=None, help="train on CPU even with a GPU present")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.set_defaults(func=run_train)

    r = sub.add_parser("recipe", help="run or check a multi-stage training recipe (YAML)",
                       description="Progressive training pipelines; see docs/training.md for the YAML schema.")
    rsub = r.add_subparsers(dest="recipe_command", metavar="ACTION")
    rsub.required = True
    run = rsub.add_parser("run", help="run every stage in order (finished stages are skipped)")
    run.add_argument("path", help="recipe YAML file")
    run.add_argument("--quick", action="store_true", help="shrink every stage (a few steps, few rows) for a smoke "
                                                          "run, written to OUTPUT_DIR-quick")
    run.add_argument("--resume", action="store_true", help="continue an interrupted stage from its checkpoint")
    run.add_argument("--variant", default=None, help="merge one of the recipe's variants into it (e.g. cpu); auto: "
                                                      "the cpu variant where no CUDA device is present")
    run.set_defaults(func=run_recipe_cmd)
    check = rsub.add_parser("check", help="validate a recipe and print its stages without training")
    check.add_argument("path", help="recipe YAML file")
    check.add_argument("--quick", action="store_true", help="show the --quick version")
    check.add_argument("--variant", default=None, help="show one of the recipe's variants (auto: by device)")
    check.set_defaults(func=check_recipe_cmd)

    m = sub.add_parser("merge", help="merge a LoRA adapter into a plain model checkpoint",
                       description="Write base + LoRA adapter as one plain model (safetensors + tokenizer).")
    m.add_argument("adapter", help="adapter directory (adapter_config.json + weights)")
    m.add_argument("--output", required=True, help="directory for the merged model (must be new or empty)")
    m.add_argument("--trust-remote-code", action="store_true")
    m.set_defaults(func=run_merge)


def run_train(args: argparse.Namespace) -> int:
    from ..training import TrainConfig, train
    from ..training.config import apply_overrides, load_train_config

    overrides = {
        "model": args.model, "output_dir": args.output, "data.train": args.data, "data.heldout": args.heldout,
        "data.kind": args.kind, "data.max_length": args.max_length, "data.skip_bad_rows": args.skip_bad_rows,
        "method": args.method, "epochs": args.epochs, "max_steps": args.max_steps, "batch_size": args.batch_size,
        "grad_accum": args.grad_accum, "lr": args.lr, "seed": args.seed, "lora.r": args.lora_r,
        "lora.alpha": args.lora_alpha, "lora.merge": args.merge, "mixed_precision": args.mixed_precision,
        "save_every": args.save_every, "eval_every": args.eval_every, "cpu": args.cpu, "progress": args.progress,
    }
    if args.config:
        config = load_train_config(args.config, **overrides)
    else:
        config = apply_overrides(TrainConfig(), overrides)
    if args.model is not None and config.init is not None:
        config = config.replace(init=None)
    train(config, resume=args.resume)
    return 0


def run_recipe_cmd(args: argparse.Namespace) -> int:
    from ..training import run_recipe

    run_recipe(args.path, quick=args.quick, resume=args.resume, variant=args.variant)
    return 0


def check_recipe_cmd(args: argparse.Namespace) -> int:
    from ..training import load_recipe

    recipe = load_recipe(args.path, quick=args.quick, variant=args.variant)
    variant = f" (variant {recipe.variant})" if recipe.variant else ""
    print(f"recipe {recipe.name}{variant}: {len(recipe.stages)} stages, output {recipe.output_dir}")
    for n, stage in enumerate(recipe.stages, 1):
        c = stage.config
        length = f"{c.max_steps} steps" if c.max_steps else f"{c.epochs:g} epochs"
        r = c.lora.r if c.lora.r is not None else "auto"
        alpha = f"{c.lora.alpha:g}" if c.lora.alpha is not None else "r"
        lora = f" r={r} alpha={alpha}{' merged' if c.lora.merge else ''}" if c.method == "lora" else ""
        print(f"  {n}. {stage.name}: start {stage.start}; data {c.data.train} ({c.data.kind}, max_length "
              f"{c.data.max_length}); {c.method}{lora}; {length}, batch {c.batch_size}x{c.grad_accum}, lr {c.lr:g}")
        if c.init is not None and isinstance(c.init.config, dict):
            shape = {k: c.init.config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size")
                     if k in c.init.config}
            print(f"     fresh model: {', '.join(f'{k} {v}' for k, v in shape.items())}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from ..training import merge_adapter

    out = merge_adapter(args.adapter, args.output, trust_remote_code=args.trust_remote_code)
    print(f"merged model written to {out}")
    return 0


__all__ = ["register", "DiffutronError"]
