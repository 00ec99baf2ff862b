"""An lm-evaluation-harness model named ``diffutron`` (needs the ``eval`` extra: lm-eval).

lm-eval finds models in its registry only once the module that registers them is imported, so
run it through diffutron (both import this module, then hand over to lm-eval's own CLI)::

    diffutron eval lm-eval --model_args pretrained=PATH --tasks xcopa_tr --include_path PATH/TO/cetvel/tasks
    python -m diffutron.evaluation.lm_eval_adapter --model diffutron --model_args pretrained=PATH ...

or, from Python, ``import diffutron.evaluation.lm_eval_adapter`` before ``lm_eval.simple_evaluate``.

The three calls of lm-eval's contract:

- ``loglikelihood``: :func:`diffutron.likelihood.loglikelihood` (exact for one-token
  continuations, ELBO otherwise; ``is_greedy`` from greedy decoding of the masked answer).
- ``loglikelihood_rolling``: the ELBO bound of the whole text, cut into disjoint windows of
  the model's context (each window scored on its own, special tokens around it).
- ``generate_until``: ``DiffusionLM`` sampling with the model's default settings (the paper's:
  block 32, temperature 0.1, repetition penalty 1.2, one token per step), the request's ``until``
  strings (also stopping at token level) and ``max_gen_toks``; ``do_sample=False`` means
  temperature 0, a ``temperature`` in the request sets it.

Model arguments (``--model_args k=v,...``): ``pretrained`` (directory or hub id), ``device``,
``dtype``, ``mc_samples`` (64), ``deterministic`` (true), ``seed`` (0), ``check_greedy`` (true),
``trust_remote_code``; for generation ``max_gen_toks`` (when the request gives none; default the
model's ``max_new_tokens``, 64), ``steps`` (default: the model's steps per token, one), and any
other sampler setting (``block_length``, ``temperature``, ``repetition_penalty``, ``remasking``,
``cfg_scale``, ``threshold``, ``top_k``, ``top_p``, ``cache``, ``cache_refresh``, ``rng``) over the
model's defaults. The reference adapter's names are accepted too: ``max_new_tokens`` (=
``max_gen_toks``), ``cfg`` (= ``cfg_scale``), ``mc_num`` (= ``mc_samples``), ``is_check_greedy``
(= ``check_greedy``). lm-eval's ``--batch_size`` is the number of rows per forward pass (use 32;
its default 1 is slow). Where this adapter differs from the reference's (dLLM's ``bert`` model):
docs/evaluation.md, "lm-eval adapter".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from collections.abc import Sequence

from ..errors import DiffutronError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise DiffutronError("lm-eval is not installed: pip install 'diffutron[eval]' (or pip install lm-eval)") from err

from ..likelihood import loglikelihood, loglikelihood_ids, special_affixes
from ..sampling import SamplerConfig

logger = logging.getLogger(__name__)

_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature"}
# sampler settings model_args may set over the model's defaults (max_new_tokens and steps: see sampler_config)
_SAMPLER_KEYS = {f.name for f in dataclasses.fields(SamplerConfig)} - {"max_new_tokens", "steps", "seed"}
_ALIASES = {"max_new_tokens": "max_gen_toks", "cfg": "cfg_scale", "mc_num": "mc_samples",
            "is_check_greedy": "check_greedy"}  # the reference adapter's names -> ours


@register_model("diffutron")
class DiffutronLMEval(LM):
    """lm-eval's ``LM`` over a :class:`~diffutron.lm.DiffusionLM` (loaded from ``pretrained`` or
    given as ``lm``)."""

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        lm=None,
        device: str | None = "auto",
        dtype: str | None = None,
        batch_size: int | str = 32,
        max_batch_size: int | None = None,
        mc_samples: int = 64,
        deterministic: bool = True,
        seed: int = 0,
        check_greedy: bool = True,
        steps: int | None = None,
        max_gen_toks: int | None = None,
        trust_remote_code: bool = False,
        chat: bool | None = None,
        **more,
    ) -> None:
        super().__init__()
        for alias, name in _ALIASES.items():  # the reference adapter's argument names
            if alias in more:
                more.setdefault(name, more.pop(alias))
        mc_samples = more.pop("mc_samples", mc_samples)
        check_greedy = more.pop("check_greedy", check_greedy)
        max_gen_toks = more.pop("max_gen_toks", max_gen_toks)
        sampler = {k: more.pop(k) for k in list(more) if k in _SAMPLER_KEYS}
        if more:
            logger.warning("diffutron: ignoring model arguments %s", ", ".join(sorted(more)))
        if lm is None:
            from ..lm import DiffusionLM

            lm = DiffusionLM.from_pretrained(pretrained, device=_device(device), dtype=dtype,
                                             trust_remote_code=trust_remote_code)
        self.lm = lm
        self._device = lm.device
        if isinstance(batch_size, str):
            batch_size = 32 if batch_size.startswith("auto") else int(batch_size)
        if batch_size == 1:
            logger.warning("diffutron: --batch_size 1 runs one row per forward pass; pass --batch_size 32 "
                           "(rows per forward) for speed")
        self.batch_size = int(batch_size)
        self.mc_samples = int(mc_samples)
        self.deterministic = bool(deterministic)
        self.seed = int(seed)
        self.check_greedy = bool(check_greedy)
        # generation: the model's defaults (the paper's), model_args over them, checked now
        self.sampler = lm.defaults.replace(seed=self.seed, **sampler)
        self.steps = None if steps is None else int(steps)
        self.steps_per_token = lm.defaults.steps / lm.defaults.max_new_tokens if lm.defaults.max_new_tokens else 1.0
        self.max_gen_toks = int(max_gen_toks) if max_gen_toks is not None else lm.defaults.max_new_tokens

    # ------------------------------------------------------------------------------ lm-eval API
    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.lm.tokenizer, "name_or_path", "diffutron")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.lm.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat template; without a generation prompt (lm-eval's ``gen_prefix``) the text ends
        inside the final message, which the answer continues (as the reference adapter does)."""
        return self.lm.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt,
                                                     continue_final_message=not add_generation_prompt)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(req.args) for req in requests]
        scores = loglikelihood(
            self.lm, pairs, mc_samples=self.mc_samples, batch_size=self.batch_size,
            deterministic=self.deterministic, seed=self.seed, check_greedy=self.check_greedy,
            progress=False if disable_tqdm else "diffutron loglikelihood",
        )
        return [(s.value, bool(s.is_greedy)) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        prefix, suffix = special_affixes(self.lm.tokenizer)
        window = self.lm.context_length - len(prefix) - len(suffix)
        pieces: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for r, req in enumerate(requests):
            ids = self.lm.tokenizer.encode(req.args[0], add_special_tokens=False)
            for lo in range(0, len(ids), window):
                pieces.append(([], ids[lo : lo + window]))
                owner.append(r)
        scores = loglikelihood_ids(
            self.lm, pieces, mc_samples=self.mc_samples, batch_size=self.batch_size,
            deterministic=self.deterministic, seed=self.seed, check_greedy=False,
            progress=False if disable_tqdm else "diffutron rolling",
        )
        totals = [0.0] * len(requests)
        for r, s in zip(owner, scores):
            totals[r] += s.value
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(_gen_key(req.args[1]), sort_keys=True), []).append(i)
        bar = None
        if not disable_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="diffutron generate", leave=False)
        for key, indices in groups.items():
            kwargs = json.loads(key)
            for lo in range(0, len(indices), self.batch_size):
                chunk = indices[lo : lo + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in chunk], kwargs)
                for i, text in zip(chunk, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                if bar is not None:
                    bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------------------ generation
    def _generate(self, contexts: Sequence[str], kwargs: dict) -> list[str]:
        lm = self.lm
        until = kwargs.get("until") or []
        config = self.sampler_config(kwargs)
        max_new = config.max_new_tokens
        ctx = lm.context_length
        # the prompt's tokens, cut from the left so that prompt + answer fit the context
        token_lists = [lm.encode(c)[-(ctx - max_new):] if c else [] for c in contexts]
        empty = lm.pad_token_id if lm.eos_token_id is None else lm.eos_token_id  # an id of 0 counts
        token_lists = [t if t else [empty] for t in token_lists]
        stops = lm.stop_sequences + [ids for u in until for ids in _token_stops(lm, u)]
        result = lm.generate_ids(token_lists, config, stop_sequences=stops)
        texts = [c.text for c in lm.completions(result, token_lists, stops)]
        return [_cut(t, until) for t in texts]

    def sampler_config(self, gen_kwargs: dict) -> SamplerConfig:
        """The settings one request decodes with: the model's defaults and model_args, the
        request's ``max_gen_toks`` (else model_args', else the model's ``max_new_tokens``, at most
        the context less one), ``steps`` from model_args or the model's steps per token, and
        ``do_sample=False`` (temperature 0) or the request's ``temperature``."""
        max_new = min(int(gen_kwargs.get("max_gen_toks") or self.max_gen_toks), self.lm.context_length - 1)
        steps = self.steps or max(1, math.ceil(max_new * self.steps_per_token))
        temperature = self.sampler.temperature
        if gen_kwargs.get("do_sample") is False:
            temperature = 0.0
        elif gen_kwargs.get("temperature") is not None:
            temperature = float(gen_kwargs["temperature"])
        return self.sampler.replace(max_new_tokens=max_new, steps=steps, temperature=temperature)


def _device(device: str | None) -> str:
    """lm-eval's CLI asks for ``cuda:0`` unless told otherwise: fall back to auto-detection
    (CUDA, MPS, else CPU) when CUDA is not there."""
    import torch

    if device and str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("diffutron: %s requested but CUDA is not available; choosing the device automatically", device)
        return "auto"
    return device or "auto"


def _gen_key(gen_kwargs) -> dict:
    kwargs = dict(gen_kwargs or {})
    until = kwargs.get("until")
    if isinstance(until, str):
        until = [until]
    key = {k: v for k, v in kwargs.items() if k in _GEN_KEYS}
    key["until"] = list(until or [])
    ignored = sorted(set(kwargs) - _GEN_KEYS)
    if ignored:
        logger.warning("diffutron: ignoring generation arguments %s", ", ".join(ignored))
    return key


def _token_stops(lm, until: str) -> list[list[int]]:
    """Token sequences for one ``until`` string; none when the vocabulary cannot spell it (the
    text cut below still applies)."""
    try:
        return lm.stop_ids([until]) if until else []
    except DiffutronError:
        return []


def _cut(text: str, until: Sequence[str]) -> str:
    """The text before the first of the ``until`` strings (lm-eval's semantics)."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with the ``diffutron`` model registered (``--model diffutron``
    is added when no ``--model`` is given)."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("run", "ls", "validate"):
        command, args = args[0], args[1:]
    else:
        command = "run"
    if command == "run" and not any(a == "--model" or a.startswith("--model=") for a in args):
        args = ["--model", "diffutron", *args]
    sys.argv = ["lm-eval", command, *args]
    try:
        cli_evaluate()
    except ValueError as err:  # lm-eval's own refusals of its arguments: one line, not a traceback
        if not str(err).startswith(_ARGUMENT_ERRORS):
            raise
        raise DiffutronError(f"lm-eval: {err} (check --tasks and --include_path; `diffutron eval lm-eval ls "
                             "tasks` lists the tasks it can find)") from None


# How lm-eval 0.4's argument checks begin their ValueErrors (config/evaluate_config.py, _cli/utils.py).
_ARGUMENT_ERRORS = ("Tasks not found", "No tasks specified", "Invalid JSON", "Either 'limit' or 'samples'",
                    "expected `key=value`", "Argument requires")


if __name__ == "__main__":  # pragma: no cover
    main()
