"""score='mixed': n_additive_heads additive heads + dot heads in one layer. Each limit equals the existing
scorer (all dot: rel_ref dot; all additive: score='additive'), and a split layer is, head by head,
the additive layer on its additive heads and the dot layer on the others (forward, probabilities, grads)."""
from __future__ import annotations

import pytest
import torch

from txl.model import TransformerXL, causal_mask
from txl.model.block import MultiHeadAttention
from txl.model.config import AttnConfig, TXLConfig
from txl.model.positions import relative_distances, sinusoid

N, H, D = 3, 8, 24


def _cfg(kind="relative", **attn):
    return TXLConfig(vocab_size=40, n_layer=2, d_model=D, n_head=N, d_head=H, d_inner=48, kind=kind,
                     attn=dict(backend="rel_ref", **attn), seq=dict(tgt_len=6, mem_len=6))


def _inputs(T=5, M=4, kind="relative"):
    g = torch.Generator().manual_seed(1)
    x, mem = torch.randn(2, T, D, generator=g, requires_grad=True), torch.randn(2, M, D, generator=g)
    pe = sinusoid(relative_distances(M + T, -1), D) if kind == "relative" else None
    return x, mem, causal_mask(T, M), pe


def _copy(dst, src, heads=None):
    """src's parameters into dst; score_* restricted to `heads` (the additive heads of dst)."""
    sd = src.state_dict()
    if heads is not None:
        sd = {k: (v[heads] if k.startswith("score_") else v) for k, v in sd.items()}
    missing, unexpected = dst.load_state_dict(sd, strict=False)
    assert not unexpected and all(dst.state_dict()[k].numel() == 0 for k in missing)  # only empty score_* (0 heads)
    return dst


def _run(layer, x, mem, blocked, pe):
    y, p, _ = layer(x, mem, blocked, pe, need_weights=True)
    g = torch.autograd.grad(y.square().sum(), [x], retain_graph=True)[0]
    return y, p, g


@pytest.mark.parametrize("kind", ["relative", "alibi"])
def test_all_dot_heads_is_the_dot_scorer(kind):
    torch.manual_seed(0)
    dot = MultiHeadAttention(_cfg(kind))
    mixed = _copy(MultiHeadAttention(_cfg(kind, score="mixed", n_additive_heads=0)), dot)
    args = _inputs(kind=kind)
    for a, b in zip(_run(mixed, *args), _run(dot, *args)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["relative", "alibi"])
def test_all_additive_heads_is_the_additive_scorer(kind):
    torch.manual_seed(0)
    add = MultiHeadAttention(_cfg(kind, score="additive"))
    for p in (add.score_q, add.score_k, add.score_w):
        torch.nn.init.normal_(p, std=0.3)  # away from the zero init: the additive term matters
    mixed = _copy(MultiHeadAttention(_cfg(kind, score="mixed", n_additive_heads=N)), add)
    args = _inputs(kind=kind)
    for a, b in zip(_run(mixed, *args), _run(add, *args)):
        torch.testing.assert_close(a, b)


def test_split_heads_are_additive_then_dot():
    """n_additive_heads=1: head 0's probabilities are the additive layer's, heads 1.. the dot layer's."""
    torch.manual_seed(0)
    add = MultiHeadAttention(_cfg(score="additive"))
    for p in (add.score_q, add.score_k, add.score_w):
        torch.nn.init.normal_(p, std=0.3)
    mixed = _copy(MultiHeadAttention(_cfg(score="mixed", n_additive_heads=1)), add, heads=slice(0, 1))
    dot = MultiHeadAttention(_cfg())
    dot.load_state_dict({k: v for k, v in add.state_dict().items() if not k.startswith("score_")})
    args = _inputs()
    p_mix, p_add, p_dot = (m(*args, need_weights=True)[1] for m in (mixed, add, dot))
    torch.testing.assert_close(p_mix[:, :1], p_add[:, :1])
    torch.testing.assert_close(p_mix[:, 1:], p_dot[:, 1:])
    assert not torch.allclose(p_add[:, :1], p_dot[:, :1])  # the two scorers do differ here
    assert mixed.score_q.shape == (1, H, H) and mixed.score_w.shape == (1, H)  # only additive heads own weights


def test_mixed_model_trains_a_step():
    torch.manual_seed(0)
    m = TransformerXL(_cfg(score="mixed", n_additive_heads=2))
    ids = torch.randint(0, 40, (2, 6))
    m(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.blocks[0].attn.score_q.grad.abs().sum() > 0


def test_mixed_config_errors_are_one_line():
    with pytest.raises(ValueError, match="n_additive_heads must be <= n_head=3"):
        _cfg(score="mixed", n_additive_heads=4)
    with pytest.raises(ValueError, match="n_additive_heads is for score='mixed'"):
        AttnConfig(n_additive_heads=1)
    with pytest.raises(ValueError, match="score='mixed' needs pattern='dense'"):
        AttnConfig(score="mixed", pattern="local", window=2)
    with pytest.raises(ValueError, match="not supported by backend 'rel_fused'"):
        AttnConfig(score="mixed", backend="rel_fused")
