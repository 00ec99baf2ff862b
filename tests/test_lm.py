"""DiffusionLM: loading, saving, the chat template, high-level generation."""

import json
import shutil

import pytest
import torch

from diffutron import DiffusionLM
from diffutron.backbone import CHAT_TEMPLATE
from diffutron.errors import DiffutronError
from diffutron.tiny import tiny_lm, tiny_model, tiny_tokenizer


def test_chat_template_renders_reference_format(lm):
    msgs = [
        {"role": "system", "content": "  Yardımcı bir asistansın. "},
        {"role": "user", "content": "Başkent neresi?\n"},
        {"role": "assistant", "content": "Ankara."},
        {"role": "user", "content": "Peki İzmir?"},
    ]
    text = lm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "[SYS]\nYardımcı bir asistansın.\n[/SYS]\n\n"
        "[Question]\nBaşkent neresi?\n[/Question]\n\n"
        "[Answer]\nAnkara.\n[/Answer]\n\n"
        "[Question]\nPeki İzmir?\n[/Question]\n\n"
        "[Answer]\n"
    )
    no_gen = lm.tokenizer.apply_chat_template(msgs[1:3], tokenize=False)
    assert no_gen == "[Question]\nBaşkent neresi?\n[/Question]\n\n[Answer]\nAnkara.\n[/Answer]\n\n"


