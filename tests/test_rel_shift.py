"""rel_shift, causal_mask and the full relative attention score against explicit per-(i, j) constructions.

Convention (Dai et al. 2019, appendix B): query i sits at window position M + i, key j at j, so the
relative distance is M + i - j; raw position scores put distance K-1-c in column c.
"""
import math

import pytest
import torch

from txl.model import TXLConfig, TransformerXL, causal_mask, rel_shift
from txl.model.attention import RelativeTerm, rel_ref

SIZES = [(T, M) for T in (1, 2, 5, 7) for M in (0, 1, 3, 9)]


def _visible(T, M):
    """(T, K) bool: key j is at or before query i (j <= M + i)."""
    return torch.arange(M + T)[None, :] <= torch.arange(T)[:, None] + M


@pytest.mark.parametrize("T,M", SIZES)
@pytest.mark.parametrize("lead", [(), (2,), (2, 3)])
def test_rel_shift_matches_explicit_bd(T, M, lead):
    torch.manual_seed(T * 31 + M)
    K, H = M + T, 4
    q_pos = torch.randn(*lead, T, H, dtype=torch.float64)  # q_i + v
    r = torch.randn(K, H, dtype=torch.float64)  # r[c] encodes distance K-1-c
    got = rel_shift(q_pos @ r.T)  # (..., T, K)
    want = torch.zeros_like(got)
    for i in range(T):
        for j in range(M + i + 1):
            want[..., i, j] = (q_pos[..., i, :] * r[K - 1 - (M + i - j)]).sum(-1)
    vis = _visible(T, M)
    assert got.shape == (*lead, T, K)
    torch.testing.assert_close(got[..., vis], want[..., vis], rtol=0, atol=1e-12)


@pytest.mark.parametrize("T,M", SIZES)
def test_rel_shift_is_the_documented_gather(T, M):
    K = M + T
    x = torch.arange(2 * T * K, dtype=torch.float32).view(2, T, K)  # every entry distinct
    got = rel_shift(x)
    for i in range(T):
        for j in range(M + i + 1):
            assert torch.equal(got[:, i, j], x[:, i, j + T - 1 - i]), (i, j)


def test_rel_shift_does_not_modify_input():
    x = torch.randn(2, 3, 4, 9)
    before = x.clone()
    rel_shift(x)
    assert torch.equal(x, before)


# ---- causal_mask ---------------------------------------------------------------------------
def test_causal_mask_known_answer():
    # T=3 queries after M=2 memory keys: query i sees keys 0 .. 2+i
    want = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(causal_mask(3, 2), want)
    assert causal_mask(3, 2).dtype == torch.bool


