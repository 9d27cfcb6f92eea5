"""Raw corpus sources -> {'train','valid','test'}: bytes (not yet tokenized).

pystdlib   the running Python's own stdlib *.py files (embedded default, no network)
text_files three local files
synthetic_recall  a generated long-range copy probe (data.options; txl.metrics.synthetic)
hf         a Hugging Face dataset: hub name / preset, a local save_to_disk directory, or a
           packaged builder ('text', 'json', ...) with hf_data_files. Fails fast when offline.
"""
from __future__ import annotations

import hashlib
import os
import socket
import sysconfig
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple
from urllib.parse import urlparse

from txl.data import DataError

if TYPE_CHECKING:
    from txl.data.corpus import CorpusConfig

SPLITS = ("train", "valid", "test")
SHARE = {"train": 0.90, "valid": 0.05, "test": 0.05}  # max_bytes share per split; also 90/5/5 carving
SEP = b"\n\n"  # between stdlib files

# preset -> (hub dataset, config, join mode, revision). 'lines': rows are lines ('\n' added where
# missing; WikiText's empty rows become empty lines); 'concat': rows are pieces of one text.
# LTCB/enwik8 is script-based (unsupported by datasets>=4): read the hub's parquet export; its
# one 'train' split is carved 90M/5M/5M bytes as in the paper. Hub layouts unverified offline.
HF_PRESETS: Dict[str, Tuple[str, Optional[str], str, Optional[str]]] = {
    "wikitext103": ("wikitext", "wikitext-103-raw-v1", "lines", None),
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "lines", None),
    "enwik8": ("LTCB/enwik8", "enwik8", "lines", "refs/convert/parquet"),
    "text8": ("afmck/text8", None, "concat", None),
}
PACKAGED = ("text", "json", "csv", "parquet", "arrow")  # datasets builders that read local files
HF_SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}
_TRUE = ("1", "ON", "YES", "TRUE")


# ----------------------------------------------------------------------------- helpers
def cap_bytes(raw: bytes, cap: Optional[int]) -> bytes:
    """Truncate to <= cap bytes, at the last newline if any, else at a UTF-8 character start."""
    if cap is None or len(raw) <= cap:
        return raw
    cut = raw.rfind(b"\n", 0, cap)
    if cut >= 0:
        return raw[:cut + 1]
    while cap > 0 and (raw[cap] & 0xC0) == 0x80:  # 10xxxxxx = UTF-8 continuation byte
        cap -= 1
    return raw[:cap]


def split_cap(max_bytes: Optional[int], split: str) -> Optional[int]:
    return None if max_bytes is None else max(1, int(max_bytes * SHARE[split]))


def carve(raw: bytes) -> Dict[str, bytes]:
    """Split one text 90/5/5 (enwik8/text8: 90M/5M/5M), boundaries moved to UTF-8 char starts."""
    def start(i: int) -> int:
        while 0 < i < len(raw) and (raw[i] & 0xC0) == 0x80:
            i += 1
        return i
    a, b = start(int(len(raw) * 0.90)), start(int(len(raw) * 0.95))
    return {"train": raw[:a], "valid": raw[a:b], "test": raw[b:]}


