"""The sampler against a straightforward implementation of the reference algorithm."""

import itertools

import pytest
import torch

from diffutron.errors import DiffutronError
from diffutron.sampling import SamplerConfig, find_stop, generate, partial_stop_len
from diffutron.sampling.policies import block_schedule

from reference_sampler import oracle


def run(lm, prompts, **kw):
    ids, att = lm.batch(prompts)
    return generate(lm.model, ids, SamplerConfig(**kw), mask_token_id=lm.mask_token_id,
                    eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id, attention_mask=att,
                    stop_sequences=lm.stop_sequences)


PROMPT = [12, 30, 41, 7, 19]

GRID = list(itertools.product([8, 13, 32], [4, 8, 16], [1.0, 1.2], [0.0, 1.5]))  # steps, block, penalty, cfg


@pytest.mark.parametrize("steps,block,penalty,cfg", GRID)
def test_identical_to_reference_greedy(lm, steps, block, penalty, cfg):
    gen = 16
    expected, nfe = oracle(lm.model, PROMPT, mask_id=lm.mask_token_id, eos_id=lm.eos_token_id, steps=steps,
                           gen_length=gen, block_length=block, repetition_penalty=penalty, cfg_scale=cfg)
    out = run(lm, [PROMPT], max_new_tokens=gen, steps=steps, block_length=block, temperature=0.0,
              repetition_penalty=penalty, cfg_scale=cfg, stop_at_eos=False)
    assert out.sequences[0].tolist() == expected
    assert out.nfe == nfe


@pytest.mark.parametrize("remasking", ["margin", "entropy"])
def test_identical_to_reference_other_confidences(lm, remasking):
    expected, _ = oracle(lm.model, PROMPT, mask_id=lm.mask_token_id, eos_id=lm.eos_token_id, steps=12,
                         gen_length=12, block_length=6, repetition_penalty=1.2, remasking=remasking)
    out = run(lm, [PROMPT], max_new_tokens=12, steps=12, block_length=6, temperature=0.0,
              repetition_penalty=1.2, remasking=remasking, stop_at_eos=False)
    assert out.sequences[0].tolist() == expected


def test_uneven_last_block_and_more_steps_than_tokens(lm):
    expected, nfe = oracle(lm.model, PROMPT, mask_id=lm.mask_token_id, eos_id=lm.eos_token_id, steps=40,
                           gen_length=10, block_length=4, repetition_penalty=1.2)
    out = run(lm, [PROMPT], max_new_tokens=10, steps=40, block_length=4, temperature=0.0,
              repetition_penalty=1.2, stop_at_eos=False)
    assert out.sequences[0].tolist() == expected
    assert out.nfe == nfe == 10  # k=0 steps cost no forward


def reference_schedules(max_masks: int, max_steps: int) -> dict[tuple[int, int], list[int]]:
    """Every (masks, steps) schedule of the reference's get_num_transfer_tokens (linear alpha), for
    all pairs at once: q = (1 - alpha(s)) / (1 - alpha(t)) in float32 (alpha(x) = 1 - x), then
    torch.round(m * (1 - q)) in float64, capped at m; the nonzero counts."""
    steps = torch.arange(1, max_steps + 1, dtype=torch.float64)[:, None]  # [S, 1]
    j = torch.arange(max_steps, dtype=torch.float64)[None, :]  # [1, J]
    s32 = ((steps - j - 1) / steps).clamp(min=0).float()
    t32 = ((steps - j) / steps).clamp(min=1e-9).float()
    q = ((1 - (1 - s32)) / (1 - (1 - t32))).double()  # [S, J], float32 arithmetic taken out exactly
    left = torch.arange(1, max_masks + 1, dtype=torch.float64)[:, None].repeat(1, max_steps)  # [M, S]
    counts = torch.zeros(max_masks, max_steps, max_steps, dtype=torch.int64)  # [M, S, J]
    for jj in range(max_steps):
        live = torch.arange(1, max_steps + 1) > jj  # step jj exists for S > jj
        k = torch.minimum(torch.round(left * (1 - q[:, jj])), left)
        k = torch.where(live[None, :], k, torch.zeros_like(k))
        counts[:, :, jj] = k.long()
        left = left - k
    rows = counts.tolist()
    return {(m + 1, n + 1): [c for c in rows[m][n] if c > 0] for m in range(max_masks) for n in range(max_steps)}


def test_block_schedule_is_the_references_for_every_block_and_step_count():
    """All 8,192 schedules (1-64 masks, 1-128 steps): the reference's float32 arithmetic, zero
    steps dropped; 1,207 of them differ from exact round(m / (S - j)) rounding."""
    want = reference_schedules(64, 128)
    got = {key: block_schedule(*key) for key in want}
    assert [k for k in want if got[k] != want[k]] == []
    assert all(sum(v) == m and all(c > 0 for c in v) for (m, _), v in got.items())

    def exact(m, steps):
        out, left = [], m
        for j in range(steps):
            k = min(left, round(left / (steps - j)))
            out, left = out + [k] * (k > 0), left - k
        return out

    assert sum(exact(*key) != v for key, v in want.items()) == 1207
    assert block_schedule(4, 3) == [1, 1, 2] and exact(4, 3) == [1, 2, 1]  # the example
    assert block_schedule(32, 32) == [1] * 32 and block_schedule(32, 16) == [2] * 16
    assert block_schedule(32, 64) == [1] * 32  # every other step reveals 0: dropped, no forward
    assert block_schedule(0, 8) == []


def test_oracle_schedule_is_the_tests_schedule():
    from reference_sampler import transfer_schedule

    want = reference_schedules(16, 24)
    assert all(transfer_schedule(m, n) == want[(m, n)] for m in range(1, 17, 3) for n in range(1, 25))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_ragged_batch_equals_each_prompt_alone(lm, temperature):
    prompts = [[12, 30, 41, 7, 19, 22, 23, 24], [33, 8], [50, 51, 52, 53, 54]]
    kw = dict(max_new_tokens=12, steps=12, block_length=4, temperature=temperature, stop_at_eos=False)
    together = run(lm, prompts, seed=(5, 6, 7), **kw)
    for r, p in enumerate(prompts):
        alone = run(lm, [p], seed=(5 + r,), **kw)
        n = len(p) + 12
        assert together.sequences[r, :n].tolist() == alone.sequences[0, :n].tolist()
        assert (together.sequences[r, n:] == lm.pad_token_id).all()


