"""The generate / chat commands as a user runs them (subprocesses, exit codes, no tracebacks)."""

import json
import os
import subprocess
import sys

import pytest

from diffutron.cli import main


def cli(*args, input=None, env=None):
    return subprocess.run([sys.executable, "-m", "diffutron", *map(str, args)], capture_output=True, text=True,
                          input=input, timeout=300, env={**os.environ, **(env or {})})


def test_generate_json_and_output_file(saved_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Merhaba"}\n{"messages": [{"role": "user", "content": "Nasılsın?"}]}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    r = cli("generate", "--model", saved_model_dir, "--input", prompts, "--output", out, "--format", "json",
            "--max-new-tokens", "8", "--steps", "8", "--block-length", "4", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2 and rows == [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        assert set(row) >= {"text", "token_ids", "nfe", "finish_reason"}
        assert len(row["token_ids"]) <= 8


def test_generate_matches_python_api(saved_model_dir, lm, capsys):
    # --device cpu: the python-side `lm` is the float32 CPU fixture; `auto` would load bf16 on a GPU
    code = main(["generate", "--model", str(saved_model_dir), "--device", "cpu", "--format", "json", "--max-new-tokens", "8",
                 "--steps", "8", "--block-length", "4", "--seed", "3", "Türkiye'nin başkenti neresidir?"])
    assert code == 0
    row = json.loads(capsys.readouterr().out)
    from diffutron import SamplerConfig

    (c,) = lm.generate("Türkiye'nin başkenti neresidir?", SamplerConfig(max_new_tokens=8, steps=8, block_length=4, seed=3))
    assert row["token_ids"] == c.token_ids


@pytest.mark.parametrize("args,msg", [
    (["--steps", "0"], "steps=0"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "2"], "top_p"),
    (["--threshold", "0"], "threshold"),
    (["--block-length", "0"], "block_length"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
])
def test_bad_settings_one_line_exit_2(saved_model_dir, args, msg):
    r = cli("generate", "--model", saved_model_dir, *args, "Merhaba")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    err_lines = [line for line in r.stderr.splitlines() if line.startswith("diffutron: error")]
    assert len(err_lines) == 1 and msg in err_lines[0]


def test_bad_inputs(saved_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "\xff\xfe"}\n')
    out = tmp_path / "never.jsonl"
    for args, msg in [
        (["--input", bad, "--output", out], "not valid UTF-8"),
        (["  "], "empty prompt"),
        (["Ankara " * 300], "exceeds the model's context"),
        (["--model", tmp_path / "missing" / "a" / "b", "x"], "does not exist"),
        ([], "no prompt given"),
    ]:
        r = cli("generate", *(["--model", saved_model_dir] if "--model" not in args else []), *args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and msg in r.stderr, (args, r.stderr)
    assert not out.exists()


def test_chat_multi_turn_from_stdin(saved_model_dir):
    r = cli("chat", "--model", saved_model_dir, "--max-new-tokens", "4", "--steps", "4", "--block-length", "4",
            "--system", "Kısa cevap ver.", input="Merhaba\nNasılsın?\n\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2  # one answer per turn


def test_no_model_falls_back_and_says_so():
    from diffutron.lm import DiffusionLM

    r = cli("generate", "--max-new-tokens", "4", "--steps", "4", "--block-length", "4", "Merhaba")
    assert r.returncode == 0, r.stderr
    (same,) = DiffusionLM.from_pretrained().generate("Merhaba", max_new_tokens=4, steps=4, block_length=4)
    assert r.stdout.strip() == same.text  # the embedded default model's answer
    assert same.text or "empty answer: the model ended its turn at once" in r.stderr  # an empty one is explained


def test_non_utf8_argv_prompt(saved_model_dir):
    r = subprocess.run([sys.executable, "-m", "diffutron", "generate", "--model", str(saved_model_dir), b"caf\xe9"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not valid UTF-8" in r.stderr and "Traceback" not in r.stderr


def test_fast_turns_the_delayed_cache_on_unless_cache_is_given(saved_model_dir):
    import argparse

    from diffutron.cli.generate import add_sampler_args, fast_setup, sampler_config
    from diffutron.lm import DiffusionLM

    parser = argparse.ArgumentParser()
    add_sampler_args(parser)
    for flags, want in (([], "none"), (["--fast"], "delayed"), (["--fast", "--cache", "none"], "none"),
                        (["--fast-mode", "int8", "--cfg-scale", "1"], "none"), (["--cache", "dual"], "dual"),
                        (["--cache", "delayed"], "delayed"), (["--fast-mode", "bf16"], "delayed"),
                        (["--fast", "--fast-mode", "int8", "--cache", "dual"], "dual")):
        args = parser.parse_args(flags)
        # pinned to the CPU: --fast means int8 there (bf16 on a GPU), and int8 runs on CPU only
        config = fast_setup(args, DiffusionLM.from_pretrained(saved_model_dir, device="cpu"), sampler_config(args))
        assert config.cache == want, flags
    assert sampler_config(parser.parse_args(["--cache", "dual", "--cache-refresh", "2"])).cache_refresh == 2


def test_fast_takes_no_value_and_picks_the_weights_by_device(saved_model_dir, capsys):
    from diffutron.cli import build_parser
    from diffutron.cli.generate import fast_setup, sampler_config
    from diffutron.lm import DiffusionLM

    parser = build_parser()
    args = parser.parse_args(["generate", "--fast", "Merhaba"])
    assert args.fast and args.fast_mode is None and args.prompts == ["Merhaba"]  # the prompt is not swallowed

    def weights(flags):
        args = parser.parse_args(["generate", *flags, "Merhaba"])
        lm = DiffusionLM.from_pretrained(saved_model_dir, device="cpu")
        fast_setup(args, lm, sampler_config(args))
        head = lm.model.get_output_embeddings()
        return "int8" if type(head).__module__.startswith("torch.ao.nn.quantized") else str(head.weight.dtype)

    assert weights(["--fast"]) == "int8"  # a CPU model
    assert weights(["--fast-mode", "bf16"]) == "torch.bfloat16"  # the override, without --fast
    assert weights([]) == "torch.float32"
    # the old spelling `--fast int8 PROMPT` would read "int8" as a prompt: one clear line instead
    rc = main(["generate", "--model", str(saved_model_dir), "--device", "cpu", "--fast", "int8", "Merhaba"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--fast-mode int8" in err[0], err
    rc = main(["generate", "--model", str(saved_model_dir), "--device", "cpu", "--fast", "--format", "json",
               "--max-new-tokens", "4", "--steps", "4", "--block-length", "4", "Merhaba"])
    assert rc == 0 and len(json.loads(capsys.readouterr().out)["token_ids"]) <= 4
