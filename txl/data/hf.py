"""The `hf` source: Hugging Face datasets read row batch by row batch, never whole.

Where the rows come from (same preset code path for all: config, split names, join mode):
  hub name / preset   `datasets` streaming mode (offline with a populated HF cache: the cache)
  data.hf_dir         a local copy: the hub's parquet layout (read with pyarrow) or a
                      `save_to_disk` directory (memory-mapped Arrow); hf_name=<dir> works too
  packaged builder    'text', 'json', ... with data.hf_data_files
Join modes: 'lines' rows are lines ("\n" added where missing; WikiText's empty rows are empty
lines), 'concat' rows are pieces of one text, 'docs' rows are documents (PG-19: one book a row),
joined by the document separator. A dataset with only a train split is carved 90/5/5 (enwik8,
text8) through a temporary spool file in the cache directory.
"""
from __future__ import annotations

import glob
import os
import uuid
from contextlib import ExitStack
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from txl.data.config import CorpusConfig
from txl.data.errors import DataError, first_line
from txl.data.hub import hf_offline, hub_offline_reason, in_local_hf_cache, offline_message
from txl.data.reader import (BLOCK, DOC_SEP, SPLITS, Piece, SplitText, capped, carve_points, doc_mark, file_pieces,
                             file_stat, split_cap)

# preset -> (hub dataset, config, join mode, revision). LTCB/enwik8 is script-based (unsupported
# by datasets>=4): read the hub's parquet export; its one 'train' split is carved 90M/5M/5M bytes
# as in the paper. deepmind/pg19 likewise via its parquet export. Hub layouts unverified offline.
HF_PRESETS: Dict[str, Tuple[str, Optional[str], str, Optional[str]]] = {
    "wikitext103": ("wikitext", "wikitext-103-raw-v1", "lines", None),
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "lines", None),
    "enwik8": ("LTCB/enwik8", "enwik8", "lines", "refs/convert/parquet"),
    "text8": ("afmck/text8", None, "concat", None),
    "pg19": ("deepmind/pg19", None, "docs", "refs/convert/parquet"),
}
PACKAGED = ("text", "json", "csv", "parquet", "arrow")  # datasets builders that read local files
HF_SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}
ROWS = 1000  # rows per batch

Rows = Callable[[], Iterator[List[Optional[str]]]]  # a fresh pass: batches of row texts


# ----------------------------------------------------------------------------- row sources
def _dataset_rows(ds, column: str) -> Rows:
    """Rows of a datasets Dataset (Arrow) or IterableDataset (streaming)."""
    names = getattr(ds, "column_names", None)
    if names is not None and column not in names:
        raise DataError(f"data.hf_text_column: column '{column}' not in dataset columns {names}")

    def rows():
        src = ds.select_columns([column]) if names is not None else ds
        for batch in src.iter(batch_size=ROWS):
            if column not in batch:
                raise DataError(f"data.hf_text_column: column '{column}' not in dataset columns {list(batch)}")
            yield batch[column]
    return rows


def _parquet_rows(files: List[str], column: str) -> Rows:
    import pyarrow.parquet as pq
    for f in files[:1]:
        names = pq.ParquetFile(f).schema_arrow.names
        if column not in names:
            raise DataError(f"data.hf_text_column: column '{column}' not in dataset columns {names} ({f})")

    def rows():
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS, columns=[column]):
                yield batch.column(0).to_pylist()
    return rows


def _split_of(rel: str) -> Optional[str]:
    """Which HF split a parquet file of the hub layout belongs to: by a directory named after it
    (default/train/0000.parquet) or a file name starting with it (train-00000-of-00002.parquet)."""
    parts = rel.lower().replace(os.sep, "/").split("/")
    for name in (n for names in HF_SPLIT_NAMES.values() for n in names):
        if name in parts[:-1] or any(parts[-1].startswith(name + c) for c in "-._"):
            return name
    return None


def _local_rows(path: str, config: Optional[str], column: str) -> Dict[str, Rows]:
    if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
        import datasets
        try:
            dd = datasets.load_from_disk(path)
        except Exception as e:
            raise DataError(f"data.hf_dir: cannot load saved dataset {path}: {first_line(e)}") from None
        dd = dd if hasattr(dd, "keys") else {"train": dd}
        return {k: _dataset_rows(dd[k], column) for k in dd.keys()}
    root = os.path.join(path, config) if config and os.path.isdir(os.path.join(path, config)) else path
    files = sorted(glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True))
    if not files:
        raise DataError(f"data.hf_dir: {path} is neither a save_to_disk directory nor holds *.parquet files")
    by_split: Dict[str, List[str]] = {}
    for f in files:
        s = _split_of(os.path.relpath(f, root))
        if s is not None:
            by_split.setdefault(s, []).append(f)
    if not by_split:
        raise DataError(f"data.hf_dir: no parquet file under {root} is named after a split "
                        f"(train/validation/test, as in the hub's layout)")
    return {k: _parquet_rows(v, column) for k, v in by_split.items()}


