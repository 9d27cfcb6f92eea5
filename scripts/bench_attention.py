"""Forward + backward time and peak memory of ONE attention layer per backend / pattern / score,
for T query tokens over mem_len memory keys (not a test).

Each (config, mem_len) runs in its own subprocess. Peak memory: the process's resident high-water
mark (VmHWM, reset through /proc/self/clear_refs just before the first forward, with model, inputs
and memory already allocated) minus its resident size at that moment, i.e. what the forward +
backward allocate on top of the inputs; glibc is told to mmap every block >= 64 KiB
(MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the resident set at once. Time: best of --reps timed
iterations after one warm-up (the minimum is the least disturbed by other processes).
--mode train: forward + backward (default); --mode eval: forward under torch.no_grad(). Configurations whose estimated memory exceeds --max-gb are skipped,
as are any that exceed --timeout seconds.

  .venv/bin/python scripts/bench_attention.py            # full grid, writes bench_attention.md/.png
  .venv/bin/python scripts/bench_attention.py --quick    # a subset in about a minute
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MEM_LENS = [128, 512, 1600, 4096, 16384]
CONFIGS = {  # name -> (kind, attn)
    "rel_ref dense": ("relative", dict(backend="rel_ref")),
    "rel_fused dense": ("relative", dict(backend="rel_fused")),
    "flex dense": ("relative", dict(backend="flex")),
    "rel_ref local w256": ("relative", dict(backend="rel_ref", pattern="local", window=256)),
    "rel_fused local w256": ("relative", dict(backend="rel_fused", pattern="local", window=256)),
    "rel_fused block_sparse b64": ("relative", dict(backend="rel_fused", pattern="block_sparse", block_size=64)),
    "rel_fused block_sparse b64+g1": ("relative", dict(backend="rel_fused", pattern="block_sparse", block_size=64,
                                                       n_global=1)),
    "rel_fused bigbird": ("relative", dict(backend="rel_fused", pattern="bigbird", window=128, block_size=64,
                                           n_global=1, n_random=2)),
    "rel_ref topk256": ("relative", dict(backend="rel_ref", pattern="topk", topk=256)),
    "rel_ref routing c4 w128": ("relative", dict(backend="rel_ref", pattern="routing", n_clusters=4, window=128)),
    "rel_ref additive": ("relative", dict(backend="rel_ref", score="additive")),
    "rel_ref mixed a4": ("relative", dict(backend="rel_ref", score="mixed", n_additive_heads=4)),
    "rel_fused alibi": ("alibi", dict(backend="rel_fused")),
}
QUICK = ["rel_ref dense", "rel_fused dense", "rel_fused local w256", "rel_fused block_sparse b64"]


def estimate_gb(name, B, T, M, N, H, D) -> float:
    """Rough upper bound of what one forward + backward allocates (to skip what cannot fit)."""
    K = M + T
    proj = 8 * B * K * D * 4
    attn = name.split()[1]
    if "additive" in name or "mixed" in name:
        return (proj + 4 * B * N * T * K * H * 4) / 1e9
    if attn in ("local", "block_sparse") and "+g" not in name:
        return (proj + 8 * B * N * T * 512 * 4) / 1e9
    return (proj + 8 * B * N * T * K * 4) / 1e9


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(key + ":")))


def measure(spec: dict) -> dict:
    """In the child process: build one layer, time fwd + bwd, report the resident high-water growth."""
    import torch
    from txl.model import TXLConfig
    from txl.model.attention import causal_mask
    from txl.model.block import MultiHeadAttention
    from txl.model.positions import relative_distances, sinusoid
    import warnings
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(spec["ftz"])
    B, T, M, D, N, H = (spec[k] for k in ("B", "T", "M", "D", "N", "H"))
    kind, attn = CONFIGS[spec["name"]]
    layer = MultiHeadAttention(TXLConfig(d_model=D, n_head=N, d_head=H, kind=kind, attn=attn))
    x = torch.randn(B, T, D, requires_grad=True)
    mem = torch.randn(B, M, D)
    pos_emb = sinusoid(relative_distances(M + T, -1), D) if kind == "relative" else None
    blocked = causal_mask(T, M)
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    base = _status_kb("VmRSS")
    times = []
    for it in range(spec["reps"] + 1):
        t0 = time.perf_counter()
        if spec["mode"] == "eval":
            with torch.no_grad():
                layer(x, mem, blocked, pos_emb)
        else:
            y = layer(x, mem, blocked, pos_emb)[0]
            y.square().mean().backward()
        times.append(time.perf_counter() - t0)
        x.grad = None
        layer.zero_grad(set_to_none=True)
    peak = _status_kb("VmHWM") - base
    return dict(ms=1e3 * min(times[1:]), mb=peak / 1024)  # best of reps: robust to other load


def run_one(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_one", json.dumps(spec)]
    try:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(skip=f"> {timeout:.0f} s")
    if p.returncode != 0:
        return dict(skip="error: " + (p.stderr.strip().splitlines() or ["?"])[-1][:80])
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(results, names, mem_lens, args) -> str:
    import torch
    torch_threads = torch.get_num_threads()
    what = "forward + backward" if args.mode == "train" else "forward only (no_grad)"
    lines = [f"One attention layer, {what}: T={args.T}, batch {args.B}, d_model {args.D}, "
             f"{args.N} heads x {args.H}, fp32, torch {args.torch}, {args.threads or torch_threads} thread(s), "
             f"flush denormals {'on' if args.ftz else 'off'}. "
             f"Load average at start {args.load:.1f}. Cells: best-of-{args.reps} ms / peak MB allocated "
             "by the timed work (resident high-water growth).", "",
             "| config | " + " | ".join(f"M={m}" for m in mem_lens) + " |",
             "|---|" + "---|" * len(mem_lens)]
    for n in names:
        cells = []
        for m in mem_lens:
            r = results.get((n, m))
            cells.append("—" if r is None else r["skip"] if "skip" in r else f"{r['ms']:.0f} / {r['mb']:.0f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results, names, mem_lens, path, mode) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab20").colors
    for i, n in enumerate(names):
        pts = [(m, results[(n, m)]) for m in mem_lens if "ms" in results.get((n, m), {})]
        if not pts:
            continue
        ms = [m for m, _ in pts]
        style = dict(marker="o", label=n, color=colors[(2 * i) % 20 + (2 * i) // 20], ls="-" if i % 2 == 0 else "--")
        axes[0].plot(ms, [r["ms"] for _, r in pts], **style)
        axes[1].plot(ms, [max(r["mb"], 1) for _, r in pts], **style)
    for ax, lab in zip(axes, ["fwd+bwd time (ms)", "peak memory (MB)"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("mem_len")
        ax.set_ylabel(lab)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"one layer, {'fwd+bwd' if mode == 'train' else 'fwd (no_grad)'}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"configs {QUICK}, mem_len 128/1600/16384, 2 reps")
    ap.add_argument("--configs", nargs="*", default=None, help=f"subset of {list(CONFIGS)}")
    ap.add_argument("--mem-lens", nargs="*", type=int, default=None)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--N", type=int, default=8)
    ap.add_argument("--H", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mode", choices=["train", "eval"], default="train")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per run (0: torch's default); 1 is steadier on a shared machine")
    ap.add_argument("--ftz", action="store_true",
                    help="torch.set_flush_denormal(True): ALiBi's far keys get denormal probabilities, slow on x86")
    ap.add_argument("--max-gb", type=float, default=8.0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per (config, mem_len) process")
    ap.add_argument("--out", default="bench_attention.md")
    ap.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._one:
        print(json.dumps(measure(json.loads(args._one))))
        return
    import torch
    args.torch, args.load = torch.__version__, os.getloadavg()[0]
    names = args.configs or (QUICK if args.quick else list(CONFIGS))
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; valid: {list(CONFIGS)}")
    mem_lens = args.mem_lens or ([128, 1600, 16384] if args.quick else MEM_LENS)
    reps = args.reps = 2 if args.quick else args.reps
    results = {}
    t_all = time.time()
    for n in names:
        for m in mem_lens:
            est = estimate_gb(n, args.B, args.T, m, args.N, args.H, args.D)
            if est > args.max_gb:
                results[(n, m)] = dict(skip=f"skip (~{est:.0f} GB)")
            else:
                spec = dict(name=n, B=args.B, T=args.T, M=m, D=args.D, N=args.N, H=args.H, reps=reps, mode=args.mode,
                            threads=args.threads, ftz=args.ftz)
                results[(n, m)] = run_one(spec, args.timeout)
            print(f"{n:32s} M={m:6d} {results[(n, m)]}", file=sys.stderr, flush=True)
    md = table(results, names, mem_lens, args) + f"\nTotal benchmark time {time.time() - t_all:.0f} s.\n"
    print(md)
    with open(args.out, "w") as f:
        f.write(md)
    plot(results, names, mem_lens, args.plot or os.path.splitext(args.out)[0] + ".png", args.mode)


if __name__ == "__main__":
    main()
