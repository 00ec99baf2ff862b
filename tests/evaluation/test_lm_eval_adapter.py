"""The lm-eval adapter on a tiny custom task: registration, loglikelihood, rolling, generate_until."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from diffutron.cli import main  # noqa: E402
from diffutron.evaluation import lm_eval_adapter as A  # noqa: E402
from diffutron.evaluation.metrics import f1_binary, predictions  # noqa: E402
from diffutron.likelihood import loglikelihood, special_affixes  # noqa: E402
from diffutron.sampling import SamplerConfig  # noqa: E402

ROWS = [{"text": "Harika, yine yağmur yağıyor.", "label": 1}, {"text": "Bugün hava çok güzel.", "label": 0},
        {"text": "Kitap okumak insanın ufkunu genişletir.", "label": 0},
        {"text": "Iğdır ve Ağrı doğu illerimizdendir.", "label": 1}]

TASK_YAML = """task: tiny_irony
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Cümle: {{{{text}}}}\\nSoru: Bu cümlede ironi var mı?\\n"
doc_to_target: label
doc_to_choice: ["Hayır", "Evet"]
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: f1
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    data = d / "irony.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    (d / "tiny_irony.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    return d


def prompt(row):
    return f"Cümle: {row['text']}\nSoru: Bu cümlede ironi var mı?\n"


def test_registered_as_diffutron():
    assert get_model("diffutron") is A.DiffutronLMEval


def test_multiple_choice_task_through_lm_eval(lm, task_dir):
    from lm_eval.tasks import TaskManager

    model = A.DiffutronLMEval(lm=lm, batch_size=8)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)  # skip indexing 10k built-in tasks
    out = lm_eval.simple_evaluate(model=model, tasks=["tiny_irony"], task_manager=manager,
                                  num_fewshot=0, bootstrap_iters=0, log_samples=True)
    res = out["results"]["tiny_irony"]
    # the same numbers straight from the estimator and our metrics
    pairs = [(prompt(r), c) for r in ROWS for c in (" Hayır", " Evet")]
    scores = loglikelihood(lm, pairs, deterministic=True)
    lls = [[scores[2 * i].value, scores[2 * i + 1].value] for i in range(len(ROWS))]
    preds = [predictions(ll, ("Hayır", "Evet")) for ll in lls]
    golds = [r["label"] for r in ROWS]
    assert res["acc,none"] == pytest.approx(sum(p == g for (p, _), g in zip(preds, golds)) / 4)
    assert res["acc_norm,none"] == pytest.approx(sum(p == g for (_, p), g in zip(preds, golds)) / 4)
    assert res["f1,none"] == pytest.approx(f1_binary(golds, [p for p, _ in preds]))
    for sample in out["samples"]["tiny_irony"]:
        i = sample["doc_id"]
        got = [resp[0][0] for resp in sample["resps"]]
        assert got == pytest.approx(lls[i], abs=1e-5)
        assert [a[0] for a in sample["arguments"]] == [prompt(ROWS[i])] * 2


def test_loglikelihood_rolling_is_the_elbo_of_the_text(lm):
    model = A.DiffutronLMEval(lm=lm, batch_size=16, mc_samples=16)
    short = "Kitap okumak güzel."
    [value] = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (short,), 0)], disable_tqdm=True)
    [direct] = loglikelihood(lm, [("", short)], mc_samples=16, deterministic=True)
    assert value == pytest.approx(direct.value, abs=1e-5) and value < 0
    # a text longer than the context: disjoint windows, summed
    ids = lm.tokenizer.encode(" ".join(["Kitap okumak güzel."] * 50), add_special_tokens=False)
    prefix, suffix = special_affixes(lm.tokenizer)
    window = lm.context_length - len(prefix) - len(suffix)
    assert len(ids) > window
    text = lm.tokenizer.decode(ids)
    [long_value] = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    from diffutron.likelihood import loglikelihood_ids

    parts = loglikelihood_ids(lm, [([], ids[lo : lo + window]) for lo in range(0, len(ids), window)], mc_samples=16,
                              deterministic=True, check_greedy=False)
    assert long_value == pytest.approx(sum(p.value for p in parts), abs=1e-4)


