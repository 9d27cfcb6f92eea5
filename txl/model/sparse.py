"""Sparse attention patterns over [memory + segment] and the banded engine that computes them
without the (T, K) score matrix. Pure functions and plain objects; no parameters.

Coordinates as in attention.py: query i at window position M + i, key j at j, distance M + i - j.
Key blocks are anchored at the segment start (key block of j: floor((j - M) / block_size), so
memory blocks have negative numbers and query block b = i // block_size holds the queries
b*bs .. b*bs+bs-1): the partition is the same whichever memory keys are present, which lets the
layer drop never-visible memory keys before projecting them (visible_from).

The engine (sparse_attention) cuts the queries into chunks; for each chunk it takes only the key
spans that some query of the chunk may see, computes the position term for exactly those
(query, key) pairs (RelativeTerm.block: (q+v).r for the needed distances, no rel_shift over K),
masks with causal & pattern, and calls the backend on that small dense problem. Each query's whole
allowed key set lies in its chunk, so every softmax is exact. Cost O(T * (chunk + window)) for
`local` and O(T * (n_prev + 1) * block_size) for `block_sparse`: independent of the memory length.
"""
from __future__ import annotations

from typing import Optional

import torch

from .attention import BiasTerm
from .config import AttnConfig

SPARSE = ("local", "block_sparse", "bigbird")  # static patterns (topk is dynamic: a backend option)
LOCAL_CHUNK = 64  # queries per chunk for `local` (at least the window, at most T)
_NEVER = 1 << 40  # padding of the random-block table: matches no key block


def _fdiv(x, n):
    return torch.div(x, n, rounding_mode="floor")


def visible_from(a: AttnConfig, T: int, M: int) -> int:
    """First window position any query may see under the pattern (keys before it need no projection)."""
    if a.pattern == "local" or (a.pattern == "bigbird" and not a.n_global and not a.n_random):
        return max(0, M - a.window + 1)
    if a.pattern == "block_sparse" and not a.n_global:
        return max(0, M - a.n_prev * a.block_size)
    return 0


def bigbird_random_blocks(a: AttnConfig, T: int, M: int) -> list[list[int]]:
    """Per query block b, the key blocks (segment-anchored numbers) it sees at random: up to
    n_random distinct blocks drawn from those strictly before b that are neither global nor inside
    the window of b's first query. Drawn in block order from torch.Generator seeded by a.seed: the
    same (seed, T, M, pattern) always gives the same blocks."""
    bs = a.block_size
    g = torch.Generator().manual_seed(a.seed)
    kb_min = -((M + bs - 1) // bs)  # block of key 0
    out = []
    for b in range((T + bs - 1) // bs):
        first = M + b * bs  # window position of the block's first query
        cand = [kb for kb in range(kb_min + a.n_global, b) if M + kb * bs < first - a.window + 1]
        pick = torch.randperm(len(cand), generator=g)[: a.n_random].tolist() if cand else []
        out.append(sorted(cand[p] for p in pick))
    return out


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


class Pattern:
    """A static sparse pattern for T queries after M memory keys (K = M + T)."""

    def __init__(self, a: AttnConfig, T: int, M: int):
        if a.pattern not in SPARSE:
            raise ValueError(f"Pattern needs one of {list(SPARSE)}, got {a.pattern!r}")
        self.a, self.T, self.M, self.K = a, T, M, M + T
        bs = a.block_size
        self.kb_min = -((M + bs - 1) // bs) if bs else 0  # block number of key 0
        self.rand = bigbird_random_blocks(a, T, M) if a.pattern == "bigbird" else None
        if self.rand is not None:  # (query blocks, n_random) table, padded with a block no key has
            width = max([1] + [len(r) for r in self.rand])
            self.rand_tab = torch.tensor([r + [_NEVER] * (width - len(r)) for r in self.rand], dtype=torch.long)

    def _global_end(self) -> int:  # keys [0, end) form the first n_global blocks
        return min(self.K, max(0, self.M + (self.kb_min + self.a.n_global) * self.a.block_size))

    def blocked(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """True where query i may NOT see key j under the pattern alone (future keys included).
        i, j broadcastable integer tensors of query / key indices."""
        a, M = self.a, self.M
        dist = M + i - j
        if a.pattern == "local":
            return (dist < 0) | (dist >= a.window)
        bs = a.block_size
        kb, qb = _fdiv(j - M, bs), _fdiv(i, bs)
        seen = j < self._global_end()
        if a.pattern == "block_sparse":
            seen = seen | ((kb >= qb - a.n_prev) & (kb <= qb))
        else:  # bigbird
            tab = self.rand_tab.to(i.device)
            rnd = (tab[qb.clamp(0, len(self.rand) - 1)] == kb.unsqueeze(-1)).any(-1)
            seen = seen | (dist < a.window) | rnd
        return ~seen | (dist < 0)

    def mask(self, device=None) -> torch.Tensor:
        """(T, K) bool, True = hidden by the pattern."""
        i = torch.arange(self.T, device=device)[:, None]
        return self.blocked(i, torch.arange(self.K, device=device)[None, :])

    def chunks(self) -> list[tuple[int, int, list[tuple[int, int]]]]:
        """[(q0, q1, key spans)]: disjoint sorted [k0, k1) holding every key some query in q0:q1 sees."""
        a, T, M = self.a, self.T, self.M
        if a.pattern == "local":
            C = min(T, max(LOCAL_CHUNK, a.window))
            return [(q0, min(T, q0 + C), [(max(0, M + q0 - a.window + 1), M + min(T, q0 + C))])
                    for q0 in range(0, T, C)]
        bs, out = a.block_size, []
        for b, q0 in enumerate(range(0, T, bs)):
            q1 = min(T, q0 + bs)
            spans = [(0, self._global_end())]
            if a.pattern == "block_sparse":
                spans.append((max(0, M + (b - a.n_prev) * bs), M + q1))
            else:
                spans.append((max(0, M + q0 - a.window + 1), M + q1))
                spans += [(max(0, M + kb * bs), M + (kb + 1) * bs) for kb in self.rand[b]]
            out.append((q0, q1, _merge(spans)))
        return out


def _cat(xs, dim):
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim)


def sparse_attention(backend, q, k, v, pos, blocked, scale: float, pattern: Pattern,
                     dropatt: float = 0.0, training: bool = False) -> torch.Tensor:
    """Banded/gathered computation of a static pattern. q (B, N, T, H), k, v (B, N, K, H),
    blocked (T, K) or (B, 1, T, K) causal mask; returns (B, N, T, H)."""
    outs = []
    for q0, q1, spans in pattern.chunks():
        kc = _cat([k[..., s:e, :] for s, e in spans], -2)  # (B, N, L, H): a view for one span
        vc = _cat([v[..., s:e, :] for s, e in spans], -2)
        kpos = torch.cat([torch.arange(s, e, device=q.device) for s, e in spans])  # (L,)
        qi = torch.arange(q0, q1, device=q.device)[:, None]
        blk = _cat([blocked[..., q0:q1, s:e] for s, e in spans], -1) | pattern.blocked(qi, kpos[None, :])
        pc = None if pos is None else BiasTerm(_cat([pos.block(q0, q1, s, e) for s, e in spans], -1))
        o, _ = backend(q[..., q0:q1, :], kc, vc, pc, blk, scale, dropatt, training, False)
        outs.append(o)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def pattern_for(a: AttnConfig, T: int, M: int) -> Optional[Pattern]:
    return Pattern(a, T, M) if a.pattern in SPARSE else None
