"""``DiffusionLM``: a masked-LM encoder and its tokenizer, used as a text generator.

The CLI, the evaluator and the server all generate through :meth:`DiffusionLM.generate`, so
prompt encoding, answer cutting and stop handling exist once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

from . import backbone
from .errors import DiffutronError
from .sampling import GenerationOutput, SamplerConfig, find_stop
from .sampling import engine
from .sampling.cache import DualCache
from .sampling import generate as sample

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Prompt = Union[str, Sequence[Message]]


@dataclass
class Completion:
    """One answer: ``text`` (cut at the end of turn, special tokens dropped), ``finish_reason``
    ("stop" | "length" | "cancelled"), token counts, the batch's ``nfe`` and the answer's ids."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    nfe: int
    token_ids: list[int]


class DiffusionLM:
    """A masked diffusion language model: ``model`` (HF masked LM), ``tokenizer``, ``defaults``."""

    def __init__(self, model, tokenizer, *, defaults: SamplerConfig | None = None, name: str | None = None):
        backbone.check_tokenizer(tokenizer)
        backbone.install_chat_template(tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.defaults = defaults or SamplerConfig()
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or "model"
        self.stop_sequences = backbone.stop_token_sequences(tokenizer)
        self._engine: dict | None = None  # compile(): the engine's settings
        self._engines: dict = {}  # SamplerConfig (seed 0) -> sampling.engine.Engine

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike | None = None,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> "DiffusionLM":
        """Load a masked-LM encoder and its tokenizer from a directory or a hub id.

        ``None`` loads the embedded default model. ``device="auto"`` picks CUDA, then MPS, else
        CPU; ``dtype=None`` is float32 on CPU and bfloat16 on GPUs. Only safetensors weights are
        read and ``trust_remote_code`` stays off unless asked.

        Raises:
            DiffutronError: a missing directory or weights, no mask token, an architecture that is
                not a masked LM, or a hub id that cannot be reached.
        """
        if name_or_path is None:
            name_or_path = default_model_path()
        name_or_path = str(name_or_path)
        dev = backbone.resolve_device(device)
        dt = backbone.resolve_dtype(dtype, dev)
        model, tokenizer = backbone.load_backbone(
            name_or_path, device=dev, dtype=dt, trust_remote_code=trust_remote_code, revision=revision
        )
        name = Path(name_or_path).name if os.path.isdir(os.path.expanduser(name_or_path)) else name_or_path
        return cls(model, tokenizer, name=name)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write model (safetensors), config and tokenizer (with its chat template) to a directory
        that ``from_pretrained`` and plain transformers load back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)

    def make_fast(self, mode: str | None = None, *, cache: str | bool | None = None) -> "DiffusionLM":
        """Switch to approximate, faster decoding in place: ``bf16`` or ``int8`` weights (see
        backbone.make_fast; ``None``: bf16 on a GPU, int8 on a CPU) and, for a ModernBERT model,
        ``cache`` ("delayed", "dual" or "none"; ``None`` or True: the device's --fast default, see
        backbone.fast_defaults) in ``defaults`` (see sampling.cache)."""
        default_mode, default_cache = backbone.fast_defaults(self.device)
        mode = default_mode if mode is None else mode
        cache = {None: default_cache, True: default_cache, False: "none"}.get(cache, cache)
        SamplerConfig(cache=cache)  # a bad name fails before the weights change
        self.model = backbone.make_fast(self.model, mode)
        self._engines = {}  # engines hold the model they were built on
        if cache != "none" and DualCache.supports(self.model) and self.defaults.cfg_scale == 0:
            self.defaults = self.defaults.replace(cache=cache)
        return self

    def use_cache(self, cache: str) -> "DiffusionLM":
        """Decode with ``cache`` ("none", "dual" or "delayed"; see sampling.cache) by default."""
        config = self.defaults.replace(cache=cache)
        if cache != "none" and not DualCache.supports(self.model):
            raise DiffutronError(f"cache={cache!r} runs on ModernBERT masked LMs only, not "
                                 f"{type(backbone.unwrap(self.model)).__name__}: use cache='none'")
        self.defaults = config
        return self

    def compile(self, enabled: bool = True, *, inductor: bool | None = None, graphs: bool | None = None,
                max_batch: int = 128) -> "DiffusionLM":
        """Decode on the fixed-shape engine (``sampling.engine``): every step a CUDA graph on GPUs
        (captured once per batch size, width and step shape), and with ``inductor`` (default: on
        GPUs) the step compiled by torch.compile first (a one-time cost of tens of seconds per
        sampler configuration, shown by ``compile_seconds``). Settings the engine cannot run (the
        delayed cache, masks inside a prompt) keep the eager loop. ``enabled=False`` turns it off."""
        if not enabled:
            self._engine = None
            return self
        cuda = self.device.type == "cuda"
        self._engine = dict(graphs=cuda if graphs is None else graphs, compile=cuda if inductor is None else inductor,
                            max_batch=max_batch)
        self._engines = {}
        return self

    @property
    def compiled(self) -> bool:
        return self._engine is not None

    @property
    def compile_seconds(self) -> float:
        """Time spent so far compiling and capturing the engine's steps (0 when not compiled)."""
        return sum(e.capture_s for e in self._engines.values())

    def engine_for(self, config: SamplerConfig, token_lists: Sequence[Sequence[int]] = ()):
        """The compiled engine for ``config`` (one per configuration apart from the seed, kept), or
        None when decoding is not compiled or the engine cannot run these settings."""
        if not self.compiled or engine.supports(config, token_lists, self.mask_token_id) is not None:
            return None
        key = config.replace(seed=0)
        found = self._engines.get(key)
        if found is None:
            if len(self._engines) >= 4:  # forget the oldest configuration (its buffers and graphs)
                self._engines.pop(next(iter(self._engines)))
            found = self._engines[key] = engine.Engine(
                self.model, key, mask_token_id=self.mask_token_id, eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id, **self._engine)
        return found

    # ------------------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        return backbone.context_length(self.model, self.tokenizer)

    @property
    def mask_token_id(self) -> int:
        return self.tokenizer.mask_token_id

    @property
    def eos_token_id(self) -> int | None:
        """The end of text: EOS, else SEP (``backbone.end_of_text_id``)."""
        return backbone.end_of_text_id(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        """Pad, else the end of text, else the mask token (``backbone.pad_token_id``)."""
        return backbone.pad_token_id(self.tokenizer)

    # ------------------------------------------------------------------------------ prompts
    def render(self, prompt: Prompt, *, chat: bool = True) -> str:
        """The text the model sees: the chat template with a generation prompt, or the raw string.

        Raises:
            DiffutronError: no text, a message without role or content, an unknown role, and with
                ``chat``: a system message after the first message, or a conversation that ends with
                the assistant's answer (nothing to answer).
        """
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DiffutronError("empty prompt: give some text to answer")
            if not chat:
                return prompt
            prompt = [{"role": "user", "content": prompt}]
        messages = list(prompt)
        if not messages:
            raise DiffutronError("empty messages: give at least one user message")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DiffutronError('each message needs "role" and "content"')
            if m["role"] not in backbone.ROLES:
                raise DiffutronError(f"unknown role {m['role']!r}: use system, user or assistant")
            if not isinstance(m["content"], str):
                raise DiffutronError(f"message content must be a string, got {type(m['content']).__name__}")
        if not any(m["content"].strip() for m in messages if m["role"] == "user"):
            raise DiffutronError("empty prompt: the user message has no text")
        if not chat:
            return "\n\n".join(m["content"] for m in messages)
        late = next((i for i, m in enumerate(messages) if m["role"] == "system" and i > 0), None)
        if late is not None:  # the reference's template drops it silently
            raise DiffutronError(f"messages[{late}] is a system message after the first message: the Diffutron "
                                 "template has a system message only at the start; move it there or make it a "
                                 "user message")
        if messages[-1]["role"] == "assistant":  # the template adds no answer prompt after a finished answer
            raise DiffutronError("the last message is the assistant's: nothing to answer; end with a user message")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        """Token ids without special tokens (as in training: no CLS/SEP around a prompt)."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        ctx = self.context_length
        if prompt_tokens + max_new_tokens > ctx:
            raise DiffutronError(
                f"prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                f"context of {ctx} tokens: shorten the prompt or lower max_new_tokens"
            )

    def batch(self, token_lists: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(input_ids, attention_mask)`` on the model's device (``backbone.right_pad``)."""
        return backbone.right_pad(token_lists, self.pad_token_id, self.device)

    # ------------------------------------------------------------------------------ generation
    def generate(
        self,
        inputs: Prompt | Sequence[Prompt],
        config: SamplerConfig | None = None,
        *,
        chat: bool = True,
        callback=None,
        stop: Sequence[str] = (),
        **overrides,
    ) -> list[Completion]:
        """Answer one prompt or a batch of prompts.

        Args:
            inputs: a string, a list of chat messages, or a list of either.
            config: sampler settings (the model's defaults, i.e. the paper's, when None);
                keyword overrides such as ``steps=32`` are applied on top.
            chat: apply the chat template (default) or continue raw text.
            callback: ``callback(step, canvas)`` for every intermediate canvas (see sampling).
            stop: extra strings that end an answer (besides EOS and the end of turn).

        Returns:
            one ``Completion`` per prompt, in order.

        Raises:
            DiffutronError: invalid settings, an empty prompt, a prompt that does not fit the context.
        """
        prompts = [inputs] if _is_single(inputs) else list(inputs)
        if not prompts:
            raise DiffutronError("no prompts given")
        config = (config or self.defaults).replace(**overrides) if overrides else (config or self.defaults)
        token_lists = [self.encode(self.render(p, chat=chat)) for p in prompts]
        for toks in token_lists:
            has_masks = self.mask_token_id in toks
            if config.max_new_tokens < 1 and not has_masks:
                raise DiffutronError("max_new_tokens must be >= 1 (or the prompt must contain mask tokens to fill)")
            self.check_fits(len(toks), config.max_new_tokens)
        stops = self.stop_sequences + self.stop_ids(stop) if stop else None
        out = self.generate_ids(token_lists, config, callback=callback, stop_sequences=stops)
        return self.completions(out, token_lists, stops)

    def generate_ids(
        self, token_lists: Sequence[Sequence[int]], config: SamplerConfig, *, callback=None,
        stop_sequences: Sequence[Sequence[int]] | None = None,
    ) -> GenerationOutput:
        """The sampler on already-encoded prompts (what ``generate`` and the server call).

        ``stop_sequences``: token sequences that end an answer (default: the model's own,
        ``self.stop_sequences``; the server adds a request's ``stop`` strings to them)."""
        ids, att = self.batch(token_lists)
        was_training = self.model.training
        self.model.eval()
        stops = self.stop_sequences if stop_sequences is None else stop_sequences
        try:
            engine = self.engine_for(config, token_lists)
            if engine is not None:
                return engine.generate(ids, att, seeds=config.row_seeds(len(token_lists)), stop_sequences=stops,
                                       callback=callback)
            return sample(
                self.model, ids, config, mask_token_id=self.mask_token_id, eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id, attention_mask=att, stop_sequences=stops, callback=callback,
            )
        finally:
            self.model.train(was_training)

    def stop_ids(self, stop: Sequence[str] = ()) -> list[list[int]]:
        """Token sequences of extra stop strings, each as written and after a space (where the
        tokenizer marks word starts, e.g. SentencePiece); matching then happens on tokens.

        Raises:
            DiffutronError: a stop string with no tokens of its own in this vocabulary.
        """
        unk = self.tokenizer.unk_token_id
        seqs: list[list[int]] = []
        for s in stop:
            variants = [self.encode(v) for v in (s, " " + s)]
            if not s or not variants[0] or (unk is not None and unk in variants[0]):
                raise DiffutronError(f"stop string {s!r} cannot be matched: it has no tokens of its own in "
                                     "this model's vocabulary")
            for v in variants:
                if v and v not in seqs and (unk is None or unk not in v):
                    seqs.append(v)
        return seqs

    def answer_ids(
        self, tokens: Sequence[int], stop_sequences: Sequence[Sequence[int]] | None = None
    ) -> tuple[list[int], bool]:
        """The answer part of decoded tokens: cut before EOS / end of turn (or one of
        ``stop_sequences``, default the model's own); ``(ids, ended)``."""
        tokens = list(tokens)
        stops = self.stop_sequences if stop_sequences is None else stop_sequences
        hit = find_stop(tokens, eos_token_id=self.eos_token_id, stop_sequences=stops,
                        mask_token_id=self.mask_token_id)
        if hit is not None:
            return tokens[: hit[0]], True
        if self.mask_token_id in tokens:
            tokens = tokens[: tokens.index(self.mask_token_id)]
        return tokens, False

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of answer tokens: special tokens (pad, mask, ...) dropped, outer whitespace stripped."""
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True).strip()

    def completions(
        self, out: GenerationOutput, token_lists: Sequence[Sequence[int]],
        stop_sequences: Sequence[Sequence[int]] | None = None,
    ) -> list[Completion]:
        result = []
        for r, toks in enumerate(token_lists):
            start = out.answer_start[r]
            row = out.sequences[r, start:].tolist()
            answer, _ = self.answer_ids(row, stop_sequences)
            special = set(self.tokenizer.all_special_ids)  # pad, CLS, SEP, ...: no text, not counted
            answer = [t for t in answer if t != self.pad_token_id and t not in special]
            result.append(Completion(
                text=self.decode(answer), finish_reason=out.finish_reasons[r], prompt_tokens=len(toks),
                completion_tokens=len(answer), nfe=out.nfe, token_ids=answer,
            ))
        return result


def _is_single(inputs) -> bool:
    if isinstance(inputs, str):
        return True
    items = list(inputs) if not isinstance(inputs, (list, tuple)) else inputs
    return len(items) > 0 and isinstance(items[0], dict)


def default_model_path() -> str:
    """The embedded default model shipped inside the package, when it is installed."""
    here = Path(__file__).parent / "embedded" / "tiny-tr"
    if (here / "config.json").exists():
        return str(here)
    raise DiffutronError(
        "no embedded default model in this installation: pass --model DIR (a saved model directory or hub id)"
    )
