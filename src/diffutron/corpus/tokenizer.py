"""A Turkish Unigram tokenizer trained on the corpus's training split, saved in HF format.

- Normalisation: NFC only (no lower-casing, no accent stripping).
- Pre-tokenisation: spaces become ``▁`` on the following word (SentencePiece style,
  ``prepend_scheme="first"``: the start of the text gets an implicit space, the text after
  a chat marker does not); runs of newlines are pieces of their own, and the word after
  them gets its ``▁`` too (the normaliser adds a space that the decoder removes), so a
  line-initial word is the same piece as elsewhere.
- Model: Unigram with byte fallback: 256 ``<0xNN>`` pieces spell out any character the
  vocabulary lacks, so every string round-trips and ``<unk>`` never appears.
- Special tokens, with the ids mmBERT / Gemma use: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2,
  ``<unk>`` 3, ``<mask>`` 4 (``cls`` = ``<bos>``, ``sep`` = ``<eos>``). With
  ``add_special_tokens=True`` a text becomes ``<bos> text <eos>``, as mmBERT wraps it.
- Chat markers ``[SYS] [/SYS] [Question] [/Question] [Answer] [/Answer]`` are ordinary
  (non-special) added tokens: one token each, kept by ``decode(skip_special_tokens=True)``.
- The vocabulary size asked for is the final size (pieces + bytes + markers).
- The Diffutron chat template (``diffutron.backbone.CHAT_TEMPLATE``) is saved with it, so
  ``apply_chat_template`` renders ``[Question]\n...\n[/Question]\n\n[Answer]\n`` prompts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Sequence

from ..backbone import install_chat_template
from ..errors import DiffutronError
from ..text import TURKISH_LETTERS, count_words
from .build import atomic_output_dir, count_tokens, default_corpus_dir, iter_corpus
from .sources import cache_root
from .split import SPLITS

__all__ = [
    "SPECIAL_TOKENS",
    "CHAT_MARKERS",
    "TOKENIZER_INFO",
    "TOKENIZER_FORMAT",
    "is_outdated",
    "default_tokenizer_dir",
    "train_tokenizer",
    "load_tokenizer",
    "tokens_per_word",
]

# Order = ids.
SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>",
                  "mask_token": "<mask>"}
CHAT_MARKERS = ("[SYS]", "[/SYS]", "[Question]", "[/Question]", "[Answer]", "[/Answer]")
TOKENIZER_INFO = "diffutron_tokenizer.json"  # training facts next to the HF files; marks the folder as ours
# /2: the vocabulary order is canonical (``_canonical``). A folder of an older format is
# retrained by `diffutron recipe run` (see ``is_outdated``).
TOKENIZER_FORMAT = "diffutron-tokenizer/2"
_EXTRA_ALPHABET = "âîûÂÎÛ0123456789.,;:!?'’\"“”‘()[]{}-–—/\\%&*+=<>@#$_|~^`…«»°"


def default_tokenizer_dir() -> Path:
    """``<cache>/tokenizer`` (see ``diffutron.corpus.sources.cache_root``)."""
    return cache_root() / "tokenizer"


def _backend(vocab: list[tuple[str, float]], unk_id: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=True))
    # A space is inserted after each run of newlines, so the first word of a line gets the
    # same "▁word" piece as anywhere else; the decoder takes it out again.
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\n(?=[^\n])"), "\n ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
    ])
    tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                     decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True),
                                     decoders.Fuse(), decoders.Replace("\n ", "\n")])
    return tok


def _wrap(backend, model_max_length: int):
    from tokenizers import AddedToken
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend.add_tokens([AddedToken(m, special=False, normalized=False, single_word=False, lstrip=False, rstrip=False)
                        for m in CHAT_MARKERS])
    bos, eos = SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]
    backend.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B:1 {eos}:1",
        special_tokens=[(bos, backend.token_to_id(bos)), (eos, backend.token_to_id(eos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length,
                                        cls_token=bos, sep_token=eos, padding_side="right", **SPECIAL_TOKENS)
    install_chat_template(tokenizer)
    return tokenizer


def _train(texts: Iterable[str], vocab_size: int, progress: bool):
    from tokenizers import Tokenizer, models, trainers

    specials = list(SPECIAL_TOKENS.values())
    n_pieces = vocab_size - 256 - len(CHAT_MARKERS)
    trainer = trainers.UnigramTrainer(vocab_size=n_pieces, special_tokens=specials, unk_token=SPECIAL_TOKENS["unk_token"],
                                      initial_alphabet=sorted(set(TURKISH_LETTERS + _EXTRA_ALPHABET + "▁\n")),
                                      max_piece_length=16, show_progress=progress)
    scratch = _backend([("<unk>", 0.0)], 0)
    tok = Tokenizer(models.Unigram())
    tok.normalizer, tok.pre_tokenizer = scratch.normalizer, scratch.pre_tokenizer
    tok.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    head, learned = model["vocab"][: len(specials)], model["vocab"][len(specials):]
    assert [piece for piece, _ in head] == specials, "the trainer puts the special tokens first"
    vocab = [(piece, score) for piece, score in head] + _canonical(learned)
    # Byte pieces, scored below every learned piece so they are used only as a fallback.
    floor = min(score for _, score in vocab) - 1.0
    known = {piece for piece, _ in vocab}
    vocab += [(f"<0x{b:02X}>", floor) for b in range(256) if f"<0x{b:02X}>" not in known]
    return _backend(vocab, model["unk_id"])


def _canonical(learned: list) -> list[tuple[str, float]]:
    """The trainer's pieces in an order that depends on the corpus only, so retraining on the
    same corpus gives the same ids. As trained, the order is not: pieces of equal score come in
    a run-dependent order (477 of 16,378 on the full corpus), scores differ in their last bits,
    and the characters of the alphabet that no piece needed are appended last with scores
    falling by 1e-4 each, in hash order. Here: scores rounded to 1e-9, ties ordered by the
    piece, and everything from that run on given one score (its first), ordered by the piece."""
    scores = [round(score, 9) for _, score in learned]
    step = [abs(a - b - 1e-4) < 1e-7 for a, b in zip(scores, scores[1:])]  # falls by exactly 1e-4
    start = next((i for i in range(len(step) - 1) if step[i] and step[i + 1]), len(learned))
    body = sorted(zip((piece for piece, _ in learned[:start]), scores[:start]), key=lambda ps: (-ps[1], ps[0]))
    tail = sorted(piece for piece, _ in learned[start:])
    return body + [(piece, scores[start]) for piece in tail]


def tokens_per_word(tokenizer, texts: Sequence[str]) -> float:
    """Tokens (no special tokens) per word (``diffutron.text.words``) over ``texts``."""
    n_words = sum(map(count_words, texts))
    if not n_words:
        return float("nan")
    return count_tokens(tokenizer, texts) / n_words


def train_tokenizer(corpus_dir: str | Path | None = None, out_dir: str | Path | None = None, *,
                    vocab_size: int = 16384, domains: Iterable[str] | str | None = None,
                    model_max_length: int = 512, progress: bool = True) -> dict:
    """Train the Unigram tokenizer on the corpus's training split and save it (HF format).

    Args:
        corpus_dir: a corpus from ``build_corpus`` (default ``default_corpus_dir()``).
        out_dir: output folder (default ``default_tokenizer_dir()``); replaced atomically.
        vocab_size: final vocabulary size, 8,000 to 32,000 (16,384 by default).
        domains: train only on these domains / domain groups (default: all).
        model_max_length: the length models using it are built for (512, as Diffutron Base).

    Returns:
        The content of ``OUT/diffutron_tokenizer.json``: vocabulary size, corpus fingerprint,
        training time and tokens per word on the held-out splits, overall and per domain.

    Raises:
        DiffutronError: bad ``vocab_size``, no corpus, or an empty training split.
    """
    if not 1000 <= vocab_size <= 262144:
        raise DiffutronError(f"vocab_size must be between 1000 and 262144 (8k-16k suits this corpus), got {vocab_size}")
    corpus_root = Path(corpus_dir) if corpus_dir is not None else default_corpus_dir()
    out = atomic_output_dir(out_dir if out_dir is not None else default_tokenizer_dir(), TOKENIZER_INFO).check()
    texts = [d["text"] for d in iter_corpus("train", corpus_root, domains)]
    if not texts:
        raise DiffutronError(f"the training split of {corpus_root} has no documents"
                             f"{'' if domains is None else ' in domains ' + str(domains)}")
    start = time.perf_counter()
    tokenizer = _wrap(_train(texts, vocab_size, progress), model_max_length)
    seconds = time.perf_counter() - start

    held_out = [d for split in SPLITS[1:] for d in iter_corpus(split, corpus_root)]
    per_domain = {}
    for dom in sorted({d["domain"] for d in held_out}):
        per_domain[dom] = round(tokens_per_word(tokenizer, [d["text"] for d in held_out if d["domain"] == dom]), 4)
    stats_path = corpus_root / "stats.json"
    info = {
        "format": TOKENIZER_FORMAT,
        "model": "unigram",
        "vocab_size": len(tokenizer),
        "special_tokens": {k: [v, tokenizer.convert_tokens_to_ids(v)] for k, v in SPECIAL_TOKENS.items()},
        "chat_markers": {m: tokenizer.convert_tokens_to_ids(m) for m in CHAT_MARKERS},
        "model_max_length": model_max_length,
        "corpus": str(corpus_root),
        "corpus_fingerprint": json.loads(stats_path.read_text())["fingerprint"] if stats_path.is_file() else None,
        "domains": sorted(domains) if isinstance(domains, (list, tuple, set)) else domains,
        "training_documents": len(texts),
        "training_characters": sum(map(len, texts)),
        "training_seconds": round(seconds, 2),
        "held_out_tokens_per_word": round(tokens_per_word(tokenizer, [d["text"] for d in held_out]), 4),
        "held_out_tokens_per_word_by_domain": per_domain,
    }
    with out as tmp:
        tokenizer.save_pretrained(tmp)
        (tmp / TOKENIZER_INFO).write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return info


def is_outdated(path: str | Path) -> bool:
    """Whether ``path`` holds a tokenizer this module trained in an older format (a folder
    without our info file, e.g. a user's own tokenizer, is never outdated)."""
    info = Path(path).expanduser() / TOKENIZER_INFO
    if not info.is_file():
        return False
    return json.loads(info.read_text(encoding="utf-8")).get("format") != TOKENIZER_FORMAT


def load_tokenizer(path: str | Path | None = None):
    """The saved tokenizer (``PreTrainedTokenizerFast``); default ``default_tokenizer_dir()``.

    Raises:
        DiffutronError: no tokenizer there (train one with ``diffutron corpus tokenizer``).
    """
    from transformers import PreTrainedTokenizerFast

    root = Path(path).expanduser() if path is not None else default_tokenizer_dir()
    if not (root / "tokenizer.json").is_file():
        raise DiffutronError(f"no tokenizer at {root}; train one with `diffutron corpus tokenizer"
                             f"{'' if path is None else ' --out ' + str(root)}`")
    return PreTrainedTokenizerFast.from_pretrained(str(root))
