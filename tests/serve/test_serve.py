"""The OpenAI-compatible server, end to end: a real uvicorn server on a free loopback port,
driven by the official ``openai`` client (and raw HTTP for what a client library hides).

The server must answer exactly as ``DiffusionLM.generate`` does with the same settings and
seed, whether a request runs alone, batched with others, streamed or not.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser

import httpx
import pytest

from diffutron.sampling.engine import Engine, supports
from diffutron.serve import Limits, create_app, serve_in_thread
from diffutron.serve.scheduler import stable_text
from diffutron.tiny import tiny_lm

openai = pytest.importorskip("openai")

CHAT = "Türkiye'nin başkenti neresidir?"
PROMPTS = [
    "Türkiye'nin başkenti neresidir?",
    "Kitap okumak insanın ufkunu genişletir mi?",
    "Çay",
    "İstanbul Boğazı iki kıtayı birbirine bağlar. Bugün hava çok güzel, parkta yürüyüş yaptık.",
    "Öğretmen öğrencilere yeni bir soru sordu.",
    "Kışın dağlara kar yağar",
    "Iğdır ve Ağrı doğu illerimizdendir. spor magazin siyaset sağlık ekonomi haber",
    "Yapay zekâ modelleri metin üretebilir ve soruları yanıtlayabilir.",
]


class Recording:
    """The model as the server sees it, recording every whole sampler batch it runs (``outputs``:
    settings the engine cannot run) and every row its engines decode (``rows``, as added: the
    server's continuous batching)."""

    def __init__(self, lm, delay: float = 0.0):
        self._lm = lm
        self.outputs = []
        self.rows = []
        self.engines = {}
        self.delay = delay  # seconds per sampler step: a slow model, to test what happens meanwhile

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def generate_ids(self, token_lists, config, *, callback=None, **kwargs):
        def slow(step, canvas):
            time.sleep(self.delay)
            return callback(step, canvas) if callback else None

        out = self._lm.generate_ids(token_lists, config, callback=slow if self.delay else callback, **kwargs)
        self.outputs.append(out)
        return out

    def engine_for(self, config, token_lists=()):
        """The engine the server decodes on (as ``DiffusionLM.engine_for`` of a compiled model):
        a plain one that records its rows and sleeps ``delay`` per step."""
        if supports(config, token_lists, self._lm.mask_token_id) is not None:
            return None
        key = config.replace(seed=0)
        if key not in self.engines:
            lm = self._lm
            self.engines[key] = RecordingEngine(self, lm.model, key, mask_token_id=lm.mask_token_id,
                                                eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id,
                                                max_batch=128, graphs=False)
        return self.engines[key]

    def before_block(self):
        pass


class RecordingEngine(Engine):
    def __init__(self, rec, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rec = rec
        self.blocks = []  # the rows that decoded each block, in order

    def add(self, *args, **kwargs):
        row = super().add(*args, **kwargs)
        self.rec.rows.append(row)
        return row

    def step_block(self, callback=None):
        self.rec.before_block()
        self.blocks.append(list(self.active))
        delay = self.rec.delay
        if not delay:
            return super().step_block(callback)

        def slow(step, rows, host):
            time.sleep(delay)
            return callback(step, rows, host) if callback else None

        return super().step_block(slow)


@pytest.fixture(scope="module")
def lm():
    # The default tiny random model writes long, varied (meaningless) answers: what streaming,
    # stop strings and batching need to be tested on.
    return tiny_lm()


@pytest.fixture(scope="module")
def rec(lm):
    return Recording(lm)


@pytest.fixture(scope="module")
def base(rec):
    app = create_app(rec, served_model_name="tiny", limits=Limits(max_batch_size=16, max_queue=256, batch_wait_ms=20),
                     max_request_bytes=64 * 1024)
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def http(base):
    with httpx.Client(base_url=base, timeout=60) as h:
        yield h


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


def solo(lm, prompt, *, chat=True, **settings):
    """What the library answers for one prompt alone."""
    return lm.generate(prompt, chat=chat, **settings)[0]


def health(http):
    return http.get("/health").json()


# --------------------------------------------------------------------------------- basics
def test_models_and_health(client, http, base, lm):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    card = models[0].model_dump()
    assert card["max_model_len"] == lm.context_length
    assert card["diffusion_defaults"]["block_length"] == 32 and card["diffusion_defaults"]["repetition_penalty"] == 1.2
    assert client.models.retrieve("tiny").id == "tiny"
    h = health(http)
    assert h["status"] == "ok" and h["model"] == "tiny"


def test_chat_matches_the_library(client, lm):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": CHAT}], seed=7,
                                       max_tokens=40)
    ref = solo(lm, CHAT, seed=7, max_new_tokens=40, steps=40)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ("stop" if ref.finish_reason == "stop" else "length")
    assert r.usage.prompt_tokens == ref.prompt_tokens
    assert r.usage.completion_tokens == ref.completion_tokens
    assert r.usage.total_tokens == ref.prompt_tokens + ref.completion_tokens


def test_defaults_are_the_papers(client, lm):
    """No settings at all: the paper's (64 tokens, 64 steps, block 32, T 0.1, penalty 1.2)."""
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": CHAT}], seed=3)
    assert r.choices[0].message.content == solo(lm, CHAT, seed=3).text


def test_multi_turn_system_and_diffusion_settings(client, lm):
    messages = [{"role": "system", "content": "Kısa cevap ver."}, {"role": "user", "content": "Çay nasıl?"},
                {"role": "assistant", "content": "Çay bahçesinde"}, {"role": "user", "content": [
                    {"type": "text", "text": "Kitap okumak"}]}]
    extra = dict(steps=12, block_length=8, remasking="margin", threshold=0.5, repetition_penalty=1.1,
                 cfg_scale=0.5)
    r = client.chat.completions.create(model="tiny", messages=messages, seed=11, max_tokens=24, temperature=0,
                                       top_p=0.9, extra_body=dict(extra, top_k=5))
    msgs = [dict(m, content="Kitap okumak") if isinstance(m["content"], list) else m for m in messages]
    ref = solo(lm, msgs, seed=11, max_new_tokens=24, temperature=0.0, top_p=0.9, top_k=5, **extra)
    assert r.choices[0].message.content == ref.text


def test_completions_are_raw_continuations(client, lm):
    prompts = ["Kitap okumak insanın", "Çay bahçesinde arkadaşlarımızla"]
    r = client.completions.create(model="tiny", prompt=prompts, n=2, seed=5, max_tokens=16)
    assert r.object == "text_completion" and len(r.choices) == 4
    # choice i = prompt i // n with seed + i, exactly as the library's rows
    refs = lm.generate([prompts[0], prompts[0], prompts[1], prompts[1]], chat=False, seed=5, max_new_tokens=16,
                       steps=16)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [x.text for x in refs]
    assert r.usage.prompt_tokens == refs[0].prompt_tokens + refs[2].prompt_tokens


def test_n_answers_use_consecutive_seeds(client, lm):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": CHAT}], n=3, seed=20,
                                       max_tokens=16, temperature=1.0)
    assert [c.message.content for c in r.choices] == [solo(lm, CHAT, seed=s, max_new_tokens=16, steps=16, temperature=1.0).text
                                                      for s in (20, 21, 22)]
    assert len({c.message.content for c in r.choices}) > 1


