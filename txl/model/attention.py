"""Attention math: pure functions, position terms, and the BACKENDS registry.

Shape legend
  B batch   T segment (query) length   M memory length   K = M + T keys
  N heads   H head dim                 D model dim       V vocabulary

Coordinates: query i sits at window position M + i, key j at j; their distance is M + i - j.

A *backend* decides how the scores are computed, never what they are: every backend must give
rel_ref's result (tests/test_attention_backends.py) and none owns parameters. The position term
(relative BD, ALiBi, any additive bias) arrives as a PositionTerm, so a backend may ask for it
densely (rel_ref), pre-scaled the cheapest way (rel_fused), for a sub-block only (the banded
sparse engine in sparse.py) or as a FlexAttention score_mod that never materialises it (flex).
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .config import PATTERNS, POSITION_KINDS


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """Turn raw position scores into relative-distance scores (Dai et al. 2019, appendix B).

    x (..., T, K): column c holds the score against distance K-1-c (the same for every query).
    Returns (..., T, K) whose [i, j] holds x[i, j + T - 1 - i]: the score for distance M + i - j,
    the true distance between query i (window position M + i) and key j. Entries with j > M + i
    (future keys) are garbage and must be masked. One zero pad + reshape instead of a gather.
    """
    *lead, T, K = x.shape
    x = F.pad(x, (1, 0))  # (..., T, K+1): a zero column in front
    x = x.view(*lead, K + 1, T)[..., 1:, :]  # drop the first row of the re-read matrix
    return x.reshape(*lead, T, K)


def band_shift(x: torch.Tensor, L: int) -> torch.Tensor:
    """The rel_shift of a sub-block, as a view. x (..., C, L + C) contiguous, column c holding the
    score against distance d_hi - c. Returns (..., C, L) with out[t, c] = x[t, c + C - 1 - t], i.e.
    distance d_hi - C + 1 + t - c. Row t starts C-1-t columns in: read the flat buffer with row
    stride L + C - 1 from offset C - 1 (no copy; the last input column is never read)."""
    *lead, C, W = x.shape
    assert W == L + C, (W, L, C)
    flat = x.reshape(*lead, C * W)
    return flat[..., C - 1: C - 1 + C * (W - 1)].view(*lead, C, W - 1)[..., :L]


def causal_mask(T: int, M: int, same_length: bool = False, mem_len: int = 0,
                device=None) -> torch.Tensor:
    """(T, K) bool, True = the query may NOT see the key. Query i sits at window position M + i.

    same_length: every query sees the same number of keys (the paper's evaluation setting):
    as in the original code, keys at or beyond `shift` below the diagonal are hidden, with
    shift = T - (K - mem_len) when K > mem_len, else T.
    """
    K = M + T
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(K, device=device)[None, :]
    blocked = j > i + M
    if same_length:
        mask_len = K - mem_len
        shift = T - mask_len if mask_len > 0 else T
        blocked = blocked | (j - i <= -shift)
    return blocked


# ---- position terms: added to q.k *before* the 1/sqrt(H) scaling --------------------------------
class PositionTerm:
    """dense() (B|1, N, T, K); block(q0, q1, k0, k1) the same for query rows q0:q1 and keys
    k0:k1; scaled_dense(scale) = scale * dense(), computed the cheapest way; score_mod(scale) a
    FlexAttention score_mod adding scale * term."""

    requires_grad = False

    def dense(self) -> torch.Tensor:
        raise NotImplementedError

    def block(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        return self.dense()[..., q0:q1, k0:k1]

    def scaled_dense(self, scale: float) -> torch.Tensor:
        return self.dense() * scale

    def score_mod(self, scale: float):
        bias = self.scaled_dense(scale)  # (B|1, N, T, K)
        one = bias.size(0) == 1
        return lambda s, b, h, qi, ki: s + bias[0 if one else b, h, qi, ki]


class RelativeTerm(PositionTerm):
    """The paper's BD term: (q_i + v) . W_kR R_{M+i-j}.

    q_pos (B, N, T, H): query plus position bias v. r (N, R, H): projected sinusoids for distances
    R-1 .. 0 (row c is distance R-1-c); R = K for the dense view. klen: K (default R).
    """

    def __init__(self, q_pos: torch.Tensor, r: torch.Tensor, klen: Optional[int] = None,
                 r_t: Optional[torch.Tensor] = None):
        self.q_pos, self.r = q_pos, r
        self.klen = r.size(1) if klen is None else klen
        self.mem = self.klen - q_pos.size(-2)  # M: window position of query 0
        # r_t (N, H, K+1) contiguous: the rows for distances K-1 .. 0 transposed plus a zero spare
        # column, what scaled_dense multiplies by; the layer may hand it over ready-made
        self.r_t = r_t
        self.requires_grad = q_pos.requires_grad or r.requires_grad or (r_t is not None and r_t.requires_grad)

    def _r_rows(self, K: int) -> torch.Tensor:
        R = self.r.size(1)
        if R < K:
            raise ValueError(f"RelativeTerm needs r for {K} distances, has {R}")
        return self.r[:, R - K:]  # distances K-1 .. 0

    def dense(self) -> torch.Tensor:  # the readable reference: one matmul + rel_shift
        return rel_shift(torch.matmul(self.q_pos, self._r_rows(self.klen).transpose(-1, -2)))

    def scaled_dense(self, scale: float) -> torch.Tensor:
        # Scale the (T, H) queries, not the (T, K) scores. One matmul batched over heads, the batch
        # folded into the rows: r is shared by the batch, never expanded (a broadcast matmul copies
        # it B times and keeps the copy for backward), and read untransposed (N, H, K+1) (a
        # transposed operand runs this shape 2-3x slower), its zero spare column making the output
        # the buffer _full_shift views: no pad, no copy. A (B, N, T, K) view of a fresh buffer.
        K, r_t = self.klen, self.r_t
        if r_t is None or r_t.size(-1) != K + 1:
            r = self._r_rows(K)
            r_t = torch.cat([r, r.new_zeros(r.size(0), 1, r.size(2))], dim=1).transpose(1, 2).contiguous()
        N, H = r_t.size(0), r_t.size(1)
        qp = self.q_pos * scale
        B, T = qp.size(0), qp.size(-2)
        raw = torch.matmul(qp.transpose(0, 1).reshape(N, B * T, H), r_t)  # (N, B*T, K+1)
        return _full_shift(raw.view(N * B, T, K + 1), K).view(N, B, T, K).transpose(0, 1)

    def block(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        # Only the C + L distances this block needs: (C, H) x (H, L + C) instead of (T, K).
        C, L, R = q1 - q0, k1 - k0, self.r.size(1)
        d_hi = self.mem + q0 - k0 + C - 1  # distance held by raw column 0
        if d_hi > R - 1:
            raise ValueError(f"RelativeTerm.block needs distance {d_hi}, r holds 0 .. {R - 1}")
        n_neg = max(0, L + C - 1 - d_hi)  # raw columns at distances < 0: future keys, masked anyway
        rows = self.r[:, R - 1 - d_hi: R - 1 - d_hi + L + C - n_neg]  # distances d_hi, d_hi - 1, ...
        if n_neg:
            rows = torch.cat([rows, rows.new_zeros(rows.size(0), n_neg, rows.size(2))], dim=1)  # (N, L+C, H)
        raw = torch.matmul(self.q_pos[..., q0:q1, :], rows.transpose(-1, -2))  # (B, N, C, L+C)
        return band_shift(raw, L)

    def score_mod(self, scale: float):
        # Keep the raw (B, N, T, R) scores and index them by distance: no shifted copy at all.
        R, M = self.r.size(1), self.mem
        raw = torch.matmul(self.q_pos * scale, self.r.transpose(-1, -2))

        def mod(s, b, h, qi, ki):
            return s + raw[b, h, qi, R - 1 - (M + qi - ki).clamp(0, R - 1)]
        return mod


def _full_shift(raw: torch.Tensor, K: int) -> torch.Tensor:
    """raw (..., T, K+1) contiguous, column c = distance K-1-c (column K spare) -> (..., T, K)
    with [i, j] = raw[i, j + T - 1 - i], as a view: row i starts at flat offset T-1 + i*K."""
    *lead, T, W = raw.shape
    return raw.reshape(*lead, T * W)[..., T - 1: T - 1 + T * K].view(*lead, T, K)


class AlibiTerm(PositionTerm):
    """ALiBi: -slope_n * (M + i - j), computed from indices (never stored for the flex path).
    slopes (N,) are in pre-scaling units (the layer divides the paper's slopes by the scale)."""

    def __init__(self, slopes: torch.Tensor, T: int, M: int):
        self.slopes, self.T, self.mem = slopes, T, M

    def _bias(self, slopes, q0, q1, k0, k1):
        dev = slopes.device
        qpos = torch.arange(q0, q1, device=dev)[:, None] + self.mem
        dist = (qpos - torch.arange(k0, k1, device=dev)[None, :]).clamp(min=0)  # future: masked
        return (-slopes[:, None, None] * dist).unsqueeze(0)  # (1, N, C, L)

    def dense(self):
        return self._bias(self.slopes, 0, self.T, 0, self.mem + self.T)

    def block(self, q0, q1, k0, k1):
        return self._bias(self.slopes, q0, q1, k0, k1)

    def scaled_dense(self, scale):
        return self._bias(self.slopes * scale, 0, self.T, 0, self.mem + self.T)

    def score_mod(self, scale):
        s_, M = self.slopes * scale, self.mem
        return lambda s, b, h, qi, ki: s - s_[h] * (M + qi - ki).clamp(min=0)


class BiasTerm(PositionTerm):
    """A precomputed additive bias, (N, T, K) or (B|1, N, T, K)."""

    def __init__(self, bias: torch.Tensor):
        self.bias = bias if bias.dim() == 4 else bias.unsqueeze(0)
        self.requires_grad = bias.requires_grad

    def dense(self):
        return self.bias


# ---- backends ----------------------------------------------------------------------------
# A backend: (q, k, v, pos, blocked, scale, dropatt, training, need_weights) -> (out, probs or None)
# q (B, N, T, H) already holds the content bias u; k, v (B, N, K, H); blocked (T, K) or (B, 1, T, K).
Backend = Callable[..., tuple]
BACKENDS: dict[str, Backend] = {}
BACKEND_CAPS: dict[str, dict] = {}  # what each backend supports; AttnConfig validates against it


def register_backend(name: str, patterns=PATTERNS, scores=("dot",), kinds=POSITION_KINDS,
                     native_mask: bool = False):
    """native_mask: the backend applies sparse patterns itself from the full (T, K) mask (flex);
    otherwise local / block_sparse / bigbird run through sparse.py's banded engine, which calls
    the backend on each query chunk with only the keys that chunk may see."""
    def deco(fn):
        BACKENDS[name] = fn
        BACKEND_CAPS[name] = dict(patterns=tuple(patterns), scores=tuple(scores), kinds=tuple(kinds),
                                  native_mask=native_mask)
        return fn
    return deco


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid backends: {sorted(BACKENDS)}")
    return BACKENDS[name]


def _neg_inf(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min if dtype in (torch.float16, torch.bfloat16) else float("-inf")


_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)


def topk_blocked(score: torch.Tensor, blocked: torch.Tensor, k: int) -> torch.Tensor:
    """(..., T, K) True where a key is not among the query's k best allowed scores (or blocked)."""
    score = score.detach().masked_fill(blocked, _neg_inf(score.dtype))
    if k >= score.size(-1):
        return blocked.expand(score.shape)
    keep = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    keep.scatter_(-1, score.topk(k, dim=-1).indices, True)
    return blocked | ~keep  # a query with fewer than k allowed keys keeps only those


def attend(score, v, blocked, dropatt=0.0, training=False, need_weights=False, topk=0):
    """Masked softmax of final (already scaled) scores (B, N, T, K), then the weighted sum of v."""
    if topk:
        blocked = topk_blocked(score, blocked, topk)
    score = score.masked_fill(blocked, _neg_inf(score.dtype))
    prob = torch.softmax(score.float(), dim=-1).to(v.dtype)
    prob_d = F.dropout(prob, dropatt, training) if dropatt > 0 else prob
    return torch.matmul(prob_d, v), (prob if need_weights else None)


@register_backend("rel_ref", scores=("dot", "additive"))
def rel_ref(q, k, v, pos: Optional[PositionTerm], blocked, scale: float, dropatt: float = 0.0,
            training: bool = False, need_weights: bool = False, topk: int = 0):
    """Readable reference: matmul scores AC + BD (rel_shift), scale, mask, softmax. The ground truth."""
    score = torch.matmul(q, k.transpose(-1, -2))  # (B, N, T, K): AC
    if pos is not None:
        score = score + pos.dense()  # + BD
    return attend(score * scale, v, blocked, dropatt, training, need_weights, topk)


def _blocked_runs(blocked: torch.Tensor) -> list:
    """[(start, end)] column ranges of the (.., T, K) mask holding a blocked entry. Every layer gets
    the same mask object: the ranges are remembered on it (keyed by its version)."""
    version = -1 if blocked.is_inference() else blocked._version  # inference tensors have none
    memo = getattr(blocked, "_txl_runs", None)
    if memo is not None and memo[0] == version:
        return memo[1]
    cols = blocked.reshape(-1, blocked.size(-1)).any(0).tolist()
    runs, j = [], 0
    while j < len(cols):
        e = j
        while e < len(cols) and cols[e]:
            e += 1
        if e > j:
            runs.append((j, e))
        j = e + 1
    blocked._txl_runs = (version, runs)
    return runs


def fill_blocked_(x: torch.Tensor, blocked: torch.Tensor, value: float) -> torch.Tensor:
    """x.masked_fill_(blocked, value), touching only the key columns some query cannot see (with a
    long memory the causal / same_length corners are a few % of the (T, K) scores)."""
    for j, e in _blocked_runs(blocked):
        x[..., j:e].masked_fill_(blocked[..., j:e], value)
    return x


@register_backend("rel_fused", patterns=tuple(p for p in PATTERNS if p != "topk"))
def rel_fused(q, k, v, pos: Optional[PositionTerm], blocked, scale: float, dropatt: float = 0.0,
              training: bool = False, need_weights: bool = False):
    """Same scores, fewest passes over (B, N, T, K): scale * BD (one matmul, shifted as a view) is
    masked in place and, when nothing needs its gradient, handed to the fused SDPA kernel as the
    float bias. With gradients (training) the fused CPU kernel cannot differentiate the bias and
    SDPA would fall back to its unfused path plus extra passes: do that math directly, in place."""
    if need_weights:
        return rel_ref(q, k, v, pos, blocked, scale, dropatt, training, True)
    neg = _neg_inf(q.dtype)
    if pos is None:
        bias = torch.zeros(blocked.shape, dtype=q.dtype, device=q.device)
    else:
        bias = pos.scaled_dense(scale).to(q.dtype)  # (B|1, N, T, K), a fresh buffer: ours to overwrite
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or bias.requires_grad)
    if not grad:
        fill_blocked_(bias, blocked, neg)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropatt if training else 0.0,
                                             scale=scale)
        return out, None
    score = torch.matmul(q * scale, k.transpose(-1, -2)).add_(bias)  # (B, N, T, K)
    fill_blocked_(score, blocked, neg)
    prob = torch.softmax(score.float(), dim=-1).to(v.dtype)
    prob = F.dropout(prob, dropatt, training) if dropatt > 0 else prob
    return torch.matmul(prob, v), None


