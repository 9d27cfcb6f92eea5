"""Side-by-side throughput benchmark: txl vs the Hugging Face TransfoXL port (the "peer").

    python scripts/bench.py --workload char-train --dtype bf16 --impl both
    python scripts/bench.py --all                      # every workload x dtype -> bench.md + bench.json
    python scripts/bench.py --all --device cuda        # the same on a GPU (skips when there is none)
    python scripts/bench.py --workload char-eval-long --mem-dtype bf16 --mem-len 4096 --pattern local

--all runs the suite (SUITE below): every workload x dtype against the peer, char-eval-long with
memories stored in bf16 / int8 (against the peer), char-eval-long at memory lengths 4,096 / 16,384
with dense and local attention (txl alone: the peer has no local attention, and its dense eval at
16,384 would take minutes a step), and torch.compile'd txl against eager txl.

Fairness rules (what makes the ratios mean something):
  * one config, one set of weights: the peer is built from a seeded TransfoXLConfig and saved with
    save_pretrained; txl loads that directory with txl.convert.from_hf. Same seeded inputs, dropout
    0, the same harness (fused Adam, lr 2.5e-4), the same dtype policy (fp32, or torch.autocast
    bf16 around the forward), eval under torch.inference_mode for both.
  * equal numerics: both report their first-step loss; in fp32 they must agree within 1e-4.
  * every measurement runs in a fresh subprocess of a torch-free parent (honest ru_maxrss per
    implementation) and the runs alternate txl, peer, peer, txl, ...; ms/step is the median over all
    measured steps (>= 10 per implementation), each process untimed for its first step(s).
  * the txl process never imports transformers.
Tokens per step = batch * tgt_len (every input position is processed; both score tgt_len - 1).
Memory: peak_rss_mb = ru_maxrss of the process (interpreter + libraries + weights + workload);
workload_mb = the peak above the resident size just before the first step (VmHWM after a reset),
i.e. what the implementation needs for the workload itself; both run with the same fixed glibc malloc
thresholds (MALLOC_ENV), so that freed memory is returned and the figure is reproducible.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PEER_INSTALL = 'pip install transformers==4.37.2 "huggingface-hub<1.0"'
# Model shapes (TransfoXLConfig keys: the peer reads them as they are, txl through from_hf).
CHAR = dict(vocab_size=256, cutoffs=[], div_val=1, n_layer=6, d_model=512, d_embed=512, n_head=8, d_head=64,
            d_inner=2048)
WORD = dict(vocab_size=32000, cutoffs=[2000, 8000], div_val=4, n_layer=4, d_model=256, d_embed=256, n_head=4,
            d_head=64, d_inner=1024)
WORKLOADS = {
    "char-train": dict(model=CHAR, train=True, batch=8, tgt_len=128, mem_len=128, clamp_len=-1, same_length=False),
    "char-eval-long": dict(model=CHAR, train=False, batch=4, tgt_len=128, mem_len=1600, clamp_len=1000,
                           same_length=True),
    "word-train": dict(model=WORD, train=True, batch=8, tgt_len=128, mem_len=128, clamp_len=-1, same_length=False),
}
DTYPES = ("fp32", "bf16")
MEM_DTYPES = ("auto", "fp32", "bf16", "int8")  # txl.model.memory.STORES (eval only)
# --all: (workload, dtype, overrides of the command line, implementations)
# very long memories: txl alone (nothing to alternate with), one process of 3 measured steps each (dense at
# 16,384 takes ~15 s a step on 2 cores); their memory columns do not depend on the step count
LONG = [dict(mem_len=n, pattern=pat, mem_dtype=md, rounds=1, steps=3) for n in (4096, 16384)
        for pat in ("dense", "local") for md in ("auto", "bf16")]
SUITE = ([(wl, dt, {}, "both") for wl in WORKLOADS for dt in DTYPES]
         + [("char-eval-long", "fp32", dict(mem_dtype=md), "both") for md in ("bf16", "int8")]
         + [("char-eval-long", "bf16", dict(mem_dtype="int8"), "both")]
         + [("char-eval-long", "fp32", o, "txl") for o in LONG]
         + [(wl, "fp32", dict(compile=c), "txl") for wl in ("char-train", "char-eval-long") for c in (False, True)])
LOSS_TOL = 1e-4


def have_peer() -> bool:
    return importlib.util.find_spec("transformers") is not None


def hf_config(w: dict) -> dict:
    return dict(**w["model"], tgt_len=w["tgt_len"], mem_len=w["mem_len"], clamp_len=w["clamp_len"],
                same_length=w["same_length"], ext_len=0, dropout=0.0, dropatt=0.0, untie_r=True,
                tie_word_embeddings=True, proj_share_all_but_first=True)


def token_stream(w: dict, n_seg: int, seed: int = 1234):
    """(n_seg, B, T + 1) ids, consecutive segments of B streams (the extra token is the last target).
    Word vocabularies draw Zipf(1) ranks so the adaptive softmax sees a realistic cluster mix."""
    import torch
    B, T, V = w["batch"], w["tgt_len"], w["model"]["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    n = n_seg * T + 1
    if w["model"]["cutoffs"]:
        flat = torch.multinomial(1.0 / torch.arange(1, V + 1, dtype=torch.float64), B * n, True, generator=g)
    else:
        flat = torch.randint(0, V, (B * n,), generator=g)
    s = flat.view(B, n)
    return torch.stack([s[:, i * T: i * T + T + 1] for i in range(n_seg)])


# ---- child: one implementation, one process ----------------------------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak_rss() -> float:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS; returns that RSS in MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux / not allowed: workload_mb then includes the build peak (an upper bound)
    return _status_kb("VmRSS") / 1024


def workload(a) -> dict:
    """The workload with the command line's memory length (eval workloads only)."""
    w = dict(WORKLOADS[a.workload])
    if getattr(a, "mem_len", None) and not w["train"]:
        w["mem_len"] = a.mem_len
    return w