def _hub_rows(cfg: CorpusConfig, name: str, config: Optional[str], revision: Optional[str]) -> Dict[str, Rows]:
    if name in PACKAGED:
        if not cfg.hf_data_files:
            raise DataError(f"data.hf_data_files: the '{name}' builder needs data files "
                            f"(e.g. data.hf_data_files={{train: a.txt, validation: b.txt}})")
        import datasets
        try:
            dd = datasets.load_dataset(name, config, data_files=dict(cfg.hf_data_files), streaming=True)
        except Exception as e:
            raise DataError(f"data.hf_data_files: cannot load with '{name}': {first_line(e)}") from None
        return {k: _dataset_rows(dd[k], cfg.hf_text_column) for k in dd.keys()}
    reason = hub_offline_reason()  # fail fast BEFORE importing datasets (~1.5 s) when offline
    if reason and not in_local_hf_cache(name):
        raise DataError(offline_message(name, reason))
    import datasets
    try:
        if reason:  # offline with a populated cache: the prepared Arrow files
            with hf_offline():
                dd = datasets.load_dataset(name, config, revision=revision)
        else:       # online: stream, nothing the size of the corpus is downloaded first
            dd = datasets.load_dataset(name, config, revision=revision, streaming=True)
    except DataError:
        raise
    except Exception as e:
        if reason:
            raise DataError(offline_message(name, f"{reason}; cache: {first_line(e)}")) from None
        raise DataError(f"data.hf_name: cannot load dataset '{name}' config {config!r}: {first_line(e)}") from None
    dd = dd if hasattr(dd, "keys") else {"train": dd}
    return {k: _dataset_rows(dd[k], cfg.hf_text_column) for k in dd.keys()}


# ----------------------------------------------------------------------------- rows -> pieces
def row_pieces(rows: Rows, mode: str, where: str) -> Iterator[Piece]:
    """Rows joined per `mode` into pieces of ~BLOCK bytes, each ending at a row end."""
    buf: List[bytes] = []
    n, first = 0, True
    for batch in rows():
        for row in batch:
            row = row or ""
            if mode == "lines" and not row.endswith("\n"):
                row += "\n"
            if mode == "docs":
                if not row:
                    continue
                if not first:  # the separator ends the book before; the marker starts this one
                    buf.append(DOC_SEP)
                    yield Piece(b"".join(buf), where)
                    yield doc_mark(where)
                    buf, n = [], 0
            first = False
            b = row.encode("utf-8")
            buf.append(b)
            n += len(b)
            if n >= BLOCK:
                yield Piece(b"".join(buf), where)
                buf, n = [], 0
    if buf:
        yield Piece(b"".join(buf), where)


def load_hf(cfg: CorpusConfig, stack: ExitStack) -> Dict[str, SplitText]:
    name, config, mode, revision = HF_PRESETS.get(cfg.hf_name or "", (cfg.hf_name, None, "lines", None))
    config = cfg.hf_config if cfg.hf_config is not None else config
    local = cfg.hf_dir or (name if name and os.path.isdir(os.path.expanduser(name)) else None)
    if local is not None:
        local = os.path.expanduser(local)
        if not os.path.isdir(local):
            raise DataError(f"data.hf_dir: not a directory: {local}")
        files = sorted(glob.glob(os.path.join(local, "**", "*"), recursive=True))
        ident = {"dir": [file_stat(f) for f in files if os.path.isfile(f)]}
    elif name in PACKAGED:
        ident = {"builder": name, "files": {k: file_stat(v) for k, v in (cfg.hf_data_files or {}).items()
                                            if os.path.isfile(str(v))}}
    else:
        ident = {"hub": [name, revision]}
    ident.update(config=config, mode=mode, column=cfg.hf_text_column, max_bytes=cfg.max_bytes)
    opened: Dict[str, Dict[str, Rows]] = {}

    def splits() -> Dict[str, Rows]:  # opened once, on first use (a cache hit never opens it)
        if not opened:
            rows = _local_rows(local, config, cfg.hf_text_column) if local else _hub_rows(cfg, name, config, revision)
            opened["rows"] = rows
        return opened["rows"]

    def find(split: str, rows: Dict[str, Rows]) -> Optional[str]:
        return next((n for n in HF_SPLIT_NAMES[split] if n in rows), None)

    label = cfg.hf_dir or cfg.hf_name
    spool: Dict[str, Tuple[str, int, int, int]] = {}

    def carved(split: str) -> Iterator[Piece]:
        if not spool:  # only a train split: write it once to a spool file, carve 90/5/5 by bytes
            rows = splits()
            os.makedirs(cfg.cache_dir, exist_ok=True)
            path = os.path.join(cfg.cache_dir, f"spool-{os.getpid()}-{uuid.uuid4().hex[:8]}.txt")
            stack.callback(lambda: os.path.exists(path) and os.remove(path))
            with open(path, "wb") as f:
                for p in capped(row_pieces(rows[find("train", rows)], mode, f"data.hf_name: {label}"), cfg.max_bytes):
                    f.write(p.data)
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                def byte_at(i):
                    f.seek(i)
                    return f.read(1)[0]
                a, b = carve_points(size, byte_at)
            spool["f"] = (path, a, b, size)
        path, a, b, size = spool["f"]
        lo, hi = {"train": (0, a), "valid": (a, b), "test": (b, size)}[split]
        return file_pieces(path, "data.hf_name", label=f"data.hf_name: {label} [{split}]", start=lo, end=hi)

    def open_split(split: str) -> Iterator[Piece]:
        rows = splits()
        avail = sorted(rows)
        if find("train", rows) is None:
            raise DataError(f"data.hf_name: dataset '{label}' has no train split (splits: {avail})")
        if find("valid", rows) is None and find("test", rows) is None:  # enwik8 / text8 style
            return carved(split)
        if find("valid", rows) is None:
            raise DataError(f"data.hf_name: dataset '{label}' has no validation split (splits: {avail})")
        hf_split = find(split, rows)
        if hf_split is None:
            return iter(())
        return capped(row_pieces(rows[hf_split], mode, f"data.hf_name: {label} [{hf_split}]"),
                      split_cap(cfg.max_bytes, split))

    return {s: SplitText(lambda s=s: open_split(s), ident, 1) for s in SPLITS}
