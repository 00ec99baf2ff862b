"""Bad input, as a new user gives it: every case exits 2 with one line on stderr that names the
problem (no traceback), and leaves nothing behind where it was told to write.

HTTP request bodies have their own list in test_serve.py (``test_bad_request_bodies``)."""

from __future__ import annotations

import os
import re
import shutil
import struct

import pytest
import torch

from diffutron.cli import main as cli_main

TEXT = "Çocuklar bahçede top oynuyorlardı. İstanbul'a giden yol uzundu ve kış soğuktu.\n"


@pytest.fixture(scope="module")
def paths(tmp_path_factory, saved_model_dir):
    d = tmp_path_factory.mktemp("bad")
    p = {"model": saved_model_dir, "new": d / "new", "dir": d / "a-directory", "file": d / "a-file.txt"}
    p["dir"].mkdir()
    p["file"].write_text("x", encoding="utf-8")
    weights = (saved_model_dir / "model.safetensors").read_bytes()
    for name, data in (("truncated", weights[: len(weights) // 2]),
                       ("garbled", struct.pack("<Q", 1 << 40) + weights[8:])):
        p[name] = d / name
        shutil.copytree(saved_model_dir, p[name])
        (p[name] / "model.safetensors").write_bytes(data)
    p["noconfig"] = d / "noconfig"
    shutil.copytree(saved_model_dir, p["noconfig"])
    (p["noconfig"] / "config.json").unlink()
    p["binonly"] = d / "binonly"
    shutil.copytree(saved_model_dir, p["binonly"])
    (p["binonly"] / "model.safetensors").rename(p["binonly"] / "pytorch_model.bin")
    p["good"] = d / "good.txt"
    p["good"].write_text(TEXT * 40, encoding="utf-8")
    p["cp1254"] = d / "cp1254.txt"
    p["cp1254"].write_bytes((TEXT * 40).encode("cp1254"))
    p["utf16"] = d / "utf16.txt"
    p["utf16"].write_text(TEXT * 40, encoding="utf-16")
    p["binary"] = d / "binary.txt"
    p["binary"].write_bytes(bytes(range(256)) * 20)
    p["empty"] = d / "empty.txt"
    p["empty"].write_bytes(b"")
    p["blank"] = d / "blank.jsonl"
    p["blank"].write_text("\n\n  \n", encoding="utf-8")
    p["badjson"] = d / "bad.jsonl"
    p["badjson"].write_text('{"text": "bir"}\n{"text": "iki"\n', encoding="utf-8")
    p["notobject"] = d / "list.jsonl"
    p["notobject"].write_text('["bir", "iki"]\n', encoding="utf-8")
    p["prompts_cp1254"] = d / "prompts.jsonl"
    p["prompts_cp1254"].write_bytes('{"prompt": "Türkiye\'nin başkenti neresidir?"}\n'.encode("cp1254"))
    p["prompts_bad"] = d / "prompts_bad.jsonl"
    p["prompts_bad"].write_text('{"prompt": 5}\n', encoding="utf-8")
    p["prompts_broken"] = d / "prompts_broken.jsonl"
    p["prompts_broken"].write_text('{"prompt": "bir"}\n{"prompt": "iki"\n', encoding="utf-8")
    p["yaml_unknown"] = d / "unknown.yaml"
    p["yaml_unknown"].write_text("learning_rate: 0.1\n", encoding="utf-8")
    p["yaml_broken"] = d / "broken.yaml"
    p["yaml_broken"].write_text("lr: [1, 2\n", encoding="utf-8")
    p["recipe_bad"] = d / "recipe.yaml"
    p["recipe_bad"].write_text("stages: []\n", encoding="utf-8")
    return p


def train(*extra: str) -> list[str]:
    return ["train", "--data", "{good}", "--model", "{model}", "--output", "{new}", "--max-steps", "1",
            "--no-progress", "--cpu", *extra]


no_cuda = torch.backends.cuda.is_built() and torch.cuda.is_available()

CASES = [
    # generate: where it writes
    ("output is a directory", ["generate", "--output", "{dir}", "x"], r"--output .*a-directory is a directory"),
    ("output under a file", ["generate", "--output", "{file}/x.jsonl", "x"], r"a-file.txt is a file"),
    ("output not writable", ["generate", "--output", "/proc/diffutron/x.jsonl", "x"], r"cannot write in /proc"),
    # the model's files
    ("truncated weights", ["generate", "--model", "{truncated}", "x"], r"corrupt or truncated"),
    ("garbled weights header", ["generate", "--model", "{garbled}", "x"], r"corrupt or truncated"),
    ("no config.json", ["generate", "--model", "{noconfig}", "x"], r"has no config.json"),
    ("pytorch_model.bin only", ["generate", "--model", "{binonly}", "x"], r"safetensors only"),
    ("model directory missing", ["generate", "--model", "./no/such/model", "x"], r"does not exist"),
    # devices and dtypes
    ("unknown device", ["generate", "--device", "tpu", "x"], r"unknown device 'tpu'"),
    ("absent CUDA device", ["generate", "--device", "cuda:7", "x"], r"device cuda:7: "),
    ("absent MPS", ["generate", "--device", "mps", "x"], r"device mps: "),
    ("unknown dtype", ["generate", "--dtype", "float8", "x"], r"dtype"),
    # sampler settings
    ("zero steps", ["generate", "--steps", "0", "x"], r"steps"),
    ("negative temperature", ["generate", "--temperature", "-1", "x"], r"temperature"),
    ("top-p above 1", ["generate", "--top-p", "1.5", "x"], r"top_p"),
    ("negative top-k", ["generate", "--top-k", "-1", "x"], r"top_k"),
    ("zero block length", ["generate", "--block-length", "0", "x"], r"block_length"),
    ("zero new tokens", ["generate", "--max-new-tokens", "0", "x"], r"max_new_tokens"),
    ("threshold above 1", ["generate", "--threshold", "2", "x"], r"threshold"),
    ("zero repetition penalty", ["generate", "--repetition-penalty", "0", "x"], r"repetition_penalty"),
    ("negative CFG scale", ["generate", "--cfg-scale", "-1", "x"], r"cfg_scale"),
    ("zero batch size", ["generate", "--batch-size", "0", "x"], r"--batch-size"),
    # prompts from files
    ("no prompt", ["generate"], r"no prompt given"),
    ("prompt file missing", ["generate", "--input", "{new}.jsonl"], r"does not exist"),
    ("prompt file in CP1254", ["generate", "--input", "{prompts_cp1254}"], r"not valid UTF-8"),
    ("prompt row of the wrong type", ["generate", "--input", "{prompts_bad}"], r'expected \{"prompt": str\}'),
    ("prompt file not JSON", ["generate", "--input", "{prompts_broken}"], r"prompts_broken.jsonl:2: not valid JSON"),
    # training data
    ("training data missing", ["train", "--data", "{new}.txt", "--model", "{model}", "--output", "{new}"],
     r"does not exist"),
    ("training text in CP1254", train("--data", "{cp1254}"), r"Windows-1254.*iconv -f CP1254"),
    ("training text in UTF-16", train("--data", "{utf16}"), r"UTF-16.*iconv -f UTF-16"),
    ("binary training data", train("--data", "{binary}"), r"binary data, not text"),
    ("empty training file", train("--data", "{empty}"), r"empty.txt is empty"),
    ("blank JSON Lines", train("--data", "{blank}"), r"blank.jsonl is empty"),
    ("training JSON broken", train("--data", "{badjson}"), r"bad.jsonl:2: not valid JSON"),
    ("training row not an object", train("--data", "{notobject}"), r"expected a JSON object"),
    # where training writes
    ("training output is a file", train("--output", "{file}"), r"is a file, not a directory"),
    ("training output not writable", train("--output", "/proc/diffutron-run"), r"cannot write in /proc"),
    ("resume with nothing to resume", train("--resume"), r"no complete checkpoint to resume from"),
    # training settings
    ("training from truncated weights", train("--model", "{truncated}"), r"corrupt or truncated"),
    ("negative learning rate", train("--lr", "-1"), r"lr"),
    ("zero batch", train("--batch-size", "0"), r"batch_size"),
    ("sequence too short", train("--max-length", "1"), r"max_length"),
    ("zero LoRA rank", train("--method", "lora", "--lora-r", "0"), r"\br\b"),
    ("settings file missing", train("--config", "{new}.yaml"), r"settings file .* does not exist"),
    ("settings key unknown", train("--config", "{yaml_unknown}"), r"unknown key \(did you mean 'lr'\?\)"),
    ("settings YAML broken", train("--config", "{yaml_broken}"), r"broken.yaml"),
    # recipes and merging
    ("recipe missing", ["recipe", "run", "{new}.yaml"], r"does not exist"),
    ("recipe without stages", ["recipe", "check", "{recipe_bad}"], r"output_dir|stages"),
    ("merge of a non-adapter", ["merge", "{model}", "--output", "{new}"], r"adapter"),
    # evaluation
    ("perplexity data missing", ["eval", "perplexity", "--data", "{new}.txt", "--model", "{model}"],
     r"no such file"),
    ("lm-eval task unknown", ["eval", "lm-eval", "--model_args", "pretrained={model}", "--tasks", "no_such_task_tr"],
     r"lm-eval: Tasks not found: no_such_task_tr"),
]


@pytest.mark.parametrize("argv,message", [(a, m) for _, a, m in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(paths, argv, message, capsys):
    if "cuda:7" in argv and no_cuda:
        pytest.skip("this machine has a CUDA GPU: the case is for CPU-only torch builds")
    if argv[-2:] == ["mps", "x"] and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]
    before = set(os.listdir(paths["new"].parent))
    code = cli_main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("diffutron: no start model given")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("diffutron: error: "), err
    assert "Traceback" not in err
    assert re.search(message, lines[0]), lines[0]
    assert set(os.listdir(paths["new"].parent)) == before  # nothing half-written
    assert len(CASES) >= 40
