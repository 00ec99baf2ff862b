"""The task generators: from one corpus document to the rows of one task family.

Each ``*_rows`` function takes a document (with its sentences or annotations) and the seed,
and returns chat rows (``_row``) whose ``sources`` are hashes of the sentences (headwords)
they were made from; ``diffutron.corpus.tasks`` decides which generators run on which
documents and assembles the splits. Families:

- ``continue_rows``, ``complete_rows``, ``fill_blank_rows``, ``about_rows``: running text;
- ``qa_rows``: where / when / how-many questions (``_qa_candidates``);
- ``summarize_rows``: the most central sentence of a news passage (``_central``);
- ``translate_rows``: Turkish glosses of FreeDict headwords (``_glosses``);
- ``treebank_rows``: ``lemma``, ``case`` and ``analysis`` of Turkish Web Treebank words.

The prompt templates (``_TEMPLATES``) are ours; ``seeded_rng`` makes every choice depend only
on the seed and the document.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter
from typing import Iterable, Mapping

from ..text import count_words, split_sentences, tr_capitalize, tr_casefold, tr_lower, words

__all__ = [
    "seeded_rng",
    "doc_sentences",
    "continue_rows",
    "fill_blank_rows",
    "complete_rows",
    "qa_rows",
    "about_rows",
    "summarize_rows",
    "translate_rows",
    "treebank_rows",
]

_TEMPLATES = {
    "continue": ["Aşağıdaki metni bir cümleyle devam ettir.\n\n{context}",
                 "Metnin devamında gelecek cümleyi yaz:\n\n{context}"],
    "complete": ["Cümleyi tamamla:\n\n{prefix} …",
                 "Aşağıdaki cümlenin devamını yaz.\n\n{prefix} …"],
    "qa": ["{question}", "Kısaca cevapla: {question}"],
    "about": ["{topic} hakkında bir cümle yaz.", "{topic} hakkında kısa bir bilgi ver."],
    "fill_blank": ["Cümledeki boşluğa (___) gelmesi gereken kelimeyi yaz.\n\n{sentence}",
                   "Boşluğu dolduran kelime nedir?\n\n{sentence}"],
    "summarize": ["Aşağıdaki haber metnini en iyi özetleyen cümleyi metinden aynen seç.\n\n{text}",
                  "Bu metnin ana fikrini en iyi veren cümle hangisidir? Cümleyi aynen yaz.\n\n{text}"],
    "translate": ["İngilizce “{word}” kelimesinin Türkçe karşılığı nedir?",
                  "“{word}” sözcüğünü Türkçeye çevir."],
    "lemma": ["Cümle: {sentence}\n\nBu cümledeki “{word}” kelimesinin kökü (sözlük biçimi) nedir?",
              "“{word}” kelimesinin sözlükteki biçimini yaz.\n\nCümle: {sentence}"],
    "case": ["Cümle: {sentence}\n\nBu cümledeki “{word}” kelimesi hangi hâldedir?",
             "“{word}” sözcüğü hangi hâl ekini almıştır?\n\nCümle: {sentence}"],
    "analysis": ["Cümle: {sentence}\n\n“{word}” kelimesinin biçimbilimsel çözümlemesini yaz.",
                 "“{word}” sözcüğünü biçimbirimlerine ayırarak çözümle.\n\nCümle: {sentence}"],
}
# Treebank case values -> the Turkish name of the case (Bare and Nom are both "yalın").
_CASE_NAMES = {"Bare": "yalın", "Nom": "yalın", "Acc": "belirtme", "Dat": "yönelme", "Loc": "bulunma",
               "Abl": "ayrılma", "Gen": "ilgi", "Ins": "vasıta"}


def _key(text: str) -> str:
    """Short stable hash of a normalised source unit (sentence or headword)."""
    return hashlib.sha1(" ".join(tr_casefold(text).split()).encode()).hexdigest()[:12]


def _row(task: str, user: str, answer: str, doc: str, sources: Iterable[str], references=None) -> dict:
    row = {"task": task, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
           "doc": doc, "sources": sorted({_key(s) for s in sources})}
    if references and list(references) != [answer]:
        row["references"] = list(dict.fromkeys([answer, *references]))
    return row


def seeded_rng(seed: int, *parts: str) -> random.Random:
    return random.Random(hashlib.sha256(":".join([str(seed), *parts]).encode()).digest())


def _good_sentence(s: str, min_words: int = 5, max_words: int = 40) -> bool:
    n = count_words(s)
    return min_words <= n <= max_words and s[-1:] in ".!?…\"”’)" and sum(c.isalpha() for c in s) > len(s) / 2


def doc_sentences(doc: dict, annotations: Mapping[str, dict]) -> list[str]:
    ann = annotations.get(doc["id"])
    if ann and ann.get("sentences"):
        return [s["text"] if isinstance(s, dict) else s for s in ann["sentences"]]
    return split_sentences(doc["text"])


def continue_rows(doc: dict, sentences: list[str], seed: int, per_doc: int, max_context_chars: int) -> list[dict]:
    rng = seeded_rng(seed, "continue", doc["id"])
    targets = [i for i in range(1, len(sentences)) if _good_sentence(sentences[i])
               and count_words(sentences[i - 1]) >= 3]
    rows = []
    for i in sorted(rng.sample(targets, min(per_doc, len(targets)))):
        context = [sentences[i - 1]]
        for j in range(i - 2, max(-1, i - 4), -1):
            if sum(map(len, context)) + len(sentences[j]) > max_context_chars:
                break
            context.insert(0, sentences[j])
        if sum(map(len, context)) > max_context_chars:
            continue
        user = rng.choice(_TEMPLATES["continue"]).format(context=" ".join(context))
        rows.append(_row("continue", user, sentences[i], doc["id"], [*context, sentences[i]]))
    return rows


_BLANK_WORD = re.compile(r"^[^\W\d_]{4,}$")


def fill_blank_rows(doc: dict, sentences: list[str], seed: int, per_doc: int) -> list[dict]:
    rng = seeded_rng(seed, "fill_blank", doc["id"])
    usable = [s for s in sentences if _good_sentence(s, 6, 35)]
    rows = []
    for sentence in rng.sample(usable, min(per_doc, len(usable))):
        tokens = list(re.finditer(r"\S+", sentence))
        spots = [m for m in tokens[1:] if _BLANK_WORD.match(m.group().strip(".,;:!?\"“”‘’()…"))
                 and not m.group().isupper()]
        if not spots:
            continue
        m = rng.choice(spots)
        word = m.group().strip(".,;:!?\"“”‘’()…")
        start = m.start() + m.group().index(word)
        blanked = sentence[:start] + "___" + sentence[start + len(word):]
        user = rng.choice(_TEMPLATES["fill_blank"]).format(sentence=blanked)
        rows.append(_row("fill_blank", user, word, doc["id"], [sentence]))
    return rows


def complete_rows(doc: dict, sentences: list[str], seed: int, per_doc: int) -> list[dict]:
    """The first 40-60% of a sentence's words; the answer is the rest of it."""
    rng = seeded_rng(seed, "complete", doc["id"])
    usable = [s for s in sentences if _good_sentence(s, 8, 35)]
    rows = []
    for sentence in rng.sample(usable, min(per_doc, len(usable))):
        tokens = sentence.split()
        cut = rng.randint(max(3, round(len(tokens) * 0.4)), max(3, round(len(tokens) * 0.6)))
        prefix, rest = " ".join(tokens[:cut]), " ".join(tokens[cut:])
        if count_words(rest) < 3 or count_words(prefix) < 3:
            continue
        user = rng.choice(_TEMPLATES["complete"]).format(prefix=prefix)
        rows.append(_row("complete", user, rest, doc["id"], [sentence]))
    return rows