def test_seed_reproduces_and_changes_sampled_tokens(lm):
    kw = dict(max_new_tokens=16, steps=16, block_length=8, temperature=1.0, stop_at_eos=False)
    a, b = run(lm, [PROMPT], seed=1, **kw), run(lm, [PROMPT], seed=1, **kw)
    c = run(lm, [PROMPT], seed=2, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)


def test_top_k_one_equals_greedy_choice(lm):
    greedy = run(lm, [PROMPT], max_new_tokens=8, steps=8, block_length=8, temperature=0.0, stop_at_eos=False)
    topk1 = run(lm, [PROMPT], max_new_tokens=8, steps=8, block_length=8, temperature=5.0, top_k=1, stop_at_eos=False)
    tiny_p = run(lm, [PROMPT], max_new_tokens=8, steps=8, block_length=8, temperature=5.0, top_p=1e-6, stop_at_eos=False)
    assert torch.equal(greedy.sequences, topk1.sequences)
    assert torch.equal(greedy.sequences, tiny_p.sequences)


def test_infilling_masks_inside_the_input(lm):
    m = lm.mask_token_id
    prompt = [12, m, m, 41, 7, m, 19, m, m, m]
    ids, att = lm.batch([prompt])
    out = generate(lm.model, ids, SamplerConfig(max_new_tokens=0, steps=6, block_length=3, temperature=0.0),
                   mask_token_id=m, eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id)
    seq = out.sequences[0].tolist()
    assert len(seq) == len(prompt)
    assert m not in seq
    assert [seq[i] for i in (0, 3, 4, 6)] == [12, 41, 7, 19]
    # blocks start at the first mask: [1,4) [4,7) [7,10); 2 steps each, at most 1 forward per step
    assert out.nfe <= 6


def test_nothing_to_generate_is_an_error(lm):
    ids, att = lm.batch([[12, 13]])
    with pytest.raises(DiffutronError, match="nothing to generate"):
        generate(lm.model, ids, SamplerConfig(max_new_tokens=0), mask_token_id=lm.mask_token_id)


def test_threshold_never_costs_more_steps_and_tiny_threshold_commits_whole_blocks(lm):
    kw = dict(max_new_tokens=16, steps=16, block_length=8, temperature=0.0, stop_at_eos=False)
    exact = run(lm, [PROMPT], **kw)
    fast = run(lm, [PROMPT], threshold=0.5, **kw)
    assert fast.nfe <= exact.nfe
    allin = run(lm, [PROMPT], threshold=1e-9, **kw)
    assert allin.nfe == 2
    assert lm.mask_token_id not in allin.sequences[0].tolist()


def test_logits_only_at_committable_positions(lm):
    rows = []
    h = lm.model.decoder.register_forward_hook(lambda mod, i, o: rows.append(i[0].reshape(-1, i[0].shape[-1]).shape[0]))
    try:
        out = run(lm, [PROMPT, PROMPT[:2]], max_new_tokens=12, steps=12, block_length=4, temperature=0.0, stop_at_eos=False)
    finally:
        h.remove()
    assert len(rows) == out.nfe
    # each forward reads only masked positions of the current blocks: at most 4 per row, shrinking
    assert max(rows) <= 8 and rows[0] == 8 and rows[3] == 2


def test_stop_at_eos_stops_row_and_saves_forwards(lm):
    kw = dict(max_new_tokens=16, steps=16, block_length=4, temperature=0.0)
    a, b = [12, 30, 41, 7, 19], [50, 51, 52]
    full_a = run(lm, [a], stop_at_eos=False, **kw).sequences[0, len(a):].tolist()
    full_b = run(lm, [b], stop_at_eos=False, **kw).sequences[0, len(b):].tolist()
    # a stop "sequence" that appears in a's second block but nowhere in b's answer
    stop_tok = next(t for t in full_a[4:8] if t not in full_b and t not in full_a[:4])
    ids, att = lm.batch([a, b])
    out = generate(lm.model, ids, SamplerConfig(stop_at_eos=True, **kw), mask_token_id=lm.mask_token_id,
                   eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id, attention_mask=att,
                   stop_sequences=[[stop_tok]])
    assert out.finish_reasons == ["stop", "length"]
    row_a = out.sequences[0, len(a):len(a) + 16].tolist()
    cut = full_a.index(stop_tok) + 1
    assert row_a[:cut] == full_a[:cut] and all(t == lm.pad_token_id for t in row_a[cut:])
    assert out.sequences[1, len(b):len(b) + 16].tolist() == full_b  # the other row is unaffected
    forwards_a_alone = run(lm, [a], stop_at_eos=False, **kw).nfe
    assert out.nfe == forwards_a_alone  # b still needs all its steps; a stopped after block 2
    solo = generate(lm.model, torch.tensor([a]), SamplerConfig(stop_at_eos=True, **kw),
                    mask_token_id=lm.mask_token_id, eos_token_id=lm.eos_token_id, stop_sequences=[[stop_tok]])
    assert solo.nfe == 8 and solo.finish_reasons == ["stop"]


def test_callback_sees_every_state_and_can_cancel(lm):
    states = []

    def cb(step, canvas):
        states.append((step, canvas.clone()))
        return [1] if step == 2 else None

    ids, att = lm.batch([PROMPT, PROMPT[:3]])
    out = generate(lm.model, ids, SamplerConfig(max_new_tokens=8, steps=8, block_length=4, temperature=0.0,
                                                stop_at_eos=False), mask_token_id=lm.mask_token_id,
                   eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id, attention_mask=att, callback=cb)
    assert [s for s, _ in states] == list(range(1, out.nfe + 1))
    masks = [int((c[0] == lm.mask_token_id).sum()) for _, c in states]
    assert masks == sorted(masks, reverse=True) and masks[-1] == 0 and masks[0] == 7
    assert out.finish_reasons == ["length", "cancelled"]
    assert lm.mask_token_id not in out.sequences[1].tolist()
    alone = run(lm, [PROMPT], max_new_tokens=8, steps=8, block_length=4, temperature=0.0, stop_at_eos=False)
    assert torch.equal(out.sequences[0], alone.sequences[0])