def read_file(path: str, split: str) -> bytes:
    where = f"data.{split}"
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise DataError(f"{where}: file not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"{where}: is a directory, expected a text file: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{where}: cannot read {path}: {e.strerror or e}") from None
    if not raw:
        raise DataError(f"{where}: file is empty: {path}")
    return raw


# ----------------------------------------------------------------------------- text_files
def load_text_files(cfg: "CorpusConfig") -> Dict[str, bytes]:
    out = {}
    for split in SPLITS:
        path = getattr(cfg, split)
        if path is None:
            if split == "test":  # test is optional: an empty split, only an error if evaluated
                out[split] = b""
                continue
            raise DataError(f"data.{split}: no path given (set data.{split}=/path/to/{split}.txt)")
        out[split] = cap_bytes(read_file(path, split), split_cap(cfg.max_bytes, split))
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


def load_pystdlib(cfg: "CorpusConfig") -> Dict[str, bytes]:
    parts: Dict[str, List[bytes]] = {s: [] for s in SPLITS}
    size = {s: 0 for s in SPLITS}
    for rel, path in stdlib_files(cfg.stdlib_root):
        split = stdlib_split(rel)
        cap = split_cap(cfg.max_bytes, split)
        if cap is not None and parts[split] and size[split] >= cap:
            continue  # split full; whole files only, in sorted order
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError:
            continue  # an unreadable stdlib file is not the user's problem: skip it
        if cap is not None and parts[split] and size[split] + len(raw) + len(SEP) > cap:
            size[split] = cap  # the next file would overflow: this split is complete
            continue
        parts[split].append(raw)
        size[split] += len(raw) + len(SEP)
    out = {s: SEP.join(p) for s, p in parts.items()}
    for s in SPLITS:
        if not out[s]:
            root = cfg.stdlib_root or sysconfig.get_paths()["stdlib"]
            raise DataError(f"data.{s}: no Python stdlib sources for this split found under {root}")
    return out


# ----------------------------------------------------------------------------- hf
_probe_cache: Dict[str, Optional[str]] = {}


def hub_offline_reason(timeout: float = 1.5) -> Optional[str]:
    """None if the hub looks reachable, else why not. Bounded by `timeout` (DNS included)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").upper() in _TRUE:
            return f"{var}=1 is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    key = f"{host}:{port}"
    if key not in _probe_cache:
        result: List[Optional[str]] = ["no answer within %.1fs" % timeout]

        def probe():  # in a thread: getaddrinfo ignores socket timeouts and can hang for long
            try:
                socket.create_connection((host, port), timeout=timeout).close()
                result[0] = None
            except OSError as e:
                result[0] = f"{type(e).__name__}: {e}"
        t = threading.Thread(target=probe, daemon=True)
        t.start()
        t.join(timeout)
        _probe_cache[key] = None if (not t.is_alive() and result[0] is None) else result[0]
    return _probe_cache[key]


def in_local_hf_cache(name: str, repo_type: str = "datasets") -> bool:
    """Does the HF cache hold anything for `name`? (filesystem check, no import)"""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    ds_cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(home, "datasets")
    hub_cache = (os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
                 or os.path.join(home, "hub"))
    in_hub = os.path.isdir(os.path.join(hub_cache, f"{repo_type}--" + name.replace("/", "--")))
    in_ds = repo_type == "datasets" and os.path.isdir(os.path.join(ds_cache, name.replace("/", "___")))
    return in_hub or in_ds


@contextmanager
def hf_offline():
    """Force datasets / huggingface_hub into offline mode for one call (no 20 s of retries)."""
    import datasets.config
    import huggingface_hub.constants as hc
    old = datasets.config.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE = old


def offline_message(name: str, reason: str) -> str:
    return (f"data.hf_name: cannot reach the Hugging Face hub for dataset '{name}' ({reason}) and it "
            f"is not in the local HF cache; download it elsewhere and use data=text_files "
            f"data.train=... data.valid=... data.test=..., or point data.hf_name at a local "
            f"save_to_disk directory, or set HF_DATASETS_OFFLINE=1 with a populated HF cache")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0] if s else ''}"


def _open_hf(cfg: "CorpusConfig"):
    """-> (DatasetDict-like mapping or Dataset, join mode)."""
    name, config, mode, revision = HF_PRESETS.get(cfg.hf_name, (cfg.hf_name, None, "lines", None))
    config = cfg.hf_config if cfg.hf_config is not None else config
    local = os.path.expanduser(name)
    if os.path.isdir(local):  # a datasets.save_to_disk directory: fully offline
        import datasets
        try:
            return datasets.load_from_disk(local), mode
        except Exception as e:
            raise DataError(f"data.hf_name: cannot load saved dataset {local}: {_first_line(e)}") from None
    if name in PACKAGED:
        if not cfg.hf_data_files:
            raise DataError(f"data.hf_data_files: the '{name}' builder needs data files "
                            f"(e.g. data.hf_data_files={{train: a.txt, validation: b.txt}})")
        import datasets
        try:
            # arrow conversions of local files go to our cache dir, not the shared HF cache
            return datasets.load_dataset(name, config, data_files=dict(cfg.hf_data_files),
                                         cache_dir=os.path.join(cfg.cache_dir, "hf")), mode
        except Exception as e:
            raise DataError(f"data.hf_data_files: cannot load with '{name}': {_first_line(e)}") from None
    reason = hub_offline_reason()  # fail fast BEFORE importing datasets (~1.5 s) when offline
    if reason and not in_local_hf_cache(name):
        raise DataError(offline_message(name, reason))
    import datasets
    try:
        if reason:
            with hf_offline():
                return datasets.load_dataset(name, config, revision=revision), mode
        return datasets.load_dataset(name, config, revision=revision), mode
    except DataError:
        raise
    except Exception as e:
        if reason:
            raise DataError(offline_message(name, f"{reason}; cache: {_first_line(e)}")) from None
        raise DataError(f"data.hf_name: cannot load dataset '{name}' config {config!r}: "
                        f"{_first_line(e)}") from None


def _join_rows(ds, column: str, mode: str, cap: Optional[int]) -> bytes:
    if column not in ds.column_names:
        raise DataError(f"data.hf_text_column: column '{column}' not in dataset columns {ds.column_names}")
    parts, n = [], 0
    for batch in ds.select_columns([column]).iter(batch_size=10_000):
        for row in batch[column]:
            row = row or ""
            if mode == "lines" and not row.endswith("\n"):
                row += "\n"
            parts.append(row)
            n += len(row)  # characters <= bytes, so stopping here keeps >= cap bytes
        if cap is not None and n >= cap:
            break
    return cap_bytes("".join(parts).encode("utf-8"), cap)


def load_hf(cfg: "CorpusConfig") -> Dict[str, bytes]:
    dd, mode = _open_hf(cfg)
    if not hasattr(dd, "keys"):  # a single Dataset: treat it as 'train'
        dd = {"train": dd}
    avail = list(dd.keys())
    found = {s: next((n for n in HF_SPLIT_NAMES[s] if n in dd), None) for s in SPLITS}
    if found["train"] is None:
        raise DataError(f"data.hf_name: dataset '{cfg.hf_name}' has no train split (splits: {avail})")
    if found["valid"] is None and found["test"] is None:  # enwik8 / text8 style: carve 90/5/5
        total = None if cfg.max_bytes is None else int(cfg.max_bytes)
        return carve(_join_rows(dd[found["train"]], cfg.hf_text_column, mode, total))
    if found["valid"] is None:
        raise DataError(f"data.hf_name: dataset '{cfg.hf_name}' has no validation split (splits: {avail})")
    out = {}
    for s in SPLITS:
        out[s] = (b"" if found[s] is None else
                  _join_rows(dd[found[s]], cfg.hf_text_column, mode, split_cap(cfg.max_bytes, s)))
    return out


# ----------------------------------------------------------------------------- synthetic_recall
# A generated long-range probe made of episodes: a payload digit, D-2 noise letters, a marker (one
# per distance D), then the payload again: the copy stands exactly D tokens after its source and
# nothing but that source predicts it. Episodes never overlap (the payload is always the most
# recent digit) and are separated by 0..gap noise letters. Recall accuracy at the markers
# (txl.metrics.synthetic) says whether the model reaches D tokens into the past; chance is
# 1/values. Tokens are ASCII: 'a'.. noise, '0'.. payloads, 'A'.. markers.
RECALL_MARKERS = "ABCDEFGHIJ"  # marker of the k-th distance in `distances`
RECALL_DEFAULTS: Dict[str, object] = {"distances": [32, 96, 192], "alphabet": 16, "values": 10, "gap": 8,
                                       "train_tokens": 500_000, "eval_tokens": 25_000, "seed": 0}


def recall_options(options: Optional[Dict[str, object]]) -> Dict[str, object]:
    """data.options for synthetic_recall, defaults filled in and every value checked."""
    opts = dict(RECALL_DEFAULTS)
    unknown = sorted(set(options or {}) - set(opts))
    if unknown:
        raise DataError(f"data.options: unknown synthetic_recall option(s) {unknown} (known: {sorted(opts)})")
    opts.update(options or {})
    d = opts["distances"]
    d = [d] if isinstance(d, int) else list(d)
    if not d or len(d) > len(RECALL_MARKERS) or len(set(d)) != len(d) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 2 for x in d):
        raise DataError(f"data.options.distances: 1 to {len(RECALL_MARKERS)} distinct integers >= 2, got {d}")
    opts["distances"] = d
    for k, lo, hi in (("alphabet", 1, 26), ("values", 2, 10), ("gap", 0, 10 ** 6)):
        v = opts[k]
        if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
            raise DataError(f"data.options.{k}: an integer in [{lo}, {hi}], got {v!r}")
    for k in ("train_tokens", "eval_tokens"):
        if not (isinstance(opts[k], int) and opts[k] >= 4 * max(d)):
            raise DataError(f"data.options.{k}: an integer >= 4 * max(distances) = {4 * max(d)}, got {opts[k]!r}")
    if not isinstance(opts["seed"], int):
        raise DataError(f"data.options.seed: an integer, got {opts['seed']!r}")
    return opts


def recall_text(n: int, distances: List[int], alphabet: int, values: int, gap: int, seed: int) -> bytes:
    """n ASCII tokens of back-to-back episodes (distance drawn uniformly per episode):
    [0..gap noise] payload [D-2 noise] marker payload, so token s+D = token s for the payload s."""
    import numpy as np
    rng = np.random.default_rng(seed)
    codes = (ord("a") + rng.integers(0, alphabet, n)).astype(np.uint8)  # noise everywhere first
    s = 0
    while True:
        k = int(rng.integers(0, len(distances)))
        s += int(rng.integers(0, gap + 1))
        if s + distances[k] >= n:
            break
        codes[s] = codes[s + distances[k]] = ord("0") + int(rng.integers(0, values))
        codes[s + distances[k] - 1] = ord(RECALL_MARKERS[k])
        s += distances[k] + 1
    return codes.tobytes()


def load_synthetic_recall(cfg: "CorpusConfig") -> Dict[str, bytes]:
    o = recall_options(cfg.options)
    out = {}
    for n_split, split in enumerate(SPLITS):
        n = o["train_tokens"] if split == "train" else o["eval_tokens"]
        cap = split_cap(cfg.max_bytes, split)
        n = max(4 * max(o["distances"]), min(n, cap)) if cap is not None else n
        out[split] = recall_text(n, o["distances"], o["alphabet"], o["values"], o["gap"], o["seed"] * 3 + n_split)
    return out


SOURCES = {"pystdlib": load_pystdlib, "text_files": load_text_files, "hf": load_hf,
           "synthetic_recall": load_synthetic_recall}