_MONTHS = "Ocak Şubat Mart Nisan Mayıs Haziran Temmuz Ağustos Eylül Ekim Kasım Aralık"
_DAYS = "Pazartesi Salı Çarşamba Perşembe Cuma Cumartesi Pazar"
_TIME_NAMES = frozenset(tr_lower(w) for w in (_MONTHS + " " + _DAYS).split())
_UPPER = "A-ZÇĞİÖŞÜÂÎÛ"
# a capitalised name with a case suffix after its apostrophe: locative, ablative, dative
_NAME_CASE = re.compile(rf"^([{_UPPER}][^\W\d_]*)['’]([^\W\d_]+)$")
_WHERE = ((re.compile(r"^n?[dt][ae]$"), "nerede"), (re.compile(r"^n?[dt][ae]n$"), "nereden"),
          (re.compile(r"^(?:y?[ae]|n[ae])$"), "nereye"))
_WHEN = re.compile(rf"(?:(?:\d{{1,2}} )?(?:{'|'.join(_MONTHS.split())}) )?(1[5-9]\d\d|20[0-4]\d)"
                   r"(?:['’](?:de|da|te|ta)\b| yılında\b| tarihinde\b)")
_HOW_MANY = re.compile(r"(?<![\d.,:/%'’\w])(\d{1,4}) ([a-zçğıöşü]{3,})\b")