class TxlRunner:
    def __init__(self, weights, w: dict, device, backend: str, mems: str = "hidden", mem_dtype: str = "auto",
                 pattern: str = "dense", window: int = 0, compile: bool = False):
        import torch
        from txl.model import TransformerXL, TXLConfig
        if weights:
            from txl.convert import from_hf
            self.model = from_hf(weights)
        else:  # no peer: the same shapes with txl's own seeded init
            c = hf_config(w)
            torch.manual_seed(0)
            self.model = TransformerXL(TXLConfig(
                **{k: c[k] for k in ("vocab_size", "cutoffs", "div_val", "n_layer", "d_model", "d_embed", "n_head",
                                     "d_head", "d_inner")}, mem_init="zeros",
                seq=dict(tgt_len=c["tgt_len"], mem_len=c["mem_len"], clamp_len=c["clamp_len"],
                         same_length=c["same_length"])))
        # the backend owns no parameters: switch it in place (one copy of the weights in memory)
        self.model.cfg.attn = replace(self.model.cfg.attn, backend=backend, pattern=pattern,
                                      window=(window or w["tgt_len"]) if pattern == "local" else 0)
        self.model.set_lengths(mem_len=w["mem_len"])
        self.model.to(device)
        # eval may keep memories as keys / values (txl-eval's default): each segment projects its
        # T new rows only; training cannot (it needs W_k, W_v's gradient on the memory rows)
        self.projected = mems == "projected" and not w["train"]
        # eval memories may be stored small (bf16 / int8 rows), read back in the model's dtype
        self.mem_dtype = mem_dtype if not w["train"] else "auto"
        self.train = w["train"]
        self.mems = None
        self.forward = torch.compile(self.model) if compile else self.model

    def step(self, seg):
        if self.mems is None and not self.train:  # as txl-eval scores: a rolling memory (updated in place)
            self.mems = self.model.init_mems(seg.size(0), projected=self.projected, store=self.mem_dtype,
                                             rolling=True)
        x, y = seg[:, :-1], seg[:, 1:].clone()
        y[:, -1] = -100  # the peer scores T - 1 positions per segment (it shifts inside): so do we
        out = self.forward(x, mems=self.mems, labels=y)
        self.mems = out.mems
        return out.loss


