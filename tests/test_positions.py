"""Position kinds together with memory: a text processed in segments (memory holding the whole past)
equals one pass over it, for every kind, every backend that supports it and the patterns whose keys
do not depend on where the segment starts. Plus the position functions against their definitions."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from txl.model import TransformerXL, TXLConfig
from txl.model.attention import BACKEND_CAPS
from txl.model.config import POSITION_KINDS
from txl.model.positions import alibi_slopes, relative_distances, rotate, sinusoid

V, T, S = 40, 4, 3  # vocabulary, segment length, segments

PATTERNS = [dict(pattern="dense"), dict(pattern="local", window=5), dict(pattern="topk", topk=3),
            # blocks are anchored at the segment start: T % block_size == 0 keeps them where one pass has them
            dict(pattern="block_sparse", block_size=2, n_prev=1, n_global=1)]
# every kind with every backend (dense); every pattern with every backend (relative); every kind
# with the banded engine (local drops old memory keys: positions must survive the offset)
CASES = sorted({(kind, backend, i) for kind in POSITION_KINDS for backend in BACKEND_CAPS for i, pat in enumerate(PATTERNS)
                if pat["pattern"] in BACKEND_CAPS[backend]["patterns"] and kind in BACKEND_CAPS[backend]["kinds"]
                and (i == 0 or kind == "relative" or (i == 1 and backend == "rel_fused"))})
CASES = [(kind, backend, PATTERNS[i]) for kind, backend, i in CASES]


def _model(kind, backend="rel_ref", clamp_len=-1, mem_len=T * S, **attn):
    torch.manual_seed(0)
    cfg = TXLConfig(vocab_size=V, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, kind=kind,
                    init_std=0.2, attn=dict(backend=backend, **attn),
                    seq=dict(tgt_len=T, mem_len=mem_len, clamp_len=clamp_len))
    model = TransformerXL(cfg).eval()
    with torch.no_grad():  # non-zero u, v so the position biases matter
        for name, p in model.named_parameters():
            if name.endswith((".u", ".v")):
                p.normal_(0, 0.5)
    return model


def _segments_vs_whole(model, grad: bool):
    ids = torch.randint(0, V, (2, T * S), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, V, (2, T * S), generator=torch.Generator().manual_seed(2))
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex's one-time CPU fallback notice
        whole = model(ids, labels=labels)
        mems, hid, nll = None, [], []
        for s in range(S):
            out = model(ids[:, s * T:(s + 1) * T], mems=mems, labels=labels[:, s * T:(s + 1) * T])
            mems = out.mems
            hid.append(out.hidden)
            nll.append(out.nll)
    assert mems[0].size(1) == T * S  # the memory really held the whole past
    torch.testing.assert_close(torch.cat(hid, 1), whole.hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(nll, 1), whole.nll, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,backend,pat", CASES, ids=lambda x: x["pattern"] if isinstance(x, dict) else x)
def test_segments_equal_one_pass(kind, backend, pat):
    # without grad, flex runs FlexAttention itself on CPU (with grad it is rel_fused, tested there)
    _segments_vs_whole(_model(kind, backend, **pat), grad=backend != "flex")


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_segments_equal_one_pass_with_clamp_len(kind):
    _segments_vs_whole(_model(kind, "rel_fused", clamp_len=3), grad=False)


def test_segments_equal_one_pass_additive():
    _segments_vs_whole(_model("relative", "rel_ref", score="additive"), grad=False)


def test_short_memory_differs_from_one_pass():
    """Sanity of the check above: with memory shorter than the past, the segments see less."""
    model = _model("rotary", mem_len=T)
    ids = torch.randint(0, V, (1, T * S), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(ids).hidden
        mems, last = None, None
        for s in range(S):
            out = model(ids[:, s * T:(s + 1) * T], mems=mems)
            mems, last = out.mems, out.hidden
    assert not torch.allclose(last, whole[:, -T:], atol=1e-4)


# ---- the position functions ---------------------------------------------------------------
def test_sinusoid_layout():
    pos = torch.tensor([0.0, 3.0, 7.5])
    got = sinusoid(pos, 6)
    for a, p in enumerate(pos.tolist()):
        ang = [p / 10000 ** (2 * k / 6) for k in range(3)]
        want = torch.tensor([math.sin(x) for x in ang] + [math.cos(x) for x in ang])
        torch.testing.assert_close(got[a], want)


def test_relative_distances_descend_and_clamp():
    assert relative_distances(5, -1).tolist() == [4, 3, 2, 1, 0]
    assert relative_distances(5, 2).tolist() == [2, 2, 2, 1, 0]


def test_rotate_is_a_rotation_and_scores_depend_on_distance_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 8, dtype=torch.float64), torch.randn(1, 2, 5, 8, dtype=torch.float64)
    pos = torch.arange(5)
    qr, kr = rotate(q, pos), rotate(k, pos)
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))
    s0 = qr @ kr.transpose(-1, -2)
    s7 = rotate(q, pos + 7) @ rotate(k, pos + 7).transpose(-1, -2)  # shifting every position: same scores
    torch.testing.assert_close(s0, s7, rtol=1e-6, atol=1e-6)
    # pair (c, c + H/2) turns by angle pos / 10000^(2c/H)
    c, p = 1, 3
    ang = p / 10000 ** (2 * c / 8)
    x1, x2 = q[0, 0, p, c], q[0, 0, p, c + 4]
    torch.testing.assert_close(qr[0, 0, p, c], x1 * math.cos(ang) - x2 * math.sin(ang))
    torch.testing.assert_close(qr[0, 0, p, c + 4], x1 * math.sin(ang) + x2 * math.cos(ang))


def test_alibi_slopes_known_answers():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads (not a power of 2): the 8-head slopes, then every other 16-head slope
    want = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 * i + 0.5) for i in (0, 2, 4, 6)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(want))


def test_alibi_layer_uses_the_papers_slopes_on_scaled_scores():
    """softmax(q.k / sqrt(H) - m * distance): the slope is not divided by sqrt(H)."""
    model = _model("alibi")
    ids = torch.randint(0, V, (1, T))
    seen = []
    att = model.blocks[0].attn
    hook = att.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        prob = model(ids, need_weights=True).attn[0]
        hook.remove()
        x = seen[0]
        N, H = 2, 16
        q, k, _ = att.qkv(x).split(N * H, -1)
        q, k = q.view(1, T, N, H).transpose(1, 2), k.view(1, T, N, H).transpose(1, 2)
        dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp(min=0)  # no memory: i - j
        score = q @ k.transpose(-1, -2) / math.sqrt(H) - alibi_slopes(N)[:, None, None] * dist
        score = score.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(prob, score.softmax(-1))