def test_find_stop_and_partial_stop():
    assert find_stop([5, 6, 1, 7], eos_token_id=1) == (2, 3)
    assert find_stop([5, 8, 9, 1], eos_token_id=1, stop_sequences=[[8, 9]]) == (1, 3)
    assert find_stop([5, 8, 4, 9], eos_token_id=1, stop_sequences=[[8, 9]], mask_token_id=4) is None
    assert find_stop([5, 6], eos_token_id=None) is None
    assert partial_stop_len([3, 8], [[8, 9, 10]]) == 1
    assert partial_stop_len([8, 9], [[8, 9, 10]]) == 2
    assert partial_stop_len([9, 3], [[8, 9, 10]]) == 0


@pytest.mark.parametrize("field,value,msg", [
    ("steps", 0, "steps=0"), ("block_length", 0, "block_length=0"), ("temperature", -1.0, "temperature"),
    ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"), ("threshold", 0.0, "threshold"), ("threshold", 1.5, "threshold"),
    ("remasking", "best", "remasking"), ("max_new_tokens", -1, "max_new_tokens"), ("cfg_scale", -1.0, "cfg_scale"),
    ("seed", -3, "seed"), ("repetition_penalty", 0.0, "repetition_penalty"),
])
def test_invalid_settings(field, value, msg):
    with pytest.raises(DiffutronError, match=msg):
        SamplerConfig(**{field: value})


def test_row_seeds():
    assert SamplerConfig(seed=3).row_seeds(3) == [3, 4, 5]
    assert SamplerConfig(seed=[9, 1]).row_seeds(2) == [9, 1]
    with pytest.raises(DiffutronError, match="one per row"):
        SamplerConfig(seed=(1, 2)).row_seeds(3)


def test_reference_rng_draws_what_the_reference_lines_draw(monkeypatch):
    """rng="reference": per step U = torch.rand_like(logits, dtype=float64) over [B, T, V] from the
    generator torch.manual_seed(seed) sets, x0 = argmax(exp(logits) / (-log U) ** T), then
    torch.rand((B, T)) for random remasking; ours reads only the positions it needs (drawn in
    chunks that split rows of the canvas here), and later steps continue the same stream."""
    from diffutron.sampling import noise, policies

    monkeypatch.setattr(noise.ReferenceNoise, "CHUNK_VALUES", 3 * 1000)  # 3 positions per chunk: 5 chunks
    g = torch.Generator().manual_seed(0)
    b, t, v, temperature, seed = 2, 7, 1000, 0.7, 11
    steps = [torch.randn(b, t, v, generator=g) * 3 for _ in range(2)]
    rows, cols = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([2, 6, 0, 3, 4])
    want = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for logits in steps:  # the reference's lines, float64
            u = torch.rand_like(logits, dtype=torch.float64)
            x0 = (logits.to(torch.float64).exp() / (-torch.log(u)) ** temperature).argmax(-1)
            want.append((x0[rows, cols], torch.rand((b, t))[rows, cols]))
    stream = noise.ReferenceNoise(seed)
    for logits, (x0, order) in zip(steps, want):
        u = stream.token_uniforms((b, t, v), rows, cols)
        got = policies.gumbel_candidates(logits[rows, cols], u, temperature=temperature)
        assert torch.equal(got, x0)
        assert torch.equal(stream.order_uniforms((b, t), rows, cols), order)
    probe = steps[0][rows, cols]
    x0, conf = policies.propose_reference(probe, stream.token_uniforms((b, t, v), rows, cols), None,
                                          temperature=temperature, top_k=0, top_p=1.0, remasking="low_confidence")
    torch.testing.assert_close(conf.double(), torch.softmax(probe.double(), -1).gather(1, x0[:, None]).squeeze(1))


REFERENCE_RNG = [
    dict(temperature=0.7),
    dict(temperature=0.1, repetition_penalty=1.2),
    dict(temperature=1.0, cfg_scale=1.5),
    dict(temperature=0.5, remasking="random"),
    dict(temperature=0.0, remasking="random"),
]


