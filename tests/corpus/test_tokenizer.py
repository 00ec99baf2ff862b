"""The Turkish Unigram tokenizer: special tokens, chat markers, exact round trips."""

import json
import unicodedata

import pytest

from diffutron.cli import main
from diffutron.corpus.tokenizer import (CHAT_MARKERS, SPECIAL_TOKENS, TOKENIZER_INFO, load_tokenizer, tokens_per_word,
                                      train_tokenizer)
from diffutron.errors import DiffutronError

_WORDS = ("ev okul kitap deniz bahçe şehir köprü ırmak ağaç çiçek göl dağ yol kapı pencere masa sandalye öğretmen "
          "öğrenci doktor işçi çiftçi yazar ressam müzik şarkı haber gazete").split()
_SUFFIXES = ["", "ler", "de", "den", "e", "i", "in", "imiz", "lerinde", "ce", "siz", "li"]
_VERBS = ["geldi", "gidiyor", "okudu", "yazacak", "gördük", "sevdiler", "açıldı", "kapandı", "büyüyor", "değişti"]


def make_text(i: int) -> str:
    w = [_WORDS[(i * 7 + k) % len(_WORDS)] + _SUFFIXES[(i + k) % len(_SUFFIXES)] for k in range(6)]
    return (f"{w[0].capitalize()} {w[1]} {w[2]} {_VERBS[i % 10]}. İstanbul'da {w[3]} ve {w[4]} {_VERBS[(i + 3) % 10]}."
            f"\nIğdır'ın {w[5]} {1900 + i} yılında {_VERBS[(i + 5) % 10]}!")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus"
    corpus.mkdir()
    for split, rng in (("train", range(0, 400)), ("validation", range(400, 420)), ("test", range(420, 440))):
        with open(corpus / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in rng:
                doc = {"id": f"d/{i}", "text": make_text(i), "source": "d", "domain": "news" if i % 2 else "help"}
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    (corpus / "stats.json").write_text(json.dumps({"fingerprint": "abc"}))
    info = train_tokenizer(corpus, root / "tokenizer", vocab_size=8000, progress=False)
    return root, info, load_tokenizer(root / "tokenizer")


def test_special_tokens_have_mmbert_ids(trained):
    _, info, tok = trained
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    assert (tok.cls_token_id, tok.sep_token_id) == (2, 1)
    assert [tok.convert_ids_to_tokens(i) for i in range(5)] == list(SPECIAL_TOKENS.values())
    assert tok.model_max_length == 512 and tok.padding_side == "right"
    assert tok("ev okul")["input_ids"][0] == tok.bos_token_id and tok("ev okul")["input_ids"][-1] == tok.eos_token_id
    batch = tok(["ev", "ev okul kitap deniz"], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id and batch["attention_mask"][0][-1] == 0
    assert info["special_tokens"]["mask_token"] == ["<mask>", 4] and info["corpus_fingerprint"] == "abc"


def test_chat_markers_are_single_ordinary_tokens(trained):
    _, _, tok = trained
    marker_ids = [tok.convert_tokens_to_ids(m) for m in CHAT_MARKERS]
    assert len(set(marker_ids)) == len(CHAT_MARKERS) and tok.unk_token_id not in marker_ids
    assert not set(marker_ids) & set(tok.all_special_ids)
    for m, i in zip(CHAT_MARKERS, marker_ids):
        assert tok(m, add_special_tokens=False)["input_ids"] == [i]
    chat = "[SYS]\nKısa cevap ver.\n[/SYS]\n\n[Question]\nIğdır nerede?\n[/Question]\n\n[Answer]\nDoğuda.\n[/Answer]\n\n"
    ids = tok(chat)["input_ids"]
    assert sum(i in marker_ids for i in ids) == 6
    assert tok.decode(ids, skip_special_tokens=True) == chat  # markers survive, <bos>/<eos> do not
    assert "<mask>" not in tok.decode(ids + [tok.mask_token_id], skip_special_tokens=True)
    prompt = tok("[Question]\nev\n[/Question]\n\n[Answer]\n", add_special_tokens=False)["input_ids"]
    assert prompt[-2:] == [tok.convert_tokens_to_ids("[Answer]"), tok.convert_tokens_to_ids("\n")]


@pytest.mark.parametrize("text", [
    "İstanbul'da yaşayan Iğdırlı öğrenciler ılık bir günde çıktılar.",
    "ÇOK BÜYÜK HARFLİ BİR BAŞLIK",
    "Satır bir.\nSatır iki.\n\n\nÜç boş satırdan sonra.",
    "\nBaşta satır sonu, sonda da\n",
    "iki  boşluk\tve sekme",
    "Sayılar: 3,14 ve 1.000.000; %25 indirim (yaklaşık).",
    "Emoji 😀, Çince 漢字, Arapça العربية ve ünlem!",
    "e-posta: ornek@alan.com.tr — “tırnak” ‘işaretleri’ … bitti",
])
def test_round_trip_is_exact(trained, text):
    _, _, tok = trained
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids  # byte fallback spells out unknown characters
    assert tok.decode(ids) == text
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_nfc_and_no_lowercasing(trained):
    _, _, tok = trained
    composed = "Şişli'de çiçekçi"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    assert tok(decomposed)["input_ids"] == tok(composed)["input_ids"]
    assert tok.decode(tok(decomposed, add_special_tokens=False)["input_ids"]) == composed
    assert tok.tokenize("İstanbul") != tok.tokenize("istanbul")


def test_first_word_of_a_line_is_the_same_piece_as_elsewhere(trained):
    _, _, tok = trained
    mid = tok.tokenize("okul kitap")
    line = tok.tokenize("okul\nkitap")
    assert line == mid[:1] + ["\n"] + mid[1:]


def test_chat_template_is_saved_with_the_tokenizer(trained):
    _, _, tok = trained
    messages = [{"role": "system", "content": " Kısa cevap ver. "}, {"role": "user", "content": "Iğdır nerede?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "[SYS]\nKısa cevap ver.\n[/SYS]\n\n[Question]\nIğdır nerede?\n[/Question]\n\n[Answer]\n"


def test_saved_files_load_with_auto_tokenizer_and_default_path(trained, monkeypatch):
    from transformers import AutoTokenizer

    root, info, tok = trained
    auto = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    text = "[Question]\nİstanbul'da hava nasıl?\n[/Question]"
    assert auto(text)["input_ids"] == tok(text)["input_ids"]
    assert auto.mask_token_id == 4
    assert (root / "tokenizer" / TOKENIZER_INFO).is_file()
    monkeypatch.setenv("DIFFUTRON_CACHE", str(root))
    assert load_tokenizer()("ev")["input_ids"] == tok("ev")["input_ids"]


def test_vocabulary_order_is_canonical_so_a_retrained_tokenizer_has_the_same_ids(trained, tmp_path):
    root, _, tok = trained
    vocab = json.loads(tok.backend_tokenizer.to_str())["model"]["vocab"]
    floor = min(score for _, score in vocab)  # the byte-fallback pieces, appended last
    learned = [(piece, score) for piece, score in vocab[len(SPECIAL_TOKENS):] if score > floor]
    assert len(learned) > 100 and learned == sorted(learned, key=lambda ps: (-ps[1], ps[0]))
    assert all(score == round(score, 9) for _, score in learned)
    train_tokenizer(root / "corpus", tmp_path / "again", vocab_size=8000, progress=False)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (root / "tokenizer" / "tokenizer.json").read_bytes()


def test_training_report(trained):
    _, info, tok = trained
    assert info["vocab_size"] == len(tok) <= 8000
    assert info["training_documents"] == 400
    assert info["held_out_tokens_per_word"] > 1.0
    assert set(info["held_out_tokens_per_word_by_domain"]) == {"news", "help"}
    held = [make_text(i) for i in range(400, 440)]
    assert info["held_out_tokens_per_word"] == pytest.approx(tokens_per_word(tok, held), abs=1e-4)


def test_user_errors(tmp_path, trained):
    root, _, _ = trained
    with pytest.raises(DiffutronError, match="vocab_size must be between 1000 and 262144"):
        train_tokenizer(root / "corpus", tmp_path / "t", vocab_size=500)
    with pytest.raises(DiffutronError, match="corpus build"):
        train_tokenizer(tmp_path / "none", tmp_path / "t")
    with pytest.raises(DiffutronError, match="corpus tokenizer"):
        load_tokenizer(tmp_path / "none")


def test_cli_trains_on_one_domain(tmp_path, trained, capsys):
    root, _, _ = trained
    out = tmp_path / "tok"
    assert main(["corpus", "tokenizer", "--corpus", str(root / "corpus"), "--out", str(out), "--vocab-size", "8000",
                 "--domains", "news", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "held-out tokens per word" in printed and str(out) in printed
    info = json.loads((out / TOKENIZER_INFO).read_text())
    assert info["domains"] == ["news"] and info["training_documents"] == 200


def test_recipe_prepare_retrains_an_outdated_tokenizer_and_its_tasks(tmp_path, trained, monkeypatch):
    import shutil

    import diffutron.corpus.tasks as tasks_mod
    from diffutron.corpus.tokenizer import is_outdated
    from diffutron.training.prepare import PrepareConfig, prepare

    root, _, tok = trained
    tok_dir = tmp_path / "tokenizer"
    shutil.copytree(root / "tokenizer", tok_dir)
    assert not is_outdated(tok_dir) and not is_outdated(tmp_path)  # current; not ours at all
    info = json.loads((tok_dir / TOKENIZER_INFO).read_text())
    (tok_dir / TOKENIZER_INFO).write_text(json.dumps({**info, "format": "diffutron-tokenizer/1"}))
    assert is_outdated(tok_dir)
    built = []
    monkeypatch.setattr(tasks_mod, "build_tasks", lambda corpus, out, **kw: built.append(out))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "stats.json").write_text(json.dumps({"format": tasks_mod.TASKS_FORMAT}))
    where = {"corpus": str(root / "corpus"), "tasks": str(tasks), "tokenizer": str(tok_dir), "data": str(tmp_path)}
    logs = []
    prepare(PrepareConfig(vocab_size=8000), where, log=logs.append)
    assert not is_outdated(tok_dir) and "older format" in logs[0]
    assert built == [tasks]  # the tasks' length filter depends on the tokenizer: rebuilt too
    assert (tok_dir / "tokenizer.json").read_bytes() == (root / "tokenizer" / "tokenizer.json").read_bytes()
    prepare(PrepareConfig(vocab_size=8000), where, log=logs.append)
    assert built == [tasks] and len(logs) == 2  # nothing left to do
    (tasks / "stats.json").write_text(json.dumps({"format": "diffutron-tasks/1"}))  # before complete, qa, about
    prepare(PrepareConfig(vocab_size=8000), where, log=logs.append)
    assert built == [tasks, tasks] and "older format" in logs[-1]
