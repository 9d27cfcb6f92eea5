"""Data layer: tokenizers, corpora (streamed into a verified on-disk token cache) and ordered
segment streams.

Modules, each importing only those listed before it (no circle; tests/test_data_imports.py):
errors, hub, recall, config, cache, reader, tokenizers, hf, sources, build, corpus, stream,
datamodule. Importing this package is cheap (numpy only); torch / Lightning / datasets / pyarrow
are pulled in lazily by the names that need them.
"""
from txl.data.errors import DataError
from txl.data.config import CorpusConfig
from txl.data.tokenizers import (
    Tokenizer, ByteTokenizer, CharTokenizer, WordTokenizer, HFTokenizer,
    build_tokenizer, tokenizer_from_state,
)
from txl.data.corpus import Corpus, load_corpus
from txl.data.reader import read_text_tokens

_LAZY = {"OrderedStream": "txl.data.stream", "TXLDataModule": "txl.data.datamodule"}


def __getattr__(name):  # PEP 562: keep `import txl.data` free of torch / Lightning
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'txl.data' has no attribute {name!r}")


__all__ = [
    "DataError", "Tokenizer", "ByteTokenizer", "CharTokenizer", "WordTokenizer", "HFTokenizer",
    "build_tokenizer", "tokenizer_from_state", "Corpus", "CorpusConfig", "load_corpus",
    "read_text_tokens", "OrderedStream", "TXLDataModule",
]
