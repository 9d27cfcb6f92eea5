"""Attention math: pure functions, and the BACKENDS registry.

Shape legend
  B batch   T segment (query) length   M memory length   K = M + T keys
  N heads   H head dim                 D model dim       V vocabulary

A *backend* decides how the scores are computed, never what they are: every backend must give
rel_ref's result (tests/test_attention_backends.py) and none owns parameters. The position term
(relative BD, ALiBi) arrives as a PositionTerm so a backend may compute it densely or not at all.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F


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


class PositionTerm(Protocol):
    def dense(self) -> torch.Tensor:  # (B or 1, N, T, K), added to q.k before scaling
        ...


class RelativeTerm:
    """The paper's BD term: (q + v) . W_kR R_{i-j}, via rel_shift."""

    def __init__(self, q_pos: torch.Tensor, r: torch.Tensor):
        self.q_pos = q_pos  # (B, N, T, H): query plus position bias v
        self.r = r  # (N, K, H): projected sinusoids for distances K-1 .. 0

    def dense(self) -> torch.Tensor:
        return rel_shift(torch.matmul(self.q_pos, self.r.transpose(-1, -2)))  # (B, N, T, K)


class BiasTerm:
    """A precomputed additive bias such as ALiBi's, (N, T, K)."""

    def __init__(self, bias: torch.Tensor):
        self.bias = bias

    def dense(self) -> torch.Tensor:
        return self.bias.unsqueeze(0)


# A backend: (q, k, v, pos, blocked, scale, dropatt, training, need_weights) -> (out, probs or None)
# q (B, N, T, H) already holds the content bias u; k, v (B, N, K, H); blocked (T, K) or (B, 1, T, K).
Backend = Callable[..., tuple]
BACKENDS: dict[str, Backend] = {}


def register_backend(name: str):
    def deco(fn):
        BACKENDS[name] = fn
        return fn
    return deco


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid backends: {sorted(BACKENDS)}")
    return BACKENDS[name]


def _neg_inf(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min if dtype in (torch.float16, torch.bfloat16) else float("-inf")


@register_backend("rel_ref")
def rel_ref(q, k, v, pos: Optional[PositionTerm], blocked, scale: float, dropatt: float = 0.0,
            training: bool = False, need_weights: bool = False):
    """Readable reference: einsum-style scores, rel_shift, masked softmax. The ground truth."""
    score = torch.matmul(q, k.transpose(-1, -2))  # (B, N, T, K): AC
    if pos is not None:
        score = score + pos.dense()  # + BD
    score = (score * scale).masked_fill(blocked, _neg_inf(score.dtype))
    prob = torch.softmax(score.float(), dim=-1).to(v.dtype)
    prob_d = F.dropout(prob, dropatt, training) if dropatt > 0 else prob
    return torch.matmul(prob_d, v), (prob if need_weights else None)


@register_backend("rel_fused")
def rel_fused(q, k, v, pos: Optional[PositionTerm], blocked, scale: float, dropatt: float = 0.0,
              training: bool = False, need_weights: bool = False):
    """Same scores through the fused SDPA kernel: the position term and mask become one float bias."""
    if need_weights:
        return rel_ref(q, k, v, pos, blocked, scale, dropatt, training, True)
    bias = pos.dense() * scale if pos is not None else q.new_zeros(blocked.shape)
    bias = bias.to(q.dtype).masked_fill(blocked, _neg_inf(q.dtype))  # (B|1, N|1, T, K)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                         dropout_p=dropatt if training else 0.0, scale=scale)
    return out, None
