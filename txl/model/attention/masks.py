"""Key distance and masks. Masks are bool, True = the query may NOT see the key.

Coordinates (the whole package): query i sits at window position M + i, key j at j; their
distance is M + i - j (negative: a future key). `distance` is the only place it is computed.
"""
from __future__ import annotations

import torch


def distance(i, j, M: int):
    """Window distance of query i to key j (tensors or ints, broadcast): M + i - j."""
    return M + i - j


def distance_grid(M: int, q0: int, q1: int, k0: int, k1: int, device=None) -> torch.Tensor:
    """(q1-q0, k1-k0) long: distance of queries q0:q1 to keys k0:k1."""
    i = torch.arange(q0, q1, device=device)[:, None]
    return distance(i, torch.arange(k0, k1, device=device)[None, :], M)


def causal_mask(T: int, M: int, same_length: bool = False, mem_len: int = 0,
                device=None) -> torch.Tensor:
    """(T, K) bool, True = the query may NOT see the key. Query i sits at window position M + i.

    same_length: every query sees the same number of keys (the paper's evaluation setting):
    as in the original code, keys at or beyond `shift` below the diagonal are hidden, with
    shift = T - (K - mem_len) when K > mem_len, else T.
    """
    K = M + T
    dist = distance_grid(M, 0, T, 0, K, device)
    blocked = dist < 0
    if same_length:
        mask_len = K - mem_len
        shift = T - mask_len if mask_len > 0 else T
        blocked = blocked | (dist >= M + shift)  # i - j >= shift
    return blocked


def neg_inf(dtype: torch.dtype) -> float:
    """The fill value of hidden scores: -inf, or the dtype's minimum where -inf would overflow."""
    return torch.finfo(dtype).min if dtype in (torch.float16, torch.bfloat16) else float("-inf")


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
