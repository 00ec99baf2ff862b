"""Instruction data: formats, chat-template rendering, what is maskable, padding, splits."""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch

from diffutron.data.instruct import build_instruct, encode_conversations, split_rows
from diffutron.errors import DiffutronError
from diffutron.tiny import tiny_tokenizer
from diffutron.training.config import DataConfig

Q = "Türkiye'nin başkenti neresidir?"
A = "Türkiye'nin başkenti Ankara'dır."


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg(path, **kw):
    base = dict(train=path if isinstance(path, list) else str(path), kind="instruct", max_length=48, heldout_fraction=0.0)
    base.update(kw)
    return DataConfig(**base)


def decode(tok, ids):
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def test_alpaca_json_with_bom_renders_the_reference_user_turn(tmp_path, tok):
    rows = [{"instruction": "Soru sordu.", "input": "Ankara", "output": A},
            {"instruction": Q, "input": "", "output": A}]
    f = tmp_path / "llamaturk.json"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, ensure_ascii=False, indent=1).encode("utf-8"))
    train, _, report = build_instruct(tok, cfg(f))
    assert report.formats == {"alpaca": 2} and len(train) == 2
    expected0 = tok.apply_chat_template(
        [{"role": "user", "content": "Soru sordu.\n\nAnkara"}, {"role": "assistant", "content": A}], tokenize=False)
    ids0, start0 = train.row(0)
    assert ids0.tolist() == tok.encode(expected0, add_special_tokens=False)
    prompt1 = tok.apply_chat_template([{"role": "user", "content": Q}], tokenize=False, add_generation_prompt=True)
    ids1, start1 = train.row(1)
    assert ids1[:start1].tolist() == tok.encode(prompt1, add_special_tokens=False)


def test_only_the_final_answer_and_its_closing_marker_are_maskable(tmp_path, tok):
    conv = [{"role": "system", "content": "Kısa cevap ver."}, {"role": "user", "content": "Bugün hava?"},
            {"role": "assistant", "content": "Bugün hava çok güzel."}, {"role": "user", "content": Q},
            {"role": "assistant", "content": A}]
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    for padding in ("pad_as_target", "exclude"):
        train, _, _ = build_instruct(tok, cfg(f, padding=padding, max_length=80))
        batch = train.batch([0])
        ids, maskable = batch.input_ids[0], batch.maskable[0]
        real = batch.attention_mask[0].bool() if padding == "exclude" else ids != tok.pad_token_id
        assert ids[maskable & real].tolist() == tok.encode(A + "\n[/Answer]\n\n", add_special_tokens=False)
        prompt = decode(tok, ids[~maskable & real])
        assert "Bugün hava çok güzel" in prompt and "[SYS]" in prompt and A.split()[-1] not in prompt.split()
        first_masked = int(maskable.nonzero()[0])
        assert not maskable[:first_masked].any()  # the prompt never


def test_instructurca_rows_and_format_per_file(tmp_path, tok):
    f = write_jsonl(tmp_path / "instructurca.jsonl", [{"Input": Q, "Output": A}, {"Input": "Bugün hava?", "Output": "Güzel."}])
    g = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]}])
    train, _, report = build_instruct(tok, cfg([str(f), str(g)]))
    assert report.formats == {"instructurca": 2, "chat": 1} and len(train) == 3
    assert train.row(0)[0].tolist() == train.row(2)[0].tolist()  # same conversation, two formats


