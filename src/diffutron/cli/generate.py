"""``diffutron generate`` and ``diffutron chat``."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from ..backbone import FAST_MODES
from ..errors import DiffutronError
from ..outputs import check_output_file
from ..sampling import SamplerConfig
from ._common import add_model_args, load_lm
from ._sampler import add_sampler_flags, sampler_overrides


def add_sampler_args(parser: argparse.ArgumentParser) -> None:
    """Sampler flags (one per ``SamplerConfig`` field, see ``_sampler``) and ``--fast`` / ``--fast-mode``."""
    add_sampler_flags(parser, "sampler (defaults: the Diffutron paper's settings)")


def add_compile_arg(parser, default_help: str) -> None:
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="decode on the compiled engine: CUDA graphs and torch.compile on GPUs, a one-time cost "
                             f"of tens of seconds per settings, then several times faster ({default_help})")


def compile_setup(args, lm, batched: bool) -> None:
    """``--compile`` / ``--no-compile``; without either, compiled on GPUs when ``batched``."""
    on = args.compile if args.compile is not None else (lm.device.type == "cuda" and batched)
    if on:
        lm.compile()
        print("diffutron: compiling the decoder for this device (once per sampler settings; --no-compile "
              "skips it)", file=sys.stderr, flush=True)


def compile_report(lm) -> None:
    if lm.compiled and lm.compile_seconds >= 0.1:
        print(f"diffutron: compiling and capturing the decoder took {lm.compile_seconds:.1f} s (reused by "
              "every later batch of these settings)", file=sys.stderr)


def sampler_config(args: argparse.Namespace) -> SamplerConfig:
    """The settings the flags ask for (``--cache`` not given: none, until ``fast_setup``)."""
    return SamplerConfig(**sampler_overrides(args))


def fast_setup(args, lm, config: SamplerConfig) -> SamplerConfig:
    """``--fast`` / ``--fast-mode``: approximate weights (``DiffusionLM.make_fast``: bf16 on a GPU,
    int8 on a CPU, unless ``--fast-mode`` says), and its cache unless ``--cache`` was given."""
    if not (args.fast or args.fast_mode):
        return config
    stray = next((p for p in getattr(args, "prompts", None) or () if p in FAST_MODES), None)
    if stray is not None:  # `--fast int8 PROMPT` as it was written before --fast-mode existed
        raise DiffutronError(f"{stray!r} was read as a prompt: --fast takes no value; "
                             f"choose the weights with --fast-mode {stray}")
    lm.make_fast(args.fast_mode)
    if args.cache is None and lm.defaults.cache != "none" and config.cfg_scale == 0:
        return config.replace(cache=lm.defaults.cache)
    return config


def register(sub) -> None:
    p = sub.add_parser("generate", help="answer prompts (chat template applied unless --raw)",
                       description="Generate answers with semi-autoregressive block denoising.")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt texts (or use --input)")
    add_model_args(p)
    add_sampler_args(p)
    p.add_argument("--system", default=None, help="system message for every prompt")
    p.add_argument("--raw", action="store_true", help="continue the raw text instead of applying the chat template")
    p.add_argument("--input", type=Path, default=None,
                   help='JSONL file: one prompt per line, {"prompt": "..."} or {"messages": [...]}')
    p.add_argument("--output", type=Path, default=None, help="write one JSON object per prompt to this JSONL file")
    p.add_argument("--format", choices=["text", "json"], default="text", help="what to print")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per sampler batch")
    add_compile_arg(p, "default: on with a GPU and more than one prompt")
    p.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat in the terminal",
                       description="Chat with the model; the answer denoises live when the terminal allows.")
    add_model_args(c)
    add_sampler_args(c)
    add_compile_arg(c, "default: off")
    c.add_argument("--system", default=None, help="system message")
    c.set_defaults(func=run_chat)


def _read_prompts(args) -> list:
    prompts: list = list(args.prompts)
    if args.input is not None:
        if not args.input.is_file():
            raise DiffutronError(f"input file {args.input} does not exist")
        try:
            lines = args.input.read_bytes().decode("utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise DiffutronError(f"{args.input} is not valid UTF-8 (byte {err.start}): save it as UTF-8") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DiffutronError(f"{args.input}:{n}: not valid JSON") from None
            if isinstance(row, str):
                prompts.append(row)
            elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
                prompts.append(row["prompt"])
            elif isinstance(row, dict) and isinstance(row.get("messages"), list):
                prompts.append(row["messages"])
            else:
                raise DiffutronError(f'{args.input}:{n}: expected {{"prompt": str}} or {{"messages": [...]}}')
    if not prompts:
        raise DiffutronError("no prompt given: pass PROMPT text or --input prompts.jsonl")
    if args.system:
        prompts = [
            [{"role": "system", "content": args.system}] + ([{"role": "user", "content": p}] if isinstance(p, str) else list(p))
            for p in prompts
        ]
    return prompts


def _check_utf8_argv(prompts) -> None:
    for p in prompts:
        if isinstance(p, str):
            try:
                p.encode("utf-8")
            except UnicodeEncodeError:
                raise DiffutronError("a prompt is not valid UTF-8: pass UTF-8 text") from None


def run_generate(args) -> int:
    config = sampler_config(args)
    prompts = _read_prompts(args)
    _check_utf8_argv(prompts)
    if args.batch_size < 1:
        raise DiffutronError("--batch-size must be >= 1")
    if args.output is not None:
        check_output_file(args.output)  # before the model loads and answers: not after
    lm = load_lm(args)
    config = fast_setup(args, lm, config)
    compile_setup(args, lm, batched=len(prompts) > 1)
    results = []
    for i in range(0, len(prompts), args.batch_size):
        chunk = prompts[i : i + args.batch_size]
        if config.rng == "reference":  # one stream per batch, seeded with --seed, as one call of the reference
            results.extend(lm.generate(chunk, config, chat=not args.raw))
            continue
        seeds = tuple(config.row_seeds(len(prompts))[i : i + len(chunk)])
        results.extend(lm.generate(chunk, config.replace(seed=seeds), chat=not args.raw))
    compile_report(lm)
    records = [
        {"prompt": p if isinstance(p, str) else p[-1]["content"], "text": c.text, "token_ids": c.token_ids,
         "nfe": c.nfe, "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
         "completion_tokens": c.completion_tokens}
        for p, c in zip(prompts, results)
    ]
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(args.output.name + ".tmp")
        try:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
            tmp.replace(args.output)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise DiffutronError(f"--output {args.output}: cannot write it ({err.strerror or err})") from None
    for r in records:
        if args.format == "json":
            print(json.dumps(r, ensure_ascii=False))
        elif args.output is None:
            print(r["text"])
            if not r["text"].strip():
                print(EMPTY_ANSWER, file=sys.stderr)
    return 0


EMPTY_ANSWER = "diffutron: (empty answer: the model ended its turn at once)"  # generate's and chat's notice


def run_chat(args) -> int:
    config = sampler_config(args)
    lm = load_lm(args)
    config = fast_setup(args, lm, config)
    compile_setup(args, lm, batched=False)
    live = sys.stdout.isatty()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"diffutron chat with {lm.name} ({config.steps} steps, block {config.block_length}); "
          "empty line or Ctrl-D to quit, /reset to start over", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> " if live else "")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        width = shutil.get_terminal_size((100, 20)).columns

        special = set(lm.tokenizer.all_special_ids) - {lm.mask_token_id}

        def show(step, canvas):
            # The answer as it denoises: masked slots drawn as a shaded block; special tokens (the
            # end of turn, padding after it) are not text and not shown
            ids = canvas[0, start:].tolist()
            text = " ".join("░" if t == lm.mask_token_id else lm.tokenizer.decode([t]) for t in ids if t not in special)
            sys.stdout.write("\r\033[K" + text.replace("\n", " ")[: width - 1])
            sys.stdout.flush()

        start = len(lm.encode(lm.render(messages)))
        try:
            (answer,) = lm.generate([messages], config.replace(seed=config.seed + turn), callback=show if live else None)
        except DiffutronError as err:
            messages.pop()
            print(f"diffutron: error: {err}", file=sys.stderr)
            continue
        if live:
            sys.stdout.write("\r\033[K")
        print(answer.text, flush=True)
        if not answer.text.strip():
            print(EMPTY_ANSWER, file=sys.stderr)
        messages.append({"role": "assistant", "content": answer.text})
        turn += 1
    return 0