_FLEX: dict = {}


def _flex_attention(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention
    if device.type == "cpu":  # eager CPU flex: unfused but exact (the only way to test it here)
        return flex_attention
    if "compiled" not in _FLEX:  # GPUs: the fused kernel needs torch.compile
        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["compiled"]


@register_backend("flex", patterns=tuple(p for p in PATTERNS if p != "topk"), native_mask=True)
def flex(q, k, v, pos: Optional[PositionTerm], blocked, scale: float, dropatt: float = 0.0,
         training: bool = False, need_weights: bool = False):
    """FlexAttention: the position term as a score_mod (relative: raw (q+v).r indexed by distance,
    ALiBi: from indices), the mask (causal & pattern) as a block_mask whose empty blocks the GPU
    kernel skips. Falls back to rel_fused (one warning) where flex cannot do the job: attention
    dropout in training, and any call needing gradients on CPU (torch has no CPU flex backward).
    need_weights: rel_ref (flex does not return probabilities)."""
    if need_weights:
        return rel_ref(q, k, v, pos, blocked, scale, dropatt, training, True)
    if training and dropatt > 0:
        _warn_once("attention backend 'flex' has no attention dropout: using rel_fused for dropatt > 0")
        return rel_fused(q, k, v, pos, blocked, scale, dropatt, training)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or (pos is not None and pos.requires_grad))
    if grad and q.device.type == "cpu":
        _warn_once("attention backend 'flex': FlexAttention has no CPU backward in this torch; "
                   "computing with rel_fused whenever gradients are needed on CPU")
        return rel_fused(q, k, v, pos, blocked, scale, dropatt, training)
    from torch.nn.attention.flex_attention import create_block_mask
    B, T, K = q.size(0), q.size(-2), k.size(-2)
    if blocked.dim() == 2:
        mask_mod, mB = (lambda b, h, qi, ki: ~blocked[qi, ki]), None
    else:
        full = blocked.expand(B, 1, T, K)
        mask_mod, mB = (lambda b, h, qi, ki: ~full[b, 0, qi, ki]), B
    block_mask = create_block_mask(mask_mod, mB, None, T, K, device=q.device)
    score_mod = pos.score_mod(scale) if pos is not None else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = _flex_attention(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    return out, None


# ---- additive (Bahdanau) compatibility ---------------------------------------------------
def additive_scores(q, k, w_q, w_k, w):
    """e[b, n, i, j] = w_n . tanh(W_q,n q_i + W_k,n k_j). q (B, N, T, H), k (B, N, K, H),
    w_q, w_k (N, H, H), w (N, H) -> (B, N, T, K). Memory O(B N T K H): dense only."""
    qa = torch.matmul(q, w_q)  # (B, N, T, H)
    ka = torch.matmul(k, w_k)  # (B, N, K, H)
    feat = torch.tanh(qa.unsqueeze(-2) + ka.unsqueeze(-3))  # (B, N, T, K, H)
    return torch.matmul(feat, w[:, None, :, None]).squeeze(-1)


def additive_attention(q, k, v, pos: Optional[PositionTerm], blocked, scale: float, w_q, w_k, w,
                       dropatt: float = 0.0, training: bool = False, need_weights: bool = False):
    """score = additive content term (unscaled, as Bahdanau) + scale * position term (the paper's
    BD for kind=relative, where q already holds u so the content term sees q + u)."""
    score = additive_scores(q, k, w_q, w_k, w)
    if pos is not None:
        score = score + pos.dense() * scale
    return attend(score, v, blocked, dropatt, training, need_weights)
