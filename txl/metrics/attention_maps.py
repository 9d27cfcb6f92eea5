"""Attention maps a person can read (`metrics.attention_maps=true`, txl-eval and validation).

For one chosen segment (`metrics.attention_maps_segment`: the n-th segment of the stream, counted
from 0, so 1 is the first one that has a memory; a shorter stream gives its last), batch row 0:

  <prefix>_attention_map_L<l>.png   one panel per head: the (T, K) probabilities of the T queries
                                     over the [memory | segment] keys, the memory boundary drawn as
                                     a line, the tokens as tick labels when they fit (<= MAX_LABELS)
  <prefix>_attention_distance.png   per layer: mean attention at each relative distance
                                     M + i - j (log-scale axes), averaged over heads and over the
                                     queries that have a key at that distance

One extra forward pass with need_weights=True (every backend answers through rel_ref's dense
probabilities, patterns applied). Memory rows are labelled with the tokens the stream fed before
(the row is an ordered stream); rows older than what was seen (mem_init=zeros) show "·".
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

import torch
from matplotlib.figure import Figure

from txl.metrics.base import Metric
from txl.metrics.plots import _save
from txl.model.attention import distance_grid

MAX_LABELS = 48  # tick labels only for axes of at most this many tokens


def capture(model, ids: torch.Tensor, mems) -> List[torch.Tensor]:
    """ids (1, T), mems as the model takes them -> per layer (N, T, K) float probabilities (CPU)."""
    with torch.no_grad():
        probs = model(ids, mems=mems, need_weights=True).attn
    return [p[0].float().cpu() for p in probs]


def distance_profile(probs: torch.Tensor, M: int) -> torch.Tensor:
    """probs (N, T, K) of one layer -> (K,): at each distance d = M + i - j (0 .. K-1), the mean over
    heads and over the queries that have a key at distance d of the probability of that key."""
    N, T, K = probs.shape
    d = distance_grid(M, 0, T, 0, K)  # (T, K)
    ok = d >= 0
    idx = d.clamp(min=0)[ok]  # the distance of every existing (query, key) pair
    tot = torch.zeros(K, dtype=torch.float64).index_add_(0, idx, probs.double().mean(0)[ok])
    cnt = torch.zeros(K, dtype=torch.float64).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
    return tot / cnt.clamp(min=1)


def _label(tok, i: Optional[int]) -> str:
    if i is None:
        return "·"
    s = tok.decode([int(i)]) if tok is not None else str(int(i))
    return s.replace("\n", "⏎").replace(" ", "␣").replace("$", r"\$")[:8] or "∅"


def plot_layer(probs: torch.Tensor, M: int, path, title: str, keys: Optional[List[str]] = None,
               queries: Optional[List[str]] = None) -> str:
    """probs (N, T, K): one heat map per head, keys on x ([memory | segment]), queries on y."""
    N, T, K = probs.shape
    cols = min(N, 4)
    rows = math.ceil(N / cols)
    # panel size (inches): room for one tick label per token when they are drawn, else a fixed size
    w = 0.16 * K + 1.5 if keys is not None and K <= MAX_LABELS else 5.0
    h = 0.16 * T + 1.2 if queries is not None and T <= MAX_LABELS else 3.5
    fig = Figure(figsize=(w * cols, h * rows))
    for n in range(N):
        ax = fig.add_subplot(rows, cols, n + 1)
        im = ax.imshow(probs[n].numpy(), aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
        if M:
            ax.axvline(M - 0.5, color="red", lw=1.2)  # keys left of it: the memory
        ax.set_title(f"head {n}" + (f"  (memory | segment, M={M})" if n == 0 else ""), fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        if keys is not None and K <= MAX_LABELS:
            ax.set_xticks(range(K))
            ax.set_xticklabels(keys, rotation=90, fontsize=7)
        if queries is not None and T <= MAX_LABELS:
            ax.set_yticks(range(T))
            ax.set_yticklabels(queries, fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle(title)
    return _save(fig, path)


def plot_distances(profiles: List[torch.Tensor], path, title: str = "mean attention by distance") -> str:
    """profiles: per layer (K,) from distance_profile; log-log axes (distance + 1: d = 0 is the query itself)."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for l, p in enumerate(profiles):
        d = torch.arange(p.numel())
        keep = p > 0
        ax.plot((d[keep] + 1).numpy(), p[keep].numpy(), marker=".", label=f"layer {l}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("relative distance + 1 (M + i - j + 1)")
    ax.set_ylabel("mean attention probability")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def draw_maps(probs: List[torch.Tensor], M: int, out_dir, prefix: str, keys=None, queries=None,
              what: str = "") -> Dict[str, str]:
    """All the PNGs of one capture -> {name: path}."""
    out_dir, paths = Path(out_dir), {}
    for l, p in enumerate(probs):
        paths[f"attention_map_L{l}"] = plot_layer(p, M, out_dir / f"{prefix}_attention_map_L{l}.png",
                                                  f"layer {l} attention {what}".strip(), keys, queries)
    paths["attention_distance"] = plot_distances([distance_profile(p, M) for p in probs],
                                                 out_dir / f"{prefix}_attention_distance.png")
    return paths


class AttentionMaps(Metric):
    """Captures one segment's probabilities (update) and draws them (draw). Rank-local: nothing
    is reduced over DDP ranks; rank 0 draws its own row."""

    name = "attention_maps"

    def __init__(self, tokenizer=None, segment: int = 1):
        if segment < 0:
            raise ValueError(f"metrics.attention_maps_segment must be >= 0, got {segment}")
        self.tok, self.segment = tokenizer, segment
        self.reset()

    def reset(self):
        self.calls, self.probs, self.M, self.ids, self.keys, self.at = 0, None, 0, [], None, None
        self.history: list = []  # token ids of row 0 fed so far (labels for the memory keys)

    def update(self, model, batch, out, mems_in):
        if self.calls > self.segment:
            return
        ids = batch["input_ids"][:1].to(out.hidden.device)
        mems = type(mems_in)(m[:1] for m in mems_in)  # hidden states or keys / values, as given
        M = mems[0].size(1)
        self.probs, self.M, self.at = capture(model, ids, mems), M, self.calls
        row = ids[0].tolist()
        past = self.history[-M:] if M else []
        self.keys = [None] * (M - len(past)) + past + row  # (K,) ids, None where nothing was seen
        self.ids = row
        self.history = (self.history + row)[-(model.seq.mem_len + len(row)):]
        self.calls += 1

    def summary(self, state) -> dict:
        if self.probs is None:
            return {"segment": None}
        N, T, K = self.probs[0].shape
        return {"segment": self.at, "layers": len(self.probs), "heads": N, "queries": T, "keys": K,
                "memory": self.M}

    def draw(self, out_dir, prefix: str) -> Dict[str, str]:
        if self.probs is None:
            return {}
        keys = [_label(self.tok, i) for i in self.keys]
        return draw_maps(self.probs, self.M, out_dir, prefix, keys, keys[self.M:], f"(segment {self.at})")
