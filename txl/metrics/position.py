"""Loss by position within the segment and by available context (context fragmentation).

Without memory, the first tokens of every segment are predicted from almost nothing, so the loss
by position falls steeply along the segment; with memory that curve flattens. "Available context"
counts, per scored token, the keys its attention may see in one layer (the query itself
included): memory actually filled with past text + the segment up to the token, after the
causal / same_length mask and a static sparse pattern. Stacked layers reach further back through
the memory (up to n_layer x mem_len); this counts the direct span only.

Pure functions first (testable), then the metrics: each keeps float64 sums that are reduced over
DDP ranks with a plain sum before they are summarised.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from txl.metrics.base import IGNORE, Metric
from txl.model.attention import causal_mask, get_pattern


# ---------------------------------------------------------------------------------------- math
def position_buckets(T: int, tgt_len: int, n_buckets: int) -> torch.Tensor:
    """(T,) bucket of each segment position: t * n_buckets // tgt_len (positions past tgt_len, as
    can happen with ext_len, fall in the last bucket). tgt_len is the nominal segment length, so a
    shorter last segment keeps the same bucket edges."""
    t = torch.arange(T)
    return (t * n_buckets // tgt_len).clamp(max=n_buckets - 1)


def position_edges(tgt_len: int, n_buckets: int) -> List[List[int]]:
    """[[first, last]] segment positions of each bucket."""
    b = position_buckets(tgt_len, tgt_len, n_buckets).tolist()
    return [[b.index(i), len(b) - 1 - b[::-1].index(i)] if i in b else [0, -1] for i in range(n_buckets)]


def available_context(T: int, M: int, filled: Optional[int] = None, same_length: bool = False,
                      mem_len: int = 0, blocked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(T,) number of keys query t may attend to in one layer, itself included.

    M: memory tensor length (keys 0..M-1); filled: how many of them hold real past text (the rest
    are mem_init='zeros' padding at a stream start), default M. blocked: (T, M+T) the exact mask
    (True = hidden) when known, else the causal / same_length mask is rebuilt here.
    """
    filled = M if filled is None else max(0, min(int(filled), M))
    if blocked is None:
        blocked = causal_mask(T, M, same_length, mem_len)
    real = torch.arange(M + T, device=blocked.device) >= M - filled  # (K,) keys holding real text
    return ((~blocked) & real[None, :]).sum(-1)  # (T,)


def log2_bucket(n: torch.Tensor) -> torch.Tensor:
    """Context n >= 1 -> floor(log2 n): bucket b holds contexts [2^b, 2^(b+1))."""
    return torch.floor(torch.log2(n.clamp(min=1).double())).long()


def log2_label(b: int) -> str:
    lo, hi = 2 ** b, 2 ** (b + 1) - 1
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def bucket_sums(values: torch.Tensor, buckets: torch.Tensor, keep: torch.Tensor, n: int):
    """Sum and count of `values` per bucket over the kept entries: (n,) float64 each."""
    b = buckets[keep].reshape(-1)
    v = values[keep].reshape(-1).double()
    s = torch.zeros(n, dtype=torch.float64, device=v.device).index_add_(0, b, v)
    c = torch.zeros(n, dtype=torch.float64, device=v.device).index_add_(0, b, torch.ones_like(v))
    return s, c


def _means(s: torch.Tensor, c: torch.Tensor) -> List[Optional[float]]:
    return [float(a / b) if b > 0 else None for a, b in zip(s.tolist(), c.tolist())]


def segment_offset(T_in: int, tgt_len: int) -> int:
    """Leading ext_len context columns (labels -100) when the input is longer than tgt_len."""
    return max(0, T_in - tgt_len)


def filled_memory(batch: dict, M: int, tgt_len: int) -> int:
    """Memory slots holding real text: a stream that restarted `pos` segments ago has seen at
    most pos * tgt_len tokens (mem_init='zeros' pads the rest with zero vectors)."""
    pos = batch.get("pos")
    return M if pos is None else min(M, int(pos) * tgt_len)


def model_mask(model, T: int, M: int, device=None) -> torch.Tensor:
    """(T, M+T) the keys hidden from each query: causal + same_length + a static sparse pattern
    (a dynamic top-k pattern is not included: its span is at most this)."""
    seq = model.seq
    return causal_mask(T, M, seq.same_length, seq.mem_len, device) | get_pattern(model.cfg.attn).mask(T, M, device)


