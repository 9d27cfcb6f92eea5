"""Corpus loading: raw splits (sources.py) -> tokenizer -> 1-D token arrays, cached on disk.

Cache layout: <cache_dir>/<source>-<tokenizer>-<key[:16]>/{train,valid,test}.npy + tokenizer.json
+ meta.json (written last = the completeness marker). key = sha256(format version, tokenizer
options, each split's raw bytes), so a corpus is tokenized once and any content change re-keys.
Arrays are reopened with mmap_mode='r' and stored in the smallest dtype that holds the vocab.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import numpy as np

from txl.data import DataError
from txl.files import atomic_write
from txl.data.sources import SOURCES, SPLITS
from txl.data.tokenizers import KINDS, Tokenizer, build_tokenizer, decode_utf8, tokenizer_from_state

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # bump when the tokenization or storage format changes: invalidates caches


def default_cache_dir() -> str:
    return os.environ.get("TXL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "txl")


@dataclass
class CorpusConfig:
    source: str = "pystdlib"            # 'pystdlib' | 'text_files' | 'hf' | 'synthetic_recall'
    train: Optional[str] = None         # text_files paths (test optional)
    valid: Optional[str] = None
    test: Optional[str] = None
    tokenizer: str = "byte"             # 'byte' | 'char' | 'word' | 'hf'
    min_freq: int = 0                   # word: drop tokens rarer than this
    max_size: Optional[int] = None      # word: vocabulary cap, specials included
    lower: bool = False                 # word: lower-case before splitting
    hf_name: Optional[str] = None       # hub id, preset (wikitext103|wikitext2|enwik8|text8),
                                        # local save_to_disk dir, or packaged builder ('text', ...)
    hf_config: Optional[str] = None     # overrides the preset's config
    hf_data_files: Optional[Dict[str, str]] = None  # for packaged builders: {split: path}
    hf_text_column: str = "text"
    hf_tokenizer: Optional[str] = None  # tokenizer=hf: hub id, local dir or tokenizer.json
    cache_dir: Optional[str] = None     # None -> $TXL_CACHE or ~/.cache/txl
    use_cache: bool = True
    max_bytes: Optional[int] = None     # cap raw size: 90% train / 5% valid / 5% test
    stdlib_root: Optional[str] = None   # pystdlib: override the stdlib directory (tests)
    name: Optional[str] = None          # display name; derived from the source when None
    options: Dict[str, Any] = field(default_factory=dict)  # source-specific (synthetic_recall)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise DataError(f"data.source: unknown source '{self.source}' "
                            f"(expected one of {'|'.join(SOURCES)})")
        if self.tokenizer not in KINDS:
            raise DataError(f"data.tokenizer: unknown kind '{self.tokenizer}' "
                            f"(expected one of {'|'.join(KINDS)})")
        if self.source == "text_files":
            for s in ("train", "valid"):
                if not getattr(self, s):
                    raise DataError(f"data.{s}: source=text_files needs a path (data.{s}=/path/to/{s}.txt)")
        if self.source == "hf" and not self.hf_name:
            raise DataError("data.hf_name: source=hf needs a dataset name or local path")
        if self.tokenizer == "hf" and not self.hf_tokenizer:
            raise DataError("data.hf_tokenizer: tokenizer=hf needs a tokenizer name or path")
        if self.min_freq < 0:
            raise DataError(f"data.min_freq: must be >= 0, got {self.min_freq}")
        if self.max_size is not None and self.max_size < 3:
            raise DataError(f"data.max_size: must be >= 3 (<unk>, <eos> and one word), got {self.max_size}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise DataError(f"data.max_bytes: must be > 0, got {self.max_bytes}")
        self.options = dict(self.options or {})
        if self.source == "synthetic_recall":
            from txl.data.sources import recall_options
            recall_options(self.options)  # bad options fail here, before any work
            if self.tokenizer not in ("char", "byte"):
                raise DataError(f"data.tokenizer: source=synthetic_recall needs char or byte, got '{self.tokenizer}'")
        if self.hf_data_files is not None:
            self.hf_data_files = dict(self.hf_data_files)  # hydra DictConfig -> dict
        self.cache_dir = os.path.expanduser(self.cache_dir or default_cache_dir())
        if self.name is None:
            self.name = {"pystdlib": "pystdlib", "hf": f"hf:{self.hf_name}",
                         "text_files": f"text:{os.path.basename(str(self.train))}",
                         "synthetic_recall": "synthetic_recall"}[self.source]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CorpusConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DataError(f"data: unknown corpus option(s) {unknown} (known: {sorted(names)})")
        return cls(**dict(d))

    def tokenizer_spec(self) -> Dict[str, Any]:
        """The options that determine the tokenizer (part of the cache key)."""
        spec: Dict[str, Any] = {"kind": self.tokenizer}
        if self.tokenizer == "word":
            spec.update(min_freq=self.min_freq, max_size=self.max_size, lower=self.lower)
        if self.tokenizer == "hf":
            spec.update(name=self.hf_tokenizer)
        return spec


@dataclass
class Corpus:
    name: str
    tokenizer: Tokenizer
    train: np.ndarray   # [N_train] token ids (np.memmap when cached), dtype uint8/uint16/int32
    valid: np.ndarray   # [N_valid]
    test: np.ndarray    # [N_test]; empty when the source has no test split
    cache_path: Optional[str] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise DataError(f"corpus: unknown split '{name}' (expected train|valid|test)")
        return getattr(self, name)

    def __repr__(self) -> str:
        return (f"Corpus({self.name!r}, {self.tokenizer.kind} vocab={self.vocab_size}, "
                f"train={len(self.train):,} valid={len(self.valid):,} test={len(self.test):,})")


def storage_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.int32)


def cache_key(raw: Mapping[str, bytes], spec: Mapping[str, Any]) -> str:
    h = hashlib.sha256(f"txl-corpus-v{FORMAT_VERSION}\n".encode())
    h.update(json.dumps(dict(spec), sort_keys=True).encode())
    for s in SPLITS:  # length-prefixed so split boundaries cannot alias
        h.update(f"\n{s}:{len(raw[s])}\n".encode())
        h.update(raw[s])
    return h.hexdigest()


_atomic_write = atomic_write  # txl.files: temp file + os.replace, readers never see half a file


def _write_cache(path: str, arrays: Dict[str, np.ndarray], tok: Tokenizer, meta: Dict[str, Any]) -> None:
    os.makedirs(path, exist_ok=True)
    for s in SPLITS:
        _atomic_write(os.path.join(path, f"{s}.npy"), lambda f, a=arrays[s]: np.save(f, a))
    _atomic_write(os.path.join(path, "tokenizer.json"),
                  lambda f: f.write(json.dumps(tok.state_dict()).encode()))
    _atomic_write(os.path.join(path, "meta.json"),  # last: marks the entry complete
                  lambda f: f.write(json.dumps(meta, indent=1).encode()))


def _read_cache(path: str):
    if not os.path.isfile(os.path.join(path, "meta.json")):
        return None
    try:
        with open(os.path.join(path, "tokenizer.json")) as f:
            tok = tokenizer_from_state(json.load(f))
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        arrays = {s: np.load(os.path.join(path, f"{s}.npy"), mmap_mode="r") for s in SPLITS}
    except (OSError, ValueError, KeyError) as e:  # damaged entry: re-tokenize and overwrite it
        log.warning("txl.data: ignoring unreadable cache entry %s (%s)", path, e)
        return None
    return tok, arrays, meta


def _tokenize(cfg: CorpusConfig, raw: Dict[str, bytes]):
    where = {s: f"data.{s}" + (f": {getattr(cfg, s)}" if cfg.source == "text_files" else "")
             for s in SPLITS}
    train_text = None
    if cfg.tokenizer in ("char", "word"):
        train_text = decode_utf8(raw["train"], where["train"])
    tok = build_tokenizer(cfg.tokenizer, train_text, min_freq=cfg.min_freq, max_size=cfg.max_size,
                          lower=cfg.lower, name=cfg.hf_tokenizer)
    dtype, arrays = storage_dtype(tok.vocab_size), {}
    for s in SPLITS:
        if s == "train" and train_text is not None:
            ids = tok.encode(train_text)  # already decoded once for the vocabulary
        else:
            ids = tok.encode_bytes(raw[s], where[s])
        arrays[s] = np.ascontiguousarray(ids, dtype=dtype)
    return tok, arrays


def load_corpus(cfg: CorpusConfig) -> Corpus:
    """Read the source, then load tokens from the cache or tokenize once and cache them."""
    raw = SOURCES[cfg.source](cfg)
    spec = cfg.tokenizer_spec()
    key = cache_key(raw, spec)
    path = os.path.join(cfg.cache_dir, f"{cfg.source}-{cfg.tokenizer}-{key[:16]}")
    if cfg.use_cache:
        hit = _read_cache(path)
        if hit is not None:
            tok, arrays, meta = hit
            return Corpus(cfg.name, tok, arrays["train"], arrays["valid"], arrays["test"], path, meta)
    tok, arrays = _tokenize(cfg, raw)
    meta = {"key": key, "name": cfg.name, "tokenizer": spec, "vocab_size": tok.vocab_size,
            "raw_bytes": {s: len(raw[s]) for s in SPLITS}, "tokens": {s: len(arrays[s]) for s in SPLITS},
            "format_version": FORMAT_VERSION}
    if cfg.use_cache:
        try:
            _write_cache(path, arrays, tok, meta)
            hit = _read_cache(path)  # reopen as memmaps: cache hit and miss behave the same
            if hit is not None:
                tok, arrays, meta = hit
        except OSError as e:  # read-only / full disk: keep going with in-memory arrays
            log.warning("txl.data: cannot write corpus cache %s (%s); not caching", path, e)
            path = None
    else:
        path = None
    log.info("txl.data: %s tokenized (vocab %d), cache %s", cfg.name, tok.vocab_size, path)
    return Corpus(cfg.name, tok, arrays["train"], arrays["valid"], arrays["test"], path, meta)