def test_padding_policies(tmp_path, tok):
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": Q, "output": A}, {"instruction": Q, "output": "Ankara"}])
    train, _, _ = build_instruct(tok, cfg(f, max_length=40, pad_weight=0.25))
    b = train.batch([0, 1])
    lengths = [len(train.row(i)[0]) for i in (0, 1)]
    assert b.input_ids.shape == (2, 40) and b.attention_mask.all()  # reference: attention runs over padding
    for r in range(2):
        assert b.maskable[r, lengths[r]:].all()  # padding is a target
        assert (b.input_ids[r, lengths[r]:] == tok.pad_token_id).all()
        assert torch.equal(b.target_weight[r, lengths[r]:], torch.full((40 - lengths[r],), 0.25))
        assert (b.target_weight[r, :lengths[r]] == 1).all()
    ex = type(train)(train.ids, train.offsets, train.answer_start, max_length=40, pad_id=tok.pad_token_id,
                     padding="exclude")
    e = ex.batch([0, 1])
    assert e.input_ids.shape == (2, min(40, -(-max(lengths) // 16) * 16)) and e.target_weight is None
    assert not e.maskable[1, lengths[1]:].any() and not e.attention_mask[1, lengths[1]:].any()


def test_answer_window_trains_on_the_sampler_canvas(tmp_path, tok):
    long_a = " ".join([A] * 10)
    rows = [{"instruction": Q, "output": A}, {"instruction": "Başkent?", "output": long_a},
            {"instruction": " ".join([Q] * 12), "output": A}]
    f = write_jsonl(tmp_path / "a.jsonl", rows)
    train, _, report = build_instruct(tok, cfg(f, max_length=60, pad_weight=0.5, answer_window=12))
    assert len(train) == 2 and report.dropped_prompt_too_long == 1  # prompt + 12 would not fit in 60
    assert report.truncated_answers == 1  # the long answer is cut to its 12 positions
    (ids0, s0), (ids1, s1) = train.row(0), train.row(1)
    assert len(ids1) == s1 + 12
    b = train.batch([0, 1])
    assert b.input_ids.shape == (2, min(60, -(-(max(s0, s1) + 12) // 16) * 16))
    for r, (ids, start) in enumerate([(ids0, s0), (ids1, s1)]):
        end = start + 12  # the canvas: prompt + 12 positions (answer, end marker, padding), as the sampler's
        assert b.attention_mask[r, :end].all() and not b.attention_mask[r, end:].any()
        assert b.maskable[r, start:end].all() and not b.maskable[r, :start].any() and not b.maskable[r, end:].any()
        assert (b.input_ids[r, len(ids):end] == tok.pad_token_id).all()
        assert torch.equal(b.target_weight[r, len(ids):end], torch.full((end - len(ids),), 0.5))
        assert (b.target_weight[r, start:len(ids)] == 1).all()
    with pytest.raises(DiffutronError, match="answer_window: only works with padding: pad_as_target"):
        cfg(f, padding="exclude", answer_window=12)


def test_long_prompts_dropped_and_long_answers_cut(tmp_path, tok):
    long_q = " ".join([Q] * 10)
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": long_q, "output": A},
                                           {"instruction": Q, "output": " ".join([A] * 10)},
                                           {"instruction": Q, "output": A}])
    train, _, report = build_instruct(tok, cfg(f, max_length=30))
    assert report.dropped_prompt_too_long == 1 and report.truncated_answers == 1 and len(train) == 2
    assert len(train.row(0)[0]) == 30  # cut on the right, at max_length
    assert "dropped" in report.summary() and "cut" in report.summary()
    with pytest.raises(DiffutronError, match=r"no usable instruction rows \(1 prompts longer"):
        build_instruct(tok, cfg(write_jsonl(tmp_path / "b.jsonl", [{"instruction": long_q, "output": A}]), max_length=30))


def test_heldout_split_matches_datasets_train_test_split(tmp_path, tok):
    from datasets import Dataset

    n = 37
    ds = Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=0.1, seed=42)
    train_idx, test_idx = split_rows(n, 0.1, 42)
    assert ds["test"]["i"] == test_idx.tolist() and ds["train"]["i"] == train_idx.tolist()
    rows = [{"instruction": f"{Q} {i}", "output": A} for i in range(n)]
    train, held, report = build_instruct(tok, cfg(write_jsonl(tmp_path / "a.jsonl", rows), heldout_fraction=0.1))
    assert report.examples == 33 and report.heldout_examples == 4 and len(held) == 4


@pytest.mark.parametrize("row, message", [
    ({"question": Q, "answer": A}, r"a\.jsonl:2: no 'messages' field \(fields: question, answer\)"),
    ({"instruction": Q, "output": 3}, r"a\.jsonl:2: field 'output' must be text, got int"),
    ({"messages": [{"role": "user", "content": Q}]}, r"a\.jsonl:2: the last message must be the assistant's"),
    ({"messages": [{"role": "bot", "content": Q}]}, r"a\.jsonl:2: messages\[0\] has role 'bot'"),
    ({"Input": Q, "Output": ""}, r"a\.jsonl:2: field 'Output' is empty"),
])
def test_bad_rows_name_file_and_line(tmp_path, tok, row, message):
    first = {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]}
    if "instruction" in row:
        first = {"instruction": Q, "output": A}
    if "Input" in row:
        first = {"Input": Q, "Output": A}
    f = write_jsonl(tmp_path / "a.jsonl", [first, row, first])
    with pytest.raises(DiffutronError, match=message):
        build_instruct(tok, cfg(f))
    train, _, report = build_instruct(tok, cfg(f, skip_bad_rows=True))
    assert report.bad_rows == 1 and len(train) == 2


def test_unknown_format_and_empty_file(tmp_path, tok):
    f = write_jsonl(tmp_path / "a.jsonl", [{"question": Q, "answer": A}])
    with pytest.raises(DiffutronError, match=r"a\.jsonl:1: unknown instruction format \(fields: answer, question\)"):
        build_instruct(tok, cfg(f))
    (tmp_path / "e.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DiffutronError, match=r"e\.jsonl is empty"):
        build_instruct(tok, cfg(tmp_path / "e.jsonl"))


def test_encoding_splits_exactly_at_the_prompt(tok):
    convs = [[{"role": "user", "content": Q}, {"role": "assistant", "content": A}]]
    (prompt, answer), = encode_conversations(tok, convs)
    text = tok.apply_chat_template(convs[0], tokenize=False)
    assert prompt + answer == tok.encode(text, add_special_tokens=False)
    assert answer == tok.encode(A + "\n[/Answer]\n\n", add_special_tokens=False)
    assert np.asarray(prompt).size and decode(tok, prompt).rstrip().endswith("[Answer]")


def test_longest_as_target_is_the_references_batch_and_loss_normaliser(tmp_path, tok):
    """padding: longest_as_target = the reference's collator (pad to the batch's longest row, pad
    labels = pad id, no attention mask) and trainer (loss = 1/b sum_i sum_masked w(t_i) CE / N_i,
    N_i = labels != -100 in row i). One batch, by hand: N_i = longest - prompt_i."""
    from diffutron.objective import mdlm_loss
    from diffutron.tiny import tiny_model

    rows = [{"instruction": Q, "output": A}, {"instruction": "Başkent?", "output": "Ankara."},
            {"instruction": "Bir şehir söyle.", "output": " ".join([A] * 2)}]
    f = write_jsonl(tmp_path / "a.jsonl", rows)
    train, _, _ = build_instruct(tok, cfg(f, max_length=80, padding="longest_as_target"))
    lengths = [len(train.row(i)[0]) for i in range(3)]
    starts = [train.row(i)[1] for i in range(3)]
    longest = max(lengths)
    assert train.widths().tolist() == lengths  # what group_by_length sorts by
    batch = train.batch([0, 1, 2])
    assert batch.input_ids.shape == (3, -(-longest // 16) * 16)
    # the normaliser by hand: answer + closing marker + padding up to the longest row
    assert batch.maskable.sum(1).tolist() == [longest - s for s in starts]
    assert batch.attention_mask[:, :longest].all() and not batch.attention_mask[:, longest:].any()
    assert not batch.maskable[:, longest:].any()
    # the reference's tensors: width = longest, labels -100 on the prompt, pad labels after the answer
    ids = batch.input_ids[:, :longest]
    labels = ids.clone()
    for r, s in enumerate(starts):
        labels[r, :s] = -100
        assert (ids[r, lengths[r]:] == tok.pad_token_id).all()
    model = tiny_model(tok, seed=1)
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0.3, 0.6, 0.9])
    noise = (torch.rand(ids.shape, generator=g) < t[:, None]) & (labels != -100)
    with torch.no_grad():  # the reference's compute_loss, steps 3-7, on the reference's tensors
        noisy = torch.where(noise, tok.mask_token_id, ids)
        logits = model(input_ids=noisy).logits
        w = 1 / (t + 1e-6)  # the reference's weight -alpha'/(1 - alpha + 1e-6); ours is 1/t (3e-6 apart here)
        ce = torch.nn.functional.cross_entropy(logits[noise], ids[noise], reduction="none")
        ce = ce * w[:, None].expand_as(ids)[noise]
        n_i = (labels != -100).sum(1, keepdim=True).expand_as(ids)
        want = (ce / n_i[noise]).sum() / 3
        full_noise = torch.zeros_like(batch.maskable)
        full_noise[:, :longest] = noise
        got = mdlm_loss(model, batch.input_ids, batch.maskable, mask_token_id=tok.mask_token_id,
                        attention_mask=batch.attention_mask, t=t, noise_mask=full_noise)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # pad_as_target (to max_length) grows every row's normaliser by the extra padding
    wide = type(train)(train.ids, train.offsets, train.answer_start, max_length=80, pad_id=tok.pad_token_id)
    assert wide.batch([0, 1, 2]).maskable.sum(1).tolist() == [80 - s for s in starts]


def test_longest_as_target_keeps_a_prompt_that_fills_max_length(tmp_path, tok):
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": Q, "output": A}])
    prompt = len(build_instruct(tok, cfg(f, max_length=80))[0].row(0)[0]) - len(
        tok.encode(A + "\n[/Answer]\n\n", add_special_tokens=False))
    kept, _, report = build_instruct(tok, cfg(f, max_length=prompt, padding="longest_as_target"))
    assert len(kept) == 1 and report.truncated_answers == 1 and kept.row(0)[1] == prompt  # no answer left
    with pytest.raises(DiffutronError, match="no usable instruction rows"):
        build_instruct(tok, cfg(f, max_length=prompt))  # pad_as_target needs room for an answer


def test_alpaca_instruction_and_input_are_stripped_each(tmp_path, tok):
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "  Soru sordu. \n", "input": "\n Ankara  ", "output": A}])
    user = {True: "Soru sordu.\n\nAnkara", False: "Soru sordu. \n\n\n Ankara"}
    for strip, text in user.items():
        train, _, _ = build_instruct(tok, cfg(f, alpaca_strip=strip))
        want = tok.apply_chat_template([{"role": "user", "content": text}, {"role": "assistant", "content": A}],
                                       tokenize=False)
        assert train.row(0)[0].tolist() == tok.encode(want, add_special_tokens=False), strip


def test_a_late_system_message_in_chat_rows_is_an_error(tmp_path, tok):
    conv = [{"role": "user", "content": Q}, {"role": "system", "content": "Kısa."},
            {"role": "assistant", "content": A}]
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    with pytest.raises(DiffutronError, match=r"chat.jsonl:1: messages\[1\] is a system message after the first"):
        build_instruct(tok, cfg(f))
