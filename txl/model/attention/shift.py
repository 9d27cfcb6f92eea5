"""The relative shift: raw position scores, one column per *distance*, -> scores per (query, key).

rel_shift is the one readable reference (Dai et al. 2019, appendix B). band_shift and full_shift
are the fast views that replace it where the raw scores are laid out for them (no pad, no copy);
tests/test_shift.py proves each equal to rel_shift on the entries a query may see.
Shapes as in the package legend: T queries, K = M + T keys; query i sits at window position M + i.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """Turn raw position scores into relative-distance scores (the reference).

    x (..., T, K): column c holds the score against distance K-1-c (the same for every query).
    Returns (..., T, K) whose [i, j] holds x[i, j + T - 1 - i]: the score for distance M + i - j,
    the true distance between query i (window position M + i) and key j. Entries with j > M + i
    (future keys) are garbage and must be masked. One zero pad + reshape instead of a gather.
    """
    *lead, T, K = x.shape
    x = F.pad(x, (1, 0))  # (..., T, K+1): a zero column in front
    x = x.view(*lead, K + 1, T)[..., 1:, :]  # drop the first row of the re-read matrix
    return x.reshape(*lead, T, K)


def full_shift(raw: torch.Tensor, K: int) -> torch.Tensor:
    """rel_shift as a view of a buffer with one spare column. raw (..., T, K+1) contiguous, column c
    = distance K-1-c (column K spare) -> (..., T, K) with [i, j] = raw[i, j + T - 1 - i]: row i
    starts at flat offset T-1 + i*K."""
    *lead, T, W = raw.shape
    return raw.reshape(*lead, T * W)[..., T - 1: T - 1 + T * K].view(*lead, T, K)


def band_shift(x: torch.Tensor, L: int) -> torch.Tensor:
    """The rel_shift of a sub-block, as a view. x (..., C, L + C) contiguous, column c holding the
    score against distance d_hi - c. Returns (..., C, L) with out[t, c] = x[t, c + C - 1 - t], i.e.
    distance d_hi - C + 1 + t - c. Row t starts C-1-t columns in: read the flat buffer with row
    stride L + C - 1 from offset C - 1 (no copy; the last input column is never read)."""
    *lead, C, W = x.shape
    assert W == L + C, (W, L, C)
    flat = x.reshape(*lead, C * W)
    return flat[..., C - 1: C - 1 + C * (W - 1)].view(*lead, C, W - 1)[..., :L]
