"""PNG plots of the metrics (matplotlib's object API: no pyplot state, no display needed)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence

from matplotlib.figure import Figure

from txl.files import atomic_write


def _save(fig: Figure, path) -> str:
    # a reader (wandb, a browser) never sees half a file
    return str(atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"), fsync=False))


def _centers(edges: Sequence[Sequence[int]]) -> List[float]:
    return [(lo + hi) / 2 for lo, hi in edges]


def plot_position(records: Sequence[dict], path, title: str = "loss by position in the segment") -> Optional[str]:
    """records: [{'step', 'position': LossByPosition summary}], oldest first: one line per
    validation (later = darker). With a no-memory sample, a second panel shows its gap on the
    same tokens: (loss without memory) - (loss with memory), the context fragmentation."""
    recs = [r for r in records if r.get("position", {}).get("edges")  # a record with no scored bucket has no line
            and any(y is not None for y in r["position"]["loss"])]
    if not recs:
        return None
    last = recs[-1]["position"]
    gap = bool(last.get("sample_nomem"))
    fig = Figure(figsize=(10.0 if gap else 6.4, 4.0))
    ax = fig.add_subplot(1, 2 if gap else 1, 1)
    for k, r in enumerate(recs):
        p = r["position"]
        xs, ys = zip(*[(x, y) for x, y in zip(_centers(p["edges"]), p["loss"]) if y is not None])
        shade = 0.25 + 0.75 * (k + 1) / len(recs)
        ax.plot(xs, ys, marker="o", color=(0.1, 0.3, 0.8, shade), label=f"step {r['step']}"
                if k == len(recs) - 1 else None)
    _axes(ax, f"position in the segment (tgt_len {last['tgt_len']})", "loss (nats/token)", title)
    if gap:
        ax2 = fig.add_subplot(1, 2, 2)
        pts = [(x, b - a) for x, a, b in zip(_centers(last["edges"]), last["sample_mem"], last["sample_nomem"])
               if a is not None and b is not None]
        ax2.plot(*zip(*pts), marker="o", color="tab:red", label=f"{last['sample_tokens']} tokens")
        ax2.axhline(0, color="gray", lw=0.8)
        _axes(ax2, "position in the segment", "loss without memory - with (nats)", "what the memory buys")
    return _save(fig, path)


def _axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_context(records: Sequence[dict], path) -> Optional[str]:
    recs = [r for r in records if r.get("context", {}).get("buckets")]
    if not recs:
        return None
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for k, r in enumerate(recs):
        b = r["context"]["buckets"]
        shade = 0.25 + 0.75 * (k + 1) / len(recs)
        ax.plot([math.sqrt(x["lo"] * (x["hi"] + 1)) for x in b], [x["loss"] for x in b], marker="o",
                color=(0.1, 0.5, 0.2, shade), label=f"step {r['step']}" if k == len(recs) - 1 else None)
    ax.set_xscale("log", base=2)
    _axes(ax, "available context (keys one layer may attend to, log2 buckets)", "loss (nats/token)",
          "loss by available context")
    return _save(fig, path)


def plot_attention(summary: dict, path) -> Optional[str]:
    if not summary.get("distance"):
        return None
    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    for k, (key, lab, fmt) in enumerate((("distance", "mean attended distance (tokens)", "{:.0f}"),
                                         ("memory_mass", "attention mass on memory", "{:.2f}"))):
        ax = fig.add_subplot(1, 2, k + 1)
        vals = summary[key]  # (L, N)
        im = ax.imshow(vals, aspect="auto", cmap="viridis", vmin=0, vmax=1 if key == "memory_mass" else None)
        L, N = len(vals), len(vals[0])
        ax.set_xticks(range(N))
        ax.set_yticks(range(L))
        if L * N <= 64:  # small enough to print the numbers
            for l in range(L):
                for h in range(N):
                    ax.text(h, l, fmt.format(vals[l][h]), ha="center", va="center", fontsize=8, color="w")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(lab, fontsize=10)
        fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_recall(records: Sequence[dict], path, chance: Optional[float] = None) -> Optional[str]:
    recs = [r for r in records if r.get("recall", {}).get("by_distance")]
    if not recs:
        return None
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for k, r in enumerate(recs):
        pts = [(x["distance"], x["accuracy"]) for x in r["recall"]["by_distance"] if x["accuracy"] is not None]
        if pts:
            shade = 0.25 + 0.75 * (k + 1) / len(recs)
            ax.plot(*zip(*pts), marker="o", color=(0.6, 0.2, 0.6, shade),
                    label=f"step {r['step']}" if k == len(recs) - 1 else None)
    if chance:
        ax.axhline(chance, ls=":", color="gray", label="chance")
    ax.set_ylim(-0.02, 1.02)
    _axes(ax, "distance D to the token to recall", "recall accuracy", "synthetic recall")
    return _save(fig, path)


def plot_sweep(curves: dict, path, marks: Optional[dict] = None, title: str = "context sweep",
               xlabel: str = "evaluation memory length (eval_mem_len)") -> str:
    """curves: {name: (contexts, losses)}; marks: {name: context} (ECL / RECL) drawn as dots.
    x is symlog so that context 0 fits."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for name, (ctx, L) in curves.items():
        line, = ax.plot(ctx, [math.exp(min(x, 700)) for x in L], marker="o", label=name)
        if marks and name in marks and marks[name] in ctx:
            c = marks[name]
            ax.plot([c], [math.exp(L[list(ctx).index(c)])], "*", ms=14, color=line.get_color())
    ax.set_xscale("symlog", linthresh=max(1, min([c for ctx, _ in curves.values() for c in ctx if c > 0] or [1])))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity")
    ax.set_title(title + (" (star: effective context)" if marks else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