# ---------------------------------------------------------------------------------------- metrics
class LossByPosition(Metric):
    """Mean NLL per bucket of segment positions, over every scored token. With nomem_batches > 0
    (and memory in use) the first such batches are also scored WITHOUT memory, and the same tokens
    WITH it, so the fragmentation gap is measured on identical tokens."""

    name = "position"

    def __init__(self, n_buckets: int = 8, nomem_batches: int = 0):
        if n_buckets < 1:
            raise ValueError(f"metrics.position_buckets must be >= 1, got {n_buckets}")
        self.n, self.nomem_batches = n_buckets, nomem_batches
        self.reset()

    def reset(self):
        self.s = self.sample = None
        self.tgt_len, self.seen = None, 0

    def update(self, model, batch, out, mems_in):
        labels = batch["labels"].to(out.nll.device)
        T_in, tgt = labels.size(1), model.seq.tgt_len
        self.tgt_len = tgt
        off = segment_offset(T_in, tgt)
        b = position_buckets(T_in - off, tgt, self.n).to(labels.device)
        b = torch.cat([b.new_zeros(off), b])[None].expand_as(labels)  # ext columns are never scored
        keep = labels != IGNORE
        s, c = bucket_sums(out.nll, b, keep, self.n)
        self.s = torch.stack([s, c]) if self.s is None else self.s + torch.stack([s, c])
        if self.seen < self.nomem_batches and model.seq.mem_len > 0 and mems_in[0].size(1) > 0:
            self.seen += 1
            nomem = model(batch["input_ids"].to(labels.device), mems=None, labels=labels.masked_fill(~keep, IGNORE))
            s0, c0 = bucket_sums(nomem.nll, b, keep, self.n)
            add = torch.stack([s, s0, c0])  # with memory, without, count: the same tokens
            self.sample = add if self.sample is None else self.sample + add

    def state(self, model, device):
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)
        return {"all": self.s if self.s is not None else z(2, self.n),
                "sample": self.sample if self.sample is not None else z(3, self.n)}

    def summary(self, st):
        tgt = self.tgt_len or 0
        out = {"tgt_len": tgt, "edges": position_edges(tgt, self.n) if tgt else None,
               "loss": _means(st["all"][0], st["all"][1]), "tokens": [int(x) for x in st["all"][1].tolist()]}
        if float(st["sample"][2].sum()) > 0:
            out["sample_mem"] = _means(st["sample"][0], st["sample"][2])
            out["sample_nomem"] = _means(st["sample"][1], st["sample"][2])
            out["sample_tokens"] = int(st["sample"][2].sum())
        return out

    def scalars(self, s, prefix):
        out = {}
        for i, v in enumerate(s["loss"]):
            if v is not None:
                lo, hi = s["edges"][i]
                out[f"{prefix}_loss_pos/{lo:04d}-{hi:04d}"] = v
        for i, v in enumerate(s.get("sample_nomem") or []):
            if v is not None:
                lo, hi = s["edges"][i]
                out[f"{prefix}_loss_pos_nomem/{lo:04d}-{hi:04d}"] = v
        return out


class LossByContext(Metric):
    """Mean NLL per log2 bucket of available context (see available_context)."""

    name = "context"
    N_BUCKETS = 32  # contexts up to 2^32: fixed, so every rank reduces the same shape

    def reset(self):
        self.s = None

    def update(self, model, batch, out, mems_in):
        labels = batch["labels"].to(out.nll.device)
        T, M = labels.size(1), mems_in[0].size(1)
        blocked = model_mask(model, T, M, labels.device)
        ctx = available_context(T, M, filled_memory(batch, M, model.seq.tgt_len), blocked=blocked)  # (T,)
        b = log2_bucket(ctx)[None].expand_as(labels)
        s, c = bucket_sums(out.nll, b, labels != IGNORE, self.N_BUCKETS)
        self.s = torch.stack([s, c]) if self.s is None else self.s + torch.stack([s, c])

    def state(self, model, device):
        return {"all": self.s if self.s is not None else torch.zeros(2, self.N_BUCKETS, dtype=torch.float64,
                                                                      device=device)}

    def summary(self, st):
        s, c = st["all"]
        rows = [{"bucket": log2_label(b), "lo": 2 ** b, "hi": 2 ** (b + 1) - 1, "loss": float(s[b] / c[b]),
                 "tokens": int(c[b])} for b in range(self.N_BUCKETS) if c[b] > 0]
        return {"buckets": rows}

    def scalars(self, s, prefix):
        return {f"{prefix}_loss_ctx/{r['lo']:05d}-{r['hi']:05d}": r["loss"] for r in s["buckets"]}