@pytest.mark.parametrize("settings", REFERENCE_RNG, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_reference_rng_reproduces_a_seeded_run_of_the_reference(lm, settings):
    from reference_sampler import oracle_batch

    prompts = [PROMPT, [33, 8, 9], [50, 51, 52, 53, 54, 55, 56]]  # ragged: the draw covers the padded canvas
    settings = {"repetition_penalty": 1.0, **settings}
    ours = dict(max_new_tokens=12, steps=10, block_length=4, stop_at_eos=False, seed=7, **settings)
    for batch in (prompts[:1], prompts):
        want, nfe = oracle_batch(lm.model, batch, mask_id=lm.mask_token_id, eos_id=lm.eos_token_id, seed=7,
                                 steps=10, gen_length=12, block_length=4, **settings)
        out = run(lm, batch, rng="reference", **ours)
        for r, p in enumerate(batch):
            n = len(p) + 12
            assert out.sequences[r, :n].tolist() == want[r][:n], (len(batch), r)
        assert out.nfe == nfe
    keyed = run(lm, prompts[:1], **ours)
    if settings["temperature"] >= 0.5:  # the default draws from per-row keyed streams: other tokens
        assert keyed.sequences[0].tolist() != want[0][: keyed.sequences.shape[1]]


def test_reference_rng_settings():
    with pytest.raises(DiffutronError, match="rng='reference'.*one integer seed"):
        SamplerConfig(rng="reference", seed=(1, 2))
    with pytest.raises(DiffutronError, match="rng='mine'"):
        SamplerConfig(rng="mine")
    from diffutron.sampling.engine import supports

    assert "rng='reference'" in supports(SamplerConfig(rng="reference"), [[5, 6]], mask_token_id=4)
    assert SamplerConfig().rng == "keyed"
    import argparse

    from diffutron.cli.generate import add_sampler_args, sampler_config

    parser = argparse.ArgumentParser()
    add_sampler_args(parser)
    assert sampler_config(parser.parse_args(["--rng", "reference", "--seed", "4"])).replace().rng == "reference"
    assert sampler_config(parser.parse_args([])).rng == "keyed"


@pytest.mark.parametrize("temperature", [0.0, 0.5])
def test_mask_token_is_never_a_candidate(lm, temperature):
    import copy

    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        model.decoder.bias[lm.mask_token_id] = 1e4  # the model "prefers" [MASK] everywhere
    ids, att = lm.batch([PROMPT])
    out = generate(model, ids, SamplerConfig(max_new_tokens=8, steps=8, block_length=4, temperature=temperature,
                                             stop_at_eos=False), mask_token_id=lm.mask_token_id)
    assert lm.mask_token_id not in out.sequences[0].tolist()
    assert out.nfe == 8


def uniforms(n, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("plain", [False, True])
def test_sampling_follows_softmax_over_temperature_and_never_the_forbidden_id(plain):
    from diffutron.sampling.policies import propose

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]]).repeat(4000, 1)
    x0, _ = propose(logits, uniforms(4000), temperature=2.0, top_k=0, top_p=1.0, remasking="low_confidence",
                    forbid=4, plain=plain)
    freq = torch.bincount(x0, minlength=5).float() / 4000
    expected = torch.softmax(logits[0, :4] / 2.0, -1)
    assert freq[4] == 0
    assert torch.allclose(freq[:4], expected, atol=0.03)


def test_block_argmax_is_torch_argmax_first_of_ties():
    from diffutron.sampling.cpu_kernels import block_argmax

    g = torch.Generator().manual_seed(0)
    for width in (7, 1024, 3000, 4096, 70001):  # below one chunk, exact chunks, ragged last chunk
        x = torch.randint(-3, 3, (9, width), generator=g).float()  # many ties: the first must win
        x[0] = -5.0
        x[0, width // 2 :] = 7.0  # the maximum starts mid-row, in a later chunk
        index, best = block_argmax(x)
        assert torch.equal(index, x.argmax(-1)), width
        assert torch.equal(best, x.amax(-1, keepdim=True))
    x = torch.randn(3, 5000, generator=g)
    x[1, 7] = float("nan")
    x[2, 4000] = float("inf")
    assert torch.equal(block_argmax(x)[0], x.argmax(-1))


def test_top2_values_equal_torch_topk():
    from diffutron.sampling.cpu_kernels import top2_values

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 7, generator=g)
    assert torch.equal(top2_values(x), x.topk(2, dim=-1).values)  # below one block
    for width in (3000, 70001):
        x = torch.randn(6, width, generator=g)
        x[1, 5] = x[1, 2900] = 9.0  # the maximum twice, in different blocks
        x[2, 10] = x[2, 11] = 9.0  # twice in one block
        x[3, 2999], x[3, 0] = 9.0, 8.0  # the best two in the first and the last block
        assert torch.equal(top2_values(x), x.topk(2, dim=-1).values), width


@pytest.mark.parametrize("plain", [False, True])
def test_trained_like_logits_sample_as_float64_softmax_and_confidence_is_exact(plain):
    """At temperature 0.1 most of a trained model's vocabulary sits where exp() underflows (the
    CPU kernels' clamped path): draws still follow softmax(logits / T) and confidences softmax(logits)."""
    from diffutron.sampling.policies import propose

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 20000, generator=g) * 3.0
    logits[:, 5], logits[:, 11] = 20.0, 19.95  # two close leaders, >6 nats above the rest
    draws = []
    for seed in range(300):
        x0, conf = propose(logits, uniforms(6, seed), temperature=0.1, top_k=0, top_p=1.0,
                           remasking="low_confidence", forbid=None, plain=plain)
        ref = torch.softmax(logits.double(), -1).gather(1, x0[:, None]).squeeze(1)
        assert torch.allclose(conf.double(), ref, rtol=1e-5)
        draws.append(x0)
    draws = torch.stack(draws)  # [300, 6]
    p = torch.softmax(logits.double() / 0.1, -1)
    top2 = p.topk(2, dim=-1)
    # each row draws only its own two (the rest of its vocabulary has < 1e-20 of the mass)
    assert bool(((draws == top2.indices[:, 0]) | (draws == top2.indices[:, 1])).all())
    share = (draws == top2.indices[:, 0]).double().mean(0)
    assert torch.allclose(share, top2.values[:, 0] / top2.values.sum(-1), atol=0.1)
    # top-k: filtered ids keep weight exactly 0 even though the clamp lifts the rest
    x0, _ = propose(logits, uniforms(6), temperature=0.1, top_k=1, top_p=1.0, remasking="low_confidence",
                    forbid=None, plain=plain)
    assert torch.equal(x0, logits.argmax(-1))


RULES = [(t, k, p, r) for t in (0.0, 0.1, 1.0) for k, p in ((0, 1.0), (50, 1.0), (0, 0.9), (50, 0.5))
         for r in ("low_confidence", "margin", "entropy", "random") if t > 0 or (k, p) == (0, 1.0)]


@pytest.mark.parametrize("temperature,top_k,top_p,remasking", RULES)
def test_cpu_kernels_equal_the_plain_rules(temperature, top_k, top_p, remasking):
    """The one place that picks CPU kernels (``uses_cpu_kernels``) may pick either: same candidates,
    same confidences (to float32 rounding), for every rule, on trained-like logits wider than a block."""
    from diffutron.sampling import policies

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 5000, generator=g) * 4.0
    logits[::3, 4321] = 40.0  # the forbidden id leads some rows
    logits[1::3, 17] = 25.0  # a confident leader in others
    u, u_order = uniforms(40, 2), uniforms(40, 3)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, remasking=remasking, forbid=4321)
    x_cpu, c_cpu = policies.propose(logits, u, u_order, **kw)
    x_plain, c_plain = policies.propose(logits, u, u_order, plain=True, **kw)
    assert torch.equal(x_cpu, x_plain)
    assert not (x_plain == 4321).any()
    torch.testing.assert_close(c_cpu, c_plain, rtol=1e-4, atol=1e-6)


