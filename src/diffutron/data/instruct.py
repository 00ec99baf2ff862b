"""Instruction data: Alpaca, InstrucTurca and chat rows -> chat-template sequences.

Row formats (``format: auto`` picks one per file from its first row):

- ``alpaca``: ``{"instruction", "input", "output"}`` (LlamaTurk-Instruction-Set; its JSON file
  starts with a UTF-8 BOM, which is dropped). The user turn is ``instruction``, followed by
  ``"\\n\\n" + input`` when ``input`` is not blank (the Diffutron reference); instruction and
  input are each stripped first, as the reference does (``alpaca_strip``; false joins them as
  given, and the template strips only the turn as a whole).
- ``instructurca``: ``{"Input", "Output"}`` (turkish-nlp-suite/InstrucTurca, ``data/train.jsonl``;
  field names as its rows spell them, capitalised): user = ``Input``, assistant = ``Output``.
- ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``, the
  last message from the assistant; earlier turns are context.

Each conversation is rendered with the Diffutron chat template. Only the final answer (its text
plus the closing ``\\n[/Answer]\\n\\n``) is maskable; the prompt never is. A row whose prompt
leaves no room for an answer in ``max_length`` tokens is dropped and counted; a long answer is cut
on the right (counted). Padding policy:

- ``longest_as_target`` (the reference: ``DataCollatorForSeq2Seq(padding=True,
  label_pad_token_id=pad)`` without an attention mask): each batch is padded to its longest row;
  the padding after a row's answer is maskable, predicted as the pad token (EOS when the tokenizer
  has none) and attended, so a row's normaliser N_i (its maskable tokens) is the batch's longest
  length less its prompt. The batch tensor is rounded up to a multiple of 16 columns; columns
  past the longest row are neither target nor attended, which leaves every value as at the
  longest row's width. As the reference, a prompt of exactly ``max_length`` tokens is kept (with
  no answer); only longer ones are dropped. ``pad_weight`` scales the padding's loss terms.
- ``pad_as_target``: every row is padded to ``max_length``; the padding after the answer is
  maskable, predicted as pad tokens and attended; ``pad_weight`` scales its loss terms.
  With ``answer_window`` W, a row is instead its prompt plus exactly W answer positions (answer,
  closing marker, padding; longer answers are cut), the canvas the sampler decodes with
  ``max_new_tokens=W``; what lies beyond is neither target nor attended. Rows whose prompt plus
  W exceed ``max_length`` are dropped (counted).
- ``exclude``: padding is neither maskable nor attended (rows pad to the batch's longest, rounded up
  to a multiple of 16).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..backbone import ROLES, install_chat_template, pad_token_id
from ..errors import DiffutronError
from .rows import Batch, ReadReport, Row, iter_rows

DEFAULT_HELDOUT_FRACTION = 0.1
DEFAULT_MAX_LENGTH = 256  # the paper's instruction-tuning length
WIDTH_MULTIPLE = 16  # batches without a fixed width are padded to a multiple of this
INSTRUCTURCA_FIELDS = ("Input", "Output")
_ENCODE_BATCH = 256


def detect_format(row: Row) -> str:
    """``chat``, ``alpaca`` or ``instructurca`` from the fields of a row.

    Raises:
        DiffutronError: fields that match no supported format.
    """
    keys = set(row.data)
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if set(INSTRUCTURCA_FIELDS) <= keys:
        return "instructurca"
    raise DiffutronError(
        f"{row.where}: unknown instruction format (fields: {', '.join(sorted(map(str, keys))) or 'none'}); expected "
        '"messages" (chat), "instruction"+"output" (Alpaca) or "Input"+"Output" (InstrucTurca)')


def to_messages(row: Row, fmt: str, *, alpaca_strip: bool = True) -> list[dict]:
    """The conversation of a row in ``fmt``; raises DiffutronError naming the row on a bad one.

    ``alpaca_strip``: strip an Alpaca row's instruction and input each before joining them (the
    reference); otherwise they are joined as given."""
    d = row.data
    if fmt == "alpaca":
        instruction, inp, output = d.get("instruction"), d.get("input") or "", d.get("output")
        _need_text(row, "instruction", instruction)
        _need_text(row, "output", output)
        _need_text(row, "input", inp, allow_empty=True)
        if alpaca_strip:
            instruction, inp = instruction.strip(), inp.strip()
        user = instruction + ("\n\n" + inp if inp.strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if fmt == "instructurca":
        user, answer = d.get("Input"), d.get("Output")
        _need_text(row, "Input", user)
        _need_text(row, "Output", answer)
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if fmt == "chat":
        messages = d.get("messages")
        if "messages" not in d:
            raise DiffutronError(f"{row.where}: no 'messages' field (fields: {', '.join(map(str, d))}); "
                                 "rows of one file share a format (chat here, from its first row)")
        if not isinstance(messages, list) or not messages:
            raise DiffutronError(f'{row.where}: "messages" must be a non-empty list of {{"role", "content"}}')
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DiffutronError(f'{row.where}: messages[{i}] needs "role" and "content"')
            if m["role"] not in ROLES:
                raise DiffutronError(f"{row.where}: messages[{i}] has role {m['role']!r}; use system, user or assistant")
            if m["role"] == "system" and i > 0:
                raise DiffutronError(f"{row.where}: messages[{i}] is a system message after the first message; "
                                     "the chat template has one only at the start")
            if not isinstance(m["content"], str):
                raise DiffutronError(f"{row.where}: messages[{i}].content must be a string")
        if messages[-1]["role"] != "assistant":
            raise DiffutronError(f"{row.where}: the last message must be the assistant's answer to train on")
        if not messages[-1]["content"].strip():
            raise DiffutronError(f"{row.where}: the final assistant answer is empty")
        if not any(m["role"] == "user" for m in messages):
            raise DiffutronError(f"{row.where}: the conversation has no user message")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    raise ValueError(f"unknown format {fmt!r}")


def _need_text(row: Row, name: str, value, allow_empty: bool = False) -> None:
    if value is None and name not in row.data:
        raise DiffutronError(f"{row.where}: no {name!r} field (fields: {', '.join(map(str, row.data))})")
    if not isinstance(value, str):
        raise DiffutronError(f"{row.where}: field {name!r} must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DiffutronError(f"{row.where}: field {name!r} is empty")


# ---------------------------------------------------------------------------------------------
# encoding


def encode_conversations(tokenizer, conversations: Sequence[list[dict]]) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, answer_ids)`` per conversation, without special tokens.

    The full text is tokenized in one piece and split where the prompt's own tokens end (as the
    reference does); should a tokenizer merge across that boundary, the answer text is tokenized
    on its own instead, so the prompt ids are always exactly the prompt's.
    """
    prompts = [tokenizer.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in conversations]
    fulls = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    p_ids = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
    f_ids = tokenizer(fulls, add_special_tokens=False, verbose=False)["input_ids"]
    out = []
    for prompt, full, p, f in zip(prompts, fulls, p_ids, f_ids):
        assert full.startswith(prompt), "the chat template must render the prompt as a prefix of the conversation"
        if f[: len(p)] == p:
            out.append((list(p), list(f[len(p):])))
        else:
            out.append((list(p), tokenizer.encode(full[len(prompt):], add_special_tokens=False)))
    return out


