"""Routing attention (Roy et al. 2020): one cluster is dense attention; with several clusters it is
dense rel_ref under the explicit routing mask built here from the centroids; causal; the centroids
are buffers that move by EMA in training only and travel in the state_dict."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from txl.model import TransformerXL, causal_mask
from txl.model.attention import PATTERNS
from txl.model.attention.patterns import Centroids
from txl.model.block import MultiHeadAttention
from txl.model.config import AttnConfig, TXLConfig
from txl.model.positions import relative_distances, sinusoid

ROUTING = [n for n, p in PATTERNS.items() if p.requires == ("n_clusters", "window")][0]  # the name lives in patterns.py


def _cfg(**attn):
    return TXLConfig(vocab_size=50, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, attn=attn,
                     seq=dict(tgt_len=8, mem_len=8))


def _routing(n_clusters, window, **kw):
    return dict(backend="rel_ref", pattern=ROUTING, n_clusters=n_clusters, window=window, **kw)


def _twins(**attn):
    """(dense rel_ref model, routing model) with the same parameters."""
    torch.manual_seed(0)
    ref = TransformerXL(_cfg(backend="rel_ref"))
    rout = TransformerXL(_cfg(**attn))
    missing, unexpected = rout.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("pattern_state.centroids") for k in missing) and missing
    return ref, rout


@pytest.mark.parametrize("train", [False, True])
def test_one_cluster_is_dense_attention(train):
    ref, rout = _twins(**_routing(1, 1))
    ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(1))
    for m in (ref, rout):
        m.train(train)
    mr = mm = None
    for seg in range(2):  # the second segment attends over memory
        a = ref(ids, mems=mr, labels=ids)
        b = rout(ids, mems=mm, labels=ids)
        torch.testing.assert_close(b.loss, a.loss)
        torch.testing.assert_close(b.hidden, a.hidden)
        mr, mm = a.mems, b.mems
    ga = torch.autograd.grad(a.loss, list(ref.parameters()))
    gb = torch.autograd.grad(b.loss, list(rout.parameters()))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x)


def test_routing_is_dense_under_the_explicit_routing_mask():
    """Several clusters: the layer equals rel_ref given the mask built here from q, k and the centroids."""
    torch.manual_seed(0)
    T, M, N, H, C, w = 6, 5, 2, 16, 3, 2
    lay = MultiHeadAttention(_cfg(**_routing(C, w, seed=3)))
    ref = MultiHeadAttention(_cfg(backend="rel_ref"))
    ref.load_state_dict(lay.state_dict(), strict=False)
    x, mem = torch.randn(2, T, 32), torch.randn(2, M, 32)
    pe = sinusoid(relative_distances(M + T, -1), 32)
    blocked = causal_mask(T, M)
    # by hand: q (with u), k of [memory; segment]; cosine-nearest centroid per head
    w_q, w_k = lay.qkv.weight[: N * H], lay.qkv.weight[N * H: 2 * N * H]
    q = (x @ w_q.t()).view(2, T, N, H).transpose(1, 2) + lay.u[:, None]
    k = (torch.cat([mem, x], 1) @ w_k.t()).view(2, M + T, N, H).transpose(1, 2)
    cent = lay.pattern_state.centroids  # (N, C, H)
    cq = torch.einsum("bnth,nch->bntc", F.normalize(q, dim=-1), cent).argmax(-1)
    ck = torch.einsum("bnth,nch->bntc", F.normalize(k, dim=-1), cent).argmax(-1)
    dist = torch.arange(T)[:, None] + M - torch.arange(M + T)[None, :]
    vis = (cq[..., :, None] == ck[..., None, :]) | (dist < w)
    assert not vis.all() and (cq[..., :, None] == ck[..., None, :]).any()  # routing decides something
    y, p, _ = lay(x, mem, blocked, pe, need_weights=True)
    y_ref, p_ref, _ = ref(x, mem, blocked | ~vis, pe, need_weights=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(p, p_ref)


def test_routing_is_causal():
    torch.manual_seed(0)
    model = TransformerXL(_cfg(**_routing(3, 2))).eval()
    g = torch.Generator().manual_seed(2)
    warm = torch.randint(0, 50, (2, 8), generator=g)
    ids = torch.randint(0, 50, (2, 8), generator=g)
    late = ids.clone()
    late[:, 5:] = torch.randint(0, 50, (2, 3), generator=g)
    mems = model(warm).mems
    a, b = model(ids, mems=mems).hidden, model(late, mems=mems).hidden
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_centroids_move_in_training_only_and_live_in_the_state_dict():
    torch.manual_seed(0)
    model = TransformerXL(_cfg(**_routing(4, 2, ema_decay=0.5)))
    key = "blocks.0.attn.pattern_state.centroids"
    sd = model.state_dict()
    assert key in sd and sd[key].shape == (2, 4, 16)
    assert not any("centroids" in n for n, _ in model.named_parameters())  # a buffer: no gradient, no optimizer
    ids = torch.randint(0, 50, (2, 8))
    before = sd[key].clone()
    model.eval()
    model(ids, labels=ids)
    assert torch.equal(model.state_dict()[key], before)
    model.train()
    model(ids, labels=ids).loss.backward()
    after = model.state_dict()[key]
    assert not torch.equal(after, before)
    torch.testing.assert_close(after.norm(dim=-1), torch.ones(2, 4))
    other = TransformerXL(_cfg(**_routing(4, 2, ema_decay=0.5, seed=9)))
    assert not torch.equal(other.state_dict()[key], after)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.state_dict()[key], after)


def test_ema_update_by_hand():
    c = Centroids(1, 2, 2, decay=0.75, seed=0)
    c.centroids.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    x = torch.tensor([[[[2.0, 0.2], [1.0, -0.1], [0.0, 3.0]]]])  # (B=1, N=1, L=3, H=2)
    assign = c.assign(x)
    assert assign.tolist() == [[[0, 0, 1]]]
    xn = F.normalize(x, dim=-1)[0, 0]
    want0 = F.normalize(0.75 * torch.tensor([1.0, 0.0]) + 0.25 * (xn[0] + xn[1]) / 2, dim=0)
    c.update([x], [assign])
    torch.testing.assert_close(c.centroids[0, 0], want0)
    torch.testing.assert_close(c.centroids[0, 1], torch.tensor([0.0, 1.0]))  # mean of [0, 1] is itself
    c.update([x[..., :2, :]], [assign[..., :2]])  # nothing assigned to centroid 1: it stays
    torch.testing.assert_close(c.centroids[0, 1], torch.tensor([0.0, 1.0]))


def test_routing_config_errors_are_one_line():
    with pytest.raises(ValueError, match="n_clusters must be >= 1"):
        AttnConfig(**_routing(0, 2))
    with pytest.raises(ValueError, match="not supported by backend 'rel_fused'"):
        AttnConfig(**{**_routing(2, 2), "backend": "rel_fused"})
    with pytest.raises(ValueError, match="ema_decay must be in"):
        AttnConfig(**_routing(2, 2, ema_decay=1.0))