def test_one_pass_scan_and_confidences_equal_full_width_references(monkeypatch):
    """The CPU kernels read all V columns once, in L2-sized chunks, and recompute the weights of
    the one block a draw lands in: same normaliser, block sums and draws as full-width tensors give."""
    from diffutron.sampling import cpu_kernels, policies

    monkeypatch.setattr(cpu_kernels, "SCAN_BYTES", 4 * 5 * 2048)  # 5 rows: 2,048-column chunks, the last ragged
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 9000, generator=g) * 3.0
    logits[:2, 4500] = 30.0  # the forbidden id leads two rows
    row_max = logits.amax(-1, keepdim=True)
    clamped = (logits - row_max).clamp(min=cpu_kernels.EXP_FLOOR)
    u = uniforms(5)
    for temperature in (0.0, 0.1, 1.0):
        z, sums, m1 = cpu_kernels.scan(logits, row_max, temperature, forbid=4500, moment=True)
        torch.testing.assert_close(z, clamped.exp().sum(-1, keepdim=True), rtol=1e-5, atol=0)
        torch.testing.assert_close(m1, (clamped.exp() * clamped).sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)
        if temperature == 0:
            assert sums is None
            continue
        w = cpu_kernels.sampling_weights(logits, row_max, temperature)
        w[:, 4500] = 0.0
        assert sums.shape == (5, 9) and torch.equal(sums, cpu_kernels.in_blocks(w, 1024, 0.0).sum(-1))
        # draws centre the weights on the best allowed id (rows 0-1: not the forbidden leader)
        w = cpu_kernels.sampling_weights(logits, logits.index_fill(1, torch.tensor([4500]), float("-inf"))
                                         .amax(-1, keepdim=True), temperature)
        w[:, 4500] = 0.0
        x0, conf = policies.propose(logits, u, temperature=temperature, top_k=0, top_p=1.0,
                                    remasking="low_confidence", forbid=4500)
        assert torch.equal(x0, cpu_kernels.inverse_cdf(w, u)) and not (x0 == 4500).any()
        probs = torch.softmax(logits.double(), -1)
        torch.testing.assert_close(conf.double(), probs.gather(1, x0[:, None]).squeeze(1), rtol=1e-5, atol=0)
    probs = torch.softmax(logits.double(), -1)
    _, margin = policies.propose(logits, None, temperature=0.0, top_k=0, top_p=1.0, remasking="margin")
    top2 = probs.topk(2, dim=-1).values
    torch.testing.assert_close(margin.double(), top2[:, 0] - top2[:, 1], rtol=1e-5, atol=1e-7)
    _, neg_entropy = policies.propose(logits, None, temperature=0.0, top_k=0, top_p=1.0, remasking="entropy")
    torch.testing.assert_close(neg_entropy.double(), (probs * probs.log()).sum(-1), rtol=1e-5, atol=1e-5)


def test_top_p_nucleus_from_partial_sorts_equals_full_sort(monkeypatch):
    """top-p keeps the smallest prefix of sorted ids whose mass reaches p; the CPU kernel finds it
    by topk of growing size (full sort last): both kept sets equal the one a float64 full sort gives."""
    from diffutron.sampling import cpu_kernels, policies

    monkeypatch.setattr(cpu_kernels, "NUCLEUS_TRIES", (16, 256))  # small tiers: every path runs
    g = torch.Generator().manual_seed(0)
    paths = set()
    for width in (10, 3000):
        for spread in (0.05, 1.0, 30.0):  # flat (full sort), medium (second tier), peaked (first)
            logits = torch.randn(6, width, generator=g) * spread
            for p in (0.05, 0.5, 0.9, 0.99):
                sorted_logits, order = torch.sort(logits.double(), dim=-1, descending=True)
                probs = sorted_logits.softmax(-1)
                drop = torch.zeros(logits.shape, dtype=torch.bool).scatter(-1, order, probs.cumsum(-1) - probs >= p)
                for got in (cpu_kernels.top_p_filter(logits, p), policies.top_p_filter(logits, p)):
                    assert torch.equal(got == float("-inf"), drop), (width, spread, p)
                    assert torch.equal(got[~drop], logits[~drop])
                paths.add(int((~drop).sum(-1).max()) > 256)
    assert paths == {True, False}


@pytest.mark.parametrize("plain", [False, True])
def test_repetition_penalty_touches_only_present_ids_of_each_row(plain):
    from diffutron.sampling.policies import apply_repetition_penalty

    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0], [4.0, -4.0, 1.0]])
    present = torch.tensor([[True, True, False], [False, False, True]])
    out = apply_repetition_penalty(logits.clone(), present, torch.tensor([0, 0, 1]), 2.0, plain=plain)
    assert out.tolist() == [[1.0, -4.0, 1.0], [1.0, -4.0, 1.0], [4.0, -4.0, 0.5]]


def test_two_level_inverse_cdf_matches_one_float64_running_sum():
    from diffutron.sampling.policies import inverse_cdf

    g = torch.Generator().manual_seed(0)
    weights = torch.rand(64, 5000, generator=g) ** 8  # uneven mass; 5000 is not a multiple of the chunk
    weights[:, 100:900] = 0.0  # filtered ids: never drawn
    weights[:3, 4000:] = 0.0  # rows whose tail is empty
    u = torch.rand(64, generator=g, dtype=torch.float64)
    u[:2] = torch.tensor([0.0, 1.0 - 1e-16], dtype=torch.float64)  # both ends of [0, 1)
    cdf = weights.double().cumsum(-1)
    reference = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    for chunk in (256, 1024):
        got = inverse_cdf(weights, u, chunk=chunk)
        assert (got != reference).sum() <= 1  # block sums are float32: a draw within 1e-7 of an edge may move
        assert bool((weights.gather(1, got[:, None]) > 0).all())


