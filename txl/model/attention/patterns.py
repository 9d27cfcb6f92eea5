"""Attention patterns: which keys of [memory + segment] a query may see, after the causal /
same_length mask. Each pattern is a small class, registered under its name; this is the only module
that names one (tests/test_imports.py checks it). The layer asks the configured pattern to `run`
the backend; the metrics ask it for its `mask`.

  dense         every causal key
  local         the `window` most recent keys, the query itself included
  block_sparse  key blocks of `block_size`, anchored at the segment start: the query's own block
                and `n_prev` previous ones, plus the first `n_global` blocks
  bigbird       local `window` + the first `n_global` blocks + `n_random` random earlier blocks
                per query block, drawn from `seed`
  topk          the `topk` highest-scoring causal keys of each query (dynamic: needs a backend
                with the `dynamic` capability)
  routing       content-based (Roy et al. 2020): the causal keys routed to the query's k-means
                cluster, plus the local `window`; the centroids are buffers updated by EMA
                (dynamic: the mask is per example and head)

Coordinates as in masks.py: query i at window position M + i, key j at j. Key blocks are anchored at
the segment start (key block of j: floor((j - M) / block_size), so memory blocks have negative
numbers and query block b = i // block_size holds the queries b*bs .. b*bs+bs-1): the partition is
the same whichever memory keys are present, which lets the layer drop never-visible memory keys
before projecting them (visible_from).

The banded engine (Static.run) cuts the queries into chunks; for each chunk it takes only the key
spans that some query of the chunk may see, computes the position term for exactly those (query,
key) pairs (RelativeTerm.block: (q+v).r for the needed distances, no rel_shift over K), masks with
causal & pattern, and calls the backend on that small dense problem. Each query's whole allowed
key set lies in its chunk, so every softmax is exact. Cost O(T * (chunk + window)) for `local` and
O(T * (n_prev + 1) * block_size) for `block_sparse`: independent of the memory length.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .masks import distance
from .registry import register_pattern
from .terms import BiasTerm

LOCAL_CHUNK = 64  # queries per chunk for `local` (at least the window, at most T)
_NEVER = 1 << 40  # padding of the random-block table: matches no key block


def _fdiv(x, n):
    return torch.div(x, n, rounding_mode="floor")


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _cat(xs, dim):
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim)


class Pattern:
    """Base: sees every causal key. a: the AttnConfig (window, block_size, ...).

    requires: config fields that must be >= 1; dynamic: the mask depends on the scores (the backend
    needs the `dynamic` capability); full: every causal key is seen (what additive scoring needs)."""

    name = ""
    requires: tuple = ()
    dynamic = False
    full = False

    def __init__(self, a):
        self.a = a

    def hidden(self, i: torch.Tensor, j: torch.Tensor, T: int, M: int) -> torch.Tensor:
        """True where query i may NOT see key j by position (i, j broadcastable index tensors)."""
        return torch.zeros(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.bool, device=i.device)

    def mask(self, T: int, M: int, device=None) -> torch.Tensor:
        """(T, K) bool, True = hidden by the pattern alone (a dynamic pattern's span is at most this)."""
        i = torch.arange(T, device=device)[:, None]
        return self.hidden(i, torch.arange(M + T, device=device)[None, :], T, M)

    def visible_from(self, T: int, M: int) -> int:
        """First window position any query may see (keys before it need no projection)."""
        return 0

    def init_state(self, n_head: int, d_head: int):
        """None, or an nn.Module of buffers the pattern keeps across calls (the layer owns it, so it
        lives in the state_dict / checkpoint and follows .to(device)). Called once per layer."""
        return None

    def bind(self, state) -> "Pattern":
        """This pattern reading the layer's state (what init_state made). Patterns without one ignore it."""
        return self

    def run(self, kernel, q, k, v, pos, blocked, scale: float, dropatt: float = 0.0, training: bool = False,
            need_weights: bool = False, native_mask: bool = False):
        """-> kernel's (out (B, N, T, H), probs or None) for this pattern."""
        return kernel(q, k, v, pos, blocked, scale, dropatt, training, need_weights)


@register_pattern
class Dense(Pattern):
    name = "dense"
    full = True


class Static(Pattern):
    """A pattern fixed by positions, run by the banded engine (or as one full mask for backends with
    native_mask, and when the probabilities are wanted)."""

    def chunks(self, T: int, M: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
        """[(q0, q1, key spans)]: disjoint sorted [k0, k1) holding every key some query in q0:q1 sees."""
        raise NotImplementedError

    def run(self, kernel, q, k, v, pos, blocked, scale, dropatt=0.0, training=False, need_weights=False,
            native_mask=False):
        T = q.size(-2)
        M = k.size(-2) - T
        if need_weights or native_mask:  # one call with the full mask
            return kernel(q, k, v, pos, blocked | self.mask(T, M, q.device), scale, dropatt, training, need_weights)
        outs = []  # banded: only the keys each query chunk may see
        for q0, q1, spans in self.chunks(T, M):
            kc = _cat([k[..., s:e, :] for s, e in spans], -2)  # (B, N, L, H): a view for one span
            vc = _cat([v[..., s:e, :] for s, e in spans], -2)
            kpos = torch.cat([torch.arange(s, e, device=q.device) for s, e in spans])  # (L,)
            qi = torch.arange(q0, q1, device=q.device)[:, None]
            blk = _cat([blocked[..., q0:q1, s:e] for s, e in spans], -1) | self.hidden(qi, kpos[None, :], T, M)
            pc = None if pos is None else BiasTerm(_cat([pos.block(q0, q1, s, e) for s, e in spans], -1))
            o, _ = kernel(q[..., q0:q1, :], kc, vc, pc, blk, scale, dropatt, training, False)
            outs.append(o)
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)), None


