"""Tokenize split streams into a cache build directory, in parallel worker processes.

    train pieces --(char/word)--> vocabulary pass: per-job counts / char sets, merged in order
    each split   --> jobs of ~4 MB cut after a newline --> workers --> ids, in order --> .npy

Jobs go out with at most 2 per worker in flight, so memory stays bounded whatever the corpus
size; ids are appended straight to the .npy file. byte needs no worker (bytes are the ids); hf
encodes in this process (its Rust encode_batch is parallel itself). Worker processes are forked
(spawned where fork does not exist) only when a split has more than one job.
"""
from __future__ import annotations

import multiprocessing as mp
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Dict, Iterable, Iterator, List, Tuple

import numpy as np

from txl.data import reader
from txl.data.cache import NpyWriter, storage_dtype
from txl.data.errors import DataError, first_line
from txl.data.reader import Piece, chunks, decode_pieces, encode_docs
from txl.data.tokenizers import CharTokenizer, Tokenizer, WordTokenizer, build_tokenizer, rank_words

Job = Tuple[List[Piece], bool]
_STATE: Dict[str, Any] = {}  # per worker process: the tokenizer / options set by _init


def _init(state: Dict[str, Any]) -> None:
    _STATE.clear()
    _STATE.update(state)


def count_words(job: Job) -> Counter:
    text = decode_pieces(job[0])
    return Counter((text.lower() if _STATE.get("lower") else text).split())


def char_set(job: Job) -> set:
    return set(decode_pieces(job[0]))


def encode_ids(job: Job) -> Tuple[np.ndarray, List[int]]:
    ids, starts = encode_docs(_STATE["tok"], job[0], job[1])
    return np.ascontiguousarray(ids, dtype=_STATE["dtype"]), starts


def _context():
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def run_jobs(fn: Callable[[Job], Any], jobs: Iterable[Job], workers: int, state: Dict[str, Any]) -> Iterator[Any]:
    """fn(job) for every job, results in job order; >1 job and workers > 1: in worker processes.

    A worker's exception ends the run with its cause; a worker that dies (killed, out of memory)
    ends it with its exit code."""
    jobs = iter(jobs)
    first = next(jobs, None)
    if first is None:
        return
    second = next(jobs, None)
    if second is None or workers <= 1:
        _init(state)
        for job in ([first] if second is None else [first, second]):
            yield fn(job)
        for job in jobs:
            yield fn(job)
        return
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=_context(), initializer=_init, initargs=(state,))
    pending: deque = deque()
    procs: Dict[int, Any] = {}  # every worker seen, to name a dead one's exit code
    try:
        for job in _prepend([first, second], jobs):
            pending.append(ex.submit(fn, job))
            procs.update(getattr(ex, "_processes", None) or {})
            if len(pending) >= 2 * workers:
                yield _result(pending.popleft(), procs)
        while pending:
            yield _result(pending.popleft(), procs)
    finally:
        for f in pending:
            f.cancel()
        ex.shutdown(wait=True, cancel_futures=True)


def _prepend(head, rest):
    yield from head
    yield from rest


def _result(fut, procs):
    try:
        return fut.result()
    except DataError:
        raise
    except BrokenProcessPool:
        for p in procs.values():
            p.join(timeout=1)  # the dead one has exited; its exit code is set once joined
        codes = sorted({p.exitcode for p in procs.values() if p.exitcode not in (None, 0)})
        how = f" (exit code {', '.join(map(str, codes))})" if codes else ""
        raise DataError(f"data: a tokenizer worker process died{how}; no cache was written "
                        f"(out of memory? try a smaller data.num_proc)") from None
    except Exception as e:
        raise DataError(f"data: a tokenizer worker failed: {first_line(e)}; no cache was written") from None


def train_tokenizer(kind: str, train: Callable[[], Iterator[Piece]], workers: int, **opts) -> Tokenizer:
    """byte/hf as configured; char/word learn their vocabulary from the train stream in one pass."""
    if kind in ("byte", "hf"):
        return build_tokenizer(kind, **opts)
    jobs = chunks(train())
    if kind == "char":
        chars: set = set()
        for s in run_jobs(char_set, jobs, workers, {}):
            chars |= s
        return CharTokenizer(sorted(chars))
    counts: Counter = Counter()
    lower = bool(opts.get("lower", False))
    for c in run_jobs(count_words, jobs, workers, {"lower": lower}):
        counts.update(c)
    return WordTokenizer(rank_words(counts, int(opts.get("min_freq") or 0), opts.get("max_size")), lower=lower)


def write_split(tok: Tokenizer, pieces: Iterable[Piece], path: str, workers: int) -> Dict[str, Any]:
    """Tokenize a piece stream into the .npy at `path` -> {'tokens', 'bytes', 'doc_starts'}.

    doc_starts: int64 [D], the token offset of every document's first token (0 first; a document
    marker in the stream starts the next); [] for an empty split; None for hf (its ~1 MB
    encode_batch items span documents, so a document start has no token offset of its own)."""
    dtype = storage_dtype(tok.vocab_size)
    w = NpyWriter(path, dtype)
    nbytes = [0]
    starts: List[int] = [0]

    def counted(ps):
        for p in ps:
            nbytes[0] += len(p.data)
            yield p
    try:
        if tok.kind == "byte":  # the bytes are the ids: straight to disk
            for p in counted(pieces):
                if p.doc:
                    starts.append(w.n)
                else:
                    w.write(np.frombuffer(p.data, dtype=np.uint8))
        elif tok.kind == "hf":
            starts = None
            for ids in reader.stream_ids(tok, counted(pieces)):
                w.write(ids)
        else:
            if tok.kind == "word":
                tok.stoi  # the word -> id map is built lazily: once here, forked workers inherit it
            for ids, at in run_jobs(encode_ids, chunks(counted(pieces)), workers, {"tok": tok, "dtype": dtype}):
                starts.extend(w.n + a for a in at)
                w.write(ids)
        n = w.close()
    except BaseException:
        w.abort()
        raise
    docs = None if starts is None else np.asarray(starts if n else [], dtype=np.int64)
    return {"tokens": n, "bytes": nbytes[0], "doc_starts": docs}
