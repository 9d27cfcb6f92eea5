"""Data-layer benchmark (not a test): tokenization throughput, reopen time, peak memory.

    python scripts/bench_data.py [--size-mb 1024] [--dir DIR] [--num-proc N] [--kinds byte,char,word]

Builds (or reuses) a plain-text corpus of --size-mb under DIR (default $TXL_CACHE/bench-data):
the Python stdlib sources plus the shared texts (../shared/data beside the checkout, if present),
repeated with perturbations (in each repetition some long words get a repetition tag), so the
word vocabulary keeps growing as in real text. Split 90/5/5 into train/valid/test files.

For each tokenizer, every measurement in a fresh subprocess (so peak RSS is its own):
  first run   load_corpus into an empty cache: MB/s of raw text, peak RSS (main and workers; a
              forked worker's peak counts the pages it shares with the main process)
  reopen      load_corpus again: seconds (cache verification included), peak RSS
  segments/s  the training stream (OrderedStream, batch 16 x tgt_len 128) over the cached train split
  eval read   txl-eval's reader (read_text_tokens) on the train file with max_tokens=100000: peak RSS
JSON lines go to stdout and, with a Markdown table, into docs/data.md (between the BENCH markers).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "data.md"
BEGIN, END = "<!-- BENCH:BEGIN -->", "<!-- BENCH:END -->"


def base_text() -> bytes:
    parts = []
    lib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(lib.rglob("*.py")):
        if "site-packages" in p.parts:
            continue
        try:
            b = p.read_bytes()
            b.decode("utf-8")  # text tokenizers need UTF-8: skip the few latin-1 test files
            parts.append(b)
        except (OSError, UnicodeDecodeError):
            pass
    shared = Path(os.environ.get("TXL_SHARED_DATA") or ROOT.parent / "shared" / "data")
    for p in sorted(shared.rglob("*.txt")) if shared.is_dir() else []:
        parts.append(p.read_bytes())
    return b"\n".join(parts)


def build_corpus(d: Path, size_mb: int) -> dict:
    """train/valid/test .txt of ~size_mb MB in total (reused when present with the same size)."""
    d.mkdir(parents=True, exist_ok=True)
    stamp = d / "corpus.json"
    if stamp.is_file():
        info = json.loads(stamp.read_text())
        if info.get("size_mb") == size_mb and all((d / f"{s}.txt").is_file() for s in ("train", "valid", "test")):
            return info
    base = base_text()
    target = size_mb << 20
    word = re.compile(rb"\b([A-Za-z]{7,})\b")
    t0 = time.time()
    sizes = {"train": int(target * 0.9), "valid": int(target * 0.05), "test": target - int(target * 0.9) - int(target * 0.05)}
    rep = 0
    for split, want in sizes.items():
        with open(d / f"{split}.txt", "wb") as f:
            n = 0
            while n < want:
                rep += 1  # 1/20 of each repetition gets its long words tagged: new vocabulary
                tag, step, k = b"q" + format(rep, "x").encode(), len(base) // 20, rep % 20
                block = base[:k * step] + word.sub(rb"\1" + tag, base[k * step:(k + 1) * step]) + base[(k + 1) * step:]
                if n + len(block) > want:  # the last one: cut after a newline
                    block = block[: want - n]
                    f.write(block[: block.rfind(b"\n") + 1] or block)
                    break
                f.write(block)
                n += len(block)
    info = {"size_mb": size_mb, "bytes": {s: (d / f"{s}.txt").stat().st_size for s in sizes},
            "seconds_to_build": round(time.time() - t0, 1)}
    stamp.write_text(json.dumps(info))
    return info


CHILD = r"""
import json, resource, sys, time
import numpy as np
from txl.data import CorpusConfig, load_corpus, read_text_tokens
a = json.loads(sys.argv[1])


def hwm_mb():  # this process's peak RSS since exec (ru_maxrss would include the parent's, kept by fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024



cfg = CorpusConfig(source="text_files", tokenizer=a["kind"], cache_dir=a["cache"], num_proc=a["num_proc"],
                   train=a["dir"] + "/train.txt", valid=a["dir"] + "/valid.txt", test=a["dir"] + "/test.txt")
