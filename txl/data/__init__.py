"""Data layer: tokenizers, corpora (with an on-disk token cache) and ordered segment streams.

Importing this package is cheap (numpy only); torch / Lightning / datasets are pulled in lazily
by the names that need them (`OrderedStream`, `TXLDataModule`, the `hf` source).
"""


class DataError(ValueError):
    """A user-facing data problem (bad path, bad encoding, corpus too short, hub offline, ...).

    The message is one line naming the cause, e.g. "data.train: file not found: /x/y.txt".
    """


from txl.data.tokenizers import (  # noqa: E402  (DataError must exist before submodules import it)
    Tokenizer, ByteTokenizer, CharTokenizer, WordTokenizer, HFTokenizer,
    build_tokenizer, tokenizer_from_state,
)
from txl.data.corpus import Corpus, CorpusConfig, load_corpus  # noqa: E402

_LAZY = {"OrderedStream": "txl.data.stream", "TXLDataModule": "txl.data.datamodule"}


def __getattr__(name):  # PEP 562: keep `import txl.data` free of torch / Lightning
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'txl.data' has no attribute {name!r}")


__all__ = [
    "DataError", "Tokenizer", "ByteTokenizer", "CharTokenizer", "WordTokenizer", "HFTokenizer",
    "build_tokenizer", "tokenizer_from_state", "Corpus", "CorpusConfig", "load_corpus",
    "OrderedStream", "TXLDataModule",
]
