"""CorpusConfig: what corpus to read and how to tokenize it; the one place a corpus config is built.

`CorpusConfig.from_dict(d)` is the only constructor the CLIs use (strict: unknown keys fail;
strict=False: keys of a wider mapping, e.g. a checkpoint's data node with batch sizes, are skipped).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from txl.data.errors import DataError

SPLITS = ("train", "valid", "test")
SOURCE_NAMES = ("pystdlib", "text_files", "hf", "synthetic_recall")  # txl.data.sources.SOURCES keys
TOKENIZER_KINDS = ("byte", "char", "word", "hf")


def default_cache_dir() -> str:
    return os.environ.get("TXL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "txl")


def usable_cores() -> int:
    """CPUs this process may run on (CPU affinity / cgroup cpusets), not the machine's total."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass
class CorpusConfig:
    source: str = "pystdlib"            # 'pystdlib' | 'text_files' | 'hf' | 'synthetic_recall'
    train: Optional[str] = None         # text_files: a file, a directory or a glob (one document per file)
    valid: Optional[str] = None
    test: Optional[str] = None          # optional
    tokenizer: str = "byte"             # 'byte' | 'char' | 'word' | 'hf'
    min_freq: int = 0                   # word: drop tokens rarer than this
    max_size: Optional[int] = None      # word: vocabulary cap, specials included
    lower: bool = False                 # word: lower-case before splitting
    hf_name: Optional[str] = None       # hub id, preset (wikitext103|wikitext2|enwik8|text8|pg19),
                                        # local save_to_disk / parquet dir, or packaged builder ('text', ...)
    hf_config: Optional[str] = None     # overrides the preset's config
    hf_dir: Optional[str] = None        # a local copy (hub parquet layout or save_to_disk) read instead
                                        # of the hub, with hf_name's preset (config, splits, join mode)
    hf_data_files: Optional[Dict[str, str]] = None  # for packaged builders: {split: path}
    hf_text_column: str = "text"
    hf_tokenizer: Optional[str] = None  # tokenizer=hf: hub id, local dir or tokenizer.json
    cache_dir: Optional[str] = None     # None -> $TXL_CACHE or ~/.cache/txl
    use_cache: bool = True
    max_bytes: Optional[int] = None     # cap raw size: 90% train / 5% valid / 5% test
    num_proc: Optional[int] = None      # tokenizer worker processes; None: the usable cores
    stdlib_root: Optional[str] = None   # pystdlib: override the stdlib directory (tests)
    name: Optional[str] = None          # display name; derived from the source when None
    options: Dict[str, Any] = field(default_factory=dict)  # source-specific (synthetic_recall)

    def __post_init__(self):
        if self.source not in SOURCE_NAMES:
            raise DataError(f"data.source: unknown source '{self.source}' "
                            f"(expected one of {'|'.join(SOURCE_NAMES)})")
        if self.tokenizer not in TOKENIZER_KINDS:
            raise DataError(f"data.tokenizer: unknown kind '{self.tokenizer}' "
                            f"(expected one of {'|'.join(TOKENIZER_KINDS)})")
        if self.source == "text_files":
            for s in ("train", "valid"):
                if not getattr(self, s):
                    raise DataError(f"data.{s}: source=text_files needs a path (data.{s}=/path/to/{s}.txt)")
        if self.source == "hf" and not (self.hf_name or self.hf_dir):
            raise DataError("data.hf_name: source=hf needs a dataset name or local path")
        if self.tokenizer == "hf" and not self.hf_tokenizer:
            raise DataError("data.hf_tokenizer: tokenizer=hf needs a tokenizer name or path")
        if self.min_freq < 0:
            raise DataError(f"data.min_freq: must be >= 0, got {self.min_freq}")
        if self.max_size is not None and self.max_size < 3:
            raise DataError(f"data.max_size: must be >= 3 (<unk>, <eos> and one word), got {self.max_size}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise DataError(f"data.max_bytes: must be > 0, got {self.max_bytes}")
        if self.num_proc is not None and self.num_proc < 1:
            raise DataError(f"data.num_proc: must be >= 1 (or null for the usable cores), got {self.num_proc}")
        self.options = dict(self.options or {})
        if self.source == "synthetic_recall":
            from txl.data.recall import recall_options
            recall_options(self.options)  # bad options fail here, before any work
            if self.tokenizer not in ("char", "byte"):
                raise DataError(f"data.tokenizer: source=synthetic_recall needs char or byte, got '{self.tokenizer}'")
        if self.hf_data_files is not None:
            self.hf_data_files = dict(self.hf_data_files)  # hydra DictConfig -> dict
        self.cache_dir = os.path.expanduser(self.cache_dir or default_cache_dir())
        if self.name is None:
            self.name = {"pystdlib": "pystdlib", "hf": f"hf:{self.hf_name or self.hf_dir}",
                         "text_files": f"text:{os.path.basename(str(self.train))}",
                         "synthetic_recall": "synthetic_recall"}[self.source]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], strict: bool = True) -> "CorpusConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown and strict:
            raise DataError(f"data: unknown corpus option(s) {unknown} (known: {sorted(names)})")
        return cls(**{k: v for k, v in dict(d).items() if k in names})

    @property
    def workers(self) -> int:
        return self.num_proc or usable_cores()

    def tokenizer_spec(self) -> Dict[str, Any]:
        """The options that determine the tokenizer (part of the cache key)."""
        spec: Dict[str, Any] = {"kind": self.tokenizer}
        if self.tokenizer == "word":
            spec.update(min_freq=self.min_freq, max_size=self.max_size, lower=self.lower)
        if self.tokenizer == "hf":
            spec.update(name=self.hf_tokenizer)
        return spec