def test_seed_omitted_is_random_and_given_seed_reproduces(client):
    ask = dict(model="tiny", messages=[{"role": "user", "content": CHAT}], max_tokens=16, temperature=1.0)
    a, b = (client.chat.completions.create(seed=9, **ask).choices[0].message.content for _ in range(2))
    assert a == b
    free = {client.chat.completions.create(**ask).choices[0].message.content for _ in range(3)}
    assert len(free) > 1


# --------------------------------------------------------------------------------- streaming
def _stream_chat(client, **kw):
    text, chunks = "", []
    for ch in client.chat.completions.create(**{"model": "tiny", **kw}, stream=True):
        chunks.append(ch)
        for c in ch.choices:
            text += c.delta.content or ""
    return text, chunks


@pytest.mark.parametrize("settings", [
    dict(seed=1, max_tokens=64),
    dict(seed=2, max_tokens=50, extra_body=dict(block_length=8, steps=25)),
    dict(seed=3, max_tokens=48, temperature=0, extra_body=dict(threshold=0.3, block_length=16)),
    dict(seed=4, max_tokens=40, temperature=1.5, extra_body=dict(remasking="random", repetition_penalty=1.0)),
])
def test_streamed_text_is_the_final_answer(client, settings):
    messages = [{"role": "user", "content": CHAT}]
    full = client.chat.completions.create(model="tiny", messages=messages, **settings)
    text, chunks = _stream_chat(client, messages=messages, stream_options={"include_usage": True}, **settings)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(ch.id == chunks[0].id and ch.object == "chat.completion.chunk" for ch in chunks)


def test_stream_with_n_answers(client, lm):
    texts, finished = ["", ""], [None, None]
    for ch in client.chat.completions.create(model="tiny", messages=_msgs(CHAT), n=2, seed=30, max_tokens=24,
                                             temperature=1.0, stream=True):
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            finished[c.index] = c.finish_reason or finished[c.index]
    assert texts == [solo(lm, CHAT, seed=s, max_new_tokens=24, steps=24, temperature=1.0).text for s in (30, 31)]
    assert None not in finished


def test_stream_sends_each_block_as_soon_as_it_is_final(http, base, lm):
    """With the denoising events interleaved, text of block 0 arrives before block 1 is decoded."""
    body = dict(messages=[{"role": "user", "content": CHAT}], stream=True, seed=1, max_tokens=64, temperature=0,
                repetition_penalty=2.0, stream_options={"include_denoising": True})
    events = _sse(http, "/v1/chat/completions", body)
    order = []
    for ev in events:
        for c in ev.get("choices", []):
            if "denoising" in c:
                order.append(("state", c["denoising"]))
            elif c["delta"].get("content"):
                order.append(("text", c["delta"]["content"]))
    first_block1 = next(i for i, (kind, x) in enumerate(order) if kind == "state" and x["block"] == 1)
    early = "".join(x for kind, x in order[:first_block1] if kind == "text")
    assert early, "nothing was streamed before the second block started"
    contents = [x for kind, x in order if kind == "text"]
    assert len(contents) >= 2


