"""Segment-level recurrence: equivalence with one pass, ext_len slices, stop-gradient, lengths, purity."""
import pytest
import torch

from txl.model import KVMemory as ProjectedMems
from txl.model import TXLConfig, TransformerXL, init_mems, update_mems

KINDS = ["relative", "absolute", "rotary", "alibi"]
V = 64


def _model(kind="relative", n_layer=2, mem_len=32, clamp_len=-1, ext_len=0, mem_init="empty", seed=0):
    torch.manual_seed(seed)
    cfg = TXLConfig(vocab_size=V, n_layer=n_layer, d_model=32, n_head=2, d_head=16, d_inner=64, kind=kind,
                    mem_init=mem_init, init_std=0.2,
                    seq=dict(tgt_len=4, mem_len=mem_len, clamp_len=clamp_len, ext_len=ext_len))
    return TransformerXL(cfg).eval()


def _by_segments(model, x, y, lens):
    mems, nll, hid, s = None, [], [], 0
    for n in lens:
        out = model(x[:, s:s + n], mems=mems, labels=y[:, s:s + n])
        mems, s = out.mems, s + n
        nll.append(out.nll)
        hid.append(out.hidden)
    return torch.cat(nll, 1), torch.cat(hid, 1)


def _data(B=2, L=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, L), generator=g), torch.randint(0, V, (B, L), generator=g)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("clamp_len", [-1, 3])
@pytest.mark.parametrize("lens", [[4, 4, 4], [5, 1, 6]])
def test_segments_with_full_memory_equal_one_pass(kind, clamp_len, lens):
    """mem_len >= the whole past: recurrence loses nothing (dropout off, empty first memory)."""
    model = _model(kind, mem_len=12, clamp_len=clamp_len)
    x, y = _data()
    full = model(x, labels=y)
    nll, hid = _by_segments(model, x, y, lens)
    torch.testing.assert_close(nll, full.nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hid, full.hidden, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_no_memory_loses_context(kind):
    model = _model(kind, mem_len=0)
    x, y = _data()
    full = model(x, labels=y).nll
    nll, _ = _by_segments(model, x, y, [4, 4, 4])
    torch.testing.assert_close(nll[:, :4], full[:, :4], rtol=1e-5, atol=1e-5)  # first segment: same context
    for s in (4, 8):  # later segments: every position lost its past
        assert not torch.allclose(nll[:, s:s + 4], full[:, s:s + 4], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_short_memory_is_a_sliding_window_for_one_layer(kind):
    """One layer: its memory is the embedded tokens, so segment t with mem_len m equals one pass over
    the window [start - m, end) (the window's leading tokens only serve as context).

    Not for `absolute`: a cached token keeps the position it had in the window where it was embedded,
    so once the memory slides, memory and queries carry incoherent positions (the paper's §3.3 point).
    """
    m, T = 3, 4
    model = _model(kind, n_layer=1, mem_len=m)
    x, y = _data(L=16)
    nll, _ = _by_segments(model, x, y, [T] * 4)
    for s in range(T, 16, T):
        win = model(x[:, s - m:s + T], labels=y[:, s - m:s + T]).nll[:, m:]
        if kind == "absolute":
            assert not torch.allclose(nll[:, s:s + T], win, rtol=1e-3, atol=1e-3)
        else:
            torch.testing.assert_close(nll[:, s:s + T], win, rtol=1e-5, atol=1e-5)


def _capture_layer_inputs(model):
    seen, hooks = [], []
    for blk in model.blocks:
        hooks.append(blk.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone())))
    return seen, hooks


