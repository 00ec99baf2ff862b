"""The lockstep engine (fixed shapes, CUDA graphs on GPUs) decodes exactly as the eager loop."""

import pytest
import torch

from diffutron.errors import DiffutronError
from diffutron.sampling import SamplerConfig, generate
from diffutron.sampling.engine import Engine, bucket, supports

PROMPTS = [[12, 30, 41, 7, 19, 22, 23, 24], [33, 8], [50, 51, 52, 53, 54]]


def eager(lm, prompts, config, stops=None):
    ids, att = lm.batch(prompts)
    return generate(lm.model, ids, config, mask_token_id=lm.mask_token_id, eos_token_id=lm.eos_token_id,
                    pad_token_id=lm.pad_token_id, attention_mask=att,
                    stop_sequences=lm.stop_sequences if stops is None else stops)


def engine(lm, prompts, config, stops=None, **kw):
    ids, att = lm.batch(prompts)
    e = Engine(lm.model, config, mask_token_id=lm.mask_token_id, eos_token_id=lm.eos_token_id,
               pad_token_id=lm.pad_token_id, **kw)
    return e.generate(ids, att, stop_sequences=lm.stop_sequences if stops is None else stops)


SETTINGS = [
    dict(temperature=0.0),
    dict(temperature=0.0, repetition_penalty=1.0, block_length=5, steps=7),  # uneven last block, k = 0 steps
    dict(temperature=0.7, seed=(3, 4, 5)),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.0, remasking="margin"),
    dict(temperature=0.0, remasking="entropy"),
    dict(temperature=0.5, remasking="random"),
    dict(temperature=0.0, threshold=0.2),
    dict(temperature=0.0, cfg_scale=1.5),
    dict(temperature=0.0, cache="dual"),
    dict(temperature=0.7, cache="dual", cache_refresh=2),
    dict(temperature=0.0, cache="dual", threshold=0.2),
]


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_engine_equals_the_eager_loop(lm, settings, plain):
    config = SamplerConfig(**{"max_new_tokens": 12, "steps": 12, "block_length": 4, "repetition_penalty": 1.2,
                              "stop_at_eos": False, **settings})
    want = eager(lm, PROMPTS, config)
    got = engine(lm, PROMPTS, config, graphs=False)
    if plain:  # the plain rules (what GPUs run) on this CPU
        ids, att = lm.batch(PROMPTS)
        e = Engine(lm.model, config, mask_token_id=lm.mask_token_id, eos_token_id=lm.eos_token_id,
                   pad_token_id=lm.pad_token_id, graphs=False)
        e.plain = True
        got = e.generate(ids, att, stop_sequences=lm.stop_sequences)
    assert torch.equal(got.sequences, want.sequences)
    assert got.finish_reasons == want.finish_reasons
    assert got.answer_start == want.answer_start
    if settings.get("threshold") is None:
        assert got.nfe == want.nfe  # lockstep costs no extra forward without a threshold


def test_early_stop_retires_rows_and_pads_their_tails(lm):
    config = SamplerConfig(max_new_tokens=16, steps=16, block_length=4, temperature=0.0)
    free = eager(lm, PROMPTS, config.replace(stop_at_eos=False))
    # a stop "sequence": a token that row 0 writes in its second block and nowhere before
    answer0 = free.sequences[0, len(PROMPTS[0]):].tolist()
    stop = next(t for t in answer0[4:8] if t not in answer0[:4])
    want = eager(lm, PROMPTS, config, stops=[[stop]])
    got = engine(lm, PROMPTS, config, stops=[[stop]], graphs=False)
    assert torch.equal(got.sequences, want.sequences)
    assert got.finish_reasons == want.finish_reasons and "stop" in got.finish_reasons
    assert got.nfe == want.nfe


def test_rows_join_at_block_boundaries_and_decode_as_alone(lm):
    """Continuous batching: a row added while others run decodes exactly as it would alone."""
    config = SamplerConfig(max_new_tokens=12, steps=12, block_length=4, temperature=0.7, stop_at_eos=False)
    e = Engine(lm.model, config, mask_token_id=lm.mask_token_id, eos_token_id=lm.eos_token_id,
               pad_token_id=lm.pad_token_id, graphs=False)
    first = e.add(PROMPTS[0], seed=11)
    assert e.step_block() == []
    late = e.add(PROMPTS[1], seed=12)
    done = []
    while e.rows:
        done += e.step_block()
    assert done == [first, late]
    for row, prompt, seed in ((first, PROMPTS[0], 11), (late, PROMPTS[1], 12)):
        alone = eager(lm, [prompt], config.replace(seed=seed))
        assert row.canvas.tolist() == alone.sequences[0].tolist()


