"""The on-disk token cache: one directory per (source identity, tokenizer options).

Entry layout: <cache_dir>/<source>-<tokenizer>-<key[:16]>/{train,valid,test}.npy + tokenizer.json
+ meta.json, and {split}_docs.npy (int64 [D]: the token offset where each document starts, 0
first) unless the tokenizer is hf (meta "doc_starts": false). An entry is built in a sibling temp
directory and renamed into place whole, so a reader never sees half an entry and a failed build
(disk full, a worker crash, Ctrl-C) leaves nothing behind. meta.json, written last, records every file's size and checksum; `open_entry`
verifies them (and the arrays' headers) on every open and reports a damaged entry, which the
caller then rebuilds.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
import zlib
from typing import Any, Dict, Optional, Tuple

import numpy as np

from txl.data.config import SPLITS
from txl.data.errors import DataError

log = logging.getLogger("txl.data")
FORMAT_VERSION = 3  # 2: streamed build, stat-keyed, checksummed; 3: + <split>_docs.npy. Bump when ids or layout change.
HEADER = 128        # bytes reserved for the .npy header (rewritten in place once the length is known)

try:  # xxh3 reads ~10 GB/s (a dependency of datasets); crc32 ~2 GB/s is the fallback
    import xxhash
    CHECKSUM = "xxh3_64"
except ImportError:  # pragma: no cover
    xxhash, CHECKSUM = None, "crc32"


def storage_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.int32)


def digest(path: str, algo: str = CHECKSUM, block: int = 16 << 20) -> str:
    h = xxhash.xxh3_64() if algo == "xxh3_64" else None
    crc = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(block)
            if not b:
                break
            if h is not None:
                h.update(b)
            else:
                crc = zlib.crc32(b, crc)
    return h.hexdigest() if h is not None else f"{crc:08x}"


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    d = "{'descr': %r, 'fortran_order': False, 'shape': (%d,), }" % (np.lib.format.dtype_to_descr(dtype), n)
    body = d.encode("latin1")
    body += b" " * (HEADER - 10 - len(body) - 1) + b"\n"   # magic(6) + version(2) + length(2)
    return b"\x93NUMPY\x01\x00" + (len(body)).to_bytes(2, "little") + body


class NpyWriter:
    """Append 1-D ids to a .npy file whose length is not known in advance."""

    def __init__(self, path: str, dtype: np.dtype):
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self.f = open(path, "wb")
        self.f.write(b"\0" * HEADER)

    def write(self, ids: np.ndarray) -> None:
        a = np.ascontiguousarray(ids, dtype=self.dtype)
        self.f.write(memoryview(a).cast("B"))
        self.n += len(a)

    def close(self) -> int:
        self.f.seek(0)
        self.f.write(_npy_header(self.dtype, self.n))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.n

    def abort(self) -> None:
        try:
            self.f.close()
        except OSError:
            pass


def entry_path(cache_dir: str, source: str, tokenizer: str, key: str) -> str:
    return os.path.join(cache_dir, f"{source}-{tokenizer}-{key[:16]}")


def new_build_dir(path: str) -> str:
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    return tmp


def write_json(path: str, obj: Any, indent: Optional[int] = None) -> None:
    with open(path, "w") as f:  # indent=None: the C encoder (a 500k-word vocabulary in ~0.1 s)
        f.write(json.dumps(obj, indent=indent))
        f.flush()
        os.fsync(f.fileno())


def seal(tmp: str, meta: Dict[str, Any]) -> None:
    """Checksums of every file, then meta.json last (the completeness marker)."""
    meta["files"] = {n: {"bytes": os.path.getsize(os.path.join(tmp, n)), CHECKSUM: digest(os.path.join(tmp, n))}
                     for n in sorted(os.listdir(tmp)) if n != "meta.json"}
    write_json(os.path.join(tmp, "meta.json"), meta, indent=1)


def commit(tmp: str, path: str) -> None:
    """Move a sealed build into place; an old (damaged or stale) entry is removed first."""
    if os.path.exists(path):
        old = f"{path}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, path)


def remove(path: Optional[str]) -> None:
    if path and os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


def verify(path: str, meta: Dict[str, Any]) -> Optional[str]:
    """None if every recorded file has its size and checksum, else what is wrong (one phrase)."""
    files = meta.get("files")
    if not isinstance(files, dict) or not {f"{s}.npy" for s in SPLITS} | {"tokenizer.json"} <= set(files):
        return "meta.json lists no checksums"
    for name, rec in files.items():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            return f"{name} is missing"
        size = os.path.getsize(p)
        if size != rec.get("bytes"):
            return f"{name} has {size} bytes, expected {rec.get('bytes')}"
        algo = next((a for a in ("xxh3_64", "crc32") if a in rec), None)
        if algo is None or (algo == "xxh3_64" and xxhash is None):
            return f"{name}: no usable checksum"
        if digest(p, algo) != rec[algo]:
            return f"{name} checksum mismatch"
    return None


def _check_docs(split: str, d: np.ndarray, n_tokens: int) -> Optional[str]:
    """None if d is a valid document-start array for a split of n_tokens, else what is wrong."""
    if d.ndim != 1 or d.dtype != np.int64:
        return f"{split}_docs.npy holds {d.dtype} {d.shape}, expected int64 [D]"
    if n_tokens == 0:
        return None if len(d) == 0 else f"{split}_docs.npy lists documents of an empty split"
    if len(d) == 0 or d[0] != 0 or d[-1] > n_tokens or bool((np.diff(d) < 0).any()):
        return f"{split}_docs.npy is not a sorted list of offsets in [0, {n_tokens}] starting at 0"
    return None


def open_entry(path: str, load_tokenizer) -> Optional[Tuple[Any, Dict[str, np.ndarray], Dict[str, Any]]]:
    """(tokenizer, {split: memmap, and '<split>_docs': memmap when recorded}, meta) of a complete,
    intact entry, else None.

    A damaged entry (sizes, checksums, headers or the tokenizer do not match what meta.json
    recorded) logs one warning; the caller rebuilds it."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        log.warning("txl.data: cache entry %s is damaged (meta.json unreadable: %s); rebuilding it", path, e)
        return None
    if meta.get("format_version") != FORMAT_VERSION:
        log.info("txl.data: cache entry %s has format %s (now %d); rebuilding it", path,
                 meta.get("format_version"), FORMAT_VERSION)
        return None
    problem = verify(path, meta)
    tok = arrays = None
    if problem is None:
        try:
            with open(os.path.join(path, "tokenizer.json")) as f:
                tok = load_tokenizer(json.load(f))
            arrays = {s: np.load(os.path.join(path, f"{s}.npy"), mmap_mode="r") for s in SPLITS}
            for s in SPLITS:
                if arrays[s].ndim != 1 or len(arrays[s]) != meta["tokens"][s]:
                    problem = f"{s}.npy holds {arrays[s].shape} tokens, expected {meta['tokens'][s]}"
                    break
            if problem is None and meta.get("doc_starts"):
                docs = {s: np.load(os.path.join(path, f"{s}_docs.npy"), mmap_mode="r") for s in SPLITS}
                problem = next((p for p in (_check_docs(s, docs[s], meta["tokens"][s]) for s in SPLITS) if p), None)
                arrays.update({f"{s}_docs": docs[s] for s in SPLITS})
            if problem is None and tok.vocab_size != meta.get("vocab_size"):
                problem = f"tokenizer.json has vocab {tok.vocab_size}, expected {meta.get('vocab_size')}"
        except (OSError, ValueError, KeyError, TypeError, DataError) as e:
            problem = f"unreadable: {type(e).__name__}: {e}"
    if problem is not None:
        log.warning("txl.data: cache entry %s is damaged (%s); rebuilding it", path, problem)
        return None
    return tok, arrays, meta