class InstructDataset:
    """Encoded conversations: flat ``ids`` with ``offsets`` [N+1] and each row's ``answer_start``."""

    kind = "instruct"

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, answer_start: np.ndarray, *, max_length: int,
                 pad_id: int, padding: str = "pad_as_target", pad_weight: float = 1.0,
                 answer_window: int | None = None):
        self.ids, self.offsets, self.answer_start = ids, offsets, answer_start
        self.max_length, self.pad_id, self.padding, self.pad_weight = max_length, pad_id, padding, pad_weight
        self.answer_window = answer_window  # DataConfig allows it with pad_as_target only

    def __len__(self) -> int:
        return int(len(self.offsets) - 1)

    def row(self, i: int) -> tuple[np.ndarray, int]:
        """``(ids, answer_start)`` of row ``i``."""
        return np.asarray(self.ids[self.offsets[i]: self.offsets[i + 1]]), int(self.answer_start[i])

    def widths(self) -> np.ndarray:
        """[N] each row's width in a batch: prompt + answer_window, else its length (exclude,
        longest_as_target) or max_length (pad_as_target without a window)."""
        if self.padding == "pad_as_target" and self.answer_window is None:
            return np.full(len(self), self.max_length)
        if self.answer_window is not None:
            return np.minimum(np.asarray(self.answer_start) + self.answer_window, self.max_length)
        return np.minimum(np.diff(np.asarray(self.offsets)), self.max_length)

    def batch(self, indices: Sequence[int]) -> Batch:
        """Padded rows: answer (+ padding with pad_as_target) maskable, the prompt never."""
        rows = [self.row(int(i)) for i in indices]
        b = len(rows)
        lengths = torch.tensor([len(r) for r, _ in rows])[:, None]
        starts = torch.tensor([s for _, s in rows])[:, None]
        longest = int(lengths.max()) if self.answer_window is None else int((starts + self.answer_window).max())
        if self.padding == "pad_as_target" and self.answer_window is None:
            width = self.max_length
        else:  # the longest row, rounded up to a multiple of 16: few distinct shapes, so the
            # allocator does not keep one set of buffers per width (RSS grew ~7 MB per new width)
            width = min(self.max_length, -(-longest // WIDTH_MULTIPLE) * WIDTH_MULTIPLE)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        pos = torch.arange(width)[None, :]
        for k, (r, _) in enumerate(rows):
            ids[k, : len(r)] = torch.from_numpy(r.astype(np.int64))
        if self.padding in ("pad_as_target", "longest_as_target"):
            # [B, L]: answer, closing marker and the padding after it, up to the row's canvas end
            # (longest_as_target: the batch's longest row; the rounded-up columns after it are neither)
            if self.padding == "longest_as_target":
                end = longest
            else:
                end = width if self.answer_window is None else starts + self.answer_window
            maskable = (pos >= starts) & (pos < end)
            attention = (pos < end).expand(b, width).long()
            weight = None
            if self.pad_weight != 1.0:
                weight = torch.where(pos >= lengths, self.pad_weight, 1.0).to(torch.float32).expand(b, width).clone()
        else:
            maskable = (pos >= starts) & (pos < lengths)
            attention = (pos < lengths).long()
            weight = None
        return Batch(ids, maskable, attention, weight)

    def save(self, directory: Path, prefix: str) -> None:
        for name in ("ids", "offsets", "answer_start"):
            np.save(directory / f"{prefix}_{name}.npy", np.ascontiguousarray(getattr(self, name)))

    @classmethod
    def load(cls, directory: Path, prefix: str, **kwargs) -> "InstructDataset":
        arrays = {n: np.load(directory / f"{prefix}_{n}.npy", mmap_mode="r") for n in ("ids", "offsets", "answer_start")}
        return cls(arrays["ids"], arrays["offsets"], arrays["answer_start"], **kwargs)


@dataclass
class InstructReport:
    """What building the instruction data read, kept, cut and dropped."""

    rows: int = 0
    bad_rows: int = 0
    bad_examples: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    examples: int = 0
    heldout_examples: int = 0
    dropped_prompt_too_long: int = 0
    truncated_answers: int = 0
    tokens: int = 0

    def summary(self) -> str:
        fmts = ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items()))
        parts = [f"{self.rows} rows ({fmts}) -> {self.examples} training, {self.heldout_examples} held-out examples"]
        if self.dropped_prompt_too_long:
            parts.append(f"{self.dropped_prompt_too_long} dropped (prompt does not fit)")
        if self.truncated_answers:
            parts.append(f"{self.truncated_answers} answers cut to fit")
        if self.bad_rows:
            parts.append(f"{self.bad_rows} bad rows skipped (first: {self.bad_examples[0]})")
        return "; ".join(parts)