def test_callback_sees_every_step_and_cancels(lm):
    config = SamplerConfig(max_new_tokens=8, steps=8, block_length=4, temperature=0.0, stop_at_eos=False)
    seen = []

    def callback(step, canvas):
        seen.append((step, int((canvas == lm.mask_token_id).sum())))
        return [1] if step == 2 else None

    ids, att = lm.batch(PROMPTS[:2])
    e = Engine(lm.model, config, mask_token_id=lm.mask_token_id, eos_token_id=lm.eos_token_id,
               pad_token_id=lm.pad_token_id, graphs=False)
    out = e.generate(ids, att, callback=callback)
    assert [s for s, _ in seen] == list(range(1, 9))
    assert seen[0][1] == 16 - 2 and seen[2][1] == 8 - 3  # 2 rows x 8 masks, 1 per row and step; then row 1 gone
    assert out.finish_reasons == ["length", "cancelled"]
    assert lm.mask_token_id not in out.sequences[1].tolist()


def test_what_the_engine_leaves_to_the_eager_loop(lm):
    config = SamplerConfig(max_new_tokens=4)
    assert supports(config, PROMPTS, lm.mask_token_id) is None
    assert "delayed" in supports(config.replace(cache="delayed"), PROMPTS, lm.mask_token_id)
    assert "infilling" in supports(config, [[12, lm.mask_token_id, 13]], lm.mask_token_id)
    with pytest.raises(DiffutronError, match="CUDA graphs need a CUDA device"):
        Engine(lm.model, config, mask_token_id=lm.mask_token_id, eos_token_id=None, pad_token_id=0, graphs=True) \
            if not torch.cuda.is_available() else (_ for _ in ()).throw(DiffutronError("CUDA graphs need a CUDA device"))
    assert [bucket(n, 128) for n in (1, 2, 3, 5, 16, 17, 200)] == [1, 2, 4, 8, 16, 32, 128]


def test_steps_are_pure_tensor_functions_without_graph_breaks(lm):
    """What CUDA graphs and torch.compile need: a step traces whole (fullgraph), with no value read
    back to the host and no shape taken from the data (dynamo's eager backend: no compiler here)."""
    import torch._dynamo

    config = SamplerConfig(max_new_tokens=8, steps=8, block_length=4, temperature=0.7, top_p=0.9,
                           repetition_penalty=1.2, threshold=0.5)
    for cache in ("none", "dual"):
        e = Engine(lm.model, config.replace(cache=cache), mask_token_id=lm.mask_token_id,
                   eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id, graphs=False)
        e.plain = True
        e.add(PROMPTS[0], seed=0)
        lay = e._layout(1, 32)
        e._load(lay, e.rows)
        torch._dynamo.reset()
        step = torch.compile(e._step, backend="eager", fullgraph=True)
        with torch.inference_mode():
            lay.k.fill_(1)
            step(lay, "refresh" if cache == "dual" else "full", torch.arange(4))
            step(lay, "window" if cache == "dual" else "full", torch.arange(2))
        assert int((lay.canvas[0, 8:12] != lm.mask_token_id).sum()) >= 2


def test_a_failing_compile_falls_back_to_the_plain_step(lm, monkeypatch, caplog):
    """torch.compile can fail on a model or a torch version: decoding goes on without it, same tokens."""
    from diffutron.sampling import engine as engine_module

    def broken(fn):
        def run(*args):
            raise RuntimeError("inductor codegen failed")
        return run

    monkeypatch.setattr(engine_module, "_compiled", broken)
    config = SamplerConfig(max_new_tokens=8, steps=8, block_length=4, temperature=0.0, stop_at_eos=False)
    want = eager(lm, PROMPTS, config)
    e = Engine(lm.model, config, mask_token_id=lm.mask_token_id, eos_token_id=lm.eos_token_id,
               pad_token_id=lm.pad_token_id, graphs=False, compile=True)
    ids, att = lm.batch(PROMPTS)
    with caplog.at_level("WARNING", logger="diffutron.engine"):
        got = e.generate(ids, att, stop_sequences=lm.stop_sequences)
    assert torch.equal(got.sequences, want.sequences)
    assert not e.compiling and "torch.compile failed (RuntimeError: inductor codegen failed)" in caplog.text