class PeerRunner:
    def __init__(self, weights, w: dict, device, bf16: bool):
        import transformers as tr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = tr.TransfoXLLMHeadModel.from_pretrained(weights)
        self.model.to(device)
        self.mems = None
        # The peer's own code fails under bf16 autocast in two places; work around each minimally.
        # 1) Its plain softmax head (no cutoffs) index_puts bf16 log-probs into an fp32 buffer
        #    (modeling_transfo_xl_utilities.py:114): hand the head bf16 hidden states.
        self.patch_head = bf16 and not w["model"]["cutoffs"]
        # 2) Its adaptive embedding (div_val > 1) index_copy_s bf16 projections into an fp32 buffer
        #    (modeling_transfo_xl.py:449): run the embedding (lookups + small projections) in fp32.
        if bf16 and w["model"]["div_val"] > 1:
            import torch
            emb = self.model.transformer.word_emb
            fwd = emb.forward

            def fp32_embedding(ids):
                with torch.autocast(torch.device(device).type, enabled=False):
                    return fwd(ids)
            emb.forward = fp32_embedding

    def step(self, seg):
        import torch
        x = seg[:, :-1]
        if not self.patch_head:
            out = self.model(input_ids=x, mems=self.mems, labels=x)  # labels are shifted inside
            self.mems = out.mems
            return out.loss
        t = self.model.transformer(input_ids=x, mems=self.mems)
        self.mems = t.mems
        nll = self.model.crit(t.last_hidden_state.to(torch.bfloat16), x)  # (B * (T - 1),), shifted inside
        return nll[nll != 0].float().mean()  # the peer's own reduction


def measure(a) -> dict:
    import torch
    w = workload(a)
    dev = torch.device(a.device)
    bf16 = a.dtype == "bf16"
    runner = (TxlRunner(a.weights, w, dev, a.backend, a.mems, a.mem_dtype, a.pattern, a.window, a.compile)
              if a.impl == "txl" else PeerRunner(a.weights, w, dev, bf16))
    model = runner.model
    data = token_stream(w, a.warmup + a.steps).to(dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    opt = None
    if w["train"]:
        model.train()
        fused = dict(fused=True) if dev.type in ("cpu", "cuda") else {}
        opt = torch.optim.Adam(model.parameters(), lr=2.5e-4, **fused)
    else:
        model.eval()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = reset_peak_rss()
    times, losses = [], []
    for i, seg in enumerate(data):
        sync()
        t0 = time.perf_counter()
        if opt is not None:
            with amp:
                loss = runner.step(seg)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), amp:
                loss = runner.step(seg)
        sync()
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if i >= a.warmup:
            times.append(dt)
    out = dict(impl=a.impl, times=times, losses=losses, workload_mb=_status_kb("VmHWM") / 1024 - rss0,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               threads=torch.get_num_threads(), torch=torch.__version__)
    if dev.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    if a.impl == "txl":  # which txl ran, and the model FLOPs (the same for both implementations), for achieved TFLOP/s
        import txl
        from txl.perf import model_flops_per_token
        out["txl_path"] = str(Path(txl.__file__).parent)
        labels = data[:, :, 1:-1]  # the scored targets
        ends = [0] + w["model"]["cutoffs"] + [w["model"]["vocab_size"]]
        shares = [((labels >= lo) & (labels < hi)).double().mean().item() for lo, hi in zip(ends, ends[1:])]
        out["flops_per_token"] = model_flops_per_token(model.cfg, w["tgt_len"], w["mem_len"], w["batch"],
                                                       train=w["train"], cluster_fractions=shares)
    return out


