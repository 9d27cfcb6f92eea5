"""Position terms: what is added to q.k *before* the 1/sqrt(H) scaling, in the forms a backend asks
for. dense() is the readable definition; block / scaled_dense / score_mod are faster forms of it
(tests/test_attention_backends.py proves them equal)."""
from __future__ import annotations

from typing import Optional

import torch

from .masks import distance, distance_grid
from .shift import band_shift, full_shift, rel_shift


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
        # the buffer full_shift views: no pad, no copy. A (B, N, T, K) view of a fresh buffer.
        K, r_t = self.klen, self.r_t
        if r_t is None or r_t.size(-1) != K + 1:
            r = self._r_rows(K)
            r_t = torch.cat([r, r.new_zeros(r.size(0), 1, r.size(2))], dim=1).transpose(1, 2).contiguous()
        N, H = r_t.size(0), r_t.size(1)
        qp = self.q_pos * scale
        B, T = qp.size(0), qp.size(-2)
        raw = torch.matmul(qp.transpose(0, 1).reshape(N, B * T, H), r_t)  # (N, B*T, K+1)
        raw = raw.view(N * B, T, K + 1)
        # without gradients a plain view: backends may fill it in place (a custom Function's view may not)
        return _ShiftedScores.apply(raw, N, K) if raw.requires_grad else _shifted(raw, N, K)

    def block(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        # Only the C + L distances this block needs: (C, H) x (H, L + C) instead of (T, K).
        C, L, R = q1 - q0, k1 - k0, self.r.size(1)
        d_hi = distance(q0 + C - 1, k0, self.mem)  # distance held by raw column 0
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
            return s + raw[b, h, qi, R - 1 - distance(qi, ki, M).clamp(0, R - 1)]
        return mod


def _shifted(raw: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """(N*B, T, K+1) raw position scores -> the (B, N, T, K) shifted view scaled_dense returns."""
    NB, T = raw.size(0), raw.size(1)
    return full_shift(raw, K).view(N, NB // N, T, K).transpose(0, 1)


class _ShiftedScores(torch.autograd.Function):
    """_shifted with a one-pass backward: the gradient is written straight through the same view
    into a zeroed raw buffer. (Autograd's chain of view backwards first makes the transposed
    gradient contiguous, then copies it into the zeroed slice: two (B, N, T, K) copies per layer.)
    Every raw entry is read at most once by the view, so the copy is the whole gradient."""

    @staticmethod
    def forward(ctx, raw, N: int, K: int):
        ctx.shape, ctx.N, ctx.K = raw.shape, N, K
        return _shifted(raw, N, K)

    @staticmethod
    def backward(ctx, grad):
        g_raw = grad.new_zeros(ctx.shape)
        _shifted(g_raw, ctx.N, ctx.K).copy_(grad)
        return g_raw, None, None


class AlibiTerm(PositionTerm):
    """ALiBi: -slope_n * (M + i - j), computed from indices (never stored for the flex path).
    slopes (N,) are in pre-scaling units (the layer divides the paper's slopes by the scale)."""

    def __init__(self, slopes: torch.Tensor, T: int, M: int):
        self.slopes, self.T, self.mem = slopes, T, M

    def _bias(self, slopes, q0, q1, k0, k1):
        dist = distance_grid(self.mem, q0, q1, k0, k1, slopes.device).clamp(min=0)  # future: masked
        return (-slopes[:, None, None] * dist).unsqueeze(0)  # (1, N, C, L)

    def dense(self):
        return self._bias(self.slopes, 0, self.T, 0, self.mem + self.T)

    def block(self, q0, q1, k0, k1):
        return self._bias(self.slopes, q0, q1, k0, k1)

    def scaled_dense(self, scale):
        return self._bias(self.slopes * scale, 0, self.T, 0, self.mem + self.T)

    def score_mod(self, scale):
        s_, M = self.slopes * scale, self.mem
        return lambda s, b, h, qi, ki: s - s_[h] * distance(qi, ki, M).clamp(min=0)


class BiasTerm(PositionTerm):
    """A precomputed additive bias, (N, T, K) or (B|1, N, T, K)."""

    def __init__(self, bias: torch.Tensor):
        self.bias = bias if bias.dim() == 4 else bias.unsqueeze(0)
        self.requires_grad = bias.requires_grad

    def dense(self):
        return self.bias
