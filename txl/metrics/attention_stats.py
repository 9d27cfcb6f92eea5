"""Attention statistics per layer and head: where the probability mass goes.

  mean distance   sum_j p[i, j] * (M + i - j), averaged over scored queries: how far back a head
                  looks (uniform attention over keys 0..M+i gives (M + i) / 2)
  memory mass     sum_{j < M} p[i, j]: the share of attention spent on the cached memory
  compressed mass sum_{j < C} p[i, j]: the part of it on the C compressed slots (memory=compressive,
                  whose memory is [compressed slots; memory rows]); 0 for other memories

Measured on a small sample (the first `batches` eval batches that have a memory, `rows` rows of
each; with mem_len 0 simply the first batches) with one
extra forward pass that returns the probabilities (need_weights=True: every backend answers
through the dense rel_ref reference), so it costs little and changes no state.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from txl.metrics.base import IGNORE, Metric
from txl.model.attention import distance_grid
from txl.model.compressive import slot_distances
from txl.model.memory import as_memory


def key_distances(T: int, M: int, device=None) -> torch.Tensor:
    """(T, K) distance M + i - j from query i (window position M + i) to key j; < 0 for the future."""
    return distance_grid(M, 0, T, 0, M + T, device).double()


def attention_sums(probs: torch.Tensor, M: int, keep: Optional[torch.Tensor] = None, C: int = 0, rate: int = 1):
    """probs (B, N, T, K) one layer's attention; keep (B, T) scored queries (default all); C of the
    M memory keys compressed slots of `rate` rows each (their distance: the centre of their span).

    Returns (dist_sum (N,), mem_sum (N,), n_queries) float64: sums over kept queries of the mean
    attended distance and of the mass on the M memory keys (the C slots' share: compressed_sum)."""
    B, N, T, K = probs.shape
    p = probs.double()
    w = torch.ones(B, T, dtype=torch.float64, device=p.device) if keep is None else keep.double()
    d = key_distances(T, M, p.device)
    if C:
        base, _, index = slot_distances(T, M - C, C, rate, p.device)
        d[:, :C] = base + index.double()
    dist = (p * d.clamp(min=0)).sum(-1)  # (B, N, T): future keys have p = 0
    mem = p[..., :M].sum(-1)  # (B, N, T)
    wq = w[:, None, :]  # (B, 1, T)
    return (dist * wq).sum((0, 2)), (mem * wq).sum((0, 2)), w.sum()


def compressed_sum(probs: torch.Tensor, C: int, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N,) float64: the sum over kept queries of the mass on the first C keys (compressed slots)."""
    B, N, T, K = probs.shape
    w = torch.ones(B, T, dtype=torch.float64, device=probs.device) if keep is None else keep.double()
    return (probs[..., :C].double().sum(-1) * w[:, None, :]).sum((0, 2))


class AttentionStats(Metric):
    name = "attention"

    def __init__(self, batches: int = 2, rows: int = 4):
        if batches < 0 or rows < 1:
            raise ValueError(f"metrics.attention_batches must be >= 0 and metrics.attention_rows >= 1, "
                             f"got {batches}, {rows}")
        self.batches, self.rows = batches, rows
        self.reset()

    def reset(self):
        self.seen, self.s = 0, None

    @torch.no_grad()
    def update(self, model, batch, out, mems_in):
        if self.seen >= self.batches or (mems_in[0].size(1) == 0 and model.seq.mem_len > 0):
            return  # sample only segments that have their memory (a stream start has none yet)
        self.seen += 1
        dev = out.nll.device
        r = min(self.rows, batch["input_ids"].size(0))
        ids, labels = batch["input_ids"][:r].to(dev), batch["labels"][:r].to(dev)
        mems = as_memory(mems_in).map(lambda m: m[:r])  # hidden states or keys / values, as given
        M, C = mems[0].size(1), getattr(mems, "n_cmem", 0)
        probs = model(ids, mems=mems, need_weights=True).attn  # per layer (r, N, T, K)
        keep = labels != IGNORE
        rate = model.cfg.memory.compression_rate
        rows = [torch.stack([*attention_sums(p, M, keep, C, rate)[:2], compressed_sum(p, C, keep)])
                for p in probs]  # (3, N) each: distance, memory mass, compressed mass
        n = (labels != IGNORE).sum().double()
        add = torch.stack(rows)  # (L, 3, N)
        if self.s is None:
            self.s, self.n = add, n
        else:
            self.s, self.n = self.s + add, self.n + n

    def state(self, model, device):
        L, N = model.cfg.n_layer, model.cfg.n_head
        if self.s is None:
            return {"sums": torch.zeros(L, 3, N, dtype=torch.float64, device=device),
                    "n": torch.zeros((), dtype=torch.float64, device=device)}
        return {"sums": self.s, "n": self.n}

    def summary(self, st) -> dict:
        n = float(st["n"])
        if n == 0:
            return {"queries": 0}
        s = (st["sums"] / n).tolist()  # (L, 3, N)
        out = {"queries": int(n), "distance": [row[0] for row in s], "memory_mass": [row[1] for row in s],
               "layer_distance": [sum(row[0]) / len(row[0]) for row in s],
               "layer_memory_mass": [sum(row[1]) / len(row[1]) for row in s]}
        if any(any(row[2]) for row in s):  # compressive memory: mass on the compressed slots
            out["compressed_mass"] = [row[2] for row in s]
            out["layer_compressed_mass"] = [sum(row[2]) / len(row[2]) for row in s]
        return out

    def scalars(self, s, prefix) -> Dict[str, float]:
        out = {}
        for l, (d, m) in enumerate(zip(s.get("layer_distance", []), s.get("layer_memory_mass", []))):
            out[f"{prefix}_attn_dist/L{l}"] = d
            out[f"{prefix}_attn_mem/L{l}"] = m
            out[f"{prefix}_attn_dist_max_head/L{l}"] = max(s["distance"][l])
        for l, c in enumerate(s.get("layer_compressed_mass", [])):
            out[f"{prefix}_attn_cmem/L{l}"] = c
        return out
