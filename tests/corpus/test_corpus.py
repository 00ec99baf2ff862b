"""Corpus: extraction from small wheel/.deb archives made here, fetching with checksums,
cleaning, de-duplication, deterministic splits, atomic output, the CLI. One test talks to PyPI."""

import gzip
import hashlib
import io
import json
import logging
import random
import shutil
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from diffutron.cli import main
from diffutron.corpus import build as corpus_mod
from diffutron.corpus import sources as sources_mod
from diffutron.corpus.archives import SourceError, open_archive
from diffutron.corpus.build import build_corpus, load_annotations, load_corpus
from diffutron.corpus.clean import clean_text, is_turkish
from diffutron.corpus.dedupe import deduplicate
from diffutron.corpus.extractors import (Document, extract_freedict, extract_gettext, extract_libreoffice_help,
                                         extract_manpages, extract_sadedegel, extract_treebank, parse_mo)
from diffutron.corpus.sources import SOURCES, Source, extract, fetch, select_sources
from diffutron.corpus.split import split_documents
from diffutron.errors import DiffutronError
from diffutron.text import count_words, tr_upper

# --------------------------------------------------------------------------- Turkish text made here

_CITIES = ["Ankara", "İzmir", "Bursa", "Trabzon", "Kayseri", "Edirne", "Mardin", "Sinop", "Rize", "Muğla"]
_THINGS = ["kütüphane", "park", "okul", "hastane", "köprü", "müze", "pazar", "stadyum", "liman", "istasyon"]
_VERBS = ["açıldı", "yenilendi", "büyütüldü", "taşındı", "kapatıldı", "genişletildi"]
_FEELINGS = ["memnun kaldı", "şaşırdı", "endişelendi", "sevindi", "itiraz etti"]


