"""Turkish data: registry sources (``sources``), the corpus (``corpus``), synthetic
instruction tasks and their metric (``tasks``), and the tokenizer (``tokenizer``).

Import from the submodules, e.g. ``from diffutron.data.corpus import load_corpus``.
"""