# ---- parent: weights, alternation, aggregation (never imports torch) -------------------------------------
def make_weights(w: dict, out_dir: str) -> None:
    import torch
    import transformers as tr
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.TransfoXLLMHeadModel(tr.TransfoXLConfig(**hf_config(w))).save_pretrained(out_dir, safe_serialization=True)


# glibc's malloc by default raises its mmap threshold after large frees and keeps freed heap pages: how
# much freed memory a process still holds then depends on the order of its allocations, and measured
# workload memory varied by up to ~200 MB between identical runs. Fixed thresholds (the same for both
# implementations) return every large block on free, so workload_mb is the high-water mark of what is
# live: reproducible to ~0.1 MB here. A caller's own MALLOC_* settings are kept.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def child(argv: list) -> dict:
    env = {**MALLOC_ENV, **os.environ}
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True, text=True,
                       env=env)
    if p.returncode != 0:
        raise RuntimeError(f"bench child {' '.join(argv)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_workload(workload: str, dtype: str, impls: list, a) -> list:
    w = WORKLOADS[workload]
    w = dict(w, mem_len=a.mem_len or w["mem_len"]) if not w["train"] else w
    steps = max(a.steps, 1)
    per_round = -(-steps // a.rounds)
    runs = {i: [] for i in impls}
    with tempfile.TemporaryDirectory(prefix="txl-bench-") as tmp:
        weights = None
        if have_peer():
            weights = tmp
            child(["--_make-weights", tmp, "--workload", workload] + (["--mem-len", str(a.mem_len)] if a.mem_len else []))
        for r in range(a.rounds):
            for impl in (impls if r % 2 == 0 else impls[::-1]):  # ABBA: neither always goes first
                argv = ["--_measure", "--workload", workload, "--dtype", dtype, "--impl", impl, "--device", a.device,
                        "--backend", a.backend, "--mems", a.mems, "--steps", str(per_round), "--warmup", str(a.warmup),
                        "--mem-dtype", a.mem_dtype, "--pattern", a.pattern, "--window", str(a.window)]
                argv += (["--mem-len", str(a.mem_len)] if a.mem_len else []) + (["--compile"] if a.compile else [])
                runs[impl].append(child(argv + (["--weights", weights] if weights else [])))
    tokens = w["batch"] * w["tgt_len"]
    fpt = runs["txl"][0].get("flops_per_token") if "txl" in runs else None
    out = []
    for impl, rs in runs.items():
        times = [t for r in rs for t in r["times"]]
        ms = statistics.median(times) * 1e3
        res = dict(impl=impl, workload=workload, dtype=dtype, tokens_per_s=round(tokens / ms * 1e3, 1),
                   ms_per_step=round(ms, 1), peak_rss_mb=round(max(r["peak_rss_mb"] for r in rs), 1),
                   workload_mb=round(max(r["workload_mb"] for r in rs), 1), ms_best=round(min(times) * 1e3, 1),
                   n_steps=len(times), first_loss=rs[0]["losses"][0], device=a.device, threads=rs[0]["threads"])
        if fpt:
            res["model_tflops"] = round(res["tokens_per_s"] * fpt / 1e12, 4)
        if "peak_cuda_mb" in rs[0]:
            res["peak_cuda_mb"] = round(max(r["peak_cuda_mb"] for r in rs), 1)
        res.update(mem_len=w["mem_len"], mem_dtype=a.mem_dtype if not w["train"] else "auto",
                   pattern="dense" if impl == "peer" else a.pattern, compile=bool(a.compile) and impl == "txl")
        if impl == "txl":
            res["backend"] = a.backend
            res["mems"] = a.mems if not w["train"] else "hidden"
            res["txl_path"] = rs[0].get("txl_path")
        out.append(res)
    return out


def compare(results: list) -> dict:
    """txl / peer ratios of one workload x dtype, and the first-step loss check."""
    by = {r["impl"]: r for r in results}
    if set(by) != {"txl", "peer"}:
        return {}
    t, p = by["txl"], by["peer"]
    c = dict(workload=t["workload"], dtype=t["dtype"], speedup=round(t["tokens_per_s"] / p["tokens_per_s"], 2),
             peak_rss_ratio=round(t["peak_rss_mb"] / p["peak_rss_mb"], 2),
             workload_mem_ratio=round(t["workload_mb"] / max(p["workload_mb"], 1e-9), 2),
             loss_diff=abs(t["first_loss"] - p["first_loss"]))
    if "peak_cuda_mb" in t:
        c["peak_cuda_ratio"] = round(t["peak_cuda_mb"] / p["peak_cuda_mb"], 2)
    c["loss_ok"] = c["loss_diff"] <= LOSS_TOL if t["dtype"] == "fp32" else None  # bf16: rounding differs
    return c


def case_label(r: dict) -> tuple:
    """(memory, memory length, attention, compile) columns of a txl row."""
    train = WORKLOADS[r["workload"]]["train"]
    mem = "hidden" if train else f"{r.get('mems', 'hidden')} {r.get('mem_dtype', 'auto')}"
    return mem, r.get("mem_len", "–"), r.get("pattern", "dense"), "yes" if r.get("compile") else "no"


def to_markdown(cases: list, meta: dict) -> str:
    """cases: [(rows of one case, its txl / peer comparison or {})], in run order."""
    lines = [f"# txl vs peer (transformers TransfoXLLMHeadModel) — {meta['device']}, {meta['cpu']}, "
             f"{meta['threads']} threads, torch {meta['torch']}", "",
             "| workload | dtype | txl memory (store) | mem len | attention | compile | steps | txl tok/s | peer tok/s | speedup "
             "| txl peak RSS MB | peer peak RSS MB | ratio | txl workload MB | peer workload MB | ratio | first-loss diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rows, c in cases:
        by = {r["impl"]: r for r in rows}
        t, p = by.get("txl", {}), by.get("peer", {})
        f = lambda d, k: f"{d[k]:,.0f}" if k in d else "–"  # noqa: E731
        diff = f"{c['loss_diff']:.1e}" + ("" if c.get("loss_ok") is None else (" ok" if c["loss_ok"] else " FAIL")) \
            if c else "–"
        mem, ml, pat, comp = case_label(t or p)
        lines.append(f"| {rows[0]['workload']} | {rows[0]['dtype']} | {mem} | {ml} | {pat} | {comp} | "
                     f"{(t or p).get('n_steps', '–')} | "
                     f"{f(t, 'tokens_per_s')} | {f(p, 'tokens_per_s')} | "
                     f"{str(c['speedup']) + 'x' if c else '–'} | {f(t, 'peak_rss_mb')} | {f(p, 'peak_rss_mb')} | "
                     f"{c.get('peak_rss_ratio', '–')} | {f(t, 'workload_mb')} | {f(p, 'workload_mb')} | "
                     f"{c.get('workload_mem_ratio', '–')} | {diff} |")
    lines += ["", "Medians over the measured steps per implementation ('steps', per case), alternating fresh "
              "processes (the very long memories: txl alone, one process). speedup = "
              "txl / peer tokens per second; memory ratios = txl / peer (lower is better). 'workload MB' = peak "
              "RSS above the resident size before the first step. txl memory: projected = keys / values, "
              "store = its storage dtype (auto: as computed)."]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="char-train")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--impl", choices=("txl", "peer", "both"), default="both")
    p.add_argument("--all", action="store_true", help="every workload x dtype; writes --md and --json")
    p.add_argument("--device", default="cpu", help="cpu or cuda (skipped when CUDA is unavailable)")
    p.add_argument("--backend", default="rel_fused", help="txl attention backend")
    p.add_argument("--mems", choices=("projected", "hidden"), default="projected",
                   help="txl eval memories: keys / values (txl-eval's default) or hidden states (as the peer)")
    p.add_argument("--mem-dtype", choices=MEM_DTYPES, default="auto",
                   help="txl eval memory storage dtype (compute stays in --dtype)")
    p.add_argument("--mem-len", type=int, default=0, help="eval workloads: memory length (0: the workload's)")
    p.add_argument("--pattern", choices=("dense", "local"), default="dense", help="txl attention pattern")
    p.add_argument("--window", type=int, default=0, help="local attention window (0: tgt_len)")
    p.add_argument("--compile", action="store_true", help="torch.compile the txl model")
    p.add_argument("--steps", type=int, default=10, help="measured steps per implementation (10: the default; fewer only for a quick look)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every process")
    p.add_argument("--rounds", type=int, default=3, help="alternating processes per implementation")
    p.add_argument("--md", default="bench.md")
    p.add_argument("--json", default="bench.json")
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--_measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_make-weights", dest="make_weights", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.make_weights:
        make_weights(WORKLOADS[a.workload], a.make_weights)
        print(json.dumps({"weights": a.make_weights}))
        return 0
    if a._measure:
        print(json.dumps(measure(a)))
        return 0
    if a.device.startswith("cuda"):
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True)
        if probe.stdout.strip() != "True":
            print("# --device cuda: no CUDA device available here; nothing to benchmark (skipped)", file=sys.stderr)
            return 0
    impls = ["txl", "peer"] if a.impl == "both" else [a.impl]
    if "peer" in impls and not have_peer():
        print(f"# the peer (transformers 4.37.2) is not installed: reporting txl alone. To compare, install it in a "
              f"separate environment: {PEER_INSTALL}", file=sys.stderr)
        impls = ["txl"]
    todo = ([(wl, dt, o, impls if who == "both" else ["txl"]) for wl, dt, o, who in SUITE] if a.all
            else [(a.workload, a.dtype, {}, impls)])
    rows, comps, cases, t0 = [], [], [], time.time()
    for wl, dt, over, who in todo:
        ca = argparse.Namespace(**{**vars(a), **over})
        res = run_workload(wl, dt, who, ca)
        for r in res:
            print(json.dumps(r), flush=True)
        c = compare(res)
        if c:
            comps.append(c)
            check = "" if c["loss_ok"] is None else (" (ok)" if c["loss_ok"] else f" (FAIL: > {LOSS_TOL})")
            print(f"# {wl} {dt} {over or ''}: speedup {c['speedup']}x, peak RSS {c['peak_rss_ratio']}x, workload "
                  f"memory {c['workload_mem_ratio']}x, first-step loss |txl - peer| = {c['loss_diff']:.2e}{check}",
                  file=sys.stderr, flush=True)
        rows += res
        cases.append((res, c))
    if a.all:
        meta = dict(device=a.device, cpu=cpu_name(), threads=rows[0]["threads"], steps=max(a.steps, 1),
                    torch=child_torch_version(), seconds=round(time.time() - t0))
        Path(a.json).write_text(json.dumps(dict(meta=meta, results=rows, ratios=comps), indent=1) + "\n")
        Path(a.md).write_text(to_markdown(cases, meta))
        print(f"# wrote {a.md} and {a.json} in {meta['seconds']} s", file=sys.stderr)
    return 1 if any(c["loss_ok"] is False for c in comps) else 0


def cpu_name() -> str:
    """Model name and whether bf16 matmuls have hardware support (AMX / AVX512_BF16) or are emulated."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "cpu")
    flags = set(next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), []))
    hw = "AMX" if "amx_bf16" in flags else "AVX512_BF16" if "avx512_bf16" in flags else "no bf16 hardware"
    return f"{name} ({hw})"


def child_torch_version() -> str:
    p = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return p.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