def test_choose_takes_the_earlier_of_equal_confidences():
    from diffutron.sampling.policies import choose

    conf = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1])
    assert choose(conf, 3, None).tolist() == [1, 3, 0]
    assert choose(conf, 1, 0.5).tolist() == [1, 3, 0, 2]


def test_block_noise_depends_on_seed_block_step_and_position_only():
    from diffutron.sampling.noise import block_noise

    a_tok, a_ord = block_noise(7, 2, 4, 8, tokens=True, order=True)
    b_tok, _ = block_noise(7, 2, 4, 8, tokens=True, order=False)
    assert a_tok.shape == a_ord.shape == (4, 8) and a_tok.dtype == torch.float64
    assert torch.equal(a_tok, b_tok)  # the order draws come after the token draws
    assert not torch.equal(a_tok, block_noise(7, 3, 4, 8, tokens=True, order=False)[0])
    assert not torch.equal(a_tok, block_noise(8, 2, 4, 8, tokens=True, order=False)[0])
    assert block_noise(7, 2, 4, 8, tokens=False, order=False) == (None, None)


def _canvas(lm, prompts, new):
    from diffutron.sampling.loop import build_canvas

    ids, att = lm.batch(prompts)
    return build_canvas(ids, att, new, mask_token_id=lm.mask_token_id, pad_token_id=lm.pad_token_id)


def test_dual_cache_refresh_and_unchanged_window_equal_the_models_logits(lm):
    from diffutron.backbone import logits_at
    from diffutron.sampling.cache import DualCache

    # canvases longer than the tiny model's local window (16), ragged: padding and sliding masks both matter
    prompts = [list(range(12, 40)), [33, 8, 9, 10, 11]]
    canvas, att, _ = _canvas(lm, prompts, 20)
    g = torch.Generator().manual_seed(0)
    canvas[att.bool() & (torch.rand(canvas.shape, generator=g) < 0.3)] = 44  # some committed answer tokens
    every = att.bool()
    exact = logits_at(lm.model, canvas, every, att)
    cache = DualCache(lm.model)
    with torch.inference_mode():
        assert torch.allclose(cache.refresh([0, 1], canvas, att, every), exact, atol=1e-5)
        # nothing changed since the refresh: a block window must read exactly what a full forward reads
        cols = torch.tensor([list(range(30, 38)), [5, 6, 7, 8, 5, 5, 5, 5]])  # row 1: 4 columns, padded
        counts = [8, 4]
        ids = canvas.gather(1, cols)
        pos = torch.tensor([[True] * 8, [True] * 4 + [False] * 4])
        window = cache.window([0, 1], ids, cols, counts, pos)
    want = torch.cat([logits_at(lm.model, canvas[:1], every[:1] & (torch.arange(canvas.shape[1]) >= 30)
                                & (torch.arange(canvas.shape[1]) < 38), att[:1]),
                      logits_at(lm.model, canvas[1:], every[1:] & (torch.arange(canvas.shape[1]) >= 5)
                                & (torch.arange(canvas.shape[1]) < 9), att[1:])])
    assert torch.allclose(window, want, atol=1e-5)
    # any subset of columns (cache="delayed" runs only masks and new tokens), not in order, one
    # of them outside the sliding window of the others: still the model's logits there
    some = torch.tensor([[36, 31, 2, 33]])
    with torch.inference_mode():
        got = cache.window([0], canvas[:1].gather(1, some), some, [4], torch.ones(1, 4, dtype=torch.bool))
    assert torch.allclose(got, exact[some[0]], atol=1e-5)
    # a window writes its block's fresh keys and values into the store in place: a later window
    # over other block tokens reads exactly what it reads after the refresh alone (one row: the
    # store itself, no copy; two rows: stacked copies)
    changed = ids.clone()
    changed[:, :3] = 45
    for rows, sl in (([0, 1], slice(None)), ([0], slice(0, 1))):
        fresh, used = DualCache(lm.model), DualCache(lm.model)
        with torch.inference_mode():
            fresh.refresh(rows, canvas[sl], att[sl], every[sl])
            used.refresh(rows, canvas[sl], att[sl], every[sl])
            used.window(rows, changed[sl], cols[sl], counts[sl], pos[sl])
            assert torch.equal(used.window(rows, ids[sl], cols[sl], counts[sl], pos[sl]),
                               fresh.window(rows, ids[sl], cols[sl], counts[sl], pos[sl]))


@pytest.mark.parametrize("mode", ["dual", "delayed"])
def test_dual_cache_decoding(lm, mode):
    prompts = [[12, 30, 41, 7, 19, 22, 23, 24], [33, 8], [50, 51, 52, 53, 54]]
    kw = dict(max_new_tokens=12, steps=12, block_length=4, temperature=0.0, stop_at_eos=False)
    exact = run(lm, prompts, **kw)
    cached = run(lm, prompts, cache=mode, **kw)
    # same forward count; the first step of every block is a full forward, so block 1's first token agrees
    assert cached.nfe == exact.nfe
    assert cached.sequences.shape == exact.sequences.shape
    assert not (cached.sequences == lm.mask_token_id).any()
    # a block decoded in one step never reads the cache: identical to exact decoding
    one = dict(kw, threshold=1e-9)
    assert torch.equal(run(lm, prompts, cache=mode, **one).sequences, run(lm, prompts, **one).sequences)
    # per-row state: a ragged batch equals each prompt alone; with a threshold, rows reach their
    # next block at different steps, so one step mixes refresh and window forwards
    for extra in ({}, {"threshold": 0.2}):
        together = run(lm, prompts, cache=mode, **kw, **extra)
        for r, p in enumerate(prompts):
            alone = run(lm, [p], cache=mode, **kw, **extra)
            assert together.sequences[r, : len(p) + 12].tolist() == alone.sequences[0, : len(p) + 12].tolist()


