"""Training data: rows from local files and hub datasets (``rows``), pre-training documents
packed into blocks (``pretrain``), instruction data with the chat template (``instruct``).

Building the Turkish corpus, its tasks, tokenizer and lexicon is ``diffutron.corpus``'s. Import
from the submodules, e.g. ``from diffutron.data.pretrain import pack_documents``.
"""
