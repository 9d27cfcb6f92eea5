"""Position encodings as pure functions (no parameters live here).

Kinds (the `kind` field of TXLConfig; each changes what the attention computes):
  relative  the paper's: sinusoids over key *distances*, projected per layer (W_kR), biases u, v
  absolute  vanilla Transformer: sinusoids over window positions, added to the input embedding
  rotary    q, k rotated by their window positions
  alibi     a per-head linear penalty -m_n * distance on the (scaled) scores, Press et al. 2022

All of them use window coordinates: memory key j sits at position j, segment token t at M + t, so
positions of the memory continue into the segment and a text processed in segments (memory holding
the whole past) is scored exactly as in one pass (tests/test_positions.py). Relative, rotary and
ALiBi only ever see distances. Absolute positions cannot: once the memory is full every segment gets
positions mem_len .. mem_len + T - 1 while the cached states kept the positions they were encoded
with (the incoherence that made the paper move to relative positions).
"""
from __future__ import annotations

import math

import torch


def sinusoid(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """pos (L,) float -> (L, dim) as [sin | cos] halves (Transformer-XL's layout, not interleaved)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, dim, 2.0, device=pos.device) / dim))
    ang = pos.float()[:, None] * inv_freq[None, :]  # (L, dim/2)
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


def relative_distances(K: int, clamp_len: int, device=None) -> torch.Tensor:
    """Key distances K-1, ..., 0 (column c of the raw position scores is distance K-1-c), clamped."""
    pos = torch.arange(K - 1, -1, -1.0, device=device)
    if clamp_len > 0:
        pos = pos.clamp(max=clamp_len)
    return pos


def rotate(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding. x (B, N, L, H), pos (L,) absolute positions in the [memory + segment] window."""
    H = x.size(-1)
    inv_freq = 1.0 / (base ** (torch.arange(0, H, 2, device=x.device, dtype=torch.float32) / H))
    ang = pos.float()[:, None] * inv_freq[None, :]  # (L, H/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : H // 2], x[..., H // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Geometric slopes 2^(-8/n), 2^(-16/n), ... (Press et al. 2022), exact for any head count."""
    if math.log2(n_head).is_integer():
        return torch.tensor([2 ** (-8.0 * (i + 1) / n_head) for i in range(n_head)])
    p = 2 ** math.floor(math.log2(n_head))
    extra = alibi_slopes(2 * p)[0::2][: n_head - p]
    return torch.cat([alibi_slopes(p), extra])
