"""serve/protocol.py, tested directly on the pydantic schemas (no server): strict types, unknown
fields refused, OpenAI fields a diffusion LM cannot honour accepted only at their neutral value, the
diffusion extras, message content as text or text parts, defaults, and responses in OpenAI's shape.
Requests are parsed from JSON, as the server does (``model_validate_json``). pydantic is a core
dependency and protocol.py imports nothing of fastapi: no skip without the serve extra."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from diffutron.sampling import REMASKING
from diffutron.serve import protocol as P

MSGS = [{"role": "user", "content": "Çay"}]


def chat(**fields) -> P.ChatCompletionRequest:
    return P.ChatCompletionRequest.model_validate_json(json.dumps({"messages": MSGS, **fields}))


def completion(**fields) -> P.CompletionRequest:
    return P.CompletionRequest.model_validate_json(json.dumps({"prompt": "Çay", **fields}))


def errors(parse, **fields) -> list[tuple[tuple, str, str]]:
    """``(loc, type, msg)`` of every error ``parse(**fields)`` raises."""
    with pytest.raises(ValidationError) as err:
        parse(**fields)
    return [(e["loc"], e["type"], e["msg"]) for e in err.value.errors()]


# ------------------------------------------------------------------------------------ requests
@pytest.mark.parametrize(("field", "value", "kind"), [
    ("max_tokens", "64", "int_type"),
    ("max_tokens", 64.0, "int_type"),
    ("n", True, "int_type"),
    ("seed", 1.0, "int_type"),
    ("steps", "8", "int_type"),
    ("temperature", "0.5", "float_type"),
    ("threshold", "0.9", "float_type"),
    ("stream", 1, "bool_type"),
    ("stream", "true", "bool_type"),
    ("user", 5, "string_type"),
])
def test_types_are_strict(field, value, kind):
    assert [(loc, t) for loc, t, _ in errors(chat, **{field: value})] == [((field,), kind)]


def test_integers_are_numbers_where_a_float_is_asked():
    req = chat(temperature=0, top_p=1, threshold=1, cfg_scale=0, repetition_penalty=1)
    assert (req.temperature, req.top_p, req.threshold, req.cfg_scale, req.repetition_penalty) == (0, 1, 1, 0, 1)


def test_unknown_fields_are_refused_not_ignored():
    assert errors(chat, step=8) == [(("step",), "extra_forbidden", "Extra inputs are not permitted")]
    assert errors(completion, tools=[]) == [(("tools",), "extra_forbidden", "Extra inputs are not permitted")]
    with pytest.raises(ValidationError) as err:
        P.ChatCompletionRequest.model_validate_json(json.dumps(
            {"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]}))
    assert [(e["loc"], e["type"]) for e in err.value.errors()] == [(("messages", 0, "tool_call_id"), "extra_forbidden")]
    assert [(loc, t) for loc, t, _ in errors(chat, stream=True, stream_options={"include_usage": True, "x": 1})] == [
        (("stream_options", "x"), "extra_forbidden")]


def test_defaults_are_none_where_left_out():
    req = chat()
    sampling = ("model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream_options", "user",
                "frequency_penalty", "presence_penalty", "logit_bias", "steps", "block_length", "remasking",
                "threshold", "repetition_penalty", "cfg_scale", "top_k")
    assert all(getattr(req, f) is None for f in sampling)
    assert all(getattr(req, f) is None for f in ("max_completion_tokens", "logprobs", "top_logprobs",
                                                  "response_format", "metadata", "store"))
    assert (req.n, req.stream, req.stops()) == (1, False, [])
    done = completion()
    assert all(getattr(done, f) is None for f in sampling + ("suffix", "best_of", "logprobs"))
    assert (done.n, done.stream, done.echo, done.prompts()) == (1, False, False, ["Çay"])


NEUTRAL_CHAT = [
    {"frequency_penalty": 0}, {"frequency_penalty": 0.0}, {"frequency_penalty": None},
    {"presence_penalty": 0}, {"presence_penalty": -0.0},
    {"logit_bias": {}}, {"logit_bias": None},
    {"logprobs": False}, {"top_logprobs": 0}, {"logprobs": False, "top_logprobs": 0},
    {"response_format": {"type": "text"}}, {"response_format": None},
    {"store": False}, {"store": False, "metadata": {"user": "x"}},
]


@pytest.mark.parametrize("fields", NEUTRAL_CHAT)
def test_openai_chat_fields_are_accepted_at_their_neutral_value(fields):
    req = chat(**fields)
    assert {k: getattr(req, k) for k in fields} == fields


PENALTY = "Value error, is not supported by a diffusion LM: leave it at 0 and use repetition_penalty"


@pytest.mark.parametrize(("fields", "loc", "message"), [
    ({"frequency_penalty": 0.5}, ("frequency_penalty",), PENALTY),
    ({"presence_penalty": -0.1}, ("presence_penalty",), PENALTY),
    ({"logit_bias": {"5": 1.0}}, ("logit_bias",), "Value error, is not supported by this server"),
    ({"logprobs": True}, (), "Value error, logprobs are not supported by this server"),
    ({"top_logprobs": 2}, (), "Value error, logprobs are not supported by this server"),
    ({"store": True}, (), "Value error, store is not supported by this server: it keeps no completions"),
    ({"response_format": {"type": "json_object"}}, (), 'Value error, response_format: only {"type": "text"} is supported'),
    ({"max_tokens": 5, "max_completion_tokens": 6}, (), "Value error, max_tokens and max_completion_tokens differ: give one of them"),
    ({"stream_options": {"include_usage": True}}, (), "Value error, stream_options is only allowed when stream is true"),
])
def test_openai_chat_fields_away_from_neutral_are_refused(fields, loc, message):
    assert errors(chat, **fields) == [(loc, "value_error", message)]


@pytest.mark.parametrize("fields", [{"echo": False}, {"suffix": None}, {"suffix": ""}, {"best_of": 1}, {"best_of": None},
                                    {"logprobs": None}])
def test_openai_completion_fields_are_accepted_at_their_neutral_value(fields):
    req = completion(**fields)
    assert {k: getattr(req, k) for k in fields} == fields


@pytest.mark.parametrize(("fields", "message"), [
    ({"echo": True}, "echo is not supported by this server"),
    ({"suffix": "son"}, "suffix is not supported by this server"),
    ({"best_of": 2}, "best_of is not supported by this server: use n"),
    ({"logprobs": 1}, "logprobs are not supported by this server"),
])
def test_openai_completion_fields_away_from_neutral_are_refused(fields, message):
    assert errors(completion, **fields) == [((), "value_error", f"Value error, {message}")]


def test_max_completion_tokens_is_max_tokens():
    assert chat(max_completion_tokens=12).max_tokens == 12
    assert chat(max_tokens=12, max_completion_tokens=12).max_tokens == 12
    assert chat(max_tokens=7).max_completion_tokens is None


def test_diffusion_extras_are_accepted():
    req = chat(steps=16, block_length=8, remasking="margin", threshold=0.9, repetition_penalty=1.0, cfg_scale=1.5,
               top_k=-1, temperature=0.0, top_p=0.95, seed=P.MAX_SEED, n=128, max_tokens=32, stop=["\n\n", "."])
    assert (req.steps, req.block_length, req.remasking, req.threshold, req.repetition_penalty, req.cfg_scale,
            req.top_k) == (16, 8, "margin", 0.9, 1.0, 1.5, -1)
    assert req.stops() == ["\n\n", "."] and chat(stop="son").stops() == ["son"]
    assert [chat(remasking=r).remasking for r in REMASKING] == list(REMASKING)


@pytest.mark.parametrize(("field", "value", "kind"), [
    ("steps", 0, "greater_than_equal"), ("block_length", 0, "greater_than_equal"), ("threshold", 0, "greater_than"),
    ("threshold", 1.5, "less_than_equal"), ("repetition_penalty", 0, "greater_than"), ("cfg_scale", 101, "less_than_equal"),
    ("top_k", -2, "greater_than_equal"), ("remasking", "best", "literal_error"), ("n", 129, "less_than_equal"),
    ("seed", P.MAX_SEED + 1, "less_than_equal"), ("temperature", 2.5, "less_than_equal"), ("top_p", 0, "greater_than"),
])
def test_absolute_ranges(field, value, kind):
    assert [(loc, t) for loc, t, _ in errors(chat, **{field: value})] == [((field,), kind)]


def test_stop_strings():
    assert errors(chat, stop=["a"] * 5) == [(("stop",), "value_error", "Value error, at most 4 stop strings")]
    for bad in ("", ["ok", ""], ["x" * 257]):
        assert errors(chat, stop=bad) == [
            (("stop",), "value_error", "Value error, each stop string must have 1 to 256 characters")]
    assert chat(stop=["x" * 256] * 4).stops() == ["x" * 256] * 4


def test_message_content_is_text_or_a_list_of_text_parts():
    parts = [{"type": "text", "text": "Başkent"}, {"type": "text", "text": "neresi?"}]
    req = P.ChatCompletionRequest.model_validate_json(json.dumps({"messages": [
        {"role": "developer", "content": "Kısa cevap ver."}, {"role": "user", "content": parts, "name": "ali"}]}))
    system, user = req.messages
    assert system.text() == "Kısa cevap ver." and user.text() == "Başkent\nneresi?" and user.name == "ali"
    assert [m.as_dict() for m in req.messages] == [{"role": "system", "content": "Kısa cevap ver."},
                                                   {"role": "user", "content": "Başkent\nneresi?"}]
    assert isinstance(user.content[0], P.TextPart)
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    with pytest.raises(ValidationError):
        P.ChatCompletionRequest.model_validate_json(json.dumps(image))
    for bad in ({"messages": []}, {"messages": [{"role": "tool", "content": "x"}]}, {}):
        with pytest.raises(ValidationError) as err:
            P.ChatCompletionRequest.model_validate_json(json.dumps(bad))
        assert err.value.errors()[0]["loc"][0] == "messages"


def test_completion_prompts():
    assert completion(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert errors(completion, prompt=[]) == [(("prompt",), "value_error", "Value error, give 1 to 128 prompts")]
    assert errors(completion, prompt=["a"] * 129)[0][2] == "Value error, give 1 to 128 prompts"
    assert {loc[0] for loc, _, _ in errors(completion, prompt=[1, 2])} == {"prompt"}  # token ids: not text


# ----------------------------------------------------------------------------------- responses
USAGE = P.Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)


def test_chat_completion_serialises_to_openais_shape():
    resp = P.ChatCompletionResponse(id="chatcmpl-1", created=1700000000, model="tiny", usage=USAGE, choices=[
        P.ChatChoice(index=0, message=P.ChatMessageOut(content="Ankara."), finish_reason="stop")])
    assert resp.model_dump() == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Ankara."}, "finish_reason": "stop",
                     "logprobs": None}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    with pytest.raises(ValidationError):
        P.ChatChoice(index=0, message=P.ChatMessageOut(content="x"), finish_reason="tool_calls")


def test_chat_chunks_leave_out_what_is_not_set():
    first = P.ChatCompletionChunk(id="c", created=1, model="tiny", choices=[
        P.ChatChunkChoice(index=0, delta=P.DeltaMessage(role="assistant", content=""))])
    assert first.model_dump() == {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
                                  "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "finish_reason": None, "logprobs": None}]}
    state = P.Denoising(step=2, block=0, block_length=4, masked=2, tokens=["Ankara", None, None, ""])
    last = P.ChatCompletionChunk(id="c", created=1, model="tiny", usage=USAGE, choices=[
        P.ChatChunkChoice(index=1, delta=P.DeltaMessage(), finish_reason="length", denoising=state)])
    dumped = last.model_dump()
    assert dumped["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert dumped["choices"] == [{"index": 1, "delta": {}, "finish_reason": "length", "logprobs": None,
                                  "denoising": {"step": 2, "block": 0, "block_length": 4, "masked": 2,
                                                "tokens": ["Ankara", None, None, ""]}}]


def test_completion_models_and_errors_serialise_to_openais_shape():
    resp = P.CompletionResponse(id="cmpl-1", created=5, model="tiny", choices=[
        P.CompletionChoice(index=0, text=" Ankara", finish_reason="stop")])
    assert resp.model_dump() == {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "tiny",
                                 "choices": [{"index": 0, "text": " Ankara", "finish_reason": "stop", "logprobs": None}]}
    card = P.ModelCard(id="tiny", created=5, max_model_len=128, diffusion_defaults={"steps": 64}, limits={"max_n": 4})
    assert P.ModelList(data=[card]).model_dump() == {"object": "list", "data": [{
        "id": "tiny", "object": "model", "created": 5, "owned_by": "diffutron", "max_model_len": 128,
        "diffusion_defaults": {"steps": 64}, "limits": {"max_n": 4}}]}
    err = P.ErrorResponse(error=P.ErrorInfo(message="bad", type="invalid_request_error", param="n"))
    assert err.model_dump() == {"error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}}