def _question(sentence: str, start: int, end: int, wh: str) -> str:
    """``sentence`` with ``[start, end)`` replaced by the question word, ending in a question mark."""
    head = sentence[:start]
    q = head + (tr_capitalize(wh) if not head.strip() else wh) + sentence[end:]
    return q.rstrip().rstrip(".!…").rstrip() + "?"


def _names(sentence: str) -> list[tuple[int, int, str, str]]:
    """Capitalised names with a suffix after an apostrophe (``"Ankara Deneme Tiyatrosu'nda"``):
    ``(start, end, name, suffix)``. A name takes up to two capitalised words before it, never the
    sentence's first word (capitalised anyway); months and days are not names."""
    out = []
    tokens = list(re.finditer(r"\S+", sentence))
    for i, m in enumerate(tokens):
        word = m.group().rstrip(".,;:!?\"”’)…")
        match = _NAME_CASE.match(word)
        if not match or tr_lower(match.group(1)) in _TIME_NAMES:
            continue
        j = i
        while j > 1 and j > i - 3 and re.match(rf"^[{_UPPER}][^\W\d_]+$", tokens[j - 1].group()):
            j -= 1
        start, end = tokens[j].start(), m.start() + len(word)
        out.append((start, end, sentence[start : end - len(match.group(2)) - 1], match.group(2)))
    return out


# words that follow a number without being what it counts
_NOT_COUNTED = frozenset("ise ve ile veya ya da de ki gibi için olarak olan kadar ila ile ya da den dan "
                         "ya yani yahut hem ama fakat sonra önce".split())


def _qa_candidates(sentence: str) -> list[tuple[str, str, list[str]]]:
    """``(question, answer, references)`` for every where / when / how-many phrase of a sentence."""
    if not _good_sentence(sentence, 5, 25) or sentence.rstrip().endswith("?") or "=" in sentence:
        return []
    out = []
    for start, end, name, suffix in _names(sentence):
        wh = next((w for pattern, w in _WHERE if pattern.match(suffix)), None)
        if wh is not None:
            out.append((_question(sentence, start, end, wh), sentence[start:end], [sentence[start:end], name]))
    for m in _WHEN.finditer(sentence):
        out.append((_question(sentence, m.start(), m.end(), "ne zaman"), m.group(), [m.group(), m.group(1)]))
    for m in _HOW_MANY.finditer(sentence):
        number, noun = m.group(1), m.group(2)
        if tr_lower(noun) in _TIME_NAMES or noun in _NOT_COUNTED or noun.startswith("yıl") and len(number) == 4:
            continue
        out.append((_question(sentence, m.start(1), m.end(1), "kaç"), number, [number, f"{number} {noun}"]))
    return out


def qa_rows(doc: dict, sentences: list[str], seed: int) -> list[dict]:
    """At most one question per sentence (where / when / how many), answer the phrase it replaces."""
    rng = seeded_rng(seed, "qa", doc["id"])
    rows = []
    for sentence in sentences:
        cands = _qa_candidates(sentence)
        if not cands:
            continue
        question, answer, refs = rng.choice(cands)
        user = rng.choice(_TEMPLATES["qa"]).format(question=question)
        rows.append(_row("qa", user, answer, doc["id"], [sentence], references=refs))
    return rows


def about_rows(doc: dict, sentences: list[str], seed: int, per_doc: int) -> list[dict]:
    """A name of a sentence (see ``_names``; suffix cut) -> the sentence."""
    rng = seeded_rng(seed, "about", doc["id"])
    usable = []
    for sentence in sentences:
        names = sorted({name for _, _, name, _ in _names(sentence)})
        if names and _good_sentence(sentence, 6, 30):
            usable.append((sentence, names))
    rows = []
    for sentence, names in rng.sample(usable, min(per_doc, len(usable))):
        user = rng.choice(_TEMPLATES["about"]).format(topic=rng.choice(names))
        rows.append(_row("about", user, sentence, doc["id"], [sentence]))
    return rows


