"""Streaming text input: files, directories and globs read as bounded pieces, never whole.

A split is a stream of `Piece`s whose concatenation is the split's raw bytes. Pieces from a file
are cut after its last newline within a block (so each starts at a character and line boundary);
`chunks` regroups pieces into worker-sized jobs, again cut after a newline, which is what makes
tokenizing chunk by chunk give the same ids as tokenizing the whole text at once.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from txl.data.cache import storage_dtype
from txl.data.config import SPLITS  # noqa: F401 (re-exported for the sources)
from txl.data.errors import DataError

BLOCK = 8 << 20         # bytes read from a file at a time
CHUNK = 4 << 20         # bytes of text per tokenizer job
DOC_SEP = b"\n\n"       # between documents (files of a directory / glob, pystdlib files, pg19 books)
_WS = (b" ", b"\t")


@dataclass(frozen=True)
class Piece:
    data: bytes
    where: str          # what an error names, e.g. "data.train: books/a.txt"
    offset: int = 0     # byte offset of `data` within its document (for UTF-8 error messages)
    doc: bool = False   # a document marker (data is b""): a new document starts here


def doc_mark(where: str) -> Piece:
    """The marker put before every document but the first (after the separator, so the separator's
    tokens belong to the document before it): the builder records the token offset it lands on."""
    return Piece(b"", where, 0, True)


def is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[") and not os.path.exists(os.path.expanduser(spec))


def resolve_paths(spec: str, where: str) -> Tuple[List[str], bool]:
    """data.<split> -> (files, is_collection): a file, every non-hidden file under a directory
    (sorted by relative path), or the files a glob matches (sorted)."""
    path = os.path.expanduser(str(spec))
    if is_glob(path):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"{where}: no file matches the pattern {spec}")
        return files, True
    if not os.path.exists(path):
        raise DataError(f"{where}: file not found: {path}")
    if os.path.isdir(path):
        files = []
        for d, dirs, names in os.walk(path):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            files += [os.path.join(d, n) for n in names if not n.startswith(".") and os.path.isfile(os.path.join(d, n))]
        files.sort(key=lambda p: os.path.relpath(p, path))
        if not files:
            raise DataError(f"{where}: directory {path} has no text files")
        return files, True
    return [path], False


def file_stat(path: str) -> List:
    """Identity of a file for the cache key: a rewrite changes size or mtime."""
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _safe_cut(buf: bytes) -> int:
    """Where to cut a newline-free buffer: after the last space/tab, else at a character start."""
    i = max(buf.rfind(w) for w in _WS) + 1
    if i > 0:
        return i
    i = len(buf)
    while i > 0 and (buf[i - 1] & 0xC0) == 0x80:  # 10xxxxxx: inside a multi-byte character
        i -= 1
    return i - 1 if i > 0 and buf[i - 1] >= 0xC0 else i  # drop an unfinished lead byte too


def file_pieces(path: str, where: str, block: Optional[int] = None, label: Optional[str] = None,
                start: int = 0, end: Optional[int] = None) -> Iterator[Piece]:
    """A file's bytes [start, end) as pieces cut after a newline; `label` (default
    "<where>: <path>") is what a decode error names."""
    block, label = block or BLOCK, label or f"{where}: {path}"
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{where}: cannot read {path}: {e.strerror or e}") from None
    with f:
        carry, off = b"", start
        if start:
            f.seek(start)
        while True:
            want = block if end is None else min(block, end - off - len(carry))
            try:
                buf = f.read(want) if want > 0 else b""
            except OSError as e:
                raise DataError(f"{where}: cannot read {path}: {e.strerror or e}") from None
            if not buf:
                break
            buf = carry + buf if carry else buf
            cut = buf.rfind(b"\n") + 1
            if cut == 0:
                if len(buf) < 4 * block:  # one long line: read on before cutting it
                    carry = buf
                    continue
                cut = _safe_cut(buf) or len(buf)
            yield Piece(buf[:cut], label, off)
            off += cut
            carry = buf[cut:]
        if carry:
            yield Piece(carry, label, off)


def documents(paths: Iterable[str], where: str, sep: bytes = DOC_SEP, skip_empty: bool = True,
              block: Optional[int] = None) -> Iterator[Piece]:
    """Files as documents, joined by `sep` (skip_empty=False: an empty file still adds one), a
    document marker (doc_mark) after each separator."""
    first = True
    for p in paths:
        if skip_empty and os.path.getsize(p) == 0:
            continue
        if not first:
            yield Piece(sep, f"{where}: document separator")
            yield doc_mark(where)
        first = False
        yield from file_pieces(p, where, block)


def capped(pieces: Iterable[Piece], cap: Optional[int]) -> Iterator[Piece]:
    """The first <= cap bytes, cut after the last newline if any, else at a character start
    (the streaming form of sources.cap_bytes on the joined stream)."""
    if cap is None:
        yield from pieces
        return
    n, newline = 0, False
    for p in pieces:
        if n + len(p.data) <= cap:
            yield p
            n += len(p.data)
            newline = newline or b"\n" in p.data
            continue
        room = cap - n
        cut = p.data.rfind(b"\n", 0, room) + 1
        if cut == 0 and not newline:  # no newline at all before the cap: a character boundary
            cut = room
            while cut > 0 and (p.data[cut] & 0xC0) == 0x80:
                cut -= 1
        if cut:
            yield Piece(p.data[:cut], p.where, p.offset)
        return


def chunks(pieces: Iterable[Piece], size: Optional[int] = None) -> Iterator[Tuple[List[Piece], bool]]:
    """Group pieces into jobs of >= size bytes cut after a newline -> (pieces, final)."""
    size = size or CHUNK
    group: List[Piece] = []
    n, pending = 0, None
    for p in pieces:
        group.append(p)
        n += len(p.data)
        if n < size:
            continue
        head, tail = _cut_after_newline(group)
        if not head and n < 4 * size:
            continue  # no newline yet: keep collecting
        if not head:
            head, tail = group, []
        if pending is not None:
            yield pending, False
        pending, group = head, tail
        n = sum(len(q.data) for q in group)
    if group:
        if pending is not None:
            yield pending, False
        pending = group
    if pending is not None:
        yield pending, True


def _cut_after_newline(group: List[Piece]) -> Tuple[List[Piece], List[Piece]]:
    for i in range(len(group) - 1, -1, -1):
        j = group[i].data.rfind(b"\n") + 1
        if j:
            p = group[i]
            head = group[:i] + [Piece(p.data[:j], p.where, p.offset)]
            rest = [Piece(p.data[j:], p.where, p.offset + j)] if j < len(p.data) else []
            return head, rest + group[i + 1:]
    return [], group


def decode_pieces(pieces: List[Piece]) -> str:
    """Strict UTF-8 decode of a job; a bad byte names its file and offset in that file."""
    out = []
    for p in pieces:
        try:
            out.append(p.data.decode("utf-8", errors="strict"))
        except UnicodeDecodeError as e:
            raise DataError(f"{p.where}: not valid UTF-8 at byte offset {p.offset + e.start} ({e.reason}); "
                            f"use data.tokenizer=byte for non-UTF-8 text") from None
    return "".join(out)


def encode_job(tok, pieces: List[Piece], final: bool) -> np.ndarray:
    """One job's ids (int32; byte: uint8) with the in-process tokenizer."""
    if tok.kind == "byte":
        return np.frombuffer(b"".join(p.data for p in pieces), dtype=np.uint8)
    return tok.encode_chunk(decode_pieces(pieces), final)


