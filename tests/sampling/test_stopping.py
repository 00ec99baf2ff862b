"""The end-of-answer rules shared by the eager loop, the lockstep engine and the server:
``end_of_block`` (after each block) and ``finish_reason`` (when a row is returned)."""

from __future__ import annotations

import torch

from diffutron.sampling.stopping import end_of_block, finish_reason

EOS, PAD = 9, 0


def test_end_of_block_stops_at_the_first_end_and_pads_what_follows_it_in_place():
    tokens = torch.tensor([5, 5, 1, 2, EOS, 3, 4, 6])  # a 2-token prompt, then the answer
    out = end_of_block(tokens, 2, 6, eos_token_id=EOS, stop_sequences=(), pad_token_id=PAD, stop_at_eos=True,
                       last=False)
    assert out == "stop" and tokens.tolist() == [5, 5, 1, 2, EOS, PAD, PAD, PAD]  # the end token stays


def test_end_of_block_looks_only_up_to_the_blocks_end_and_uses_stop_sequences():
    tokens = torch.tensor([5, 1, 2, 3, EOS])
    kw = dict(eos_token_id=EOS, pad_token_id=PAD, stop_at_eos=True)
    assert end_of_block(tokens, 1, 3, stop_sequences=(), last=False, **kw) is None  # EOS is past column 3
    assert end_of_block(tokens, 1, 3, stop_sequences=(), last=True, **kw) == "length"
    assert tokens.tolist() == [5, 1, 2, 3, EOS]  # untouched
    assert end_of_block(tokens, 1, 4, stop_sequences=[[2, 3]], last=False, **kw) == "stop"
    assert tokens.tolist() == [5, 1, 2, 3, PAD]


def test_end_of_block_without_stop_at_eos_runs_to_the_last_block():
    tokens = torch.tensor([1, EOS, 2])
    kw = dict(eos_token_id=EOS, stop_sequences=(), pad_token_id=PAD, stop_at_eos=False)
    assert end_of_block(tokens, 0, 3, last=False, **kw) is None
    assert end_of_block(tokens, 0, 3, last=True, **kw) == "length" and tokens.tolist() == [1, EOS, 2]


def test_finish_reason_of_a_row_that_ran_to_its_end_or_was_stopped():
    ended, open_ = torch.tensor([7, 1, EOS, PAD]), torch.tensor([7, 1, 2, 3])
    kw = dict(eos_token_id=EOS, stop_sequences=())
    assert finish_reason(None, ended, 1, **kw) == "stop"
    assert finish_reason("length", ended, 1, **kw) == "stop"  # stop_at_eos off: the EOS is still an end
    assert finish_reason("length", open_, 1, **kw) == "length" and finish_reason(None, open_, 1, **kw) == "length"
    assert finish_reason("cancelled", ended, 1, **kw) == "cancelled"
    assert finish_reason(None, torch.tensor([EOS, 1, 2]), 1, **kw) == "length"  # an EOS in the prompt does not count
    assert finish_reason(None, open_, 1, eos_token_id=None, stop_sequences=[[2, 3]]) == "stop"