def test_chat_template_edges_follow_the_reference_or_fail_in_one_line(lm):
    tok = lm.tokenizer
    done = [{"role": "user", "content": "Soru?"}, {"role": "assistant", "content": "Cevap."}]
    finished = "[Question]\nSoru?\n[/Question]\n\n[Answer]\nCevap.\n[/Answer]\n\n"
    # the last message is the assistant's: a generation prompt adds nothing (as the reference's template)
    assert tok.apply_chat_template(done, tokenize=False, add_generation_prompt=True) == finished
    assert tok.apply_chat_template(done[:1], tokenize=False, add_generation_prompt=True).endswith("[Answer]\n")
    # a system message after the first (the reference drops it) and an unknown role (it skips it): errors
    late = [{"role": "user", "content": "Soru?"}, {"role": "system", "content": "Kısa cevap ver."}]
    with pytest.raises(Exception, match=r"messages\[1\] is a system message after the first message"):
        tok.apply_chat_template(late, tokenize=False, add_generation_prompt=True)
    with pytest.raises(Exception, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    # DiffusionLM (generate, chat, the server): the same cases as one-line errors, and nothing to
    # answer after a finished answer
    for messages, match in ((late, r"messages\[1\] is a system message"), (done, "the last message is the assistant's"),
                            ([{"role": "tool", "content": "x"}], "unknown role 'tool'")):
        with pytest.raises(DiffutronError, match=match):
            lm.render(messages)
    assert lm.render(done, chat=False) == "Soru?\n\nCevap."  # raw text: no template, no turn rules


def test_existing_chat_template_is_kept():
    tok = tiny_tokenizer()
    tok.chat_template = "{{ messages[0]['content'] }}"
    lm = DiffusionLM(tiny_model(tok), tok)
    assert lm.tokenizer.chat_template == "{{ messages[0]['content'] }}"


def test_save_and_load_round_trip_same_logits(lm, saved_model_dir):
    back = DiffusionLM.from_pretrained(saved_model_dir, device="cpu")
    ids = torch.tensor([[12, 30, 41, 7]])
    with torch.no_grad():
        assert torch.allclose(lm.model(input_ids=ids).logits, back.model(input_ids=ids).logits, atol=1e-6)
    assert back.tokenizer.chat_template == CHAT_TEMPLATE
    assert back.name == saved_model_dir.name
    assert back.model.dtype == torch.float32 and back.device.type == "cpu"
    assert (saved_model_dir / "model.safetensors").exists()


def test_plain_transformers_loads_saved_dir(saved_model_dir):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(saved_model_dir)
    tok = AutoTokenizer.from_pretrained(saved_model_dir)
    assert type(model).__name__ == "ModernBertForMaskedLM"
    assert tok.apply_chat_template([{"role": "user", "content": "Merhaba"}], tokenize=False,
                                   add_generation_prompt=True) == "[Question]\nMerhaba\n[/Question]\n\n[Answer]\n"


def test_dtype_argument(saved_model_dir):
    lm16 = DiffusionLM.from_pretrained(saved_model_dir, device="cpu", dtype="bfloat16")
    assert lm16.model.dtype == torch.bfloat16


def test_bert_architecture_loads_and_generates(tmp_path):
    lm = tiny_lm(arch="bert")
    lm.save_pretrained(tmp_path)
    back = DiffusionLM.from_pretrained(tmp_path)
    assert type(back.model).__name__ == "BertForMaskedLM"
    (c,) = back.generate("Merhaba", max_new_tokens=4, steps=4, block_length=4)
    assert c.completion_tokens <= 4


def test_missing_dir_no_weights_pt_only_and_no_mask(tmp_path, saved_model_dir):
    with pytest.raises(DiffutronError, match="does not exist"):
        DiffusionLM.from_pretrained(str(tmp_path / "nope" / "deeper" / "x"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DiffutronError, match="no config.json"):
        DiffusionLM.from_pretrained(empty)
    noweights = tmp_path / "noweights"
    shutil.copytree(saved_model_dir, noweights)
    (noweights / "model.safetensors").unlink()
    with pytest.raises(DiffutronError, match="no model.safetensors"):
        DiffusionLM.from_pretrained(noweights)
    (noweights / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(DiffutronError, match="safetensors only"):
        DiffusionLM.from_pretrained(noweights)
    nomask = tmp_path / "nomask"
    shutil.copytree(saved_model_dir, nomask)
    cfg_path = nomask / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["mask_token"] = None
    cfg.get("extra_special_tokens", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(DiffutronError, match="no mask token"):
        DiffusionLM.from_pretrained(nomask)


def test_unknown_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(DiffutronError, match="no masked-LM head"):
        DiffusionLM.from_pretrained(tmp_path)


def test_offline_hub_id(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: the variable alone waits for the network
    with pytest.raises(DiffutronError, match="cannot reach the Hugging Face hub"):
        DiffusionLM.from_pretrained("diffutron/DiffutronLM-0.3B-Instruct")


def test_generate_high_level(lm):
    outs = lm.generate(["Türkiye'nin başkenti neresidir?", [{"role": "user", "content": "Merhaba"}]],
                       max_new_tokens=8, steps=8, block_length=4, temperature=0.0)
    assert len(outs) == 2
    for c in outs:
        assert c.finish_reason in ("stop", "length")
        assert c.completion_tokens == len(c.token_ids) <= 8
        assert c.nfe >= 1 and c.prompt_tokens > 3
        assert "[MASK]" not in c.text and "[PAD]" not in c.text
    single = lm.generate("Türkiye'nin başkenti neresidir?", max_new_tokens=8, steps=8, block_length=4, temperature=0.0)
    assert single[0].token_ids == outs[0].token_ids


def test_completion_cut_at_end_of_turn(lm):
    tok = lm.tokenizer
    end = tok.convert_tokens_to_ids("[/Answer]")
    word = tok.convert_tokens_to_ids("Ankara")
    answer, ended = lm.answer_ids([word, end, word])
    assert answer == [word] and ended
    answer, ended = lm.answer_ids([word, lm.mask_token_id, word])
    assert answer == [word] and not ended


def test_prompt_too_long_and_empty(lm):
    with pytest.raises(DiffutronError, match="exceeds the model's context of 128"):
        lm.generate("Ankara " * 200, max_new_tokens=8)
    with pytest.raises(DiffutronError, match="empty prompt"):
        lm.generate("   ")
    with pytest.raises(DiffutronError, match="unknown role"):
        lm.generate([[{"role": "robot", "content": "x"}]])
    with pytest.raises(DiffutronError, match="max_new_tokens"):
        lm.generate("Merhaba", max_new_tokens=0)


def test_fast_modes_run_with_a_cache(saved_model_dir):
    # int8 runs on CPU only: pinned, or a GPU machine would load the model on CUDA
    def load():
        return DiffusionLM.from_pretrained(saved_model_dir, device="cpu")

    assert load().make_fast("bf16", cache=False).defaults.cache == "none"
    for mode in ("bf16", "int8"):
        lm = load().make_fast(mode)
        assert lm.defaults.cache == "delayed"  # a ModernBERT model: --fast turns the delayed cache on
        (c,) = lm.generate("Merhaba", max_new_tokens=8, steps=8, block_length=4, stop_at_eos=False)
        assert c.completion_tokens <= 8 and c.nfe == 8
    lm = load().make_fast("int8", cache="dual")
    assert lm.defaults.cache == "dual"
    (c,) = lm.generate("Merhaba", max_new_tokens=8, steps=8, block_length=4, stop_at_eos=False)
    assert c.nfe == 8
    with pytest.raises(DiffutronError, match="invalid sampler setting cache='triple'"):
        load().make_fast("bf16", cache="triple")


def test_fast_without_a_mode_is_int8_on_a_cpu_and_bf16_elsewhere(saved_model_dir, tokenizer):
    lm = DiffusionLM.from_pretrained(saved_model_dir, device="cpu").make_fast()
    head = lm.model.get_output_embeddings()
    assert type(head).__module__.startswith("torch.ao.nn.quantized.dynamic") and lm.defaults.cache == "delayed"
    # a model off the CPU (the meta device stands in for a GPU here; tests/test_gpu.py runs CUDA)
    off = DiffusionLM(tiny_model(tokenizer).to("meta"), tokenizer).make_fast()
    assert off.model.dtype == torch.bfloat16 and off.defaults.cache == "dual"
    with pytest.raises(DiffutronError) as err:
        DiffusionLM(tiny_model(tokenizer).to("meta"), tokenizer).make_fast("int8")
    message = str(err.value)
    assert "runs on CPU only" in message and "--fast-mode bf16" in message and "\n" not in message


def test_use_cache_needs_modernbert(tokenizer, saved_model_dir):
    from diffutron.tiny import tiny_model

    assert DiffusionLM.from_pretrained(saved_model_dir).use_cache("delayed").defaults.cache == "delayed"
    lm = DiffusionLM(tiny_model(tokenizer, arch="bert"), tokenizer)
    with pytest.raises(DiffutronError, match="ModernBERT masked LMs only"):
        lm.use_cache("dual")
    assert lm.use_cache("none").defaults.cache == "none"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch build")
def test_packed_output_layer_lasts_one_generation(lm):
    """CPU float32 sampling multiplies by a oneDNN-packed copy of the output matrix, made when a
    generation starts and dropped when it ends (its values: tests/backbone/test_backbone.py)."""
    layer = lm.model.get_output_embeddings()
    seen = []
    lm.generate("Merhaba", max_new_tokens=4, steps=4, callback=lambda step, canvas: seen.append("forward" in vars(layer)))
    assert seen and all(seen) and "forward" not in vars(layer)


def test_special_ids_follow_the_backbone_rules(lm):
    assert (lm.pad_token_id, lm.eos_token_id) == (lm.tokenizer.pad_token_id, lm.tokenizer.eos_token_id)