def test_delayed_cache_runs_only_masks_and_new_tokens(lm, monkeypatch):
    from diffutron.sampling.cache import DualCache

    # which columns a window runs: all of the block (dual), or its masks and the tokens whose stored
    # keys and values were computed for another id (delayed)
    canvas, att, _ = _canvas(lm, [[12, 30, 41, 7, 19]], 8)
    every = att.bool()
    dual, delayed = DualCache(lm.model), DualCache(lm.model, delayed=True)
    with torch.inference_mode():
        for c in (dual, delayed):
            c.refresh([0], canvas, att, every)
    m = lm.mask_token_id
    assert dual.columns(0, canvas[0], (5, 9), m).tolist() == [5, 6, 7, 8]
    assert delayed.columns(0, canvas[0], (5, 9), m).tolist() == [5, 6, 7, 8]  # all masks
    canvas[0, 6] = 44  # committed: stored keys/values were computed for the mask
    assert delayed.columns(0, canvas[0], (5, 9), m).tolist() == [5, 6, 7, 8]
    canvas[0, 5] = 45
    cols = delayed.columns(0, canvas[0], (5, 9), m)
    with torch.inference_mode():
        delayed.window([0], canvas[:1].gather(1, cols[None]), cols[None], [len(cols)],
                       torch.ones(1, len(cols), dtype=torch.bool))
    assert delayed.columns(0, canvas[0], (5, 9), m).tolist() == [7, 8]  # 5 and 6 are stored as themselves now
    canvas[0, 8] = 46
    assert delayed.columns(0, canvas[0], (5, 9), m).tolist() == [7, 8]

    # in decoding: one token per step in a block of 4 runs 4 columns every window step with
    # "dual", and the 3, 2, 1 masks left plus the 1 token committed just before with "delayed"
    sizes = []
    original = DualCache.window
    monkeypatch.setattr(DualCache, "window",
                        lambda self, rows, ids, cols, counts, pos: sizes.append(list(counts))
                        or original(self, rows, ids, cols, counts, pos))
    kw = dict(max_new_tokens=8, steps=8, block_length=4, temperature=0.0, stop_at_eos=False)
    run(lm, [[12, 30, 41, 7, 19]], cache="dual", **kw)
    assert sizes == [[4]] * 6
    sizes.clear()
    run(lm, [[12, 30, 41, 7, 19]], cache="delayed", **kw)
    assert sizes == [[4], [3], [2]] * 2


def test_cache_refresh_interval(lm, monkeypatch):
    from diffutron.sampling.cache import DualCache

    calls = []
    refresh, window = DualCache.refresh, DualCache.window
    monkeypatch.setattr(DualCache, "refresh", lambda self, *a: calls.append("R") or refresh(self, *a))
    monkeypatch.setattr(DualCache, "window", lambda self, *a: calls.append("w") or window(self, *a))
    kw = dict(max_new_tokens=8, steps=8, block_length=4, temperature=0.0, stop_at_eos=False, cache="delayed")
    prompt = [[12, 30, 41, 7, 19]]
    want = {0: "Rwww" * 2, 1: "RwRw" * 2, 2: "RwwR" * 2, 3: "Rwww" * 2}
    outs = {}
    for every, pattern in want.items():
        calls.clear()
        outs[every] = run(lm, prompt, cache_refresh=every, **kw)
        assert "".join(calls) == pattern, every
        assert outs[every].nfe == 8
    assert torch.equal(outs[3].sequences, outs[0].sequences)  # 3 windows per block: never due
    with pytest.raises(DiffutronError, match="cache_refresh"):
        SamplerConfig(cache="dual", cache_refresh=-1)


def test_dual_cache_refuses_cfg_and_other_encoders(tokenizer):
    from diffutron.sampling.cache import DualCache
    from diffutron.tiny import tiny_model

    for mode in ("dual", "delayed"):
        with pytest.raises(DiffutronError, match="cfg_scale=0"):
            SamplerConfig(cache=mode, cfg_scale=1.0)
    with pytest.raises(DiffutronError, match="ModernBERT masked LMs only"):
        DualCache(tiny_model(tokenizer, arch="bert"))


def test_dual_cache_names_the_transformers_its_modernbert_internals_need(model):
    """transformers 4.x's ModernBERT has no per-layer-type rotary embeddings: one line naming the version."""
    from types import SimpleNamespace

    from diffutron.sampling.cache import TRANSFORMERS_NEEDED, DualCache, check_internals

    class ModernBertForMaskedLM(torch.nn.Module):  # the layout without config.layer_types
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_attention_heads=2, hidden_size=32, local_attention=16)
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Linear(32, 32)])

    for mode in ("dual", "delayed"):
        with pytest.raises(DiffutronError, match=rf"cache='{mode}' needs the ModernBERT of transformers >= "
                                                 rf"{TRANSFORMERS_NEEDED} .*use cache='none'") as err:
            DualCache(ModernBertForMaskedLM(), delayed=mode == "delayed")
        assert "\n" not in str(err.value)
    check_internals(model)  # this transformers' ModernBERT has them


# ------------------------------------------------------------------ the eager loop's per-row state
M, PAD, EOS = 4, 0, 5  # mask, pad and EOS ids for the RowState tests (no model needed)


def row_state(tokens, stops=(), **settings):
    """A RowState over row 1 of a two-row canvas (the other row must stay untouched)."""
    from diffutron.sampling.state import RowState, Specials

    canvas = torch.tensor([[8] * len(tokens), tokens])
    config = SamplerConfig(**{"temperature": 0.0, **settings})
    return RowState(1, canvas[1], config, Specials.of(M, PAD, EOS, stops), seed=3), canvas


def decode(row, canvas, fill):
    """Commit ``fill(block)`` tokens at the first k masks of each step until the row is done;
    returns the (block, step, k) of every step."""
    steps = []
    while (k := row.advance()) > 0:
        steps.append((row.block, row.j, k))
        s, e = row.span
        cols = s + (canvas[1, s:e] == M).nonzero().squeeze(-1)[:k]
        row.commit(cols, torch.full((k,), fill(row.block)))
    return steps