def test_ext_len_memory_excludes_trailing_positions():
    model = _model(mem_len=5, ext_len=2)
    x, _ = _data(L=12)
    seen, hooks = _capture_layer_inputs(model)
    out1 = model(x[:, :6])  # M = 0, T = 6: memory = inputs 0..3 (the last 2 are extended context)
    h1, seen[:] = list(seen), []
    out2 = model(x[:, 6:], mems=out1.mems)  # M = 4, T = 6: window [4 mem | 6 new], keep window 3..7
    h2 = list(seen)
    for hk in hooks:
        hk.remove()
    for layer in range(2):
        assert out1.mems[layer].shape == (2, 4, 32)
        assert torch.equal(out1.mems[layer], h1[layer][:, :4])
        assert out2.mems[layer].shape == (2, 5, 32)
        want = torch.cat([h1[layer][:, 3:4], h2[layer][:, :4]], 1)
        assert torch.equal(out2.mems[layer], want)


def test_memory_is_the_layer_inputs():
    model = _model(mem_len=3)
    x, _ = _data(L=5)
    seen, hooks = _capture_layer_inputs(model)
    out = model(x)
    for hk in hooks:
        hk.remove()
    assert len(out.mems) == 2
    for layer in range(2):
        assert torch.equal(out.mems[layer], seen[layer][:, -3:])
    torch.testing.assert_close(seen[0], model.embed(x))  # layer 0's input is the (scaled) embedding


# ---- stop-gradient -------------------------------------------------------------------------
def test_gradients_never_reach_memory():
    model = _model(mem_len=6).train()
    x, y = _data(L=8)
    out = model(x[:, :4], labels=y[:, :4])
    assert all(not m.requires_grad and m.grad_fn is None for m in out.mems)
    # memories handed in that require grad (or carry a graph) are still cut off
    mems = [m.clone().requires_grad_(True) for m in out.mems]
    graph_mems = [m * 2 for m in mems]  # non-leaf with a grad_fn
    out2 = model(x[:, 4:], mems=graph_mems, labels=y[:, 4:])
    out2.loss.backward()
    assert all(m.grad is None for m in mems)
    assert all(not m.requires_grad and m.grad_fn is None for m in out2.mems)
    assert model.blocks[0].attn.qkv.weight.grad is not None  # the loss did reach the weights


def test_update_mems_is_pure_and_detached():
    hids = [torch.randn(2, 4, 8, requires_grad=True) for _ in range(2)]
    mems = [torch.randn(2, 3, 8) for _ in range(2)]
    before = [m.clone() for m in mems]
    new = update_mems(hids, mems, mem_len=5, ext_len=1)
    for h, m, b, n in zip(hids, mems, before, new):
        assert torch.equal(m, b)
        assert n.shape == (2, 5, 8) and not n.requires_grad
        assert torch.equal(n, torch.cat([b, h.detach()], 1)[:, 1:6])  # window 1..5 of [3 mem | 4 new], minus 1 ext
        n.add_(1.0)  # writing into the new memory never reaches the old one or the hiddens
        assert torch.equal(m, b)


@pytest.mark.parametrize("mode", ["empty", "zeros"])
def test_init_mems(mode):
    mems = init_mems(3, 2, 8, 5, mode)
    assert len(mems) == 3
    assert all(m.shape == (2, 5 if mode == "zeros" else 0, 8) and not m.any() for m in mems)


@pytest.mark.parametrize("mode", ["empty", "zeros"])
def test_memory_length_over_segments(mode):
    model = _model(mem_len=6, mem_init=mode)
    x, _ = _data(L=15)
    mems, seen = None, 0
    for s in range(0, 15, 3):
        out = model(x[:, s:s + 3], mems=mems)
        seen += 3
        want = min(6, seen) if mode == "empty" else 6
        assert [m.shape for m in out.mems] == [torch.Size([2, want, 32])] * 2
        mems = out.mems
    if mode == "zeros":  # the first segment attended to zeros: it differs from the empty start
        a = model(x[:, :3], labels=x[:, :3]).nll
        model.cfg.mem_init = "empty"
        b = model(x[:, :3], labels=x[:, :3]).nll
        assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("train", [False, True])