def _conversations(spec: str, cfg, read: ReadReport, report: InstructReport, key: str) -> list[list[dict]]:
    rows = iter_rows(spec, report=read, skip_bad_rows=cfg.skip_bad_rows, sample_by=cfg.sample_by, split=cfg.split,
                     hub_config=cfg.hub_config, revision=cfg.revision, streaming=cfg.streaming,
                     max_rows=cfg.max_rows, key=key)
    out: list[list[dict]] = []
    fmt = None if cfg.format == "auto" else cfg.format
    source = None
    for row in rows:
        if cfg.format == "auto" and row.source != source:  # a new file: detect its format from its first row
            source = row.source
            try:
                fmt = detect_format(row)
            except DiffutronError as err:
                read.bad(str(err), cfg.skip_bad_rows)
                source = None
                continue
        try:
            out.append(to_messages(row, fmt, alpaca_strip=cfg.alpaca_strip))
            report.formats[fmt] = report.formats.get(fmt, 0) + 1
        except DiffutronError as err:
            read.bad(str(err), cfg.skip_bad_rows)
    return out


def _encode_all(tokenizer, conversations: Iterable[list[dict]], max_length: int, report: InstructReport,
                answer_window: int | None = None, keep_full_prompts: bool = False):
    ids: list[np.ndarray] = []
    starts: list[int] = []
    conversations = list(conversations)
    least = 0 if keep_full_prompts else 1  # longest_as_target keeps a prompt that fills max_length, as the reference
    for b in range(0, len(conversations), _ENCODE_BATCH):
        for prompt, answer in encode_conversations(tokenizer, conversations[b: b + _ENCODE_BATCH]):
            room = max_length - len(prompt) if answer_window is None else answer_window
            if room < least or len(prompt) + room > max_length:  # no room, or the canvas would not fit
                report.dropped_prompt_too_long += 1
                continue
            if len(answer) > room:
                report.truncated_answers += 1
                answer = answer[:room]
            ids.append(np.asarray(prompt + answer, dtype=np.int32))
            starts.append(len(prompt))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    if ids:
        offsets[1:] = np.cumsum([len(a) for a in ids])
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
    return flat, offsets, np.asarray(starts, dtype=np.int32)