def test_row_state_blocks_start_at_the_first_mask_and_share_the_steps():
    row, _ = row_state([7, 8] + [M] * 7, block_length=3, steps=7)
    assert (row.start, row.blocks, row.steps, row.length) == (2, [(2, 5), (5, 8), (8, 9)], 3, 9)
    row, _ = row_state([7, M, 8, M, M, 9], block_length=2, steps=4)  # masks inside a prompt: blocks span them
    assert (row.start, row.blocks, row.steps) == (1, [(1, 3), (3, 5)], 2)
    with pytest.raises(DiffutronError, match="row 1 has nothing to generate"):
        row_state([7, 8, 9])


def test_row_state_walks_each_blocks_schedule_then_stops_at_length():
    row, canvas = row_state([7] + [M] * 8, block_length=4, steps=6)  # 4 masks in 3 steps: [1, 1, 2]
    assert decode(row, canvas, lambda b: 9) == [(0, 0, 1), (0, 1, 1), (0, 2, 2), (1, 0, 1), (1, 1, 1), (1, 2, 2)]
    assert row.done == "length" and row.finish_reason() == "length"
    assert row.advance() == 0 and row.k == 0
    assert canvas[1].tolist() == [7] + [9] * 8 and canvas[0].tolist() == [8] * 9
    row, _ = row_state([7, M, M], block_length=2, steps=8)  # more steps than tokens: no step commits 0
    row.advance()
    assert row.plan == [1, 1] and row.plan == block_schedule(2, 8)


def test_row_state_leaves_a_block_its_threshold_filled_early():
    row, _ = row_state([7] + [M] * 8, block_length=4, steps=8)
    assert row.advance() == 1 and row.plan == [1, 1, 1, 1]
    row.commit(torch.arange(1, 5), torch.full((4,), 9))  # every mask of the block above the threshold
    assert row.advance() == 1 and (row.block, row.j, row.span) == (1, 0, (5, 9))
    row.commit(torch.tensor([5, 6]), torch.tensor([9, 9]))  # more than k = 1: the next step commits what is left
    assert row.advance() == 1 and row.j == 1 and row.masks_left() == 2


def test_row_state_stops_after_the_block_where_its_answer_ended():
    row, canvas = row_state([7] + [M] * 8, block_length=4, steps=8)
    row.advance()
    row.commit(torch.arange(1, 5), torch.tensor([9, EOS, 9, 9]))
    assert row.advance() == 0 and row.done == "stop" and row.finish_reason() == "stop"
    assert canvas[1].tolist() == [7, 9, EOS] + [PAD] * 6  # the tail after the EOS is padding
    # without stop_at_eos the row runs to its end; an answer holding an EOS still reports "stop"
    row, canvas = row_state([7] + [M] * 8, block_length=4, steps=8, stop_at_eos=False)
    assert len(decode(row, canvas, lambda b: EOS if b == 0 else 9)) == 8
    assert row.done == "length" and row.finish_reason() == "stop"
    assert M not in canvas[1].tolist() and PAD not in canvas[1].tolist()


def test_row_state_finds_a_stop_sequence_across_a_block_boundary():
    row, canvas = row_state([7] + [M] * 12, [[], [10, 11]], block_length=4, steps=12)
    assert row.specials.stops == ((10, 11),)  # empty stop sequences are dropped
    decode(row, canvas, lambda b: (10, 11, 9)[b])  # block 0 ends with 10, block 1 starts with 11
    assert row.done == "stop" and row.block == 1
    assert canvas[1].tolist() == [7] + [10] * 4 + [11] + [PAD] * 7


def test_row_state_cancel_turns_its_masks_into_padding():
    row, canvas = row_state([7] + [M] * 8, block_length=4, steps=8)
    row.advance()
    row.commit(torch.tensor([1]), torch.tensor([9]))
    row.cancel()
    assert canvas[1].tolist() == [7, 9] + [PAD] * 7
    assert row.advance() == 0 and row.done == "cancelled" and row.finish_reason() == "cancelled"


def test_row_state_reads_its_block_noise_at_its_step_and_offset():
    from diffutron.sampling.noise import block_noise

    row, _ = row_state([7, 8] + [M] * 8, block_length=4, steps=8, temperature=0.7, remasking="random")
    row.advance()
    row.commit(torch.arange(2, 6), torch.full((4,), 9))  # block 0 (columns 2..5) in one step
    row.advance()  # block 1 (columns 6..9), step 0
    row.commit(torch.tensor([6]), torch.tensor([9]))
    u_tokens, u_order = block_noise(3, 1, 4, 4, tokens=True, order=True)
    got = row.uniforms(torch.tensor([7, 9]))  # step 1, offsets 1 and 3
    assert torch.equal(got[0], u_tokens[1, [1, 3]]) and torch.equal(got[1], u_order[1, [1, 3]])
    greedy, _ = row_state([7] + [M] * 4, block_length=4, steps=4)
    greedy.advance()
    assert greedy.uniforms(torch.tensor([1])) == (None, None)
    reference, _ = row_state([7] + [M] * 4, block_length=4, steps=4, temperature=0.7, rng="reference")
    reference.advance()  # rng="reference": the loop draws from the batch's one stream instead
    assert reference.uniforms(torch.tensor([1])) == (None, None)


def test_row_state_cache_bookkeeping():
    row, _ = row_state([7] + [M] * 8, block_length=4, steps=8)
    row.advance()
    assert row.stale() and row.stale(2)  # a new block: refresh
    row.refreshed()
    row.windowed()
    assert not row.stale() and not row.stale(2)
    row.windowed()
    assert not row.stale() and row.stale(2)  # refresh every 2 windows
    row.refreshed()
    row.commit(torch.arange(1, 5), torch.full((4,), 9))
    row.advance()  # the next block
    assert row.stale()