def test_memory_passed_in_is_unchanged(kind, train):
    model = _model(kind, mem_len=4).train(train)
    x, y = _data(L=8)
    mems = model(x[:, :4]).mems
    before = [m.clone() for m in mems]
    out = model(x[:, 4:], mems=mems, labels=y[:, 4:])
    if train:
        out.loss.backward()
    assert all(torch.equal(m, b) for m, b in zip(mems, before))
    assert all(n.data_ptr() != m.data_ptr() for n, m in zip(out.mems, mems))


# ---- projected memories (keys / values) for inference -----------------------------------------
@pytest.mark.parametrize("kw", [dict(kind="relative"), dict(kind="rotary"), dict(kind="alibi"),
                                dict(kind="relative", mem_init="zeros"), dict(kind="relative", ext_len=2),
                                dict(kind="relative", clamp_len=3)])
@pytest.mark.parametrize("pre_lnorm", [False, True])
def test_projected_mems_equal_hidden_mems(kw, pre_lnorm):
    """Keeping each layer's memory as its keys / values gives the same NLL, segment after segment,
    as keeping its inputs (the keys of a position never change once computed)."""
    model = _model(mem_len=6, **kw)
    model.cfg.pre_lnorm = pre_lnorm  # the LayerNorm before the projection is part of what is cached
    model.set_lengths(same_length=kw.get("kind") == "relative" and "ext_len" not in kw)
    x, y = _data(L=20)
    hidden, proj = None, model.init_mems(2, projected=True)
    assert isinstance(proj, ProjectedMems) and proj[0].shape == (2, 6 if kw.get("mem_init") else 0, 64)
    with torch.no_grad():
        for s in range(0, 20, 4):
            a = model(x[:, s:s + 4], mems=hidden, labels=y[:, s:s + 4])
            b = model(x[:, s:s + 4], mems=proj, labels=y[:, s:s + 4])
            torch.testing.assert_close(b.nll, a.nll, rtol=0, atol=1e-6)
            assert isinstance(b.mems, ProjectedMems) and [m.size(1) for m in b.mems] == [m.size(1) for m in a.mems]
            torch.testing.assert_close(list(b.mems), list(model.project_mems(a.mems)), rtol=0, atol=1e-6)
            hidden, proj = a.mems, b.mems


def test_projected_mems_refused_with_gradients_and_wrong_width():
    model = _model(mem_len=4)
    x, _ = _data()
    with torch.no_grad():
        proj = model(x[:, :4], mems=model.init_mems(2, projected=True)).mems
    with pytest.raises(ValueError, match="inference only"):
        model(x[:, 4:8], mems=proj)
    with pytest.raises(ValueError, match=r"2NH=64"), torch.no_grad():
        model(x[:, 4:8], mems=ProjectedMems(m[..., :32] for m in proj))


# ---- the memory object ----------------------------------------------------------------------------
def test_memory_kind_is_chosen_once_and_carried():
    from txl.model import HiddenMemory, Memory
    model = _model(mem_len=4)
    x, _ = _data()
    with torch.no_grad():
        for projected, cls in ((False, HiddenMemory), (True, ProjectedMems)):
            mems = model.init_mems(2, projected=projected)
            for s in range(0, 12, 4):
                mems = model(x[:, s:s + 4], mems=mems).mems
                assert type(mems) is cls
        plain = model(x[:, :4], mems=[torch.zeros(2, 0, 32)] * 2).mems  # a list is hidden states
    assert type(plain) is HiddenMemory
    for mems in (plain, model.project_mems(plain)):  # state_dict round trip keeps kind and tensors
        back = Memory.from_state_dict(mems.state_dict())
        assert type(back) is type(mems) and all(torch.equal(a, b) for a, b in zip(back, mems))
    assert torch.equal(plain.hidden(1), plain[1])
    with pytest.raises(ValueError, match="keys / values"):
        model.project_mems(plain).hidden(0)
    with pytest.raises(ValueError, match="hidden"):
        Memory.from_state_dict({"kind": "nope", "layers": []})