out = {}
if a["what"] in ("build", "reopen"):
    t0, c0 = time.perf_counter(), time.process_time()
    c = load_corpus(cfg)
    out["seconds"], out["load_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    out["vocab"] = c.vocab_size
    out["tokens"] = int(len(c.train) + len(c.valid) + len(c.test))
    if a["what"] == "reopen":
        from txl.data.stream import OrderedStream  # torch: imported after the reopen is timed
        s = OrderedStream(c.train, 16, 128, infinite=True)
        it = iter(s)
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < 3:
            next(it); n += 1
        out["segments_per_s"] = n / (time.perf_counter() - t0)
else:  # eval read: the corpus' tokenizer, txl-eval's reader, max_tokens while reading
    tok = load_corpus(cfg).tokenizer
    r0 = hwm_mb()
    t0 = time.perf_counter()
    ids = read_text_tokens(a["dir"] + "/train.txt", tok, max_tokens=100000)
    out["seconds"] = time.perf_counter() - t0
    out["tokens"] = int(len(ids))
    out["rss_before_mb"] = r0
cpu = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
out["cpu_s"] = sum(u.ru_utime + u.ru_stime for u in cpu)
out["peak_rss_mb"] = hwm_mb()
out["workers_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print("RESULT " + json.dumps(out))
"""


def child(what: str, kind: str, d: Path, cache: Path, num_proc) -> dict:
    arg = json.dumps({"what": what, "kind": kind, "dir": str(d), "cache": str(cache), "num_proc": num_proc})
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, env=env, cwd=str(ROOT))
    if r.returncode != 0:
        raise SystemExit(f"bench_data: {what} {kind} failed:\n{r.stderr[-3000:]}")
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[7:])


def machine() -> str:
    name = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from txl.data.config import usable_cores
    return f"{name}, {usable_cores()} usable cores"


def table(rows) -> str:
    head = ("| tokenizer | corpus MB | first run MB/s | MB per CPU-s | first run s | peak RSS MB (main / workers) | reopen s "
            "| reopen CPU s | reopen peak RSS MB (torch imported) | segments/s | eval read peak RSS MB (max_tokens=1e5) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['kind']} | {r['corpus_mb']:.0f} | {r['mb_per_s']:.1f} | {r['mb_per_cpu_s']:.1f} | {r['build_s']:.1f} | "
        f"{r['build_rss_mb']:.0f} / {r['build_workers_rss_mb']:.0f} | {r['reopen_s']:.3f} | {r['reopen_cpu_s']:.3f} | "
        f"{r['reopen_rss_mb']:.0f} | "
        f"{r['segments_per_s']:.0f} | {r['eval_rss_mb']:.0f} |\n" for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--dir", default=None, help="where the corpus and caches go (default $TXL_CACHE/bench-data)")
    ap.add_argument("--num-proc", type=int, default=None)
    ap.add_argument("--kinds", default="byte,char,word")
    ap.add_argument("--note", default="", help="a line written under the table (e.g. the machine was loaded)")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/data.md")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from txl.data.config import default_cache_dir
    base = Path(a.dir or Path(default_cache_dir()) / "bench-data")
    d = base / f"corpus-{a.size_mb}mb"
    info = build_corpus(d, a.size_mb)
    mb = sum(info["bytes"].values()) / 1e6
    rows = []
    for kind in a.kinds.split(","):
        cache = base / f"cache-{kind}"
        shutil.rmtree(cache, ignore_errors=True)
        b = child("build", kind, d, cache, a.num_proc)
        r = child("reopen", kind, d, cache, a.num_proc)
        e = child("eval", kind, d, cache, a.num_proc)
        row = {"kind": kind, "corpus_mb": mb, "mb_per_s": mb / b["seconds"], "build_s": b["seconds"],
               "build_cpu_s": b["cpu_s"], "mb_per_cpu_s": mb / b["cpu_s"], "build_rss_mb": b["peak_rss_mb"], "build_workers_rss_mb": b["workers_peak_rss_mb"],
               "vocab": b["vocab"], "tokens": b["tokens"], "reopen_s": r["seconds"], "reopen_cpu_s": r["load_cpu_s"], "reopen_rss_mb": r["peak_rss_mb"],
               "segments_per_s": r["segments_per_s"], "eval_rss_mb": e["peak_rss_mb"], "eval_s": e["seconds"],
               "machine": machine(), "num_proc": a.num_proc}
        print(json.dumps(row), flush=True)
        rows.append(row)
        shutil.rmtree(cache, ignore_errors=True)
    if a.no_doc:
        return
    block = (f"{BEGIN}\nMeasured with `python scripts/bench_data.py --size-mb {a.size_mb}` on {machine()}"
             f"{' — ' + a.note if a.note else ''}.\n\n{table(rows)}\n```jsonl\n"
             + "".join(json.dumps(r) + "\n" for r in rows) + f"```\n{END}")
    text = DOC.read_text() if DOC.is_file() else f"# Data\n\n{BEGIN}\n{END}\n"
    DOC.write_text(text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):])
    print(table(rows))


if __name__ == "__main__":
    main()
