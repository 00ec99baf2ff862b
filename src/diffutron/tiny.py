"""Tiny random models and tokenizers, built on the spot (tests, benchmarks, smoke runs).

A random model produces random text: these exist to exercise code paths, not to answer.
"""

from __future__ import annotations

import torch

from .backbone import install_chat_template

CHAT_MARKERS = ["[SYS]", "[/SYS]", "[Question]", "[/Question]", "[Answer]", "[/Answer]"]

# A few original Turkish sentences, enough for a word-level vocabulary.
SAMPLE_TEXTS = [
    "Türkiye'nin başkenti Ankara'dır.",
    "İstanbul Boğazı iki kıtayı birbirine bağlar.",
    "Bugün hava çok güzel, parkta yürüyüş yaptık.",
    "Kitap okumak insanın ufkunu genişletir.",
    "Öğretmen öğrencilere yeni bir soru sordu.",
    "Çay bahçesinde arkadaşlarımızla sohbet ettik.",
    "Yapay zekâ modelleri metin üretebilir ve soruları yanıtlayabilir.",
    "Kışın dağlara kar yağar, yazın denizde yüzeriz.",
    "Iğdır ve Ağrı doğu illerimizdendir.",
    "Bu cümlede ironi var mı? Evet. Hayır.",
    "spor magazin siyaset sağlık ekonomi haber",
    "A B C D cevap soru metin",
]


def tiny_tokenizer(texts: list[str] | None = None, *, cls_sep: bool = False, model_max_length: int = 128):
    """A word-level ``PreTrainedTokenizerFast`` with pad/unk/mask/eos (and cls/sep) specials and
    the chat markers as single added tokens. ``cls_sep=True`` wraps encodings as [CLS] ... [SEP]
    (like BERT and mmBERT), to test code that must add special tokens only once."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EOS]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, cleans up punctuation
    trainer = trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1)
    tok.train_from_iterator(list(texts or SAMPLE_TEXTS), trainer=trainer)
    if cls_sep:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", eos_token="[EOS]", model_max_length=model_max_length,
    )
    fast.add_tokens(CHAT_MARKERS)
    install_chat_template(fast)
    return fast


def tiny_model(
    tokenizer,
    *,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 128,
    arch: str = "modernbert",
    seed: int = 0,
):
    """A random masked-LM encoder sized for the tokenizer (``modernbert`` or ``bert``), eval mode."""
    from transformers import AutoModelForMaskedLM, BertConfig, ModernBertConfig

    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "modernbert":
        config = ModernBertConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings, local_attention=16, global_attn_every_n_layers=2,
            bos_token_id=tokenizer.cls_token_id, cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id, **ids,
        )
    elif arch == "bert":
        config = BertConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings, **ids,
        )
    else:
        raise ValueError(f"unknown arch {arch!r}: modernbert or bert")
    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_config(config)
    model.eval()
    return model


def tiny_lm(*, seed: int = 0, cls_sep: bool = False, arch: str = "modernbert", **model_kwargs):
    """A ``DiffusionLM`` over a tiny random model and word-level Turkish tokenizer."""
    from .lm import DiffusionLM

    tokenizer = tiny_tokenizer(cls_sep=cls_sep)
    return DiffusionLM(tiny_model(tokenizer, arch=arch, seed=seed, **model_kwargs), tokenizer, name="tiny-random")
