"""The Turkish-word share: hunspell stems, Turkish lower-casing, letters only, the 50% prefix rule."""

import pytest

from diffutron.corpus.lexicon import (HUNSPELL_TR, fetch_lexicon, is_turkish_word, letters, load_stems, parse_dic,
                                    turkish_word_share)

DIC = """9
kitap/1,2,3
İstanbul/17,18
Ankara'lı
ılık/5
ışık
iğne/3
ev/4
Iğdır/2
gel
"""
STEMS = parse_dic(DIC)


def test_parse_dic_keeps_stems_lower_cased_with_turkish_rules_and_letters_only():
    assert STEMS == {"kitap", "istanbul", "ankaralı", "ılık", "ışık", "iğne", "ev", "ığdır", "gel"}
    assert "9" not in STEMS  # the count line


@pytest.mark.parametrize("word, expected", [
    ("İstanbul'a", "istanbula"),
    ("ISPARTA", "ısparta"),
    ("IĞDIR'DA", "ığdırda"),
    ("Kitap-lar!", "kitaplar"),
    ("1923", ""),
])
def test_letters(word, expected):
    assert letters(word) == expected


@pytest.mark.parametrize("word, turkish", [
    ("kitap", True),            # the stem itself
    ("kitaplar", True),         # 5 of 8 letters
    ("kitapçı", True),          # 5 of 7
    ("kitaplarımızdan", False),  # 5 of 15: the stem covers less than half
    ("İstanbul'a", True),       # İ -> i, apostrophe dropped: "istanbula", stem "istanbul"
    ("İSTANBUL'DAN", True),
    ("ISTANBUL", False),        # I is the capital of ı: "ıstanbul" is no stem
    ("ILIK", True),             # "ılık"
    ("Iğdır'da", True),
    ("evlerine", False),        # "ev": 2 of 8 letters
    ("evde", True),             # 2 of 4 letters: exactly 50% counts
    ("evlerde", False),         # 2 of 7
    ("gelin", True),            # 3 of 5
    ("hlıâli", False),
    ("xyz", False),
])
def test_is_turkish_word(word, turkish):
    assert is_turkish_word(word, STEMS) is turkish


def test_words_without_letters_are_not_counted():
    assert is_turkish_word("1923", STEMS) is None
    assert is_turkish_word("+++", STEMS) is None
    share = turkish_word_share("1923 yılında kitap +++ xyz", STEMS)
    assert share == {"share": 1 / 3, "words": 3, "turkish": 1}  # yılında, kitap, xyz


def test_share_over_several_texts_and_empty():
    assert turkish_word_share(["Kitap evde.", "İstanbul'a gel!"], STEMS) == {"share": 1.0, "words": 4, "turkish": 4}
    assert turkish_word_share(["", "123"], STEMS) == {"share": None, "words": 0, "turkish": 0}
    # a plain str.lower() would turn "İ" into "i" + a combining dot and miss the stem
    assert "İstanbul".lower() != "istanbul" and turkish_word_share("İstanbul", STEMS)["share"] == 1.0


def test_load_stems_reads_a_given_file(tmp_path, monkeypatch):
    path = tmp_path / "tr_TR.dic"
    path.write_text(DIC, encoding="utf-8")
    assert load_stems(path) == STEMS
    monkeypatch.setenv("DIFFUTRON_LEXICON", str(path))
    assert load_stems() == STEMS
    assert fetch_lexicon(path) == path  # a file already there is never fetched again


def test_the_pin_is_debians_hunspell_tr():
    assert HUNSPELL_TR.registry == "debian" and HUNSPELL_TR.package == "hunspell-tr"
    assert HUNSPELL_TR.filename == "hunspell-tr_1%3a7.5.0-1_all.deb" and len(HUNSPELL_TR.sha256) == 64


def test_an_offline_machine_can_say_there_is_no_lexicon(monkeypatch):
    from diffutron.errors import DiffutronError

    monkeypatch.setenv("DIFFUTRON_LEXICON", "none")
    with pytest.raises(DiffutronError, match="no Turkish lexicon"):
        load_stems()
