"""The likelihood estimator and the ELBO perplexity bound, against hand computations with full logits."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch

from diffutron.backbone import full_logits, unwrap
from diffutron.errors import DiffutronError
from diffutron.evaluation.reference_scheme import reference_loglikelihood, reference_split
from diffutron.lm import DiffusionLM
from diffutron.likelihood import (
    PerplexityResult, elbo_perplexity, encode_pair, loglikelihood, loglikelihood_ids, sequence_noise, special_affixes,
)
from diffutron.objective import mdlm_loss
from diffutron.sampling import SamplerConfig
from diffutron.tiny import tiny_model, tiny_tokenizer

CONTEXT = "Bu cümlede ironi var mı? soru cevap metin"
LONG_ANSWER = " spor magazin siyaset sağlık ekonomi haber Kitap okumak"  # 8 tokens


def _spread(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    return model


@pytest.fixture(scope="module")
def cls_lm():
    tok = tiny_tokenizer(cls_sep=True)
    return DiffusionLM(_spread(tiny_model(tok, seed=1)), tok, name="tiny-cls")


@pytest.fixture(scope="module")
def plain_lm():
    """Plain tokenizer; the output bias keeps [MASK] from ever being the argmax (a random model
    otherwise predicts it, and a sampler that commits [MASK] leaves the position masked)."""
    tok = tiny_tokenizer()
    model = _spread(tiny_model(tok, seed=3))
    with torch.no_grad():
        unwrap(model).get_output_embeddings().bias[tok.mask_token_id] = -1e4
    return DiffusionLM(model, tok, name="tiny-plain")


@pytest.fixture(scope="module")
def bert_lm():
    tok = tiny_tokenizer(cls_sep=True)
    return DiffusionLM(_spread(tiny_model(tok, arch="bert", seed=2)), tok, name="tiny-bert")


class Recorder:
    """Records the input_ids of every forward and the rows the output layer computes."""

    def __init__(self, model):
        self.inputs, self.head_rows = [], []
        self.handles = [
            model.register_forward_pre_hook(lambda m, a, k: self.inputs.append(k["input_ids"].clone()),
                                            with_kwargs=True),
            unwrap(model).get_output_embeddings().register_forward_hook(
                lambda m, a, out: self.head_rows.append(a[0].reshape(-1, a[0].shape[-1]).shape[0])),
        ]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def manual_one_token(lm, context, answer):
    """log p(answer | context) by hand: [specials] context [MASK] [specials], full logits."""
    tok = lm.tokenizer
    prefix, suffix = special_affixes(tok)
    ctx, cont = encode_pair(tok, context, answer)
    assert len(cont) == 1
    ids = prefix + ctx + [tok.mask_token_id] + suffix
    logits = full_logits(lm.model, torch.tensor([ids]))[0, len(prefix) + len(ctx)]
    logp = torch.log_softmax(logits.float(), -1)
    return logp[cont[0]].item(), int(logits.argmax()) == cont[0]


def manual_elbo(lm, ctx, cont):
    """The ELBO by explicit enumeration: sum_k 1/k * 1/C(T,k) * sum_{|S|=k} sum_{i in S} log p."""
    tok = lm.tokenizer
    prefix, suffix = special_affixes(tok)
    start, T = len(prefix) + len(ctx), len(cont)
    seq = prefix + ctx + cont + suffix
    total = 0.0
    for k in range(1, T + 1):
        for subset in itertools.combinations(range(T), k):
            ids = list(seq)
            for j in subset:
                ids[start + j] = tok.mask_token_id
            logp = torch.log_softmax(full_logits(lm.model, torch.tensor([ids]))[0].float(), -1)
            s = sum(logp[start + j, cont[j]].item() for j in subset)
            total += s / (k * math.comb(T, k))
    return total


# ---------------------------------------------------------------------------------------------
# one-token answers: exact, one forward


@pytest.mark.parametrize("which", ["plain", "cls_sep", "bert"])
def test_one_token_answers_are_exact_log_softmax(which, lm, cls_lm, bert_lm):
    model_lm = {"plain": lm, "cls_sep": cls_lm, "bert": bert_lm}[which]
    answers = [" A", " B", " C", " D"]
    with Recorder(model_lm.model) as rec:
        scores = loglikelihood(model_lm, [(CONTEXT, a) for a in answers])
    assert len(rec.inputs) == 1  # one forward for all four choices
    assert rec.inputs[0].shape[0] == 1  # they share one canvas
    for a, s in zip(answers, scores):
        value, greedy = manual_one_token(model_lm, CONTEXT, a)
        assert s.value == pytest.approx(value, abs=1e-5)
        assert s.is_greedy == greedy and s.stderr == 0.0 and s.method == "exact" and s.tokens == 1
    assert len({round(s.value, 6) for s in scores}) == 4  # the choices are told apart


def test_specials_added_once_around_the_whole_sequence(cls_lm):
    tok = cls_lm.tokenizer
    cls, sep, mask = tok.cls_token_id, tok.sep_token_id, tok.mask_token_id
    ctx_ids = tok.encode(CONTEXT, add_special_tokens=False)
    with Recorder(cls_lm.model) as rec:
        loglikelihood(cls_lm, [(CONTEXT, " A")])
    row = rec.inputs[0][0].tolist()
    assert row == [cls] + ctx_ids + [mask, sep]
    # multi-token: every row is [CLS] context answer-with-masks [SEP]; the answer keeps its first token
    answer = tok.encode(" D cevap soru", add_special_tokens=False)
    with Recorder(cls_lm.model) as rec:
        loglikelihood(cls_lm, [(CONTEXT, " D cevap soru")], mc_samples=64)
    rows = torch.cat(rec.inputs).tolist()
    assert len(rows) == 7 + 1  # 2^3 - 1 mask patterns, then the greedy check's first step
    for r in rows:
        assert r[0] == cls and r[-1] == sep and r.count(cls) == 1 and r.count(sep) == 1
        assert r[1 : 1 + len(ctx_ids)] == ctx_ids
        assert all(x in (mask, a) for x, a in zip(r[1 + len(ctx_ids) : -1], answer))


def test_plain_tokenizer_adds_nothing(lm):
    tok = lm.tokenizer
    assert special_affixes(tok) == ([], [])
    with Recorder(lm.model) as rec:
        loglikelihood(lm, [(CONTEXT, " A")])
    assert rec.inputs[0][0].tolist() == tok.encode(CONTEXT, add_special_tokens=False) + [tok.mask_token_id]


def test_reference_split_is_off_by_one_and_ties_single_letters(cls_lm):
    tok = cls_lm.tokenizer
    sep = tok.sep_token_id
    for a in (" A", " B", " C", " D"):
        prefix, target = reference_split(tok, CONTEXT + " Answer:", a)
        assert prefix[-1] == sep and target == [sep]  # the letter is gone: all four score [SEP]
    _, target = reference_split(tok, CONTEXT, " D cevap soru")
    assert target == tok.encode(" cevap soru", add_special_tokens=False) + [sep]  # first token lost
    ref = reference_loglikelihood(cls_lm, [(CONTEXT, a) for a in (" A", " B", " C", " D")], mc_samples=32,
                                  batch_size=32)
    assert len({s.value for s in ref}) == 1  # every choice ties
    ours = loglikelihood(cls_lm, [(CONTEXT, a) for a in (" A", " B", " C", " D")])
    assert len({round(s.value, 6) for s in ours}) == 4


def test_trailing_space_of_the_context_moves_to_the_continuation(lm):
    tok = lm.tokenizer
    assert encode_pair(tok, "soru cevap ", "metin") == encode_pair(tok, "soru cevap", " metin")
    assert encode_pair(tok, "", " soru cevap") == ([], tok.encode("soru cevap", add_special_tokens=False))


# ---------------------------------------------------------------------------------------------
# multi-token answers: the ELBO


def test_enumerated_elbo_equals_hand_enumeration(cls_lm):
    tok = cls_lm.tokenizer
    ctx, cont = encode_pair(tok, CONTEXT, " D cevap soru")
    with Recorder(cls_lm.model) as rec:
        [s] = loglikelihood(cls_lm, [(CONTEXT, " D cevap soru")], mc_samples=7, check_greedy=False)
    assert s.method == "enumerated" and s.stderr == 0.0 and s.tokens == 3
    assert s.value == pytest.approx(manual_elbo(cls_lm, ctx, cont), abs=1e-4)
    # logits only at masked answer positions: 3 patterns of 1, 3 of 2, 1 of 3 masked = 12 rows
    assert sum(rec.head_rows) == 3 * 1 + 3 * 2 + 1 * 3


def test_monte_carlo_is_unbiased_for_the_elbo(cls_lm):
    tok = cls_lm.tokenizer
    ctx, cont = encode_pair(tok, CONTEXT, " D cevap soru")
    exact = manual_elbo(cls_lm, ctx, cont)
    values = [loglikelihood(cls_lm, [(CONTEXT, " D cevap soru")], mc_samples=4, seed=s, check_greedy=False)[0]
              for s in range(150)]
    assert all(v.method == "monte_carlo" for v in values)
    mean = statistics.mean(v.value for v in values)
    spread = statistics.stdev(v.value for v in values) / math.sqrt(len(values))
    assert abs(mean - exact) < 4 * spread


def test_variance_falls_with_mc_samples_and_stderr_tracks_it(cls_lm):
    spreads, reported = [], []
    for n in (4, 16, 64):
        scores = [loglikelihood(cls_lm, [(CONTEXT, LONG_ANSWER)], mc_samples=n, seed=s, check_greedy=False)[0]
                  for s in range(40)]
        assert scores[0].tokens == 8 and scores[0].method == "monte_carlo"
        spreads.append(statistics.stdev(s.value for s in scores))
        reported.append(math.sqrt(statistics.mean(s.stderr**2 for s in scores)))
    assert spreads[0] > spreads[1] > spreads[2]
    assert spreads[0] / spreads[2] > 2.5  # ~ sqrt(16) = 4 from 4 to 64 draws
    for spread, se in zip(spreads, reported):
        assert 0.6 < se / spread < 1.6  # the reported stderr is the actual error


def test_values_do_not_depend_on_batch_size_or_company(cls_lm):
    pairs = [(CONTEXT, LONG_ANSWER), (CONTEXT, " A"), ("soru", " D cevap soru"),
             ("metin cevap", " spor magazin siyaset sağlık ekonomi haber")]
    for deterministic in (False, True):
        base = loglikelihood(cls_lm, pairs, mc_samples=16, deterministic=deterministic, batch_size=32)
        for bs in (1, 5):
            other = loglikelihood(cls_lm, pairs, mc_samples=16, deterministic=deterministic, batch_size=bs)
            for a, b in zip(base, other):
                assert a.value == pytest.approx(b.value, abs=1e-4)
                assert a.stderr == pytest.approx(b.stderr, abs=1e-4)
    # deterministic: a pair's value is its own, whatever is scored with it and in any order
    alone = loglikelihood(cls_lm, [pairs[0]], mc_samples=16, deterministic=True)[0]
    reordered = loglikelihood(cls_lm, pairs[::-1], mc_samples=16, deterministic=True)
    assert reordered[-1].value == pytest.approx(alone.value, abs=1e-4)
    stream = loglikelihood(cls_lm, pairs[::-1], mc_samples=16, deterministic=False)
    assert stream[-1].value != pytest.approx(alone.value, abs=1e-4)
    other_seed = loglikelihood(cls_lm, [pairs[0]], mc_samples=16, deterministic=True, seed=1)[0]
    assert other_seed.value != pytest.approx(alone.value, abs=1e-4)


def test_is_greedy_agrees_with_the_sampler_at_temperature_zero(plain_lm):
    lm = plain_lm
    tok = lm.tokenizer
    ctx = tok.encode(CONTEXT, add_special_tokens=False)
    T = 4
    config = SamplerConfig(max_new_tokens=T, steps=T, block_length=T, temperature=0.0, repetition_penalty=1.0,
                           stop_at_eos=False)
    greedy = lm.generate_ids([ctx], config).sequences[0, len(ctx):].tolist()
    assert tok.mask_token_id not in greedy and len(greedy) == T
    other = list(greedy)
    other[-1] = (other[-1] + 1) % len(tok)
    scores = loglikelihood_ids(lm, [(ctx, greedy), (ctx, other), (ctx, greedy[:1])], mc_samples=8)
    assert scores[0].is_greedy is True and scores[1].is_greedy is False
    assert scores[2].is_greedy is True  # one token: argmax at the masked position
    unchecked = loglikelihood_ids(lm, [(ctx, greedy)], mc_samples=8, check_greedy=False)[0]
    assert unchecked.is_greedy is None and unchecked.value == pytest.approx(scores[0].value)


def test_long_context_is_cut_from_the_left_and_counted(cls_lm):
    tok = cls_lm.tokenizer
    words = tok.encode(" ".join(["soru cevap metin"] * 70), add_special_tokens=False)  # 210 tokens
    answer = tok.encode(" A", add_special_tokens=False)
    [s] = loglikelihood_ids(cls_lm, [(words, answer)])
    keep = cls_lm.context_length - 2 - 1
    assert s.truncated == len(words) - keep
    [direct] = loglikelihood_ids(cls_lm, [(words[-keep:], answer)])
    assert s.value == pytest.approx(direct.value, abs=1e-6) and direct.truncated == 0


def test_edge_cases_and_bad_settings(cls_lm):
    [empty] = loglikelihood(cls_lm, [(CONTEXT, "")])
    assert empty.value == 0.0 and empty.method == "empty" and empty.is_greedy is True
    too_long = [cls_lm.tokenizer.mask_token_id * 0 + 10] * cls_lm.context_length
    with pytest.raises(DiffutronError, match="does not fit"):
        loglikelihood_ids(cls_lm, [([], too_long)])
    for bad in ({"mc_samples": 0}, {"batch_size": 0}, {"seed": -1}):
        with pytest.raises(DiffutronError):
            loglikelihood(cls_lm, [(CONTEXT, " A")], **bad)


def test_training_mode_is_restored(cls_lm):
    cls_lm.model.train()
    try:
        loglikelihood(cls_lm, [(CONTEXT, " A")])
        assert cls_lm.model.training
    finally:
        cls_lm.model.eval()


# ---------------------------------------------------------------------------------------------
# ELBO perplexity


TEXTS = ["Türkiye'nin başkenti Ankara'dır.", "Kitap okumak insanın ufkunu genişletir.",
         "Bugün hava çok güzel, parkta yürüyüş yaptık.", "Çay bahçesinde arkadaşlarımızla sohbet ettik."]


@pytest.fixture(scope="module")
def sequences(tokenizer):
    return [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]


def test_perplexity_is_the_training_objective_summed_over_tokens(model, tokenizer, sequences):
    mask = tokenizer.mask_token_id
    r = elbo_perplexity(model, sequences, mask_token_id=mask, seed=3, mc_samples=3)
    # by hand: each draw of each sequence through mdlm_loss (one row: w * sum CE / N_i)
    total = 0.0
    for i, seq in enumerate(sequences):
        ids = torch.tensor([seq])
        maskable = torch.ones_like(ids, dtype=torch.bool)
        t, noise = sequence_noise(maskable[0], index=i, seed=3, mc_samples=3)
        per_draw = [mdlm_loss(model, ids, maskable, mask_token_id=mask, t=t[d : d + 1], noise_mask=noise[d : d + 1]).item()
                    * len(seq) for d in range(3)]
        total += sum(per_draw) / 3
    n_tokens = sum(len(s) for s in sequences)
    assert r.tokens == n_tokens and r.sequences == 4
    assert r.loss == pytest.approx(total / n_tokens, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(r.loss), rel=1e-9)


def test_perplexity_reproducible_and_batching_free(model, tokenizer, sequences):
    kw = dict(mask_token_id=tokenizer.mask_token_id, seed=0, mc_samples=4)
    a = elbo_perplexity(model, sequences, batch_size=16, **kw)
    b = elbo_perplexity(model, sequences, batch_size=16, **kw)
    c = elbo_perplexity(model, sequences, batch_size=3, max_masked_per_forward=5, **kw)
    assert a == b
    assert c.loss == pytest.approx(a.loss, rel=1e-6) and c.stderr == pytest.approx(a.stderr, rel=1e-5)
    d = elbo_perplexity(model, sequences, **{**kw, "seed": 1})
    assert d.loss != a.loss


def test_shards_combine_into_the_whole_run(model, tokenizer, sequences):
    kw = dict(mask_token_id=tokenizer.mask_token_id, seed=5, mc_samples=3, words=None)
    whole = elbo_perplexity(model, sequences, **kw)
    parts = [elbo_perplexity(model, sequences[:1], **kw), elbo_perplexity(model, sequences[1:], first_index=1, **kw)]
    both = PerplexityResult.combine(parts)
    assert both.loss == pytest.approx(whole.loss, rel=1e-6) and both.stderr == pytest.approx(whole.stderr, rel=1e-5)
    assert both.tokens == whole.tokens and both.sequences == 4


def test_perplexity_input_forms_agree(model, tokenizer, sequences):
    kw = dict(mask_token_id=tokenizer.mask_token_id, seed=0, mc_samples=2)
    base = elbo_perplexity(model, sequences, **kw)
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
    att = torch.zeros_like(ids)
    for r, s in enumerate(sequences):
        ids[r, : len(s)] = torch.tensor(s)
        att[r, : len(s)] = 1
    labels = torch.where(att.bool(), ids, torch.full_like(ids, -100))
    as_batch = elbo_perplexity(model, [{"input_ids": ids[:2], "attention_mask": att[:2]},
                                       {"input_ids": ids[2:], "attention_mask": att[2:], "labels": labels[2:]}], **kw)
    rows = elbo_perplexity(model, [{"input_ids": s} for s in sequences], **kw)

    class Packed:  # the training data's interface: len() and batch(indices)
        def __len__(self):
            return len(sequences)

        def batch(self, indices):
            fields = {"input_ids": ids[indices], "attention_mask": att[indices], "maskable": att[indices].bool()}
            return type("Batch", (), fields)()

    packed = elbo_perplexity(model, Packed(), **kw)
    import datasets

    hf = elbo_perplexity(model, datasets.Dataset.from_dict({"input_ids": sequences}), **kw)
    for other in (as_batch, rows, packed, hf):
        assert other.loss == pytest.approx(base.loss, rel=1e-6) and other.tokens == base.tokens
    same_len = torch.tensor([s[:6] for s in sequences])
    assert elbo_perplexity(model, same_len, **kw).tokens == 24


def test_perplexity_only_counts_maskable_tokens(model, tokenizer, sequences):
    ids = torch.tensor([sequences[0][:8]])
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[0, 4:] = True  # a prompt of 4 tokens is never masked
    with Recorder(model) as rec:
        r = elbo_perplexity(model, [{"input_ids": ids, "maskable": maskable}], mask_token_id=tokenizer.mask_token_id,
                            mc_samples=8)
    assert r.tokens == 4
    for row in rec.inputs:
        assert row[0, :4].tolist() == ids[0, :4].tolist()
    assert sum(rec.head_rows) == sum(int((row == tokenizer.mask_token_id).sum()) for row in rec.inputs)


def test_perplexity_stderr_falls_with_draws_and_words(model, tokenizer, sequences):
    kw = dict(mask_token_id=tokenizer.mask_token_id, seed=0)
    few = elbo_perplexity(model, sequences, mc_samples=2, **kw)
    many = elbo_perplexity(model, sequences, mc_samples=32, **kw)
    assert 2.0 < few.stderr / many.stderr < 8.0  # ~ sqrt(16)
    one = elbo_perplexity(model, sequences, mc_samples=1, **kw)
    assert math.isnan(one.stderr) and one.to_dict()["stderr"] is None
    w = elbo_perplexity(model, sequences, mc_samples=2, words=20, **kw)
    assert w.loss_per_word == pytest.approx(few.loss * few.tokens / 20)
    assert w.stderr_per_word == pytest.approx(few.stderr * few.tokens / 20)
    assert w.ppl_per_word == pytest.approx(math.exp(w.loss_per_word))


def test_two_forms_of_the_bound_agree(lm, tokenizer, sequences):
    """The t-form (objective) and the k-form (answer scoring) estimate the same ELBO."""
    seq = sequences[0][:4]
    exact = loglikelihood_ids(lm, [([], seq)], mc_samples=15)[0]
    assert exact.method == "enumerated"
    r = elbo_perplexity(lm.model, [seq], mask_token_id=tokenizer.mask_token_id, mc_samples=1500, batch_size=256)
    assert abs(-r.loss * r.tokens - exact.value) < 4 * r.stderr * r.tokens


def test_perplexity_errors(model, tokenizer):
    with pytest.raises(DiffutronError, match="no maskable"):
        elbo_perplexity(model, [{"input_ids": torch.tensor([[5, 6]]), "maskable": torch.zeros(1, 2, dtype=torch.bool)}],
                        mask_token_id=tokenizer.mask_token_id)
    with pytest.raises(DiffutronError):
        elbo_perplexity(model, [[5, 6]], mask_token_id=tokenizer.mask_token_id, mc_samples=0)
