"""Turkish text helpers: casing, NFC, whitespace, words, sentences."""

import unicodedata

import pytest

from diffutron.text import (count_words, nfc, normalize_whitespace, split_sentences, tr_capitalize, tr_casefold,
                            tr_lower, tr_upper, words)


@pytest.mark.parametrize("text, lower", [
    ("IŞIK", "ışık"),
    ("İSTANBUL", "istanbul"),
    ("Iğdır ve İzmir", "ığdır ve izmir"),
    ("DİYARBAKIR'IN", "diyarbakır'ın"),
    ("ÇĞÖŞÜ", "çğöşü"),
])
def test_tr_lower(text, lower):
    assert tr_lower(text) == lower


def test_python_lower_is_wrong_for_turkish_and_ours_is_not():
    # the reason this module exists: str.lower maps I -> i and İ -> i + COMBINING DOT ABOVE
    assert "I".lower() == "i" and tr_lower("I") == "ı"
    assert len("İ".lower()) == 2 and tr_lower("İ") == "i"
    assert "i".upper() == "I" and tr_upper("i") == "İ"


@pytest.mark.parametrize("text, upper", [
    ("ışık", "IŞIK"),
    ("istanbul", "İSTANBUL"),
    ("ılık ifade", "ILIK İFADE"),
    ("çğöşü", "ÇĞÖŞÜ"),
])
def test_tr_upper(text, upper):
    assert tr_upper(text) == upper


def test_round_trip_of_case_keeps_dotted_and_dotless_i_apart():
    for word in ["ılık", "ilik", "kırık", "İnci", "Irmak"]:
        assert tr_lower(tr_upper(word)) == tr_lower(word)


def test_tr_capitalize_only_touches_the_first_letter():
    assert tr_capitalize("istanbul Boğazı") == "İstanbul Boğazı"
    assert tr_capitalize("ırmak") == "Irmak"
    assert tr_capitalize("iPhone'u") == "İPhone'u"
    assert tr_capitalize("") == ""


def test_casefold_compares_turkish_case_insensitively():
    assert tr_casefold("İSTANBUL") == tr_casefold("istanbul")
    assert tr_casefold("IŞIK") == tr_casefold("ışık")
    assert tr_casefold("ILIK") != tr_casefold("ilik")  # different words in Turkish


def test_nfc_composes_decomposed_letters_and_casing_handles_them():
    decomposed = "I\u0307stanbul s\u0327ehri"  # İ and ş written as base letter + combining mark
    assert decomposed != "İstanbul şehri"
    assert nfc(decomposed) == "İstanbul şehri"
    assert tr_lower(decomposed) == "istanbul şehri"
    assert unicodedata.is_normalized("NFC", tr_upper(unicodedata.normalize("NFD", "çiçek")))
    assert tr_upper(unicodedata.normalize("NFD", "çiçek")) == "ÇİÇEK"


def test_normalize_whitespace():
    text = "  Merhaba\u00a0\u00a0dünya\t!\r\n\r\n\r\n\nYeni\u200b pa\u00adragraf  \n"
    assert normalize_whitespace(text) == "Merhaba dünya !\n\nYeni paragraf"
    assert normalize_whitespace(text, keep_newlines=False) == "Merhaba dünya ! Yeni paragraf"
    assert normalize_whitespace("a\x07b") == "a b"  # control characters become spaces


def test_words_keep_apostrophes_hyphens_and_numbers():
    text = "Ankara'nın nüfusu 5.7 milyon; Türkiye’de e-posta kullanımı %90'ı aştı!"
    assert words(text) == ["Ankara'nın", "nüfusu", "5.7", "milyon", "Türkiye’de", "e-posta", "kullanımı",
                           "90'ı", "aştı"]
    assert count_words(text) == 9
    assert count_words("") == 0
    assert words("— ... !!") == []


def test_split_sentences():
    text = ("Dr. Ayşe Yılmaz 19. yüzyıl tarihini anlattı. Peki ya sonra? Herkes şaşırdı! "
            "“Evet” dedi. A. Kaya da geldi.\nBaşlık satırı\nSon cümle vb. şeyler içerir.")
    assert split_sentences(text) == [
        "Dr. Ayşe Yılmaz 19. yüzyıl tarihini anlattı.",
        "Peki ya sonra?",
        "Herkes şaşırdı!",
        "“Evet” dedi.",
        "A. Kaya da geldi.",
        "Başlık satırı",
        "Son cümle vb. şeyler içerir.",
    ]
    assert split_sentences("  \n ") == []
