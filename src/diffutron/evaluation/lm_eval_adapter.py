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
- ``generate_until``: ``DiffusionLM`` sampling with the request's ``until`` strings (also
  stopping at token level) and ``max_gen_toks``; ``do_sample=False`` means temperature 0.

Model arguments (``--model_args k=v,...``): ``pretrained`` (directory or hub id), ``device``,
``dtype``, ``mc_samples`` (64), ``deterministic`` (true), ``seed`` (0), ``check_greedy`` (true),
``steps`` (default: one token per step), ``block_length`` (32), ``temperature`` (0),
``repetition_penalty`` (1.0), ``max_gen_toks`` (256), ``trust_remote_code``. lm-eval's
``--batch_size`` is the number of rows per forward pass (use 32; its default 1 is slow).
"""

from __future__ import annotations

import json
import logging
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
        block_length: int = 32,
        temperature: float = 0.0,
        repetition_penalty: float = 1.0,
        max_gen_toks: int = 256,
        trust_remote_code: bool = False,
        chat: bool | None = None,
        **unused,
    ) -> None:
        super().__init__()
        if unused:
            logger.warning("diffutron: ignoring model arguments %s", ", ".join(sorted(unused)))
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
        self.steps = steps
        self.block_length = int(block_length)
        self.temperature = float(temperature)
        self.repetition_penalty = float(repetition_penalty)
        self.max_gen_toks = int(max_gen_toks)

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
        return self.lm.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)

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
        max_new = int(kwargs.get("max_gen_toks") or self.max_gen_toks)
        ctx = lm.context_length
        if max_new >= ctx:
            max_new = ctx - 1
        temperature = self.temperature
        if kwargs.get("do_sample") is False:
            temperature = 0.0
        elif kwargs.get("temperature") is not None:
            temperature = float(kwargs["temperature"])
        config = SamplerConfig(
            max_new_tokens=max_new, steps=int(self.steps or max_new), block_length=min(self.block_length, max_new),
            temperature=temperature, repetition_penalty=self.repetition_penalty, seed=self.seed,
        )
        # the prompt's tokens, cut from the left so that prompt + answer fit the context
        token_lists = [lm.encode(c)[-(ctx - max_new):] if c else [] for c in contexts]
        token_lists = [t if t else [lm.eos_token_id or lm.pad_token_id] for t in token_lists]
        stops = lm.stop_sequences + [ids for u in until for ids in _token_stops(lm, u)]
        result = lm.generate_ids(token_lists, config, stop_sequences=stops)
        texts = [c.text for c in lm.completions(result, token_lists, stops)]
        return [_cut(t, until) for t in texts]


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
    cli_evaluate()


if __name__ == "__main__":  # pragma: no cover
    main()
