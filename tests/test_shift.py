"""Each fast view of the relative shift equals the reference rel_shift on every entry a query may see
(future keys hold garbage in all of them and are masked)."""
from __future__ import annotations

import pytest
import torch

from txl.model.attention import band_shift, causal_mask, full_shift, rel_shift


def _scores(T, M, seed=0):
    """f[i, d]: an arbitrary score of query i at distance d (0 .. K-1), float64."""
    return torch.randn(2, T, M + T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _raw(f, K):
    """The raw layout rel_shift reads: column c = distance K-1-c, per query row."""
    return f.flip(-1)[..., -K:]


@pytest.mark.parametrize("T,M", [(1, 0), (4, 0), (5, 7), (8, 3)])
def test_full_shift_equals_rel_shift(T, M):
    K = M + T
    f = _scores(T, M)
    raw = _raw(f, K)
    spare = torch.cat([raw, torch.randn(2, T, 1, dtype=torch.float64)], -1).contiguous()  # (.., T, K+1)
    vis = ~causal_mask(T, M)
    want = rel_shift(raw)
    got = full_shift(spare, K)
    assert got.shape == want.shape
    torch.testing.assert_close(got[..., vis], want[..., vis], rtol=0, atol=0)


@pytest.mark.parametrize("T,M", [(5, 0), (6, 4), (7, 9)])
def test_band_shift_equals_rel_shift_on_every_block(T, M):
    K = M + T
    f = _scores(T, M, seed=1)
    want = rel_shift(_raw(f, K))
    vis = ~causal_mask(T, M)
    for q0 in range(T):
        for q1 in range(q0 + 1, T + 1):
            for k0 in range(M + q1):
                for k1 in range(k0 + 1, M + q1 + 1):
                    C, L = q1 - q0, k1 - k0
                    d_hi = M + q0 + C - 1 - k0  # distance of raw column 0
                    d = d_hi - torch.arange(L + C)  # distances of the block's raw columns
                    rows = f[:, q0:q1][..., d.clamp(min=0)] * (d >= 0)  # (2, C, L+C), future: 0
                    got = band_shift(rows.contiguous(), L)
                    v = vis[q0:q1, k0:k1]
                    torch.testing.assert_close(got[..., v], want[..., q0:q1, k0:k1][..., v], rtol=0, atol=0)


@pytest.mark.parametrize("B,N,T,M", [(1, 1, 4, 0), (2, 3, 5, 7)])
def test_scaled_dense_gradient_is_autograds_through_the_view(B, N, T, M):
    """RelativeTerm.scaled_dense writes its backward by hand (one copy through the shifted view):
    its gradients equal autograd's through the plain view chain, entry for entry, and its forward
    equals scale * dense() where a query may see the key."""
    from txl.model.attention import RelativeTerm
    from txl.model.attention.terms import _shifted
    K, H, g = M + T, 4, torch.Generator().manual_seed(3)
    q = torch.randn(B, N, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(N, K, H, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(B, N, T, K, generator=g, dtype=torch.float64)
    vis = ~causal_mask(T, M)
    term = RelativeTerm(q, r)
    got = term.scaled_dense(0.5)
    torch.testing.assert_close(got[..., vis], (0.5 * term.dense())[..., vis], rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got, [q, r], dout)
    # the same raw matmul, shifted by the view chain autograd differentiates itself
    r_t = torch.cat([r, r.new_zeros(N, 1, H)], dim=1).transpose(1, 2)
    raw = torch.matmul((q * 0.5).transpose(0, 1).reshape(N, B * T, H), r_t).view(N * B, T, K + 1)
    g_want = torch.autograd.grad(_shifted(raw, N, K), [q, r], dout)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