def encode_docs(tok, pieces: List[Piece], final: bool) -> Tuple[np.ndarray, List[int]]:
    """(ids, offsets within them where the job's document markers land) for byte / char / word.

    The job is encoded in runs between markers. A marker always follows a separator ending in a
    newline (DOC_SEP), and cutting after a newline leaves byte / char / word ids unchanged (the
    same invariant as the jobs' cuts), so the ids equal encode_job's."""
    if not any(p.doc for p in pieces):
        return encode_job(tok, pieces, final), []
    runs: List[List[Piece]] = [[]]
    for p in pieces:
        if p.doc:
            runs.append([])
        else:
            runs[-1].append(p)
    ids = [encode_job(tok, r, final and i == len(runs) - 1) for i, r in enumerate(runs)]
    starts = np.cumsum([0] + [len(a) for a in ids[:-1]]).tolist()[1:]
    return (np.concatenate(ids) if len(ids) > 1 else ids[0]), starts


def stream_ids(tok, pieces: Iterable[Piece], chunk: Optional[int] = None) -> Iterator[np.ndarray]:
    """ids of a piece stream, job by job, in this process (hf: Rust encodes in parallel itself)."""
    if tok.kind == "hf":
        yield from tok.encode_stream(decode_pieces(group) for group, _ in chunks(pieces, chunk))
        return
    for group, final in chunks(pieces, chunk):
        yield encode_job(tok, group, final)


