"""Raw corpus sources -> {'train','valid','test'}: SplitText streams (not yet tokenized).

pystdlib   the running Python's own stdlib *.py files (embedded default, no network)
text_files local files: each split a file, a directory or a glob (one document per file)
synthetic_recall  a generated long-range copy probe (data.options; txl.metrics.synthetic)
hf         a Hugging Face dataset (txl.data.hf): hub name / preset (streamed), a local copy in the
           hub's parquet layout or a save_to_disk directory, or a packaged builder ('text', ...)

A source only describes its splits (`SplitText`: a way to stream the bytes + an identity for
the cache key); nothing is read until a split is tokenized, so a cache hit reads no text.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from contextlib import ExitStack
from typing import Dict, List, Optional, Tuple

from txl.data.config import CorpusConfig
from txl.data.errors import DataError
from txl.data.hf import HF_PRESETS, HF_SPLIT_NAMES, PACKAGED, load_hf  # noqa: F401 (re-exported)
from txl.data.reader import (DOC_SEP, SHARE, SPLITS, Piece, SplitText, cap_bytes, capped, carve,  # noqa: F401
                             documents, empty_split, file_stat, resolve_paths, split_cap)
from txl.data.recall import RECALL_DEFAULTS, RECALL_MARKERS, recall_options, recall_text  # noqa: F401

SEP = DOC_SEP  # between stdlib files


# ----------------------------------------------------------------------------- text_files
def load_text_files(cfg: CorpusConfig, stack: ExitStack) -> Dict[str, SplitText]:
    out = {}
    for split in SPLITS:
        spec, where = getattr(cfg, split), f"data.{split}"
        if spec is None:
            if split == "test":  # test is optional: an empty split, only an error if evaluated
                out[split] = empty_split()
                continue
            raise DataError(f"{where}: no path given (set {where}=/path/to/{split}.txt)")
        files, many = resolve_paths(spec, where)
        stats = [file_stat(f) for f in files]
        if sum(st[1] for st in stats) == 0:
            raise DataError(f"{where}: file is empty: {files[0]}" if not many else
                            f"{where}: every file of {spec} is empty")
        cap = split_cap(cfg.max_bytes, split)
        out[split] = SplitText(lambda f=files, w=where, c=cap: capped(documents(f, w), c),
                               {"files": stats, "cap": cap}, len([s for s in stats if s[1]]))
    return out


# ----------------------------------------------------------------------------- pystdlib
def stdlib_files(root: Optional[str] = None) -> List[Tuple[str, str]]:
    """[(relative posix path, absolute path)] of stdlib *.py, no site-/dist-packages, no tests."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):  # os.walk does not follow symlinked dirs
        dirs[:] = [x for x in dirs if not _excluded(x)]
        rel = os.path.relpath(d, root)
        for f in files:
            if f.endswith(".py") and not _excluded(f):
                r = f if rel == "." else os.path.join(rel, f)
                out.append((r.replace(os.sep, "/"), os.path.join(d, f)))
    return sorted(out)


def _excluded(name: str) -> bool:
    return (name in ("site-packages", "dist-packages", "__pycache__", "idle_test")
            or name.startswith("test"))


def stdlib_split(rel: str) -> str:
    """Deterministic split by file (same on every machine): sha256(relpath) mod 100."""
    h = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") % 100
    return "train" if h < 90 else "valid" if h < 95 else "test"


def load_pystdlib(cfg: CorpusConfig, stack: ExitStack) -> Dict[str, SplitText]:
    """Whole files in sorted order, joined by SEP, until a split's max_bytes share is full."""
    parts: Dict[str, List[str]] = {s: [] for s in SPLITS}
    size = {s: 0 for s in SPLITS}
    for rel, path in stdlib_files(cfg.stdlib_root):
        split = stdlib_split(rel)
        cap = split_cap(cfg.max_bytes, split)
        if cap is not None and parts[split] and size[split] >= cap:
            continue  # split full
        try:
            n = os.path.getsize(path)
            if not os.access(path, os.R_OK):
                continue  # an unreadable stdlib file is not the user's problem: skip it
        except OSError:
            continue
        if cap is not None and parts[split] and size[split] + n + len(SEP) > cap:
            size[split] = cap  # the next file would overflow: this split is complete
            continue
        parts[split].append(path)
        size[split] += n + len(SEP)
    root = cfg.stdlib_root or sysconfig.get_paths()["stdlib"]
    out = {}
    for s in SPLITS:
        if not parts[s]:
            raise DataError(f"data.{s}: no Python stdlib sources for this split found under {root}")
        out[s] = SplitText(lambda f=parts[s], w=f"data.{s}": documents(f, w, SEP, skip_empty=False),
                           {"files": [file_stat(p) for p in parts[s]]}, len(parts[s]))
    return out


# ----------------------------------------------------------------------------- synthetic_recall
def load_synthetic_recall(cfg: CorpusConfig, stack: ExitStack) -> Dict[str, SplitText]:
    o = recall_options(cfg.options)
    out = {}
    for n_split, split in enumerate(SPLITS):
        n = o["train_tokens"] if split == "train" else o["eval_tokens"]
        cap = split_cap(cfg.max_bytes, split)
        n = max(4 * max(o["distances"]), min(n, cap)) if cap is not None else n
        args = (n, o["distances"], o["alphabet"], o["values"], o["gap"], o["seed"] * 3 + n_split)
        out[split] = SplitText(lambda a=args, w=f"data.{split}": iter([Piece(recall_text(*a), w)]), {"recall": args})
    return out


SOURCES = {"pystdlib": load_pystdlib, "text_files": load_text_files, "hf": load_hf,
           "synthetic_recall": load_synthetic_recall}
