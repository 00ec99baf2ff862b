"""Shared fixtures: tiny random models and tokenizers, built once per session."""

from __future__ import annotations

import pytest
import torch

from diffutron.lm import DiffusionLM
from diffutron.tiny import tiny_model, tiny_tokenizer

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def model(tokenizer):
    # A larger init spreads the logits, so greedy choices are far from ties.
    m = tiny_model(tokenizer, seed=0)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
        # Like a trained MDLM (targets are never [MASK]), the model never predicts the mask token;
        # the reference would commit [MASK] itself where it did, which our sampler never does.
        m.decoder.bias[tokenizer.mask_token_id] = -1e4
    return m


@pytest.fixture(scope="session")
def lm(model, tokenizer):
    return DiffusionLM(model, tokenizer, name="tiny")


@pytest.fixture(scope="session")
def saved_model_dir(tmp_path_factory, lm):
    d = tmp_path_factory.mktemp("tiny-model")
    lm.save_pretrained(d)
    return d