def test_generate_until_cuts_at_stop_strings_and_stops_early(lm):
    model = A.DiffutronLMEval(lm=lm, batch_size=4, block_length=2)
    context = "Türkiye'nin başkenti"
    free = model.generate_until([Instance("generate_until", {}, (context, {"max_gen_toks": 8, "until": [],
                                                                          "do_sample": False}), 0)],
                                disable_tqdm=True)[0]
    config = SamplerConfig(max_new_tokens=8, steps=8, block_length=2, temperature=0.0)  # paper defaults otherwise
    [same] = lm.generate([context], config, chat=False)
    assert free == same.text and free
    words = free.split()
    assert len(words) >= 3
    stop = words[1]
    counter = {"n": 0}
    handle = lm.model.register_forward_pre_hook(lambda m, a: counter.__setitem__("n", counter["n"] + 1))
    try:
        cut = model.generate_until([Instance("generate_until", {}, (context, {"max_gen_toks": 8, "until": [stop],
                                                                              "do_sample": False}), 0)],
                                   disable_tqdm=True)[0]
    finally:
        handle.remove()
    assert cut == free[: free.find(stop)] and stop not in cut
    assert counter["n"] < 8  # the stop string also ends decoding at token level


def test_generation_uses_the_models_defaults_and_model_args_override_them(lm):
    """The paper's settings unless model_args say otherwise; the request's max_gen_toks wins (the
    reference adapter ignores it: always 128 tokens); do_sample=False is greedy."""
    d = lm.defaults
    model = A.DiffutronLMEval(lm=lm)
    paper = model.sampler_config({})
    assert paper == d.replace(max_new_tokens=d.max_new_tokens, steps=d.steps)
    assert (paper.block_length, paper.temperature, paper.repetition_penalty, paper.remasking) == (32, 0.1, 1.2,
                                                                                                   "low_confidence")
    long = model.sampler_config({"max_gen_toks": 96})
    assert (long.max_new_tokens, long.steps, long.block_length) == (96, 96, 32)  # one token per step, as the paper
    assert model.sampler_config({"do_sample": False}).temperature == 0.0
    assert model.sampler_config({"temperature": 0.7}).temperature == 0.7
    assert model.sampler_config({"max_gen_toks": 10_000}).max_new_tokens == lm.context_length - 1
    # the reference adapter's settings, by its own argument names where they differ
    ref = A.DiffutronLMEval(lm=lm, max_new_tokens=128, steps=128, block_length=128, temperature=0, cfg=0.5,
                            mc_num=32, is_check_greedy=False, remasking="random", rng="reference", seed=3)
    got = ref.sampler_config({"max_gen_toks": 16})
    assert (got.max_new_tokens, got.steps, got.block_length, got.temperature, got.cfg_scale) == (16, 128, 128, 0, 0.5)
    assert (got.remasking, got.rng, got.seed, got.repetition_penalty) == ("random", "reference", 3, 1.2)
    assert ref.sampler_config({}).max_new_tokens == min(128, lm.context_length - 1)  # the tiny context caps it
    assert ref.mc_samples == 32 and ref.check_greedy is False
    with pytest.raises(A.DiffutronError, match="remasking"):
        A.DiffutronLMEval(lm=lm, remasking="best")
    # lm-eval's gen_prefix: no generation prompt, the answer continues the final message (as the reference)
    chat = [{"role": "user", "content": "Soru?"}, {"role": "assistant", "content": "Cevap:"}]
    assert model.apply_chat_template(chat, add_generation_prompt=False) == \
        "[Question]\nSoru?\n[/Question]\n\n[Answer]\nCevap:"
    assert model.apply_chat_template(chat[:1]) == "[Question]\nSoru?\n[/Question]\n\n[Answer]\n"


def test_cli_hands_over_to_lm_eval_with_the_model_registered(saved_model_dir, monkeypatch):
    import lm_eval.__main__ as lm_main

    seen = {}

    def fake_cli():
        import sys

        seen["argv"] = list(sys.argv)
        cls = get_model("diffutron")  # what lm-eval's run command resolves --model diffutron to
        seen["model"] = cls.create_from_arg_string(f"pretrained={saved_model_dir},mc_samples=8,deterministic=false",
                                                   {"batch_size": 8, "max_batch_size": None, "device": "cpu"})

    monkeypatch.setattr(lm_main, "cli_evaluate", fake_cli)
    monkeypatch.setattr("sys.argv", ["diffutron"])
    rc = main(["eval", "lm-eval", "--model_args", f"pretrained={saved_model_dir}", "--tasks", "xcopa_tr",
               "--include_path", "cetvel/"])
    assert rc == 0
    assert seen["argv"] == ["lm-eval", "run", "--model", "diffutron", "--model_args", f"pretrained={saved_model_dir}",
                            "--tasks", "xcopa_tr", "--include_path", "cetvel/"]
    model = seen["model"]
    assert model.mc_samples == 8 and model.deterministic is False and model.batch_size == 8
    assert model.lm.context_length == 128 and str(model.lm.device) == "cpu"
