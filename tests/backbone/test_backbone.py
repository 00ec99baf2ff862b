"""The backbone package, tested directly: the tokenizer conventions (special ids, padding, the chat
template, stop sequences, the mask-token check), the forward helpers (``logits_at``, ``packed_head``,
``unwrap``, ``encoder_of``, ``context_length``, ModernBERT's masks and head) against full forwards,
devices and dtypes, ``load_backbone`` and ``make_fast``."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffutron.backbone import (
    CHAT_TEMPLATE, END_OF_TURN, check_device, check_tokenizer, choose_pad_id, context_length, encoder_of,
    end_of_text_id, fast_defaults, full_logits, install_chat_template, load_backbone, logits_at, make_fast,
    packed_head, pad_token_id, resolve_device, resolve_dtype, right_pad, stop_token_sequences, unwrap,
)
from diffutron.backbone.modernbert import is_modernbert, modernbert_head, modernbert_logits_at, modernbert_masks
from diffutron.errors import DiffutronError
from diffutron.tiny import tiny_model, tiny_tokenizer

CPU = torch.device("cpu")


def ids_of(*, pad=None, eos=None, sep=None, mask=None):
    return SimpleNamespace(pad_token_id=pad, eos_token_id=eos, sep_token_id=sep, mask_token_id=mask)


def canvas(tokenizer, shape=(2, 20), seed=0):
    return torch.randint(5, tokenizer.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# tokenizer conventions


@pytest.mark.parametrize(("pad", "eos", "mask", "want"), [
    (1, 5, 4, 1),  # the pad token first
    (None, 5, 4, 5),  # else the end of text
    (None, None, 4, 4),  # else the mask token
    (0, 5, 4, 0),  # an id 0 is an id, not "none"
    (None, 0, 4, 0),
    (None, None, 0, 0),
])
def test_choose_pad_id_takes_pad_then_end_of_text_then_mask(pad, eos, mask, want):
    got = choose_pad_id(pad, eos, mask)
    assert got == want and type(got) is int


def test_choose_pad_id_with_nothing_to_pad_with_is_one_line():
    with pytest.raises(DiffutronError) as err:
        choose_pad_id(None, None, None)
    assert str(err.value) == "the tokenizer has no pad, EOS or SEP token to pad with"
    assert type(choose_pad_id(torch.tensor(3), None, None)) is int  # ids as tensors come back as ints


def test_end_of_text_id_is_eos_then_sep(tokenizer):
    assert end_of_text_id(ids_of(eos=5, sep=6)) == 5
    assert end_of_text_id(ids_of(sep=6)) == 6
    assert end_of_text_id(ids_of(eos=0, sep=6)) == 0
    assert end_of_text_id(ids_of()) is None
    assert end_of_text_id(tokenizer) == tokenizer.convert_tokens_to_ids("[EOS]")


def test_pad_token_id_with_and_without_the_mask_fallback(tokenizer):
    assert pad_token_id(ids_of(pad=1, eos=5, mask=4)) == 1
    assert pad_token_id(ids_of(eos=0, mask=4)) == 0
    assert pad_token_id(ids_of(sep=6, mask=4)) == 6
    assert pad_token_id(ids_of(mask=4)) == 4
    assert pad_token_id(ids_of(mask=4), mask_fallback=True) == 4
    assert pad_token_id(ids_of(sep=6, mask=4), mask_fallback=False) == 6
    with pytest.raises(DiffutronError, match="^the tokenizer has no pad, EOS or SEP token to pad with$"):
        pad_token_id(ids_of(mask=4), mask_fallback=False)  # training data: padding may be a target
    assert pad_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("[PAD]")


def test_right_pad_values_shape_dtype_and_device():
    ids, att = right_pad([[7, 8, 9], [5]], 2)
    assert ids.tolist() == [[7, 8, 9], [5, 2, 2]] and att.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.shape == att.shape == (2, 3) and ids.dtype == att.dtype == torch.long
    assert ids.device == att.device == CPU
    ids, att = right_pad(((), range(3, 5), [6]), 0, device="cpu")  # any sequences; an empty row
    assert ids.tolist() == [[0, 0], [3, 4], [6, 0]] and att.tolist() == [[0, 0], [1, 1], [1, 0]]
    ids, att = right_pad([[1], [2, 3]], 9, device="meta")  # the device is honoured (meta stands in for a GPU)
    assert ids.device.type == att.device.type == "meta" and ids.shape == (2, 2)


def test_check_tokenizer_without_a_mask_token_names_the_fix(tokenizer):
    check_tokenizer(tokenizer)  # the tiny tokenizer has one
    with pytest.raises(DiffutronError) as err:
        check_tokenizer(SimpleNamespace(mask_token_id=None), "the tokenizer of m")
    assert str(err.value) == (
        "the tokenizer of m has no mask token; a masked diffusion LM needs one (add it with "
        "tokenizer.add_special_tokens({'mask_token': '[MASK]'}) and resize the embeddings)")
    with pytest.raises(DiffutronError, match="^the tokenizer has no mask token; "):
        check_tokenizer(SimpleNamespace(mask_token_id=None))


def test_install_chat_template_keeps_an_existing_one_unless_forced():
    for empty in (None, ""):
        tok = SimpleNamespace(chat_template=empty)
        install_chat_template(tok)
        assert tok.chat_template == CHAT_TEMPLATE
    tok = SimpleNamespace(chat_template="{{ messages[0]['content'] }}")
    install_chat_template(tok)
    assert tok.chat_template == "{{ messages[0]['content'] }}"
    install_chat_template(tok, force=True)
    assert tok.chat_template == CHAT_TEMPLATE
    bare = SimpleNamespace()  # no attribute at all
    install_chat_template(bare)
    assert bare.chat_template == CHAT_TEMPLATE


def test_stop_token_sequences_are_the_end_of_turn_with_the_newline_dropped(tokenizer):
    assert END_OF_TURN == "[/Answer]"
    assert stop_token_sequences(tokenizer) == [[tokenizer.convert_tokens_to_ids("[/Answer]")]]

    def fake(table):
        return SimpleNamespace(encode=lambda text, add_special_tokens=False: list(table[text]))

    # a BPE-like tokenizer: the end of turn after a newline is tokenized differently; the newline goes
    bpe = fake({"[/Answer]": [1, 2, 3], "\n": [9], "\n[/Answer]": [9, 4, 2, 3]})
    assert stop_token_sequences(bpe) == [[1, 2, 3], [4, 2, 3]]
    # the newline merged into the next token: the sequence is kept whole
    merged = fake({"[/Answer]": [1, 2, 3], "\n": [9], "\n[/Answer]": [8, 2, 3]})
    assert stop_token_sequences(merged) == [[1, 2, 3], [8, 2, 3]]
    # the same ids both ways: listed once
    same = fake({"[/Answer]": [1, 2], "\n": [9], "\n[/Answer]": [9, 1, 2]})
    assert stop_token_sequences(same) == [[1, 2]]


# ---------------------------------------------------------------------------------------------
# the forward helpers


def test_context_length_is_min_of_positions_and_tokenizer():
    tok = tiny_tokenizer(model_max_length=64)
    model = tiny_model(tok, max_position_embeddings=128)
    assert context_length(model, tok) == 64
    tok.model_max_length = 10**30  # "unlimited" tokenizers
    assert context_length(model, tok) == 128


class _Wrapper(nn.Module):
    """Stands in for DDP (``module``) around torch.compile (``_orig_mod``)."""

    def __init__(self, inner, attr):
        super().__init__()
        setattr(self, attr, inner)

    def forward(self, **kwargs):
        inner = getattr(self, "module", None) or self._orig_mod
        return inner(**kwargs)


def test_unwrap_and_encoder_of_see_through_wrappers(model):
    wrapped = _Wrapper(_Wrapper(model, "_orig_mod"), "module")
    assert unwrap(wrapped) is model and unwrap(model) is model
    assert encoder_of(wrapped) is model.model  # ModernBERT's base_model_prefix is "model"
    assert is_modernbert(wrapped) and not is_modernbert(tiny_model(tiny_tokenizer(), arch="bert"))
    assert encoder_of(nn.Linear(2, 2)) is None


def test_logits_at_equals_full_logits_at_the_same_positions(model, tokenizer):
    ids = canvas(tokenizer)
    att = torch.ones_like(ids)
    att[1, 14:] = 0
    where = torch.zeros_like(ids, dtype=torch.bool)
    where[0, 3:9], where[1, [0, 13]] = True, True
    with torch.no_grad():
        full = full_logits(model, ids, att)
        assert full.shape == (2, 20, len(tokenizer)) and full.dtype == torch.float32
        got = logits_at(model, ids, where, att)
        assert got.shape == (8, len(tokenizer))
        torch.testing.assert_close(got, full[where], rtol=1e-6, atol=1e-6)
        flat = torch.tensor([33, 2, 20, 7])  # a flat index into [B * L], in any order
        torch.testing.assert_close(logits_at(model, ids, flat, att), full.reshape(-1, full.shape[-1])[flat],
                                   rtol=1e-6, atol=1e-6)


def test_logits_at_on_bert_and_on_a_model_with_no_known_encoder():
    tok = tiny_tokenizer()
    bert = tiny_model(tok, arch="bert", seed=1)
    ids = canvas(tok, (2, 12), seed=1)
    where = torch.zeros_like(ids, dtype=torch.bool)
    where[:, 5] = True

    class Opaque(nn.Module):  # no base_model_prefix: full logits, then the pick
        def __init__(self):
            super().__init__()
            self.net = bert

        def forward(self, input_ids, attention_mask=None):
            return self.net(input_ids=input_ids, attention_mask=attention_mask)

    opaque = Opaque()
    assert encoder_of(bert) is bert.bert and encoder_of(opaque) is None
    with torch.no_grad():
        want = full_logits(bert, ids)[where]
        torch.testing.assert_close(logits_at(bert, ids, where), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(logits_at(opaque, ids, where), want, rtol=1e-6, atol=1e-6)


def test_modernbert_logits_at_with_its_masks_equals_full_logits(model, tokenizer):
    ids = canvas(tokenizer, seed=2)
    att = torch.ones_like(ids)
    att[1, 15:] = 0
    pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    half = model.config.local_attention // 2
    masks = modernbert_masks(pos, att.bool(), half)
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert masks["full_attention"].shape == masks["sliding_attention"].shape == (2, 1, 20, 20)
    # row 0, query 10: every key for global layers, keys 2..18 for sliding ones; row 1 never sees 15..19
    assert masks["full_attention"][0, 0, 10].all() and masks["full_attention"][1, 0, 3].tolist() == [True] * 15 + [False] * 5
    assert masks["sliding_attention"][0, 0, 10].nonzero().squeeze(-1).tolist() == list(range(10 - half, 10 + half + 1))
    assert masks["sliding_attention"][1, 0, 12].nonzero().squeeze(-1).tolist() == list(range(12 - half, 15))
    flat = torch.tensor([0, 5, 19, 20, 34])
    with torch.no_grad():
        want = full_logits(model, ids, att).reshape(-1, len(tokenizer))[flat]
        torch.testing.assert_close(modernbert_logits_at(model, ids, flat, masks), want, rtol=1e-5, atol=1e-5)
        # the window matters: global masks everywhere give other logits (the test can tell)
        wide = modernbert_masks(pos, att.bool(), 10**6)
        assert (modernbert_logits_at(model, ids, flat, wide) - want).abs().max() > 1e-3


def test_modernbert_head_is_the_models_head_on_hidden_states(model, tokenizer):
    ids = canvas(tokenizer, (1, 16), seed=3)
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        assert hidden.shape == (1, 16, model.config.hidden_size)
        torch.testing.assert_close(modernbert_head(model, hidden), full_logits(model, ids), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(modernbert_head(_Wrapper(model, "module"), hidden[0, 4]),
                                   full_logits(model, ids)[0, 4], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch build")
def test_packed_output_layer_equals_the_plain_one(model, tokenizer):
    """CPU float32 inference multiplies by a oneDNN-packed copy of the output matrix inside the
    block: the same logits as the plain layer; under bf16 autocast and with autograd, no pack."""
    layer = model.get_output_embeddings()
    ids = torch.randint(5, tokenizer.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    where = torch.zeros(2, 12, dtype=torch.bool)
    where[0, 3:9], where[1, 1] = True, True
    with torch.no_grad():
        with packed_head(model):
            assert "forward" in vars(layer)
            fast = logits_at(model, ids, where)
        assert "forward" not in vars(layer)  # the plain layer is back
        torch.testing.assert_close(fast, model(input_ids=ids).logits[where], rtol=1e-5, atol=1e-5)
        with packed_head(model), torch.autocast("cpu", dtype=torch.bfloat16):  # inside a bf16 training run
            half = logits_at(model, ids, where)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(half, model(input_ids=ids).logits[where])
    with packed_head(model):  # autograd on: training never goes through the pack
        assert "forward" not in vars(layer)


# ---------------------------------------------------------------------------------------------
# devices and dtypes


def test_resolve_dtype_by_name_and_by_device():
    for name, want in (("float32", torch.float32), ("fp32", torch.float32), ("bfloat16", torch.bfloat16),
                       ("bf16", torch.bfloat16), ("float16", torch.float16), ("fp16", torch.float16)):
        assert resolve_dtype(name, CPU) is want
    assert resolve_dtype(None, CPU) is resolve_dtype("auto", CPU) is torch.float32
    assert resolve_dtype(None, torch.device("cuda")) is resolve_dtype("auto", torch.device("mps")) is torch.bfloat16
    assert resolve_dtype(torch.float16, CPU) is torch.float16  # a dtype passes through
    with pytest.raises(DiffutronError) as err:
        resolve_dtype("int4", CPU)
    assert str(err.value) == "unknown dtype 'int4'; use one of float32, fp32, bfloat16, bf16, float16, fp16"


def test_resolve_device():
    assert resolve_device("cpu") == CPU and resolve_device(torch.device("cpu")) == CPU
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == resolve_device(None) == CPU
    with pytest.raises(DiffutronError) as err:
        resolve_device("gpu")
    assert str(err.value) == "unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible here")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_check_device_refuses_cuda_without_a_gpu_in_one_line(name):
    with pytest.raises(DiffutronError) as err:
        resolve_device(name)
    message = str(err.value)
    if not torch.backends.cuda.is_built():
        assert message == (f"device {name}: this torch ({torch.__version__}) has no CUDA support; use --device "
                           "cpu, or install a CUDA build of torch")
    else:
        assert message == f"device {name}: no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES?); use --device cpu"
    assert "\n" not in message


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available here")
def test_check_device_refuses_mps_where_there_is_none():
    with pytest.raises(DiffutronError, match="^device mps: Apple's MPS is not available here; use --device cpu$"):
        check_device(torch.device("mps"))
    check_device(CPU)  # nothing to say


# ---------------------------------------------------------------------------------------------
# loading and fast weights


def test_load_backbone_gives_the_saved_models_logits(saved_model_dir, model, tokenizer):
    loaded, tok = load_backbone(str(saved_model_dir), device=CPU, dtype=torch.float32)
    assert type(loaded).__name__ == "ModernBertForMaskedLM" and not loaded.training
    assert loaded.dtype == torch.float32 and next(loaded.parameters()).device == CPU
    assert tok.get_vocab() == tokenizer.get_vocab() and tok.mask_token_id == tokenizer.mask_token_id
    assert tok.chat_template == CHAT_TEMPLATE
    ids = canvas(tokenizer, (2, 10), seed=5)
    with torch.no_grad():
        torch.testing.assert_close(full_logits(loaded, ids), full_logits(model, ids), rtol=0, atol=0)
    half, _ = load_backbone(str(saved_model_dir), device=CPU, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_load_backbone_missing_dir_and_truncated_weights(tmp_path, saved_model_dir):
    missing = tmp_path / "nope" / "x"
    with pytest.raises(DiffutronError) as err:
        load_backbone(str(missing), device=CPU, dtype=torch.float32)
    assert str(err.value) == f"model directory {missing} does not exist"
    cut = tmp_path / "cut"
    shutil.copytree(saved_model_dir, cut)
    weights = cut / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(DiffutronError) as err:
        load_backbone(str(cut), device=CPU, dtype=torch.float32)
    message = str(err.value)
    assert message.startswith(f"{cut}: the model's safetensors weights are corrupt or truncated (")
    assert message.endswith("); copy or download them again") and "\n" not in message


def test_fast_defaults_and_unknown_mode(tokenizer):
    assert fast_defaults("cpu") == fast_defaults(CPU) == ("int8", "delayed")
    assert fast_defaults("cuda") == fast_defaults("mps") == ("bf16", "dual")
    m = tiny_model(tokenizer)
    assert make_fast(m, "bf16") is m and m.dtype == torch.bfloat16
    with pytest.raises(DiffutronError) as err:
        make_fast(m, "int4")
    assert str(err.value) == "unknown fast mode 'int4'; choose one of bf16, int8"


def test_int8_weights_are_close_to_float32_and_leave_the_engine_as_it_was(saved_model_dir, model, tokenizer):
    engine = torch.backends.quantized.engine
    int8 = make_fast(load_backbone(str(saved_model_dir), device=CPU, dtype=torch.float32)[0], "int8")
    assert torch.backends.quantized.engine == engine  # the head's packing engine is set only while packing
    assert type(int8.get_output_embeddings()).__module__.startswith("torch.ao.nn.quantized.dynamic")
    ids = torch.randint(5, tokenizer.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = model(input_ids=ids).logits, int8(input_ids=ids).logits
    assert (got - want).norm() / want.norm() < 0.05  # per-tensor int8