def test_denoising_stream_shows_every_state(http, base, lm):
    body = dict(messages=[{"role": "user", "content": CHAT}], stream=True, seed=5, max_tokens=40, steps=40,
                block_length=16, stream_options={"include_denoising": True, "include_usage": True})
    events = _sse(http, "/v1/chat/completions", body)
    states = [c["denoising"] for ev in events for c in ev.get("choices", []) if "denoising" in c]
    assert states[0]["masked"] == 39 and len(states[0]["tokens"]) == 40  # one token per step
    assert len(states) >= 3 and states[-1]["masked"] == 0
    assert all(s["block_length"] == 16 for s in states)
    assert [s["step"] for s in states] == list(range(1, len(states) + 1))
    for prev, cur in zip(states, states[1:]):
        assert cur["masked"] <= prev["masked"] and cur["block"] >= prev["block"]
        for a, b in zip(prev["tokens"], cur["tokens"]):
            if a is not None:  # committed tokens never change (the tail after a stop may turn to padding)
                assert b == a or b == "", (a, b)
    # blocks are decoded left to right: no slot of a later block fills before the earlier one is done
    for s in states:
        first_mask = next((i for i, t in enumerate(s["tokens"]) if t is None), len(s["tokens"]))
        assert all(t is None for t in s["tokens"][(first_mask // 16 + 1) * 16:])
    text = "".join(c["delta"].get("content", "") for ev in events for c in ev.get("choices", []) if "delta" in c)
    assert text == solo(lm, CHAT, seed=5, max_new_tokens=40, steps=40, block_length=16).text


def test_completion_stream(client, lm):
    text, n = "", 0
    for ch in client.completions.create(model="tiny", prompt="Kitap okumak", stream=True, seed=8, max_tokens=32):
        assert ch.object == "text_completion"
        text += ch.choices[0].text
        n += 1
    assert text == solo(lm, "Kitap okumak", chat=False, seed=8, max_new_tokens=32, steps=32).text and n >= 3


def test_stop_strings_cut_at_token_level(client, lm):
    ref = solo(lm, CHAT, seed=13, max_new_tokens=48, steps=48)
    ids = ref.token_ids
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])  # a word that first appears at i
    word = lm.tokenizer.decode([ids[k]])
    expected = lm.decode(ids[:k])
    ask = dict(model="tiny", messages=[{"role": "user", "content": CHAT}], seed=13, max_tokens=48, stop=[word, "Evet Hayır"])
    r = client.chat.completions.create(**ask)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == k
    text, chunks = _stream_chat(client, **ask)
    assert text == expected and chunks[-1].choices[0].finish_reason == "stop"


# --------------------------------------------------------------------------------- batching
def test_concurrent_requests_are_batched_and_match_solo_runs(http, base, client, lm, rec):
    before = health(http)["stats"]
    settings = dict(max_tokens=24)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(client.chat.completions.create, model="tiny", seed=100 + i,
                               messages=[{"role": "user", "content": p}], **settings)
                   for i, p in enumerate(PROMPTS)]
        got = [f.result().choices[0].message.content for f in futures]
    refs = [solo(lm, p, seed=100 + i, max_new_tokens=24, steps=24).text for i, p in enumerate(PROMPTS)]
    assert got == refs
    after = health(http)["stats"]
    assert after["batches"] - before["batches"] < len(PROMPTS), "no two requests shared a batch"
    assert after["max_batch_rows"] > 1


def test_incompatible_settings_are_not_merged(client, lm):
    """Different max_tokens / steps never share a batch (that would change the answers)."""
    asks = [dict(max_tokens=16, seed=1), dict(max_tokens=24, seed=1), dict(max_tokens=16, seed=1, extra_body={"steps": 8})]
    with ThreadPoolExecutor(len(asks)) as pool:
        futures = [pool.submit(client.chat.completions.create, model="tiny",
                               messages=[{"role": "user", "content": CHAT}], **a) for a in asks]
        got = [f.result().choices[0].message.content for f in futures]
    assert got == [solo(lm, CHAT, seed=1, max_new_tokens=16, steps=16).text,
                   solo(lm, CHAT, seed=1, max_new_tokens=24, steps=24).text,
                   solo(lm, CHAT, seed=1, max_new_tokens=16, steps=8).text]


def test_load_32_concurrent_streaming_clients(http, base, lm):
    n = 32
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]

    async def one(aclient, i):
        text, finish = "", None
        stream = await aclient.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompts[i]}], seed=1000 + i, max_tokens=32,
            stream=True)
        async for ch in stream:
            for c in ch.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        return text, finish

    async def run():
        aclient = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(aclient, i) for i in range(n)), return_exceptions=True), 60)
        finally:
            await aclient.close()

    before = health(http)["stats"]
    t0 = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - t0
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], errors[:3]
    config = lm.defaults.replace(max_new_tokens=32, steps=32, seed=tuple(1000 + i for i in range(n)))
    refs = lm.generate(prompts, config)  # per-row seeds: each row as it would be alone
    assert [t for t, _ in results] == [r.text for r in refs]
    assert all(f in ("stop", "length") for _, f in results)
    after = health(http)["stats"]
    assert after["max_batch_rows"] >= 8 and after["batches"] - before["batches"] <= n // 2
    print(f"32 streaming clients: {elapsed:.2f} s, {after['batches'] - before['batches']} batches")


# --------------------------------------------------------------------------------- disconnects
@pytest.fixture
def slow(rec):
    rec.delay = 0.01
    yield rec
    rec.delay = 0.0


