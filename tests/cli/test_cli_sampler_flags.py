"""The sampler flags of ``generate``, ``chat`` and ``serve`` follow ``SamplerConfig``'s fields
(``cli._sampler``): one flag per field, with the field's default, parsed back into the config a
user expects; ``--fast`` / ``--fast-mode`` the same everywhere; serve's help states the code's numbers."""

from __future__ import annotations

import dataclasses
import types

import pytest

from diffutron.backbone import FAST_MODES
from diffutron.cli import build_parser, main
from diffutron.cli._sampler import flag_name, sampler_overrides
from diffutron.cli.serve import PER_REQUEST
from diffutron.sampling import CACHES, REMASKING, RNGS, SamplerConfig
from diffutron.serve import limits

COMMANDS = ("generate", "chat", "serve")
FIELDS = dataclasses.fields(SamplerConfig)


def _sub(command: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command]


def _actions(command: str) -> dict:
    return {a.dest: a for a in _sub(command)._actions}


def _parse(command: str, flags: list[str]):
    return build_parser().parse_args([command, *flags, *(["Merhaba"] if command == "generate" else [])])


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_has_a_flag_with_its_default(command):
    """A SamplerConfig field is a flag of generate, chat and serve (serve leaves out only the
    settings each request settles), named after the field, defaulting to the field's default."""
    actions = _actions(command)
    for f in FIELDS:
        if command == "serve" and f.name in PER_REQUEST:
            assert f.name not in actions, f.name
            continue
        action = actions.get(f.name)
        assert action is not None, f"{command} has no flag for SamplerConfig.{f.name}"
        assert flag_name(f.name) in action.option_strings
        if f.metadata["cli"].get("unset"):  # --cache: None = not given (--fast may pick one)
            assert action.default is None
        elif isinstance(f.default, bool):  # --no-stop: a switch whose dest is the field
            assert action.default is f.default and action.const is (not f.default)
        else:
            assert action.default == f.default and type(action.default) is type(f.default), f.name
        assert action.help, f.name
    # with no flag given, the settings are exactly the defaults
    assert SamplerConfig(**sampler_overrides(_parse(command, []))) == SamplerConfig()


def test_serve_leaves_out_only_the_per_request_settings():
    assert set(PER_REQUEST) == {"stop_at_eos", "rng"}  # widening this needs a reason in cli/serve.py
    description = _sub("serve").description
    assert all(flag_name(f) in description for f in PER_REQUEST)  # and its help says so


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_flags_parse_into_the_expected_config(command):
    flags = ["--max-new-tokens", "16", "--steps", "8", "--block-length", "4", "--temperature", "0",
             "--top-k", "5", "--top-p", "0.9", "--repetition-penalty", "1", "--remasking", "margin",
             "--threshold", "0.9", "--no-stop", "--cache", "dual", "--cache-refresh", "2", "--seed", "7",
             "--rng", "reference"]
    got = SamplerConfig(**sampler_overrides(_parse(command, flags)))
    assert got == SamplerConfig(max_new_tokens=16, steps=8, block_length=4, temperature=0.0, top_k=5, top_p=0.9,
                                repetition_penalty=1.0, remasking="margin", threshold=0.9, stop_at_eos=False,
                                cache="dual", cache_refresh=2, seed=7, rng="reference")
    # None-able and unset fields: --threshold absent is off; --cache absent is left to --fast (none)
    few = SamplerConfig(**sampler_overrides(_parse(command, ["--cfg-scale", "1.5", "--remasking", "entropy"])))
    assert few == SamplerConfig(cfg_scale=1.5, remasking="entropy") and few.threshold is None and few.cache == "none"
    assert _parse(command, ["--cfg-scale", "1.5"]).cache is None


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flag, choices", [("--remasking", REMASKING), ("--cache", CACHES), ("--rng", RNGS)])
def test_choices_are_the_configs(command, flag, choices, capsys):
    actions = {s: a for a in _sub(command)._actions for s in a.option_strings}
    if flag not in actions:
        assert command == "serve" and flag == "--rng"
        return
    assert tuple(actions[flag].choices) == choices
    with pytest.raises(SystemExit) as exc:
        _parse(command, [flag, "nonsense"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_fast_and_fast_mode_are_the_same_everywhere(command):
    actions = {s: a for a in _sub(command)._actions for s in a.option_strings}
    fast, mode = actions["--fast"], actions["--fast-mode"]
    assert fast.nargs == 0 and fast.default is False  # --fast takes no value
    assert tuple(mode.choices) == FAST_MODES and mode.default is None
    generate = {s: a for a in _sub("generate")._actions for s in a.option_strings}
    assert (fast.help, mode.help) == (generate["--fast"].help, generate["--fast-mode"].help)
    args = _parse(command, ["--fast-mode", "bf16"])
    assert args.fast is False and args.fast_mode == "bf16"


def test_serve_help_states_the_codes_numbers():
    """Serve's own settings default to ``Limits``'s, and the numbers its help states are the
    code's constants (the arrival pause, the batch sizes by device)."""
    args = _parse("serve", [])
    assert {k: getattr(args, k) for k in vars(limits.Limits())} == vars(limits.Limits())
    helps = {a.dest: a.help for a in _sub("serve")._actions}
    assert f"pause for {limits.QUIET_S * 1000:g} ms" in helps["batch_wait_ms"]
    assert f"{limits.GPU_MAX_BATCH_SIZE} with the model on a GPU, {limits.CPU_MAX_BATCH_SIZE} on a CPU" in \
        helps["max_batch_size"]


def test_serve_flags_set_the_servers_defaults(tmp_path, monkeypatch):
    """`serve --steps 8 --threshold 0.9 ...` makes those the defaults of every request (and of the
    web page); a bad setting fails before the model loads."""
    import uvicorn

    import diffutron.serve
    from diffutron.tiny import tiny_lm

    served = []
    monkeypatch.setattr(diffutron.serve, "create_app", lambda lm, **kw: served.append(lm) or types.SimpleNamespace(
        state=types.SimpleNamespace(service=types.SimpleNamespace(model_name="m"))))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    tiny_lm().save_pretrained(tmp_path / "model")
    base = ["serve", "--model", str(tmp_path / "model"), "--device", "cpu", "--port", "0"]
    assert main([*base, "--steps", "8", "--max-new-tokens", "16", "--threshold", "0.9", "--remasking", "random",
                 "--seed", "3", "--cache-refresh", "2"]) == 0
    assert served[-1].defaults == SamplerConfig(steps=8, max_new_tokens=16, threshold=0.9, remasking="random", seed=3,
                                                cache_refresh=2)
    assert main(base) == 0 and served[-1].defaults == SamplerConfig()
    assert main([*base, "--top-p", "2"]) == 2 and len(served) == 2  # refused before loading