def read_text_tokens(path, tok, max_tokens: Optional[int] = None, where: str = "text",
                     chunk: int = 1 << 20) -> np.ndarray:
    """Tokenize a text file streaming, stopping once `max_tokens` ids are read (the rest of the
    file is never read); memory ~ the ids kept plus one ~1 MB chunk. A blank file is an error."""
    return read_text_docs(path, tok, max_tokens, where, chunk)[0]


def read_text_docs(path, tok, max_tokens: Optional[int] = None, where: str = "text",
                   chunk: int = 1 << 20) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """read_text_tokens for a file, a directory or a glob (one document per file, joined as a
    corpus split joins them) -> (ids, int64 document starts below len(ids); for hf, None unless a
    single file)."""
    path = os.fspath(path)
    files, many = resolve_paths(path, where)
    seen = [False]  # any non-whitespace byte read so far

    def watch(pieces):
        for p in pieces:
            seen[0] = seen[0] or bool(p.data.strip())
            yield p
    pieces = watch(documents(files, where, block=chunk) if many else
                   file_pieces(path, where, chunk, label=f"{where} {path}"))
    parts, n, dtype = [], 0, storage_dtype(tok.vocab_size)  # kept ids: 1-2 bytes each for byte/char
    starts: Optional[List[int]] = None if tok.kind == "hf" and many else [0]  # hf: one file is one document
    jobs = stream_ids(tok, pieces, chunk) if tok.kind == "hf" else (
        encode_docs(tok, group, final) for group, final in chunks(pieces, chunk))
    for out in jobs:
        ids = out if tok.kind == "hf" else out[0]
        if tok.kind != "hf":
            starts += [n + a for a in out[1]]
        parts.append(ids.astype(dtype, copy=False))
        n += len(ids)
        if max_tokens and n >= max_tokens:
            break
    if not seen[0] and not (max_tokens and n >= max_tokens):
        raise DataError(f"{where}: {path} is empty")
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    ids = ids[:max_tokens] if max_tokens else ids
    docs = None if starts is None else np.asarray([d for d in starts if d < len(ids)], dtype=np.int64)
    return ids, docs


# ----------------------------------------------------------------------------- splits
SHARE = {"train": 0.90, "valid": 0.05, "test": 0.05}  # max_bytes share per split; also 90/5/5 carving


@dataclass
class SplitText:
    """One split as a source hands it over: `open()` starts a fresh pass over its bytes (train is
    read twice for char/word: vocabulary, then ids); `ident` is JSON for the cache key (file
    stats, names, options: never the content, so reopening reads no text)."""
    open: Callable[[], Iterator[Piece]]
    ident: object
    documents: int = 1


def empty_split() -> SplitText:
    return SplitText(lambda: iter(()), None, 0)


def split_cap(max_bytes: Optional[int], split: str) -> Optional[int]:
    return None if max_bytes is None else max(1, int(max_bytes * SHARE[split]))


def cap_bytes(raw: bytes, cap: Optional[int]) -> bytes:
    """Truncate to <= cap bytes, at the last newline if any, else at a UTF-8 character start."""
    if cap is None or len(raw) <= cap:
        return raw
    return b"".join(p.data for p in capped([Piece(raw, "text")], cap))


def carve_points(size: int, byte_at: Callable[[int], int]) -> Tuple[int, int]:
    """90/5/5 split points of a text (enwik8/text8: 90M/5M/5M), moved to UTF-8 character starts."""
    def start(i: int) -> int:
        while 0 < i < size and (byte_at(i) & 0xC0) == 0x80:
            i += 1
        return i
    return start(int(size * 0.90)), start(int(size * 0.95))


def carve(raw: bytes) -> Dict[str, bytes]:
    a, b = carve_points(len(raw), raw.__getitem__)
    return {"train": raw[:a], "valid": raw[a:b], "test": raw[b:]}