def turkish_sentences(n: int, seed: int) -> list[str]:
    """Distinct, plausible Turkish sentences (our own, no third-party text)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        s = (f"{rng.choice(_CITIES)} şehrinde {rng.randint(2, 999)} yeni {rng.choice(_THINGS)} {rng.choice(_VERBS)} "
             f"ve halk bu gelişmeden {rng.choice(_FEELINGS)}.")
        if s not in out:
            out.append(s)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- archive makers


def make_wheel(path: Path, files: dict[str, bytes | str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data.encode() if isinstance(data, str) else data)
    return path


def make_deb(path: Path, files: dict[str, bytes | str]) -> Path:
    """A minimal .deb: ar archive of debian-binary, control.tar.xz, data.tar.xz."""
    def tar_xz(members: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo("./" + name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    data = {n: (d.encode() if isinstance(d, str) else d) for n, d in files.items()}
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({"control": b"Package: fake\n"})),
               ("data.tar.xz", tar_xz(data))]
    out = bytearray(b"!<arch>\n")
    for name, body in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}".encode() + b"`\n" + body
        if len(body) % 2:
            out += b"\n"
    path.write_bytes(bytes(out))
    return path


def make_mo(catalog: dict[str, str]) -> bytes:
    """A little-endian gettext .mo file (with the usual header entry)."""
    entries = {"": "Content-Type: text/plain; charset=UTF-8\n", **catalog}
    keys = sorted(entries)
    ids = [k.encode() for k in keys]
    strs = [entries[k].encode() for k in keys]
    n = len(keys)
    orig_at, trans_at = 28, 28 + 8 * n
    data_at = trans_at + 8 * n
    table_o, table_t, blob = [], [], b""
    for s in ids:
        table_o.append((len(s), data_at + len(blob)))
        blob += s + b"\0"
    for s in strs:
        table_t.append((len(s), data_at + len(blob)))
        blob += s + b"\0"
    head = struct.pack("<7I", 0x950412DE, 0, n, orig_at, trans_at, 0, 0)
    return head + b"".join(struct.pack("<2I", *t) for t in table_o) + b"".join(struct.pack("<2I", *t) for t in table_t) + blob


def conllu(sent_id: str, rows: list[tuple]) -> str:
    """rows: (form, lemma, upos, feats, deprel, misc)."""
    text, lines = "", []
    for i, (form, lemma, upos, feats, deprel, misc) in enumerate(rows, 1):
        lines.append("\t".join([str(i), form, lemma, upos, upos[:2], feats, "0", deprel, "_", misc]))
        text += form + ("" if "SpaceAfter=No" in misc or deprel == "ig" else " ")
    return f"# sent_id = {sent_id}\n# text = {text.strip()}\n" + "\n".join(lines) + "\n"


TREEBANK_WEB = "\n".join([
    conllu("tr-forum:00000001:S002", [
        ("Açık", "açık", "NOUN", "PersonNumber=A3sg|Case=Bare|Proper=False", "ig", "SpaceAfter=No"),
        ("la", "_", "VERB", "Derivation=Make|Proper=False", "ig", "SpaceAfter=No"),
        ("nmayan", "_", "ADJ", "Derivation=PresPart|Polarity=Neg|Proper=False", "amod", "_"),
        ("sorulara", "soru", "NOUN", "PersonNumber=A3pl|Possessive=Pnon|Case=Dat|Proper=False", "obj", "_"),
        ("cevap", "cevap", "NOUN", "PersonNumber=A3sg|Case=Nom|Proper=False", "obj", "_"),
        ("verdim", "ver", "VERB", "Polarity=Pos|TenseAspectMood=Past|PersonNumber=V1sg|Proper=False", "root",
         "SpaceAfter=No"),
        (".", ".", "PUNCT", "Proper=False", "p", "_"),
    ]),
    conllu("tr-forum:00000001:S001", [
        ("Ankara'da", "ankara", "NOUN", "PersonNumber=A3sg|Case=Loc|Proper=True", "nmod", "_"),
        ("yaşıyorum", "yaşa", "VERB", "TenseAspectMood=Prog1|PersonNumber=V1sg|Proper=False", "root", "SpaceAfter=No"),
        (".", ".", "PUNCT", "Proper=False", "p", "_"),
    ]),
])
TREEBANK_WIKI = conllu("http://tr.wikipedia.org/wiki/Deneme:S005", [
    ("Kitaplar", "kitap", "NOUN", "PersonNumber=A3pl|Case=Nom|Proper=False", "nsubj", "_"),
    ("rafta", "raf", "NOUN", "PersonNumber=A3sg|Case=Loc|Proper=False", "nmod", "_"),
    ("duruyor", "dur", "VERB", "TenseAspectMood=Prog1|PersonNumber=V3sg|Proper=False", "root", "SpaceAfter=No"),
    (".", ".", "PUNCT", "Proper=False", "p", "_"),
])

HELP_PAGE = """<!DOCTYPE html><html lang="tr"><head><title>Yardım</title><script>var x = "<p>kod</p>";</script></head>
<body><header><p>LibreOffice 7.4 Yardım</p></header><aside><div>Dizin</div></aside>
<div id="DisplayArea" itemprop="softwareHelp">
<h1 id="hd_1">Tabloları Biçimlendirme</h1>
<p class="paragraph">Bir tabloyu biçimlendirmek için <span class="emph">Biçim</span> menüsünü kullanın.</p>
<p><span class="switchinline"><span hidden="true" id="MACtext" class="MAC">LibreOffice - Tercihler</span><span hidden="true" id="defaulttext">Araçlar - Seçenekler</span></span> - Genel&#39;i seçin ve ayarları değiştirin.</p>
<p>Choose Format - Table to open the dialog for the selected table.</p>
<pre class="bascode">Sub Main\n  MsgBox &quot;Merhaba&quot;\nEnd Sub</pre>
<ul><li><p class="listitem">Hücre kenarlıklarını değiştirmek için bu seçeneği kullanın.</p></li></ul>
<div class="relatedtopics"><p>İlgili Konular</p><div><p>Başka bir sayfa</p></div></div>
</div>
<div id="SearchFrame"></div><footer><div id="DEBUG" class="debug"><p>This page is: x.xhp</p></div></footer>
</body></html>"""


def dictd_number(n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = alphabet[n % 64] + out
        n //= 64
        if not n:
            return out


def make_dictd(entries: list[tuple[str, str]]) -> dict[str, bytes]:
    body, index = b"", []
    for head, text in [("00databaseshort", "English-Turkish FreeDict Dictionary\n")] + entries:
        data = text.encode()
        index.append(f"{head}\t{dictd_number(len(body))}\t{dictd_number(len(data))}")
        body += data
    return {"usr/share/dictd/freedict-eng-tur.index": "\n".join(index) + "\n",
            "usr/share/dictd/freedict-eng-tur.dict.dz": gzip.compress(body)}


DICT_ENTRIES = [
    ("apple", "apple /ˈapəl/\n1. elma. apple pie elmalı turta\n2. (argo) saçma laf.\n"),
    ("water", "water /wˈɔːtə/\n1. su\n2. deniz, göl, nehir\n"),
    ("book", "book /bʊk/\n1. kitap, defter. book club kitap kulübü\n2. deftere\n   kaydetmek\n"),
]


# --------------------------------------------------------------------------- fake sources


def _source(name, registry, path: Path, license, domains, extractor, **kw) -> Source:
    return Source(name, registry, name, "1.0", path.name, sha256(path), license, domains, extractor, **kw)


def news_wheel(tmp: Path, n_docs: int = 6) -> Path:
    files = {}
    for i in range(n_docs):
        sents = turkish_sentences(8, seed=100 + i)
        files[f"sadedegel/dataset/sents/haber-{i}.json"] = json.dumps({"sentences": sents}, ensure_ascii=False)
        files[f"sadedegel/dataset/annotated/haber-{i}.json"] = json.dumps(
            {"sentences": [{"content": s, "deletedInRound": 1 + j % 3, "id": j} for j, s in enumerate(sents)]},
            ensure_ascii=False)
        files[f"sadedegel/dataset/raw/haber-{i}.txt"] = " ".join(sents)
    return make_wheel(tmp / "sadedegel-1.0-py3-none-any.whl", files)


def fake_sources(tmp: Path) -> list[Source]:
    """Five sources covering every extractor but man pages; files placed in ``tmp/cache``."""
    cache = tmp / "cache"
    made = tmp / "made"
    made.mkdir(parents=True, exist_ok=True)
    help_files = {f"usr/share/libreoffice/help/tr/text/shared/page{i}.html":
                  HELP_PAGE.replace("Tabloları Biçimlendirme", f"Sayfa {i}: " + turkish_sentences(1, 300 + i)[0])
                  .replace("Hücre kenarlıklarını", " ".join(turkish_sentences(3, 400 + i)) + " Hücre kenarlıklarını")
                  for i in range(7)}
    ui = {f"msg{i}": s for i, s in enumerate(turkish_sentences(40, 7))}
    ui.update({"&Open": "&Aç", "Copy %s": "%s kopyala", "Untranslated": "Untranslated"})
    sources = [
        _source("news", "pypi", news_wheel(made), "MIT", ("news",), extract_sadedegel, language_filter=False),
        _source("tb", "pypi", make_wheel(made / "tb-1.0-py3-none-any.whl",
                                         {"data/web.conllu": TREEBANK_WEB, "data/wiki.conllu": TREEBANK_WIKI}),
                "Apache-2.0", ("web", "wiki"), extract_treebank, language_filter=False),
        _source("help", "debian", make_deb(made / "help_1.0_all.deb", help_files), "MPL-2.0", ("help",),
                extract_libreoffice_help),
        _source("dict", "debian", make_deb(made / "dict_1.0_all.deb", make_dictd(DICT_ENTRIES)), "GPL-2.0-or-later",
                ("dictionary",), extract_freedict, language_filter=False),
        _source("ui", "debian", make_deb(made / "ui_1.0_all.deb",
                                         {"usr/share/locale/tr/LC_MESSAGES/app.mo": make_mo(ui)}),
                "GPL-3.0-or-later", ("ui",), extract_gettext),
    ]
    for s in sources:
        (cache / s.registry).mkdir(parents=True, exist_ok=True)
        shutil.copy(made / s.filename, cache / s.registry / s.filename)
    return sources


@pytest.fixture
def no_network(monkeypatch):
    def refuse(source, into, timeout):
        raise SourceError(f"{source.name}: network disabled in this test")
    monkeypatch.setattr(sources_mod, "_download", refuse)


# --------------------------------------------------------------------------- archives and extractors


def test_pins_are_complete_and_unique():
    assert {s.name for s in SOURCES} >= {"sadedegel", "turkish-treebanks", "manpages-tr", "libreoffice-help-tr",
                                         "dict-freedict-eng-tur", "libreoffice-l10n-tr"}
    assert len({s.name for s in SOURCES}) == len(SOURCES)
    for s in SOURCES:
        assert len(s.sha256) == 64 and int(s.sha256, 16) >= 0
        assert s.registry in ("pypi", "debian") and s.version and s.license and s.domains
        assert s.version in s.filename.replace("%3a", ":")


def test_deb_archive_reads_data_tar(tmp_path):
    deb = make_deb(tmp_path / "x_1_all.deb", {"usr/share/a.txt": "şeker", "usr/share/b/c.txt": b"\x00\x01"})
    archive = open_archive(deb)
    assert archive.names() == ["usr/share/a.txt", "usr/share/b/c.txt"]
    assert archive.read("usr/share/a.txt").decode() == "şeker"


@pytest.mark.parametrize("suffix, maker", [(".deb", make_deb), (".whl", make_wheel)])
def test_truncated_archive_is_rejected(tmp_path, suffix, maker):
    path = maker(tmp_path / f"x{suffix}", {"usr/share/a.txt": "ç" * 5000})
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(SourceError, match="not a readable archive"):
        open_archive(path)


def test_extract_sadedegel_keeps_sentences_and_importance(tmp_path):
    docs = list(extract_sadedegel(open_archive(news_wheel(tmp_path, 2))))
    assert [d.id for d in docs] == ["haber-0", "haber-1"]
    assert docs[0].domain == "news"
    assert docs[0].text == " ".join(turkish_sentences(8, seed=100))
    assert docs[0].extra["sentences"] == turkish_sentences(8, seed=100)
    assert docs[0].extra["rounds"] == [1, 2, 3, 1, 2, 3, 1, 2]


def test_extract_treebank_groups_documents_and_merges_inflectional_groups(tmp_path):
    whl = make_wheel(tmp_path / "tb.whl", {"data/web.conllu": TREEBANK_WEB, "data/wiki.conllu": TREEBANK_WIKI})
    docs = {d.id: d for d in extract_treebank(open_archive(whl))}
    assert set(docs) == {"web/tr-forum:00000001", "wiki/http://tr.wikipedia.org/wiki/Deneme"}
    web = docs["web/tr-forum:00000001"]
    assert web.domain == "web"
    # sentences in document order (S001 before S002), joined into one text
    assert web.text == "Ankara'da yaşıyorum. Açıklanmayan sorulara cevap verdim."
    words = web.extra["sentences"][1]["words"]
    assert [w["form"] for w in words] == ["Açıklanmayan", "sorulara", "cevap", "verdim", "."]
    assert words[0]["lemma"] == "açık"
    assert words[0]["analysis"] == "açık+Noun+A3sg+Bare^DB+Verb+Make^DB+Adj+PresPart+Neg"
    assert words[1]["case"] == "Dat" and words[1]["lemma"] == "soru"
    assert web.extra["sentences"][0]["words"][0]["analysis"] == "ankara+Noun+A3sg+Loc+Prop"


def test_extract_help_page_keeps_prose_and_drops_markup(tmp_path):
    deb = make_deb(tmp_path / "h_all.deb", {"usr/share/libreoffice/help/tr/text/shared/a.html": HELP_PAGE})
    (doc,) = extract_libreoffice_help(open_archive(deb))
    assert doc.id == "text/shared/a" and doc.domain == "help"
    assert doc.text.split("\n") == [
        "Tabloları Biçimlendirme",
        "Bir tabloyu biçimlendirmek için Biçim menüsünü kullanın.",
        "Araçlar - Seçenekler - Genel'i seçin ve ayarları değiştirin.",  # default variant only, entity decoded
        "Choose Format - Table to open the dialog for the selected table.",  # English: removed when cleaning
        "Hücre kenarlıklarını değiştirmek için bu seçeneği kullanın.",
    ]


def test_extract_freedict_entries(tmp_path):
    deb = make_deb(tmp_path / "d_all.deb", make_dictd(DICT_ENTRIES))
    (doc,) = extract_freedict(open_archive(deb))
    assert doc.domain == "dictionary"
    assert [e["headword"] for e in doc.extra["entries"]] == ["apple", "book", "water"]
    book = doc.extra["entries"][1]
    assert book["senses"] == ["kitap, defter. book club kitap kulübü", "deftere kaydetmek"]
    assert doc.text.split("\n")[2] == "water: su; deniz, göl, nehir"


def test_extract_gettext_cleans_messages(tmp_path):
    mo = make_mo({"&Open": "&Aç", "Copy %s": "%s kopyala", "Same": "Same", "Save _As": "_Farklı Kaydet",
                  "long": "Bu ileti satır sonunda\nbölünmüş bir cümledir.", "other": "~Yeni Belge"})
    assert parse_mo(mo)["Save _As"] == "_Farklı Kaydet"
    assert "Same" not in parse_mo(mo)  # untranslated
    deb = make_deb(tmp_path / "u_amd64.deb", {"usr/share/locale/tr/LC_MESSAGES/app.mo": mo})
    (doc,) = extract_gettext(open_archive(deb))
    assert doc.id == "app/0000" and doc.domain == "ui"
    # sorted by msgid; placeholder line dropped; accelerators gone; hard wrap re-joined
    assert doc.text.split("\n") == ["Aç", "Farklı Kaydet", "Bu ileti satır sonunda bölünmüş bir cümledir.", "Yeni Belge"]


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_extract_manpages_renders_with_groff(tmp_path):
    page = ".TH DENEME 1 \"2024\" \"deneme 1.0\" \"Kullanıcı Komutları\"\n.SH İSİM\ndeneme \\- bir deneme aracı\n" \
           ".SH AÇIKLAMA\nBu komut dosyaları sayar ve sonucu ekrana basar.\n"
    deb = make_deb(tmp_path / "m_all.deb", {"usr/share/man/tr/man1/deneme.1.gz": gzip.compress(page.encode())})
    (doc,) = extract_manpages(open_archive(deb))
    assert doc.id == "man1/deneme.1" and doc.domain == "manual"
    assert "Bu komut dosyaları sayar ve sonucu ekrana basar." in doc.text.split("\n")
    assert "Kullanıcı Komutları" not in doc.text  # page header dropped


# --------------------------------------------------------------------------- fetching


def test_fetch_uses_a_verified_cache_without_network(tmp_path, no_network):
    src = fake_sources(tmp_path)[0]
    path = fetch(src, tmp_path / "cache")
    assert path == tmp_path / "cache" / "pypi" / src.filename


def test_fetch_replaces_a_corrupt_cache_file_and_rejects_a_bad_download(tmp_path, monkeypatch):
    src = fake_sources(tmp_path)[0]
    cached = tmp_path / "cache" / "pypi" / src.filename
    good = (tmp_path / "made" / src.filename).read_bytes()
    cached.write_bytes(good[:100])  # truncated download from an earlier run
    served = {"data": b"not the pinned file"}

    def download(source, into, timeout):
        (into / source.filename).write_bytes(served["data"])

    monkeypatch.setattr(sources_mod, "_download", download)
    with pytest.raises(SourceError, match="checksum mismatch"):
        fetch(src, tmp_path / "cache")
    assert not cached.exists()  # neither the truncated nor the wrong file is kept
    assert sorted(p.name for p in cached.parent.iterdir()) == ["tb-1.0-py3-none-any.whl"]  # no temporary left
    served["data"] = good
    assert fetch(src, tmp_path / "cache").read_bytes() == good


def test_extract_prefixes_ids_and_reports_broken_formats(tmp_path):
    src = fake_sources(tmp_path)[1]
    docs = extract(src, tmp_path / "cache" / "pypi" / src.filename)
    assert all(d.id.startswith("tb/") and d.source == "tb" for d in docs)
    bad = make_wheel(tmp_path / "bad.whl", {"data/web.conllu": "# sent_id = a:S1\n# text = x\n1\tx\n"})
    with pytest.raises(SourceError, match="could not extract"):
        extract(src, bad)


def test_select_sources_by_license_prefix_and_registry(tmp_path):
    sources = fake_sources(tmp_path)
    kept, excluded = select_sources(sources, ["gpl"])
    assert [s.name for s in kept] == ["news", "tb", "help"]
    assert {e["name"] for e in excluded} == {"dict", "ui"}
    kept, _ = select_sources(sources, registries=("pypi",))
    assert [s.name for s in kept] == ["news", "tb"]


# --------------------------------------------------------------------------- cleaning


@pytest.mark.parametrize("line, turkish", [
    ("Bir tabloyu biçimlendirmek için Biçim menüsünü kullanın.", True),
    ("İSİM", True),
    ("Bu komut dosyaları sayar.", True),
    ("Choose Format - Table to open the dialog.", False),
    ("The Help Index", False),
    ("--version", False),
    ("12345 67", False),
])
def test_is_turkish(line, turkish):
    assert is_turkish(line) is turkish


def test_clean_text_nfc_markup_whitespace_and_language():
    raw = ("<p>Dosyayı  <b>kaydet</b>&nbsp;ve kapat.</p>\nThe file is saved when you click the button.\n"
           "s\u0327ehir merkezi\u00a0için bilgi\n\n\n\nsatır sonunda bölün-\nmüş kelime burada.")
    text, dropped = clean_text(raw)
    assert text == "Dosyayı kaydet ve kapat.\nşehir merkezi için bilgi\n\nsatır sonunda bölünmüş kelime burada."
    assert dropped == 1
    assert clean_text("The end.", language_filter=False) == ("The end.", 0)


def test_deduplicate_exact_and_near():
    base = " ".join(turkish_sentences(12, seed=1))  # ~150 words
    near = base.replace("halk", "vatandaş", 1)
    texts = [base, tr_upper(base), "  " + base.replace(" ", "   "), near,
             " ".join(turkish_sentences(12, seed=2)), "kısa metin", "KISA METİN"]
    keep, n_exact, n_near = deduplicate(texts)
    assert keep == [0, 4, 5]
    assert (n_exact, n_near) == (3, 1)
    # Turkish case-folding: "KISA METİN" is "kısa metin"; "KİSA" would not be
    assert deduplicate(["kısa metin", "KİSA METİN"])[0] == [0, 1]


def test_split_is_deterministic_disjoint_and_per_domain():
    docs = [Document(f"s/{d}/{i}", "metin", d) for d in ("news", "help", "web") for i in range(50)]
    a = split_documents(docs, 0.1, 0.2)
    shuffled = docs[:]
    random.Random(3).shuffle(shuffled)
    b = split_documents(shuffled, 0.1, 0.2)
    ids = {k: [d.id for d in v] for k, v in a.items()}
    assert ids == {k: [d.id for d in v] for k, v in b.items()}
    assert sum(map(len, ids.values())) == 150 and len(set().union(*map(set, ids.values()))) == 150
    for domain in ("news", "help", "web"):
        assert sum(d.domain == domain for d in a["validation"]) == 5
        assert sum(d.domain == domain for d in a["test"]) == 10
    # adding another domain does not move any document of these domains
    c = split_documents(docs + [Document(f"s/ui/{i}", "metin", "ui") for i in range(20)], 0.1, 0.2)
    assert {k: [d.id for d in v if d.domain != "ui"] for k, v in c.items()} == ids
    # tiny domains still get one held-out document of each kind
    small = split_documents([Document(f"x/{i}", "t", "wiki") for i in range(3)], 0.1, 0.1)
    assert [len(small[s]) for s in ("train", "validation", "test")] == [1, 1, 1]
    with pytest.raises(DiffutronError, match="validation_fraction"):
        split_documents(docs, 1.5, 0.1)


# --------------------------------------------------------------------------- build_corpus


def test_build_corpus_end_to_end(tmp_path, no_network):
    sources = fake_sources(tmp_path)
    out = tmp_path / "corpus"
    stats = build_corpus(out, sources=sources, cache_dir=tmp_path / "cache", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["annotations.jsonl", "stats.json", "test.jsonl", "train.jsonl",
                                                     "validation.jsonl"]
    rows = [json.loads(line) for split in ("train", "validation", "test") for line in open(out / f"{split}.jsonl")]
    assert all(set(r) == {"id", "text", "source", "domain"} for r in rows)
    assert {r["domain"] for r in rows} == {"news", "web", "wiki", "help", "dictionary", "ui"}
    assert len({r["id"] for r in rows}) == len(rows)
    help_text = "\n".join(r["text"] for r in rows if r["domain"] == "help")
    assert "Choose Format" not in help_text and "Bir tabloyu biçimlendirmek" in help_text
    # the help pages share two lines: kept once (boilerplate), not five times
    assert help_text.count("Bir tabloyu biçimlendirmek için") == 1
    ui_text = "\n".join(r["text"] for r in rows if r["domain"] == "ui")
    assert "%s" not in ui_text and "Untranslated" not in ui_text
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == stats
    assert [s["name"] for s in stats["sources"]] == ["news", "tb", "help", "dict", "ui"]
    assert stats["sources"][0]["sha256"] == sources[0].sha256 and stats["sources"][0]["license"] == "MIT"
    total = sum(stats["splits"][s]["documents"] for s in ("train", "validation", "test"))
    assert total == len(rows) == stats["cleaning"]["documents_kept"]
    assert stats["splits"]["train"]["domains"]["news"]["documents"] == 4  # 6 news docs: 4 / 1 / 1
    assert stats["splits"]["train"]["words"] == sum(count_words(d["text"]) for d in load_corpus("train", out))
    assert stats["splits"]["train"]["characters"] == sum(len(d["text"]) for d in load_corpus("train", out))
    annotations = load_annotations(out)
    assert {a["source"] for a in annotations.values()} == {"news", "tb", "dict"}
    assert all(i in {r["id"] for r in rows} for i in annotations)
    # same inputs, same bytes
    again = build_corpus(tmp_path / "again", sources=sources, cache_dir=tmp_path / "cache", progress=False)
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "annotations.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert again["fingerprint"] == stats["fingerprint"]


def test_build_corpus_loads_by_domain_and_group(tmp_path, no_network):
    out = tmp_path / "corpus"
    build_corpus(out, sources=fake_sources(tmp_path), cache_dir=tmp_path / "cache", progress=False)
    news = load_corpus("train", out, domains="news")
    assert news and all(d["domain"] == "news" for d in news)
    prose = load_corpus("train", out, domains=["prose"])
    assert {d["domain"] for d in prose} <= {"news", "web", "wiki"} and len(prose) > len(news)
    with pytest.raises(DiffutronError, match="unknown domain"):
        load_corpus("train", out, domains="poetry")
    with pytest.raises(DiffutronError, match="unknown split"):
        load_corpus("dev", out)
    with pytest.raises(DiffutronError, match="corpus build"):
        load_corpus("train", tmp_path / "nowhere")


def test_build_corpus_skips_broken_sources_and_excluded_licenses(tmp_path, no_network, caplog):
    sources = fake_sources(tmp_path)
    (tmp_path / "cache" / "debian" / sources[2].filename).write_bytes(b"garbage")  # corrupt help download
    with caplog.at_level(logging.WARNING):
        stats = build_corpus(tmp_path / "c", sources=sources, cache_dir=tmp_path / "cache", exclude_licenses=["GPL"],
                             progress=False)
    assert [s["name"] for s in stats["sources"]] == ["news", "tb"]
    assert [s["name"] for s in stats["skipped"]] == ["help"] and "network disabled" in stats["skipped"][0]["reason"]
    assert {e["name"] for e in stats["excluded"]} == {"dict", "ui"}
    assert "skipping source help" in caplog.text
    assert stats["licenses"] == ["Apache-2.0", "MIT"]


def test_build_corpus_with_no_usable_source_names_what_was_tried(tmp_path, no_network):
    sources = fake_sources(tmp_path)
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(DiffutronError, match=r"no Turkish text could be collected.*news: .*network disabled.*ui: "):
        build_corpus(tmp_path / "c", sources=sources, cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "c").exists()
    with pytest.raises(DiffutronError, match="every source was excluded"):
        build_corpus(tmp_path / "c", sources=sources[:2], exclude_licenses=["MIT", "Apache"], progress=False)


def test_existing_corpus_survives_a_failed_build(tmp_path, no_network, monkeypatch):
    sources = fake_sources(tmp_path)
    out = tmp_path / "corpus"
    build_corpus(out, sources=sources, cache_dir=tmp_path / "cache", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real = corpus_mod._write_jsonl

    def failing(path, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        real(path, rows)

    monkeypatch.setattr(corpus_mod, "_write_jsonl", failing)
    with pytest.raises(OSError, match="disk full"):
        build_corpus(out, sources=sources[:2], cache_dir=tmp_path / "cache", progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "corpus", "made"]  # no temporary folder left


def test_refuses_to_replace_an_unrelated_directory(tmp_path, no_network):
    victim = tmp_path / "home"
    victim.mkdir()
    (victim / "thesis.tex").write_text("önemli")
    with pytest.raises(DiffutronError, match="not an output of this command"):
        build_corpus(victim, sources=fake_sources(tmp_path), cache_dir=tmp_path / "cache", progress=False)
    assert (victim / "thesis.tex").read_text() == "önemli"


def test_cli_build_and_user_errors(tmp_path, no_network, monkeypatch, capsys):
    monkeypatch.setenv("DIFFUTRON_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus_mod, "SOURCES", tuple(fake_sources(tmp_path)))
    assert main(["corpus", "build", "--quiet", "--exclude-license", "GPL", "--cache", str(tmp_path / "cache")]) == 0
    out, err = capsys.readouterr()
    assert "corpus written to" in out and str(tmp_path / "corpus") in out
    assert "not used: dict: license GPL-2.0-or-later excluded" in err
    assert json.loads((tmp_path / "corpus" / "stats.json").read_text())["settings"]["exclude_licenses"] == ["GPL"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    assert main(["corpus", "build", "--quiet", "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffutron: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert main(["corpus", "tasks", "--corpus", str(tmp_path / "missing")]) == 2
    assert "diffutron corpus build" in capsys.readouterr().err


def test_default_cache_locations(monkeypatch, tmp_path):
    monkeypatch.delenv("DIFFUTRON_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpus_mod.default_corpus_dir() == tmp_path / "xdg" / "diffutron" / "corpus"
    monkeypatch.setenv("DIFFUTRON_CACHE", str(tmp_path / "dc"))
    assert corpus_mod.default_corpus_dir() == tmp_path / "dc" / "corpus"


# --------------------------------------------------------------------------- the real registry


def test_real_pypi_download_of_the_treebank(tmp_path):
    """Hits PyPI: skipped, with the reason, when the registry cannot be reached."""
    source = next(s for s in SOURCES if s.name == "turkish-treebanks")
    try:
        path = fetch(source, tmp_path, timeout=120)
    except SourceError as err:
        pytest.skip(f"PyPI not reachable: {err}")
    assert sha256(path) == source.sha256
    docs = extract(source, path)
    assert len(docs) > 2000 and {d.domain for d in docs} == {"web", "wiki"}
    n_sentences = sum(len(d.extra["sentences"]) for d in docs)
    assert n_sentences == 4851