def test_same_length_known_answer():
    # memory full (M = mem_len = 2): every query sees exactly 2 keys, the last one itself
    want = torch.tensor([[1, 0, 0, 1, 1], [1, 1, 0, 0, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(causal_mask(3, 2, same_length=True, mem_len=2), want)


def _original_same_length(T, M, mem_len):
    """The released PyTorch code's formula (also Hugging Face's): triu(1 + mlen) + tril(-shift)."""
    K = M + T
    ones = torch.ones(T, K)
    mask_len = K - mem_len
    shift = T - mask_len if mask_len > 0 else T
    return (torch.triu(ones, 1 + M) + torch.tril(ones, -shift)).bool()


@pytest.mark.parametrize("T,M", SIZES)
@pytest.mark.parametrize("mem_len", [1, 3, 9, 20])
def test_same_length_window(T, M, mem_len):
    blocked = causal_mask(T, M, same_length=True, mem_len=mem_len)
    assert torch.equal(blocked, _original_same_length(T, M, mem_len))
    # each query sees a contiguous window ending at itself of min(mem_len, M + i + 1) keys
    for i in range(T):
        seen = (~blocked[i]).nonzero().squeeze(1).tolist()
        n = min(mem_len, M + i + 1)
        assert seen == list(range(M + i + 1 - n, M + i + 1)), (i, seen)
    if M == mem_len:  # memory full: every query sees exactly mem_len keys
        assert ((~blocked).sum(1) == mem_len).all()


@pytest.mark.parametrize("T,M", SIZES)
def test_causal_mask_plain(T, M):
    assert torch.equal(causal_mask(T, M), ~_visible(T, M))
    # same_length with a memory longer than the whole window changes nothing
    assert torch.equal(causal_mask(T, M, same_length=True, mem_len=M + T), ~_visible(T, M))


# ---- rel_ref on its own ----------------------------------------------------------------------
@pytest.mark.parametrize("T,M", [(1, 0), (4, 0), (4, 3), (3, 8)])
def test_rel_ref_equals_explicit_attention(T, M):
    torch.manual_seed(0)
    B, N, H, K = 2, 3, 4, M + T
    q, qv = torch.randn(B, N, T, H), torch.randn(B, N, T, H)  # q + u, q + v
    k, v, r = torch.randn(B, N, K, H), torch.randn(B, N, K, H), torch.randn(N, K, H)
    blocked = causal_mask(T, M)
    out, prob = rel_ref(q, k, v, RelativeTerm(qv, r), blocked, 0.5, need_weights=True)
    score = torch.full((B, N, T, K), float("-inf"))
    for i in range(T):
        for j in range(M + i + 1):
            ac = (q[:, :, i] * k[:, :, j]).sum(-1)
            bd = (qv[:, :, i] * r[:, K - 1 - (M + i - j)]).sum(-1)
            score[:, :, i, j] = 0.5 * (ac + bd)
    p = score.softmax(-1)
    torch.testing.assert_close(prob, p)
    torch.testing.assert_close(out, p @ v)


# ---- the whole relative attention of a layer ----------------------------------------------
def _paper_sinusoid(d: float, D: int) -> torch.Tensor:
    """R_d in Transformer-XL's layout: [sin(d / 10000^(2k/D)) for k] + [cos(...) for k]."""
    ang = [d / 10000 ** (2 * k / D) for k in range(D // 2)]
    return torch.tensor([math.sin(a) for a in ang] + [math.cos(a) for a in ang])


@pytest.mark.parametrize("clamp_len", [-1, 2])
@pytest.mark.parametrize("M", [0, 5])
@pytest.mark.parametrize("untie_r,pre_lnorm", [(True, False), (False, True)])
def test_layer_scores_match_paper_formula(clamp_len, M, untie_r, pre_lnorm):
    """prob[b, n, i, j] = softmax_j( ((q_i+u).k_j + (q_i+v).W_kR R_{M+i-j}) / sqrt(H) ), j <= M+i."""
    torch.manual_seed(1)
    cfg = TXLConfig(vocab_size=50, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, untie_r=untie_r,
                    pre_lnorm=pre_lnorm, init_std=0.3, seq=dict(tgt_len=4, mem_len=8, clamp_len=clamp_len))
    model = TransformerXL(cfg).eval()
    B, T, N, H = 2, 4, cfg.n_head, cfg.d_head
    K = M + T
    mems = [torch.randn(B, M, 32) for _ in range(cfg.n_layer)]
    seen = []
    hooks = [blk.attn.register_forward_pre_hook(lambda mod, args: seen.append(args[:2])) for blk in model.blocks]
    out = model(torch.randint(0, 50, (B, T)), mems=mems, need_weights=True)
    for hk in hooks:
        hk.remove()
    for layer, (blk, (x, mem)) in enumerate(zip(model.blocks, seen)):
        att = blk.attn
        assert torch.equal(mem, mems[layer])
        h = torch.cat([mem, x], 1)  # (B, K, D)
        h = att.ln(h) if pre_lnorm else h
        q, k, _ = att.qkv(h).split(N * H, -1)
        q, k = q[:, M:].view(B, T, N, H), k.view(B, K, N, H)
        u, v = (att.u, att.v) if untie_r else (model.u, model.v)
        want = torch.full((B, N, T, K), float("-inf"))
        for i in range(T):
            for j in range(M + i + 1):
                d = M + i - j
                d = min(d, clamp_len) if clamp_len > 0 else d
                r = att.r_proj(_paper_sinusoid(d, 32)).view(N, H)  # W_kR R_d per head
                s = ((q[:, i] + u) * k[:, j]).sum(-1) + ((q[:, i] + v) * r).sum(-1)  # (B, N)
                want[:, :, i, j] = s / math.sqrt(H)
        got = out.attn[layer]
        vis = _visible(T, M)
        assert torch.equal(got[..., ~vis], torch.zeros_like(got[..., ~vis]))  # future keys get no weight
        # log-probabilities keep every score difference: a sharp check of the scores themselves
        torch.testing.assert_close(got.log()[..., vis], want.log_softmax(-1)[..., vis], rtol=1e-5, atol=1e-5)