def _central(sentences: list[str]) -> int:
    """Index of the sentence with the highest summed cosine similarity to the others."""
    bags = [Counter(w for w in words(tr_casefold(s)) if len(w) > 2) for s in sentences]
    norms = [math.sqrt(sum(v * v for v in b.values())) or 1.0 for b in bags]
    best, best_score = 0, -1.0
    for i, b in enumerate(bags):
        if count_words(sentences[i]) < 5:
            continue
        total = sum(sum(b[w] * o[w] for w in b.keys() & o.keys()) / (norms[i] * norms[j])
                    for j, o in enumerate(bags) if j != i)
        if total > best_score:
            best, best_score = i, total
    return best


def summarize_rows(doc: dict, sentences: list[str], seed: int, max_chars: int) -> list[dict]:
    """Non-overlapping passages of whole sentences (<= max_chars, >= 4 sentences) of a news article."""
    rng = seeded_rng(seed, "summarize", doc["id"])
    rows, window = [], []
    for s in sentences + [None]:
        if s is not None and sum(map(len, window)) + len(s) + len(window) <= max_chars:
            window.append(s)
            continue
        if len(window) >= 4:
            answer = window[_central(window)]
            user = rng.choice(_TEMPLATES["summarize"]).format(text=" ".join(window))
            rows.append(_row("summarize", user, answer, doc["id"], window))
        window = [s] if s is not None and len(s) <= max_chars else []
    return rows


def _glosses(sense: str) -> list[str]:
    """Clean Turkish glosses of one dictionary sense: ``"(bot.) elma, elma ağacı. apple pie ..."``."""
    head = re.split(r"[.;]\s", sense + " ", maxsplit=1)[0]
    head = re.sub(r"\([^)]*\)", " ", head)
    out = []
    for g in head.split(","):
        g = " ".join(g.split()).strip(" .;:-")
        if g and count_words(g) <= 3 and re.fullmatch(r"[^\W\d_]+(?:[ '’\-][^\W\d_]+)*", g):
            out.append(g)
    return out


def translate_rows(doc: dict, entries: list[dict], seed: int) -> list[dict]:
    rng = seeded_rng(seed, "translate", doc["id"])
    rows = []
    for entry in entries:
        head = entry["headword"]
        if not re.fullmatch(r"[a-z]{3,}", head) or not entry["senses"]:
            continue
        glosses = _glosses(entry["senses"][0])
        if not glosses or tr_lower(glosses[0]) == head:
            continue
        user = rng.choice(_TEMPLATES["translate"]).format(word=head)
        rows.append(_row("translate", user, glosses[0], doc["id"], [head], references=glosses))
    return rows


_TREEBANK_WORD = re.compile(r"[^\W\d_]{2,}(?:['’][^\W\d_]+)?")


def treebank_rows(doc: dict, sentences: list[dict], seed: int) -> list[dict]:
    rng = seeded_rng(seed, "specific", doc["id"])
    rows = []
    for sent in sentences:
        text = sent["text"]
        # Alphabetic words (a proper noun may carry its suffix after an apostrophe) that occur
        # once in the sentence, so the question names one word unambiguously.
        cands = [w for w in sent["words"] if _TREEBANK_WORD.fullmatch(w["form"]) and text.count(w["form"]) == 1]
        if not cands:
            continue
        inflected = [w for w in cands if tr_lower(w["form"]) != tr_lower(w["lemma"])]
        w = rng.choice(inflected if inflected and rng.random() < 0.75 else cands)
        user = rng.choice(_TEMPLATES["lemma"]).format(sentence=text, word=w["form"])
        rows.append(_row("lemma", user, tr_lower(w["lemma"]), doc["id"], [text]))

        cased = [w for w in cands if w.get("case") in _CASE_NAMES]
        marked = [w for w in cased if _CASE_NAMES[w["case"]] != "yalın"]
        if cased:
            w = rng.choice(marked if marked and rng.random() < 0.75 else cased)
            name = _CASE_NAMES[w["case"]]
            answer = f"{name} hâl" if name == "yalın" else f"{name} hâli"
            refs = [answer, answer.replace("â", "a"), name]
            user = rng.choice(_TEMPLATES["case"]).format(sentence=text, word=w["form"])
            rows.append(_row("case", user, answer, doc["id"], [text], references=refs))

        w = rng.choice(inflected or cands)
        user = rng.choice(_TEMPLATES["analysis"]).format(sentence=text, word=w["form"])
        rows.append(_row("analysis", user, w["analysis"], doc["id"], [text]))
    return rows