@register_pattern
class Local(Static):
    name = "local"
    requires = ("window",)

    def hidden(self, i, j, T, M):
        dist = distance(i, j, M)
        return (dist < 0) | (dist >= self.a.window)

    def visible_from(self, T, M):
        return max(0, M - self.a.window + 1)

    def chunks(self, T, M):
        w = self.a.window
        C = min(T, max(LOCAL_CHUNK, w))
        return [(q0, min(T, q0 + C), [(max(0, M + q0 - w + 1), M + min(T, q0 + C))]) for q0 in range(0, T, C)]


class Blocks(Static):
    """Patterns over key blocks of block_size, the first n_global of them seen by every query."""

    def _kb_min(self, M: int) -> int:  # block number of key 0
        bs = self.a.block_size
        return -((M + bs - 1) // bs) if bs else 0

    def _global_end(self, T: int, M: int) -> int:  # keys [0, end) form the first n_global blocks
        return min(M + T, max(0, M + (self._kb_min(M) + self.a.n_global) * self.a.block_size))

    def _seen(self, i, j, T, M, kb, qb):
        raise NotImplementedError

    def hidden(self, i, j, T, M):
        bs = self.a.block_size
        kb, qb = _fdiv(j - M, bs), _fdiv(i, bs)
        seen = (j < self._global_end(T, M)) | self._seen(i, j, T, M, kb, qb)
        return ~seen | (distance(i, j, M) < 0)


@register_pattern
class BlockSparse(Blocks):
    name = "block_sparse"
    requires = ("block_size",)

    def _seen(self, i, j, T, M, kb, qb):
        return (kb >= qb - self.a.n_prev) & (kb <= qb)

    def visible_from(self, T, M):
        return 0 if self.a.n_global else max(0, M - self.a.n_prev * self.a.block_size)

    def chunks(self, T, M):
        a, bs, out = self.a, self.a.block_size, []
        for b, q0 in enumerate(range(0, T, bs)):
            q1 = min(T, q0 + bs)
            out.append((q0, q1, _merge([(0, self._global_end(T, M)), (max(0, M + (b - a.n_prev) * bs), M + q1)])))
        return out


@register_pattern
class BigBird(Blocks):
    name = "bigbird"
    requires = ("window", "block_size")

    def __init__(self, a):
        super().__init__(a)
        self._rand: dict = {}  # (T, M) -> (random blocks, padded table)

    def random_blocks(self, T: int, M: int) -> list[list[int]]:
        """Per query block b, the key blocks (segment-anchored numbers) it sees at random: up to
        n_random distinct blocks drawn from those strictly before b that are neither global nor
        inside the window of b's first query. Drawn in block order from torch.Generator seeded by
        a.seed: the same (seed, T, M, pattern) always gives the same blocks."""
        return self._random(T, M)[0]

    def _random(self, T, M):
        if (T, M) not in self._rand:
            a, bs = self.a, self.a.block_size
            g = torch.Generator().manual_seed(a.seed)
            out = []
            for b in range((T + bs - 1) // bs):  # query b*bs is the block's first query
                cand = [kb for kb in range(self._kb_min(M) + a.n_global, b)
                        if distance(b * bs, M + kb * bs, M) >= a.window]
                pick = torch.randperm(len(cand), generator=g)[: a.n_random].tolist() if cand else []
                out.append(sorted(cand[p] for p in pick))
            width = max([1] + [len(r) for r in out])  # (query blocks, n_random), padded with a block no key has
            tab = torch.tensor([r + [_NEVER] * (width - len(r)) for r in out], dtype=torch.long)
            self._rand[(T, M)] = (out, tab)
        return self._rand[(T, M)]

    def _seen(self, i, j, T, M, kb, qb):
        rand, tab = self._random(T, M)
        rnd = (tab.to(i.device)[qb.clamp(0, len(rand) - 1)] == kb.unsqueeze(-1)).any(-1)
        return (distance(i, j, M) < self.a.window) | rnd

    def visible_from(self, T, M):
        a = self.a
        return 0 if a.n_global or a.n_random else max(0, M - a.window + 1)

    def chunks(self, T, M):
        a, bs, out = self.a, self.a.block_size, []
        rand = self.random_blocks(T, M)
        for b, q0 in enumerate(range(0, T, bs)):
            q1 = min(T, q0 + bs)
            spans = [(0, self._global_end(T, M)), (max(0, M + q0 - a.window + 1), M + q1)]
            spans += [(max(0, M + kb * bs), M + (kb + 1) * bs) for kb in rand[b]]
            out.append((q0, q1, _merge(spans)))
        return out


@register_pattern
class TopK(Pattern):
    """Dynamic: the kernel keeps each query's `topk` best-scoring allowed keys."""

    name = "topk"
    requires = ("topk",)
    dynamic = True

    def run(self, kernel, q, k, v, pos, blocked, scale, dropatt=0.0, training=False, need_weights=False,
            native_mask=False):
        return kernel(q, k, v, pos, blocked, scale, dropatt, training, need_weights, topk=self.a.topk)


class Centroids(nn.Module):
    """Routing's k-means centroids: (N, C, H) unit vectors per head, a buffer (never a parameter: no
    gradient reaches it, the EMA moves it; saved in the state_dict, hence in every checkpoint).
    Initialised from torch.Generator(seed), so the same config gives the same start."""

    def __init__(self, n_head: int, n_clusters: int, d_head: int, decay: float, seed: int):
        super().__init__()
        self.decay = decay
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("centroids", F.normalize(torch.randn(n_head, n_clusters, d_head, generator=g), dim=-1))

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, L, H) -> (B, N, L) long: the nearest centroid of each unit-normalised vector
        (largest cosine, as the paper's spherical k-means)."""
        x = F.normalize(x.detach().float(), dim=-1)
        return torch.matmul(x, self.centroids.float().transpose(-1, -2).unsqueeze(0)).argmax(-1)

    @torch.no_grad()
    def update(self, xs: list, cs: list) -> None:
        """One EMA step: centroid c <- decay * c + (1 - decay) * mean of the (normalised) queries and
        keys assigned to c in this batch, renormalised; a centroid nothing was assigned to stays.
        xs: [(B, N, L, H)], cs: their assignments [(B, N, L)]. (The paper adds the two sums; the
        mean keeps the step size independent of batch and segment length.) Under DDP every rank
        moves its copy and the broadcast of buffers at the next forward keeps rank 0's."""
        C = self.centroids.size(1)
        x = torch.cat([F.normalize(t.detach().float(), dim=-1) for t in xs], dim=2)  # (B, N, L, H)
        hot = F.one_hot(torch.cat(cs, dim=2), C).float()  # (B, N, L, C)
        sums = torch.einsum("bnlc,bnlh->nch", hot, x)
        count = hot.sum((0, 2)).unsqueeze(-1)  # (N, C, 1)
        c = self.centroids.float()
        moved = F.normalize(self.decay * c + (1 - self.decay) * sums / count.clamp(min=1), dim=-1)
        self.centroids.copy_(torch.where(count > 0, moved, c).to(self.centroids.dtype))


@register_pattern
class Routing(Pattern):
    """Routing attention (Roy et al. 2020): query i sees key j (j causal) when both are routed to
    the same centroid of the head, or when j is among the `window` most recent keys (the paper pairs
    routing with local attention; the window also guarantees every query sees itself). Queries (with
    the content bias u, as the backend receives them) and keys of [memory + segment] are assigned by
    cosine to n_clusters centroids per head; in training (and only there) the centroids then move
    by an EMA of what was assigned to them (Centroids.update, decay ema_decay), never by gradient.

    The routing mask is (B, N, T, K): applied by a backend with the `dynamic` capability as a dense
    mask (exact, cost of dense attention; what it buys is which keys are read, not speed here).
    n_clusters=1 sees every causal key: dense attention exactly."""

    name = "routing"
    requires = ("n_clusters", "window")
    dynamic = True

    def __init__(self, a):
        super().__init__(a)
        self.state = None

    def init_state(self, n_head, d_head):
        return Centroids(n_head, self.a.n_clusters, d_head, self.a.ema_decay, self.a.seed)

    def bind(self, state):
        self.state = state
        return self

    def routed(self, q: torch.Tensor, k: torch.Tensor):
        """(B, N, T, K) bool, True where query and key share a centroid; and the two assignments."""
        cq, ck = self.state.assign(q), self.state.assign(k)
        return cq.unsqueeze(-1) == ck.unsqueeze(-2), cq, ck

    def run(self, kernel, q, k, v, pos, blocked, scale, dropatt=0.0, training=False, need_weights=False,
            native_mask=False):
        if self.state is None:
            raise ValueError("the routing pattern needs its centroids: build it through the attention layer")
        T, K = q.size(-2), k.size(-2)
        M = K - T
        i = torch.arange(T, device=q.device)[:, None]
        near = distance(i, torch.arange(K, device=q.device)[None, :], M) < self.a.window  # (T, K)
        same, cq, ck = self.routed(q, k)
        out = kernel(q, k, v, pos, blocked | ~(same | near), scale, dropatt, training, need_weights)
        if training:  # after the forward used the old centroids: every query of the step saw the same ones
            self.state.update([q, k], [cq, ck])
        return out
