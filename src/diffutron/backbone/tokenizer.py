"""The tokenizer's conventions a diffusion LM relies on: the Diffutron chat template
(``CHAT_TEMPLATE``, ``END_OF_TURN``, ``ROLES``), the mask-token check, the special ids
(``end_of_text_id``: EOS, else SEP; ``pad_token_id`` / ``choose_pad_id``: pad, else end of text,
else mask), right-padding ragged rows (``right_pad``) and the stop sequences of an answer.
Re-exported by ``backbone``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import DiffutronError

# The Diffutron chat template (plain-text markers, content stripped). Written with Jinja string
# expressions only, so whitespace control can never eat the newlines the checkpoints were trained on.
# Edges, against the reference's template: a generation prompt after a conversation that already
# ends with the assistant's answer adds nothing (as the reference); a system message after the first
# message, which the reference drops without a word, and a role other than system / user /
# assistant, which it skips, raise an error naming the message instead.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}"
    "{{ raise_exception('messages[' ~ loop.index0 ~ '] is a system message after the first message: the "
    "Diffutron template has a system message only at the start; move it to the start or make it a user message') }}"
    "{%- endif -%}"
    "{{ '[SYS]\\n' + (message['content'] | trim) + '\\n[/SYS]\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '[Question]\\n' + (message['content'] | trim) + '\\n[/Question]\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '[Answer]\\n' + (message['content'] | trim) + '\\n[/Answer]\\n\\n' }}"
    "{%- else -%}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and (messages | length == 0 or messages[-1]['role'] != 'assistant') -%}"
    "{{ '[Answer]\\n' }}"
    "{%- endif -%}"
)
END_OF_TURN = "[/Answer]"
ROLES = ("system", "user", "assistant")


def install_chat_template(tokenizer, *, force: bool = False) -> None:
    """Install the Diffutron chat template on a tokenizer that has none (or always, with force)."""
    if force or not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE


def check_tokenizer(tokenizer, where: str = "the tokenizer") -> None:
    """A diffusion LM needs a mask token; everything else has a fallback."""
    if tokenizer.mask_token_id is None:
        raise DiffutronError(
            f"{where} has no mask token; a masked diffusion LM needs one "
            "(add it with tokenizer.add_special_tokens({'mask_token': '[MASK]'}) and resize the embeddings)"
        )


def end_of_text_id(tokenizer) -> int | None:
    """The id that ends a text: EOS, else SEP (BERT-style tokenizers), else None. Pre-training
    appends it to every document; the sampler stops at it."""
    for tid in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if tid is not None:
            return int(tid)
    return None


def choose_pad_id(pad: int | None, end_of_text: int | None, mask: int | None) -> int:
    """The padding rule on ids: ``pad``, else ``end_of_text``, else ``mask`` (see pad_token_id).

    Raises:
        DiffutronError: all three are None.
    """
    for tid in (pad, end_of_text, mask):
        if tid is not None:
            return int(tid)
    raise DiffutronError("the tokenizer has no pad, EOS or SEP token to pad with")


def pad_token_id(tokenizer, *, mask_fallback: bool = True) -> int:
    """The id that pads ragged rows: the pad token, else the end of text (EOS, then SEP), else the
    mask token. Padding is never attended, and sampled answers are cut before it, so any id works
    there; training data trains its padding as a target (``pad_as_target``), where the mask token
    would make no sense, so it passes ``mask_fallback=False``.

    Raises:
        DiffutronError: the tokenizer has none of these tokens.
    """
    mask = tokenizer.mask_token_id if mask_fallback else None
    return choose_pad_id(tokenizer.pad_token_id, end_of_text_id(tokenizer), mask)


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists as ``(input_ids, attention_mask)``, LongTensors [B, longest row]: each row
    left-aligned and filled up with ``pad_id``, the mask 1 on its real tokens; on ``device``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        att[r, : len(row)] = 1
    return ids.to(device), att.to(device)


def stop_token_sequences(tokenizer) -> list[list[int]]:
    """Token-id sequences that end an answer: the end-of-turn marker as it appears after a newline."""
    seqs = []
    for text in (END_OF_TURN, "\n" + END_OF_TURN):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if text.startswith("\n"):
            nl = tokenizer.encode("\n", add_special_tokens=False)
            if ids[: len(nl)] == nl:
                ids = ids[len(nl):]
        if ids and ids not in seqs:
            seqs.append(ids)
    return seqs