def test_a_client_that_disconnects_frees_its_rows(http, base, slow):
    rec = slow
    body = dict(messages=[{"role": "user", "content": CHAT}], stream=True, max_tokens=100, seed=1, block_length=8)
    cancelled = health(http)["stats"]["cancelled"]
    n_rows = len(rec.rows)
    with httpx.Client(timeout=30) as own:  # its own connection, to hang up
        with own.stream("POST", base + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    break  # the first real text: some blocks are done; now hang up
    deadline = time.monotonic() + 10
    while (rec.rows[n_rows].done is None or health(http)["running_rows"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    row = rec.rows[n_rows]
    assert row.done == "cancelled"
    assert row.block < len(row.blocks) - 1, "the sampler kept decoding a row nobody reads"
    assert health(http)["stats"]["cancelled"] == cancelled + 1


def test_a_non_streaming_client_that_gives_up_is_cancelled(http, base, slow):
    rec = slow
    cancelled = health(http)["stats"]["cancelled"]
    n_rows = len(rec.rows)
    body = dict(messages=[{"role": "user", "content": CHAT}], max_tokens=100, seed=2, block_length=4)
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=0.2))
    deadline = time.monotonic() + 10
    while health(http)["stats"]["cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health(http)["stats"]["cancelled"] == cancelled + 1
    while (rec.rows[n_rows].done is None or health(http)["running_rows"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    row = rec.rows[n_rows]
    assert row.done == "cancelled" and row.block < len(row.blocks) - 1  # stopped at a block boundary


# --------------------------------------------------------------------------------- continuous batching
LONG = dict(max_tokens=48, extra_body=dict(steps=48, block_length=8))  # 6 blocks of 8 steps


def _started(rec, n_rows, blocks=1, timeout=10.0):
    """Wait until the row added after ``n_rows`` has decoded ``blocks`` blocks; returns it."""
    deadline = time.monotonic() + timeout
    while (len(rec.rows) <= n_rows or rec.rows[n_rows].block < blocks) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(rec.rows) > n_rows and rec.rows[n_rows].block >= blocks, "the first request never ran"
    return rec.rows[n_rows]


def _blocks_with(rec, row):
    """Indices of the blocks (of its engine) that decoded ``row``, and that engine."""
    engine = next(e for e in rec.engines.values() if any(row in b for b in e.blocks))
    return [i for i, b in enumerate(engine.blocks) if row in b], engine


def test_a_request_joins_a_running_batch_at_a_block_boundary(http, client, lm, slow):
    """B arrives while A decodes: it joins A's batch at the next block boundary (not when A ends),
    answers exactly as alone, and, ending early at its stop string, is done long before A."""
    rec = slow
    ref_b = solo(lm, PROMPTS[1], seed=41, max_new_tokens=48, steps=48, block_length=8)
    word = lm.tokenizer.decode([ref_b.token_ids[2]])  # B's third token, new there: B ends in its first block
    before, n_rows, finished = health(http)["stats"], len(rec.rows), {}

    def ask(name, prompt, seed, **kw):
        r = client.chat.completions.create(model="tiny", messages=_msgs(prompt), seed=seed, **LONG, **kw)
        finished[name] = time.monotonic()
        return r

    with ThreadPoolExecutor(2) as pool:
        fa = pool.submit(ask, "a", CHAT, 40)
        row_a = _started(rec, n_rows)  # A has decoded a block
        fb = pool.submit(ask, "b", PROMPTS[1], 41, stop=[word])
        a, b = fa.result(), fb.result()
    assert finished["b"] < finished["a"]
    assert a.choices[0].message.content == solo(lm, CHAT, seed=40, max_new_tokens=48, steps=48, block_length=8).text
    assert b.choices[0].message.content == lm.decode(ref_b.token_ids[:2]) and b.choices[0].finish_reason == "stop"
    row_b = rec.rows[n_rows + 1]
    blocks_a, engine = _blocks_with(rec, row_a)
    blocks_b, _ = _blocks_with(rec, row_b)
    assert blocks_a[0] < blocks_b[0] <= blocks_a[-1]  # B decoded next to A, A already some blocks in
    assert all(row_a in engine.blocks[i] for i in blocks_b) and len(blocks_b) == 1
    h = health(http)
    after = h["stats"]
    assert after["joined_running"] - before["joined_running"] == 1
    assert after["batches"] - before["batches"] == 1 and after["whole_batches"] == before["whole_batches"]
    assert h["running_rows"] == 0 and h["max_batch_size"] == 16 and h["compiled"] is False


def test_a_stream_that_joins_a_running_batch_sees_every_step(http, base, client, lm, slow):
    """Streamed into a running batch: text deltas build the final answer, one denoising state per step."""
    rec = slow
    n_rows = len(rec.rows)
    with ThreadPoolExecutor(1) as pool:
        fa = pool.submit(client.chat.completions.create, model="tiny", messages=_msgs(CHAT), seed=50, **LONG)
        _started(rec, n_rows)
        body = dict(messages=_msgs(PROMPTS[2]), stream=True, seed=51, max_tokens=48, steps=48, block_length=8,
                    stream_options={"include_denoising": True})
        events = _sse(http, "/v1/chat/completions", body)
        a = fa.result()
    assert a.choices[0].message.content == solo(lm, CHAT, seed=50, max_new_tokens=48, steps=48, block_length=8).text
    ref = solo(lm, PROMPTS[2], seed=51, max_new_tokens=48, steps=48, block_length=8)
    deltas = [c["delta"]["content"] for ev in events for c in ev.get("choices", []) if c.get("delta", {}).get("content")]
    assert "".join(deltas) == ref.text and len(deltas) >= 2  # pieces as blocks become final, not all at the end
    states = [c["denoising"] for ev in events for c in ev.get("choices", []) if "denoising" in c]
    assert [s["step"] for s in states] == list(range(1, len(states) + 1))
    assert states[0]["masked"] == 47  # one token per step, every step shown
    assert all(b["masked"] == a["masked"] - 1 for a, b in zip(states[:-2], states[1:-1]))
    assert states[-1]["masked"] == 0
    blocks_b, _ = _blocks_with(rec, rec.rows[n_rows + 1])
    assert rec.rows[n_rows] in _blocks_with(rec, rec.rows[n_rows])[1].blocks[blocks_b[0]]  # it joined A's batch


def test_a_joined_row_that_is_cancelled_leaves_the_others_alone(http, base, client, lm, slow):
    rec = slow
    before, n_rows = health(http)["stats"], len(rec.rows)
    with ThreadPoolExecutor(1) as pool:
        fa = pool.submit(client.chat.completions.create, model="tiny", messages=_msgs(CHAT), seed=60, **LONG)
        row_a = _started(rec, n_rows)
        body = dict(messages=_msgs(PROMPTS[3]), stream=True, seed=61, max_tokens=48, steps=48, block_length=8)
        with httpx.Client(timeout=30) as own, own.stream("POST", base + "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    break  # the first text: hang up
        a = fa.result()
    row_b = rec.rows[n_rows + 1]
    assert row_b.done == "cancelled" and row_b.block < len(row_b.blocks) - 1
    assert row_a.done in ("stop", "length")
    assert a.choices[0].message.content == solo(lm, CHAT, seed=60, max_new_tokens=48, steps=48, block_length=8).text
    deadline = time.monotonic() + 5
    while health(http)["running_rows"] and time.monotonic() < deadline:
        time.sleep(0.02)
    after = health(http)
    assert after["running_rows"] == 0 and after["stats"]["cancelled"] == before["cancelled"] + 1


def test_settings_the_engine_cannot_run_are_served_whole(http, client, lm, rec):
    """Masks inside a prompt (infilling) and the delayed cache run on the eager sampler, as a whole batch."""
    before, n_out = health(http)["stats"], len(rec.outputs)
    prompt = "Çay [MASK] bahçesinde"
    r = client.completions.create(model="tiny", prompt=prompt, seed=3, max_tokens=8)
    assert r.choices[0].text == solo(lm, prompt, chat=False, seed=3, max_new_tokens=8, steps=8).text
    assert len(rec.outputs) == n_out + 1
    after = health(http)["stats"]
    assert after["whole_batches"] == before["whole_batches"] + 1 and after["batches"] == before["batches"] + 1

    delayed = tiny_lm().use_cache("delayed")
    served = Recording(delayed)
    with serve_in_thread(create_app(served, served_model_name="tiny")) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda s: c.chat.completions.create(model="tiny", messages=_msgs(CHAT), seed=s,
                                                                     max_tokens=16).choices[0].message.content, (1, 2)))
    assert got == [solo(delayed, CHAT, seed=s, max_new_tokens=16, steps=16).text for s in (1, 2)]
    assert served.outputs and not served.rows


def test_fifo_a_batch_stops_taking_rows_when_older_requests_need_other_settings(http, client, lm, slow):
    """A runs; B (other settings) then C (A's settings) arrive. C must not pass B by joining A's batch:
    A's batch drains, B's runs, then C's."""
    rec = slow
    before, n_rows, finished = health(http)["stats"], len(rec.rows), {}

    def ask(name, seed, **kw):
        r = client.chat.completions.create(model="tiny", messages=_msgs(CHAT), seed=seed, **kw)
        finished[name] = time.monotonic()
        return r.choices[0].message.content

    with ThreadPoolExecutor(3) as pool:
        fa = pool.submit(ask, "a", 70, **LONG)
        row_a = _started(rec, n_rows)
        fb = pool.submit(ask, "b", 71, max_tokens=16, extra_body=dict(steps=16, block_length=8))
        deadline = time.monotonic() + 5
        while health(http)["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        fc = pool.submit(ask, "c", 72, **LONG)
        got = [f.result() for f in (fa, fb, fc)]
    assert finished["a"] < finished["b"] < finished["c"]
    assert got == [solo(lm, CHAT, seed=70, max_new_tokens=48, steps=48, block_length=8).text,
                   solo(lm, CHAT, seed=71, max_new_tokens=16, steps=16, block_length=8).text,
                   solo(lm, CHAT, seed=72, max_new_tokens=48, steps=48, block_length=8).text]
    row_c = rec.rows[-1]
    assert not set(_blocks_with(rec, row_a)[0]) & set(_blocks_with(rec, row_c)[0])  # never decoded together
    after = health(http)["stats"]
    assert after["joined_running"] == before["joined_running"] and after["batches"] == before["batches"] + 3


def test_shutdown_cancels_running_rows_and_fails_queued_requests(lm):
    from diffutron.serve.scheduler import Failed, Finished, Job, Scheduler

    rec = Recording(lm, delay=0.01)
    config = lm.defaults.replace(max_new_tokens=48, steps=48, block_length=8, stop_at_eos=True, seed=0)
    toks = lm.encode(lm.render(CHAT))

    async def run():
        s = Scheduler(rec, max_batch_size=1, batch_wait_s=0)
        await s.start()
        running, queued = Job([toks], [1], config, stream=True), Job([toks], [2], config)
        s.submit(running)
        s.submit(queued)
        while not rec.rows or rec.rows[0].block < 1:
            await asyncio.sleep(0.005)
        await s.stop()
        await asyncio.sleep(0.05)  # events the sampler threads posted meanwhile
        events = []
        while not running.events.empty():
            events.append(running.events.get_nowait())
        return events, queued.events.get_nowait(), s

    events, queued_event, s = asyncio.run(run())
    assert isinstance(queued_event, Failed) and "shutting down" in str(queued_event.error)
    last = events[-1]
    assert isinstance(last, (Failed, Finished)) and sum(isinstance(e, (Failed, Finished)) for e in events) == 1
    assert rec.rows[0].done in (None, "cancelled") and rec.rows[0].block < len(rec.rows[0].blocks) - 1
    assert s.running_rows == 0 and not next(iter(rec.engines.values())).rows  # the engine is free again


# --------------------------------------------------------------------------------- bad input
def _msgs(text="Çay"):
    return [{"role": "user", "content": text}]


BAD = [
    # (case, body, status, param)
    ("malformed JSON", b'{"messages": [', 400, None),
    ("empty body", b"", 400, None),
    ("not an object", b"[1, 2]", 422, None),
    ("messages not a list", {"messages": "hi"}, 422, "messages"),
    ("max_tokens as a string", {"messages": _msgs(), "max_tokens": "64"}, 422, "max_tokens"),
    ("temperature as a string", {"messages": _msgs(), "temperature": "hot"}, 422, "temperature"),
    ("stream as a string", {"messages": _msgs(), "stream": "yes"}, 422, "stream"),
    ("unknown model", {"model": "gpt-4o", "messages": _msgs()}, 404, "model"),
    ("model as a path", {"model": "/etc/passwd", "messages": _msgs()}, 404, "model"),
    ("model as a hub id", {"model": "diffutron/DiffutronLM-0.3B-Instruct", "messages": _msgs()}, 404, "model"),
    ("no messages", {"messages": []}, 422, "messages"),
    ("missing messages", {"max_tokens": 5}, 422, "messages"),
    ("empty user text", {"messages": _msgs("   ")}, 422, "messages"),
    ("only a system message", {"messages": [{"role": "system", "content": "x"}]}, 422, "messages"),
    ("unknown role", {"messages": [{"role": "tool", "content": "x"}]}, 422, "messages.0.role"),
    ("content not text", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 422, None),
    ("negative max_tokens", {"messages": _msgs(), "max_tokens": -5}, 422, "max_tokens"),
    ("zero max_tokens", {"messages": _msgs(), "max_tokens": 0}, 422, "max_tokens"),
    ("huge max_tokens", {"messages": _msgs(), "max_tokens": 10**9}, 422, "max_tokens"),
    ("astronomic max_tokens", {"messages": _msgs(), "max_tokens": 2**80}, 422, "max_tokens"),
    ("zero steps", {"messages": _msgs(), "steps": 0}, 422, "steps"),
    ("too many steps", {"messages": _msgs(), "steps": 10**6}, 422, "steps"),
    ("negative temperature", {"messages": _msgs(), "temperature": -1}, 422, "temperature"),
    ("temperature too high", {"messages": _msgs(), "temperature": 5}, 422, "temperature"),
    ("NaN temperature", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 422, "temperature"),
    ("top_p zero", {"messages": _msgs(), "top_p": 0}, 422, "top_p"),
    ("threshold over 1", {"messages": _msgs(), "threshold": 1.5}, 422, "threshold"),
    ("unknown remasking", {"messages": _msgs(), "remasking": "best"}, 422, "remasking"),
    ("block_length zero", {"messages": _msgs(), "block_length": 0}, 422, "block_length"),
    ("negative cfg", {"messages": _msgs(), "cfg_scale": -1}, 422, "cfg_scale"),
    ("n zero", {"messages": _msgs(), "n": 0}, 422, "n"),
    ("n over the limit", {"messages": _msgs(), "n": 100}, 422, "n"),
    ("negative seed", {"messages": _msgs(), "seed": -1}, 422, "seed"),
    ("five stop strings", {"messages": _msgs(), "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ("empty stop string", {"messages": _msgs(), "stop": ""}, 422, "stop"),
    ("unmatchable stop string", {"messages": _msgs(), "stop": "qqqzzz"}, 422, "stop"),
    ("typo in a field", {"messages": _msgs(), "stepz": 8}, 422, "stepz"),
    ("tools", {"messages": _msgs(), "tools": [{"type": "function"}]}, 422, "tools"),
    ("logprobs", {"messages": _msgs(), "logprobs": True}, 422, None),
    ("frequency_penalty", {"messages": _msgs(), "frequency_penalty": 0.5}, 422, "frequency_penalty"),
    ("stream_options without stream", {"messages": _msgs(), "stream_options": {"include_usage": True}}, 422, None),
    ("prompt over the limit", {"messages": _msgs("Çay " * 300)}, 413, "messages"),
    ("prompt + max_tokens over the context", {"messages": _msgs("Çay " * 60), "max_tokens": 100}, 413, "max_tokens"),
    ("body over the byte limit", {"messages": _msgs("x" * 70_000)}, 413, None),
]


@pytest.mark.parametrize("case,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_requests_get_openai_errors(http, base, case, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err
    assert "Traceback" not in r.text and 'File "' not in r.text


BAD_COMPLETIONS = [
    ("no prompt", {}, 422),
    ("empty prompt list", {"prompt": []}, 422),
    ("prompt as a number", {"prompt": 5}, 422),
    ("token-id prompt", {"prompt": [1, 2, 3]}, 422),
    ("blank prompt", {"prompt": "  "}, 422),
    ("echo", {"prompt": "Çay", "echo": True}, 422),
    ("best_of", {"prompt": "Çay", "best_of": 3}, 422),
    ("too many answers", {"prompt": ["Çay"] * 10, "n": 2}, 422),
]


@pytest.mark.parametrize("case,body,status", BAD_COMPLETIONS, ids=[b[0] for b in BAD_COMPLETIONS])
def test_bad_completion_requests(http, base, case, body, status):
    r = http.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_routes_methods_and_leniency(http, base, lm):
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert http.get("/v1/models/other").status_code == 404
    for path in ("/static/../../pyproject.toml", "/static/%2e%2e%2fapp.py", "/static/index.html", "/static/x.js"):
        assert http.get(path).status_code == 404, path
    # curl -d without a content type still works; neutral OpenAI fields are accepted
    body = {"messages": _msgs(), "max_tokens": 4, "seed": 1, "frequency_penalty": 0, "presence_penalty": 0,
            "logprobs": False, "user": "u1", "response_format": {"type": "text"}, "max_completion_tokens": 4}
    r = http.post("/v1/chat/completions", content=json.dumps(body).encode(),
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == solo(lm, "Çay", seed=1, max_new_tokens=4, steps=4).text


def test_the_server_keeps_serving_after_bad_input(http, base, client):
    for body in (b"{", b'{"messages": 1}', b"\xff\xfe", b'{"messages": [{"role": "user", "content": "x"}], "n": 1e400}'):
        assert http.post("/v1/chat/completions", content=body).status_code in (400, 422)
    r = client.chat.completions.create(model="tiny", messages=_msgs(), max_tokens=4)
    assert r.choices[0].message.content is not None
    assert health(http)["stats"]["failed"] == 0


def test_openai_client_sees_errors_as_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=_msgs())
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="tiny", messages=_msgs(), max_tokens=-1)
    assert "max_tokens" in str(info.value)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="tiny", messages=_msgs("Çay " * 300))
    assert info.value.status_code == 413


class Broken(Recording):
    def generate_ids(self, *args, **kwargs):
        raise RuntimeError("boom in /secret/path")

    def before_block(self):
        raise RuntimeError("boom in /secret/path")


def test_internal_errors_are_500_without_details(lm):
    with serve_in_thread(create_app(Broken(lm))) as url, httpx.Client(base_url=url, timeout=60) as h:
        r = h.post("/v1/chat/completions", json={"messages": _msgs()})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        events = _sse(h, "/v1/chat/completions", {"messages": _msgs(), "stream": True})
        assert events[-1]["error"]["type"] == "server_error"
        for text in (r.text, json.dumps(events)):
            assert "boom" not in text and "secret" not in text and "Traceback" not in text
        assert h.get("/health").json()["stats"]["failed"] == 2


# --------------------------------------------------------------------------------- limits & auth
def test_api_key(lm):
    app = create_app(lm, api_key="sekret", served_model_name="demo")
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as h:
        assert h.get("/health").status_code == 200
        assert h.get("/").status_code == 200  # the page loads; it asks for the key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = h.post("/v1/chat/completions", json={"messages": _msgs()}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert h.get("/v1/models", headers=headers).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert good.models.list().data[0].id == "demo"
        r = good.chat.completions.create(model="demo", messages=_msgs(), max_tokens=4)
        assert r.model == "demo"


def test_a_full_queue_answers_429(lm):
    app = create_app(Recording(lm, delay=0.01), limits=Limits(max_batch_size=1, max_queue=1, batch_wait_ms=0))
    body = {"messages": _msgs(CHAT), "max_tokens": 50, "seed": 1, "block_length": 50}
    with serve_in_thread(app) as url:
        with ThreadPoolExecutor(12) as pool, httpx.Client(base_url=url, timeout=60) as h:
            responses = list(pool.map(lambda _: h.post("/v1/chat/completions", json=body), range(12)))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(429) >= 6 and codes.count(200) >= 2, codes
        busy = next(r for r in responses if r.status_code == 429)
        assert busy.json()["error"]["type"] == "rate_limit_error" and busy.headers["retry-after"] == "1"
        with httpx.Client(base_url=url, timeout=60) as h:
            assert h.get("/health").json()["stats"]["rejected"] == codes.count(429)
            assert h.post("/v1/chat/completions", json=body).status_code == 200


def test_request_limits(lm):
    app = create_app(lm, limits=Limits(max_prompt_tokens=10, max_tokens=20, max_steps=30, max_n=2))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as h:
        def post(**kw):
            return h.post("/v1/chat/completions", json={"messages": _msgs(), **kw})
        assert post(max_tokens=20, steps=30, n=2).status_code == 200
        assert post(max_tokens=21).status_code == 422
        assert post(steps=31).status_code == 422
        assert post(n=3).status_code == 422
        r = h.post("/v1/chat/completions", json={"messages": _msgs("Çay " * 20)})
        assert r.status_code == 413 and r.json()["error"]["code"] == "prompt_too_long"
        card = h.get("/v1/models").json()["data"][0]
        assert card["id"] == lm.name  # the model's own name unless --served-model-name
        assert card["limits"]["max_tokens"] == 20 and card["limits"]["max_n"] == 2


def test_stable_text_holds_back_what_may_change():
    assert stable_text("Ankara ' dı") == "Ankara '"
    assert stable_text("Ankara") == ""
    assert stable_text("bir iki\nüç") == "bir iki"
    assert stable_text("bir iki \ufffd") == "bir iki"
    assert stable_text("bir iki üç\ufffd") == "bir iki"


# --------------------------------------------------------------------------------- web page
def test_web_page_is_served(http):
    r = http.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert 'name="viewport"' in r.text and "/static/app.js" in r.text
    js = http.get("/static/app.js")
    assert js.status_code == 200 and "include_denoising" in js.text
    assert http.get("/static/style.css").status_code == 200
    assert '<html lang="tr">' in r.text and "{{" not in r.text  # Turkish, every default filled in


class _Fields(HTMLParser):
    """Every element with an id: its attributes (the web page's form fields)."""

    def __init__(self):
        super().__init__()
        self.by_id, self.titled, self.visible = {}, [], []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.by_id[attrs["id"]] = attrs
        if attrs.get("title"):
            self.titled.append(attrs["title"])
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style")

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.visible.append(data.strip())


def test_web_page_defaults_are_the_clis(http):
    """The page's sampler fields default to exactly what `diffutron generate` / `chat` use when no
    flag is given (the server renders its defaults into the page; nothing is hard-coded there),
    seed 0 included, although the API itself draws a random seed for a request without one."""
    from diffutron.cli import build_parser

    cli = build_parser().parse_args(["generate", "x"])
    want = {"max_tokens": cli.max_new_tokens, "steps": cli.steps, "block_length": cli.block_length,
            "temperature": cli.temperature, "top_p": cli.top_p, "repetition_penalty": cli.repetition_penalty,
            "remasking": cli.remasking, "threshold": cli.threshold, "cfg_scale": cli.cfg_scale, "seed": cli.seed}
    assert cli.seed == 0
    page = _Fields()
    page.feed(http.get("/").text)
    got = {field: page.by_id[field]["data-default"] for field in want}
    assert {k: v if k == "remasking" or v == "" else float(v) for k, v in got.items()} == \
        {k: v if k == "remasking" else "" if v is None else float(v) for k, v in want.items()}


def test_web_page_speaks_turkish_with_english_tooltips(http):
    page = _Fields()
    page.feed(http.get("/").text)
    text = " ".join(page.visible)
    for english in ("New chat", "Settings", "Send", "Stop", "Sampler", "Connection", "Reset to defaults",
                    "max tokens", "temperature", "seed", "system message", "replay", "connecting"):
        assert english not in text, english
    for turkish in ("Yeni sohbet", "Ayarlar", "Gönder", "Durdur", "Örnekleyici", "tohum", "sıcaklık"):
        assert turkish in text, turkish
    for english in ("new chat", "temperature", "seed", "replay the denoising", "remasking"):
        assert any(english in t for t in page.titled), english
    for field in ("max_tokens", "steps", "block_length", "temperature", "top_p", "repetition_penalty", "threshold",
                  "cfg_scale", "seed"):  # each field's label carries the English name and the CLI flag
        assert any(t.lower().startswith(field.replace("_", " ")) and "--" in t for t in page.titled), field


# --------------------------------------------------------------------------------- CLI
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_fast_picks_weights_and_cache(tmp_path, monkeypatch):
    """`serve --fast` takes no value: int8 weights on a CPU (bf16 on a GPU), --fast-mode overrides,
    and the delayed cache unless --cache says otherwise (the server itself is stubbed out)."""
    import types

    import uvicorn

    import diffutron.serve
    from diffutron.cli import main

    served = []

    def fake_app(lm, **kw):
        served.append(lm)
        return types.SimpleNamespace(state=types.SimpleNamespace(service=types.SimpleNamespace(model_name="m")))

    monkeypatch.setattr(diffutron.serve, "create_app", fake_app)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    tiny_lm().save_pretrained(tmp_path / "model")
    base = ["serve", "--model", str(tmp_path / "model"), "--device", "cpu", "--port", "0"]
    for flags, weights, cache in ((["--fast"], "int8", "delayed"), (["--fast-mode", "bf16"], "torch.bfloat16", "delayed"),
                                  (["--fast", "--cache", "dual"], "int8", "dual"), ([], "torch.float32", "none")):
        assert main([*base, *flags]) == 0, flags
        head = served[-1].model.get_output_embeddings()
        got = "int8" if type(head).__module__.startswith("torch.ao.nn.quantized") else str(head.weight.dtype)
        assert (got, served[-1].defaults.cache) == (weights, cache), flags


def test_cli_serve_compile_warms_up_before_serving(tmp_path, monkeypatch, capsys):
    """`serve --compile` compiles the engine (plain steps on a CPU) and decodes a default request at
    batch 1 and at the batch size before serving; a CPU serves 16 answers at once by default."""
    import uvicorn

    import diffutron.serve
    from diffutron.cli import main

    apps, real = [], diffutron.serve.create_app
    monkeypatch.setattr(diffutron.serve, "create_app", lambda lm, **kw: apps.append(real(lm, **kw)) or apps[-1])
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    tiny_lm().save_pretrained(tmp_path / "model")
    base = ["serve", "--model", str(tmp_path / "model"), "--device", "cpu", "--port", "0"]
    assert main([*base, "--compile", "--max-batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert "engine warmed up in" in err
    service = apps[-1].state.service
    assert service.lm.compiled and service.limits.max_batch_size == 4
    engine = next(iter(service.scheduler._engines.values()))
    assert engine is service.lm.engine_for(engine.config) and {lay.B for lay in engine.layouts.values()} == {1, 4}
    assert main(base) == 0
    assert "warmed up" not in capsys.readouterr().err
    service = apps[-1].state.service
    assert not service.lm.compiled and service.limits.max_batch_size == 16 and service.health()["max_batch_size"] == 16


def test_cli_serve_refuses_a_busy_port(capsys):
    from diffutron.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert main(["serve", "--port", str(s.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1:" in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_serve(tmp_path):
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "diffutron", "serve", "--port", str(port), "--served-model-name", "demo", "--cache", "delayed",
           "--max-batch-size", "4", "--log-level", "warning"]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start: " + log_path.read_text()
            time.sleep(0.2)
        started = time.monotonic()
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) as c:
            r = c.chat.completions.create(model="demo", messages=_msgs(CHAT), max_tokens=8)
        assert r.model == "demo" and r.usage.completion_tokens <= 8
        print(f"server up after {started - (deadline - 90):.1f} s")
    finally:
        stopping = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
            print(f"server stopped in {time.monotonic() - stopping:.1f} s")
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, log_path.read_text()
    assert "serving 'demo' on http://127.0.0.1:" in log_path.read_text()


# --------------------------------------------------------------------------------- helpers
def _sse(http, path, body):
    """The JSON payloads of a server-sent-event stream, checking the framing and [DONE]."""
    events, done = [], False
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ") and not done
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
            else:
                events.append(json.loads(data))
    assert done
    return events