def split_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_indices, heldout_indices)`` exactly as ``datasets.Dataset.train_test_split(test_size=
    fraction, seed=seed)``: ceil(fraction * n) rows from a PCG64 permutation are held out (the
    paper's SFT: 0.1, seed 42). Fraction 0 keeps every row, in order."""
    if fraction <= 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(np.ceil(fraction * n))
    return perm[n_test:], perm[:n_test]


def dataset_kwargs(cfg, tokenizer) -> dict:
    """How an :class:`InstructDataset` of ``cfg`` (a ``DataConfig``) pads its rows: with
    ``backbone.pad_token_id`` (never the mask token: padding can be a training target).

    Raises:
        DiffutronError: the tokenizer has no pad, EOS or SEP token.
    """
    return dict(max_length=cfg.max_length or DEFAULT_MAX_LENGTH, pad_id=pad_token_id(tokenizer, mask_fallback=False), padding=cfg.padding,
                pad_weight=cfg.pad_weight, answer_window=cfg.answer_window)


def build_instruct(tokenizer, cfg) -> tuple[InstructDataset, InstructDataset | None, InstructReport]:
    """Training and held-out conversations from ``cfg`` (a ``DataConfig`` with kind instruct).

    Returns ``(train, heldout or None, report)``.

    Raises:
        DiffutronError: missing/empty sources, bad rows (unless ``skip_bad_rows``), no row that fits.
    """
    if cfg.max_length is None:
        cfg = replace(cfg, max_length=DEFAULT_MAX_LENGTH)
    install_chat_template(tokenizer)
    read, report = ReadReport(), InstructReport()
    train_convs: list[list[dict]] = []
    for spec in [cfg.train] if isinstance(cfg.train, str) else list(cfg.train):
        train_convs += _conversations(spec, cfg, read, report, "data.train")
    held_convs: list[list[dict]] = []
    if cfg.heldout is not None:
        for spec in [cfg.heldout] if isinstance(cfg.heldout, str) else list(cfg.heldout):
            held_convs += _conversations(spec, cfg, read, report, "data.heldout")
    elif cfg.heldout_split is not None:
        sub = replace(cfg, split=cfg.heldout_split)
        for spec in [cfg.train] if isinstance(cfg.train, str) else list(cfg.train):
            held_convs += _conversations(spec, sub, read, report, "data.heldout_split")
    else:
        fraction = DEFAULT_HELDOUT_FRACTION if cfg.heldout_fraction is None else cfg.heldout_fraction
        train_idx, held_idx = split_rows(len(train_convs), fraction, cfg.split_seed)
        held_convs = [train_convs[i] for i in held_idx]
        train_convs = [train_convs[i] for i in train_idx]
    report.rows, report.bad_rows, report.bad_examples = read.rows, read.bad_rows, list(read.bad_examples)

    kwargs = dataset_kwargs(cfg, tokenizer)
    keep = cfg.padding == "longest_as_target"
    train = InstructDataset(*_encode_all(tokenizer, train_convs, cfg.max_length, report, cfg.answer_window, keep),
                            **kwargs)
    held = InstructDataset(*_encode_all(tokenizer, held_convs, cfg.max_length, report, cfg.answer_window, keep),
                           **kwargs)
    report.examples, report.heldout_examples = len(train), len(held)
    report.tokens = int(train.offsets[-1])
    if len(train) == 0:
        why = f" ({report.dropped_prompt_too_long} prompts longer than data.max_length={cfg.max_length})" \
            if report.dropped_prompt_too_long else ""
        raise DiffutronError(f"data.train: no usable instruction rows{why}")
    return train, (held if len(held) else None), report
