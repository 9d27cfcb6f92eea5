"""Corpus loading: source splits (sources.py) -> tokenizer -> 1-D token arrays, cached on disk.

load_corpus: describe the splits (no reading) -> key = sha256(format version, source, each split's
identity: file paths + sizes + mtimes, hub names, options; tokenizer options) -> an intact cache
entry is reopened as memmaps (checksums verified: cache.py); otherwise the splits are streamed
through the tokenizer workers (build.py) straight into a new entry. Ids do not depend on how
the text was chunked or on data.num_proc.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import numpy as np

from txl.data import build, cache
from txl.data.cache import FORMAT_VERSION, SPLITS, storage_dtype  # noqa: F401 (re-exported)
from txl.data.config import CorpusConfig, default_cache_dir  # noqa: F401 (re-exported)
from txl.data.errors import DataError
from txl.data.reader import SplitText
from txl.data.sources import SOURCES
from txl.data.tokenizers import Tokenizer, tokenizer_from_state

log = logging.getLogger("txl.data")


@dataclass
class Corpus:
    name: str
    tokenizer: Tokenizer
    train: np.ndarray   # [N_train] token ids (np.memmap when cached), dtype uint8/uint16/int32
    valid: np.ndarray   # [N_valid]
    test: np.ndarray    # [N_test]; empty when the source has no test split
    cache_path: Optional[str] = None
    meta: Dict[str, Any] = field(default_factory=dict)
    docs: Optional[Dict[str, np.ndarray]] = None  # split -> int64 [D] document starts; None: hf (not recorded)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise DataError(f"corpus: unknown split '{name}' (expected train|valid|test)")
        return getattr(self, name)

    def doc_starts(self, name: str) -> Optional[np.ndarray]:
        """int64 [D]: the token offset where each document of the split starts (0 first; a split
        read as one text is one document, [0]; an empty split []). None when not recorded (hf
        tokenizer: its encode_batch items span documents)."""
        self.split(name)  # checks the name
        return None if self.docs is None else self.docs[name]

    def __repr__(self) -> str:
        return (f"Corpus({self.name!r}, {self.tokenizer.kind} vocab={self.vocab_size}, "
                f"train={len(self.train):,} valid={len(self.valid):,} test={len(self.test):,})")


def cache_key(source: str, splits: Mapping[str, SplitText], spec: Mapping[str, Any]) -> str:
    h = hashlib.sha256(f"txl-corpus-v{FORMAT_VERSION}\n{source}\n".encode())
    h.update(json.dumps(dict(spec), sort_keys=True).encode())
    h.update(json.dumps({s: splits[s].ident for s in SPLITS}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _build(cfg: CorpusConfig, splits: Mapping[str, SplitText], tmp: str, meta: Dict[str, Any]) -> Tokenizer:
    t0 = time.time()
    tok = build.train_tokenizer(cfg.tokenizer, splits["train"].open, cfg.workers, min_freq=cfg.min_freq,
                                max_size=cfg.max_size, lower=cfg.lower, name=cfg.hf_tokenizer)
    counts = {s: build.write_split(tok, splits[s].open(), os.path.join(tmp, f"{s}.npy"), cfg.workers)
              for s in SPLITS}
    docs = all(c["doc_starts"] is not None for c in counts.values())
    for s, c in counts.items():
        if docs:
            np.save(os.path.join(tmp, f"{s}_docs.npy"), c["doc_starts"])
    cache.write_json(os.path.join(tmp, "tokenizer.json"), tok.state_dict())
    meta.update(vocab_size=tok.vocab_size, dtype=str(storage_dtype(tok.vocab_size)),
                tokens={s: c["tokens"] for s, c in counts.items()},
                raw_bytes={s: c["bytes"] for s, c in counts.items()}, doc_starts=docs,
                documents={s: len(c["doc_starts"]) if docs else splits[s].documents for s, c in counts.items()},
                seconds=round(time.time() - t0, 3))
    cache.seal(tmp, meta)
    return tok


def _disk_error(e: OSError, where: str) -> DataError:
    what = e.strerror or str(e)
    hint = " (set TXL_CACHE or data.cache_dir to a disk with room)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return DataError(f"data.cache_dir: cannot write the token cache under {where}: {what} "
                     f"(errno {e.errno}){hint}; no partial cache was left")


def load_corpus(cfg: CorpusConfig) -> Corpus:
    """Describe the source's splits, then reopen the verified cache entry or build it once."""
    with ExitStack() as stack:
        splits = SOURCES[cfg.source](cfg, stack)
        spec = cfg.tokenizer_spec()
        key = cache_key(cfg.source, splits, spec)
        path = cache.entry_path(cfg.cache_dir, cfg.source, cfg.tokenizer, key)
        if cfg.use_cache:
            hit = cache.open_entry(path, tokenizer_from_state)
            if hit is not None:
                return _corpus(cfg.name, *hit, path)
        meta: Dict[str, Any] = {"key": key, "name": cfg.name, "source": cfg.source, "tokenizer": spec,
                                "format_version": FORMAT_VERSION}
        tmp = None
        try:
            try:
                os.makedirs(cfg.cache_dir, exist_ok=True)
                tmp = cache.new_build_dir(path) if cfg.use_cache else tempfile.mkdtemp(prefix="txl-corpus-")
                tok = _build(cfg, splits, tmp, meta)
                if not cfg.use_cache:  # nothing kept on disk: read the ids into memory
                    names = list(SPLITS) + ([f"{s}_docs" for s in SPLITS] if meta["doc_starts"] else [])
                    arrays = {n: np.load(os.path.join(tmp, f"{n}.npy")) for n in names}
                    log.info("txl.data: %s tokenized (vocab %d), not cached", cfg.name, tok.vocab_size)
                    return _corpus(cfg.name, tok, arrays, meta, None)
                cache.commit(tmp, path)
                tmp = None
            except OSError as e:
                raise _disk_error(e, cfg.cache_dir) from None
        finally:
            cache.remove(tmp)  # any failure (disk full, a worker, Ctrl-C): no partial entry
    hit = cache.open_entry(path, tokenizer_from_state)  # reopen as memmaps: hit and miss alike
    if hit is None:
        raise DataError(f"data.cache_dir: the token cache just written to {path} does not verify")
    log.info("txl.data: %s tokenized (vocab %d), cache %s", cfg.name, hit[0].vocab_size, path)
    return _corpus(cfg.name, *hit, path)


def _corpus(name: str, tok: Tokenizer, arrays: Dict[str, np.ndarray], meta: Dict[str, Any],
            path: Optional[str]) -> Corpus:
    docs = {s: arrays[f"{s}_docs"] for s in SPLITS} if meta.get("doc_starts") else None
    return Corpus(name, tok, arrays["train"], arrays["valid"], arrays["test"], path, meta, docs)
