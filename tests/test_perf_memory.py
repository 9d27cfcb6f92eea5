"""Memory storage dtype (eval.mem_dtype): stored small, read back in the compute dtype."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from txl.config import EvalNode
from txl.evaluate import evaluate_tokens
from txl.model import HiddenMemory, KVMemory, Memory, TXLConfig, TransformerXL
from txl.model.memory import dequantize_rows, quantize_rows

V = 64


def _model(mem_len=16, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = TXLConfig(vocab_size=V, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, init_std=0.2,
                    seq=dict(tgt_len=4, mem_len=mem_len), **kw)
    return TransformerXL(cfg).eval()


def _segments(model, x, y, store, projected, T=4):
    """Per-token NLL (B, L) read T at a time with memories stored as `store`; the memories seen."""
    mems, nll, seen = model.init_mems(x.size(0), projected=projected).stored_as(store), [], []
    with torch.inference_mode():
        for s in range(0, x.size(1), T):
            out = model(x[:, s:s + T], mems=mems, labels=y[:, s:s + T])
            mems = out.mems
            seen.append(mems)
            nll.append(out.nll)
    return torch.cat(nll, 1), seen


def _data(B=2, L=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, L), generator=g), torch.randint(0, V, (B, L), generator=g)


def _today(model, x, y, projected, T=4):
    """The reference: memories as plain tensors, KV rows concatenated with torch.cat (the code
    before storage dtypes existed), driven layer by layer through the same blocks."""
    class CatKV(KVMemory):
        @staticmethod
        def keys_values(mem, x, hx, w_kv, norm):
            kv_new = F.linear(hx, w_kv)
            return (torch.cat([mem.to(kv_new.dtype), kv_new], dim=1) if mem.size(1) else kv_new), kv_new
    mems = model.init_mems(x.size(0), projected=projected)
    mems = CatKV(list(mems.layers)) if projected else list(mems.layers)  # a plain list = hidden states
    nll = []
    with torch.inference_mode():
        for s in range(0, x.size(1), T):
            out = model(x[:, s:s + T], mems=mems, labels=y[:, s:s + T])
            mems = CatKV(out.mems.layers) if projected else list(out.mems.layers)
            nll.append(out.nll)
    return torch.cat(nll, 1)


@pytest.mark.parametrize("projected", [False, True])
def test_fp32_and_auto_storage_equal_today_exactly(projected):
    model = _model()
    x, y = _data()
    ref = _today(model, x, y, projected)
    for store in ("auto", "fp32"):
        nll, seen = _segments(model, x, y, store, projected)
        assert torch.equal(nll, ref), store
        assert all(m.dtype == torch.float32 for m in seen[-1].layers)


@pytest.mark.parametrize("projected", [False, True])
@pytest.mark.parametrize("store,size,tol", [("bf16", 2, 2e-2), ("int8", 1, 2e-2)])
def test_small_storage_is_small_and_close_to_fp32(projected, store, size, tol):
    model = _model()
    x, y = _data()
    ref, seen32 = _segments(model, x, y, "fp32", projected)
    nll, seen = _segments(model, x, y, store, projected)
    kind = KVMemory if projected else HiddenMemory
    for m in seen:  # every memory of the pass: its kind, its storage dtype, read back as float
        assert type(m) is kind and m.store == store
        assert all(t.element_size() == size for t in m.layers)
        assert all(m[i].is_floating_point() for i in range(len(m)))
    n = sum(t.numel() for t in seen32[-1].layers)  # values held; int8 adds one fp32 scale per row
    rows = sum(t.shape[0] * t.shape[1] for t in seen32[-1].layers)
    assert seen32[-1].nbytes() == 4 * n and seen[-1].nbytes() == size * n + (4 * rows if store == "int8" else 0)
    assert not torch.equal(nll, ref)  # really stored small (rounding reaches the loss) ...
    loss, loss32 = nll.mean().item(), ref.mean().item()
    assert abs(loss - loss32) / loss32 < tol  # ... and still the same model: mean NLL within tol
    torch.testing.assert_close(nll, ref, rtol=0.1, atol=0.1)


def test_int8_rows_dequantize_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 96, generator=g) * torch.logspace(-3, 2, 50)[None, :, None]
    x[0, 0] = 0.0  # an all-zero row
    q, s = quantize_rows(x)
    assert q.dtype == torch.int8 and q.element_size() == 1 and s.shape == (3, 50, 1)
    back = dequantize_rows(q, s)
    bound = x.abs().amax(-1, keepdim=True) / 254 * (1 + 1e-5)  # half a quantization step per row
    assert ((back - x).abs() <= bound).all()
    assert torch.equal(back[0, 0], x[0, 0])
    assert (back - x).abs().max() > 0  # it is a lossy code


def test_storage_survives_detach_projection_and_state_dict():
    model = _model()
    h = HiddenMemory([torch.randn(2, 5, 32) for _ in range(2)], "int8")
    assert h.detach().store == "int8" and h.detach().scales is not None
    kv = h.projected(model.blocks)
    assert kv.store == "int8" and kv.layers[0].dtype == torch.int8 and kv[0].shape == (2, 5, 64)
    back = Memory.from_state_dict(kv.state_dict())
    assert type(back) is KVMemory and back.store == "int8"
    assert all(torch.equal(a, b) for a, b in zip(back, kv))
    with pytest.raises(ValueError, match="memory dtype must be one of"):
        h.stored_as("fp16")


def test_evaluate_tokens_mem_dtype():
    model = _model(mem_len=16)
    toks = np.random.default_rng(0).integers(0, V, 200)
    r32 = evaluate_tokens(model, toks, 4, 16, batch_size=2, mem_dtype="fp32")
    assert r32["loss"] == evaluate_tokens(model, toks, 4, 16, batch_size=2)["loss"]  # auto == fp32 for fp32
    r16 = evaluate_tokens(model, toks, 4, 16, batch_size=2, mem_dtype="bf16")
    assert r16["loss"] != r32["loss"] and abs(r16["loss"] - r32["loss"]) / r32["loss"] < 1e-2
    with pytest.raises(ValueError, match="eval.mem_dtype must be"):
        EvalNode(mem_dtype="fp16")


@pytest.mark.parametrize("mem_init", ["zeros", "empty"])
@pytest.mark.parametrize("pre_lnorm", [False, True])
def test_projected_init_equals_projecting_the_hidden_init(mem_init, pre_lnorm):
    """init_mems(projected=True) builds the keys / values of the initial rows directly (one row
    projected per layer): the same as projecting the hidden-state init."""
    model = _model(mem_init=mem_init, pre_lnorm=pre_lnorm)
    with torch.no_grad():  # a trained LayerNorm's bias: LN(0) then projects to non-zero keys
        for block in model.blocks:
            block.attn.ln.bias.normal_()
    a, b = model.init_mems(3, projected=True), model.project_mems(model.init_mems(3))
    assert type(a) is type(b) and len(a) == len(b) == model.cfg.n_layer
    for x, y in zip(a.layers, b.layers):
        assert x.shape == y.shape and x.is_contiguous()
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)  # one row vs B*M rows: GEMM rounding
    if pre_lnorm and mem_init == "zeros":
        assert a.layers[0].abs().sum() > 0  # LN(0) = its bias: non-zero keys, so the test can fail


@pytest.mark.parametrize("store", ["bf16", "int8"])
def test_init_in_store_equals_storing_after(store):
    """init_mems(store=...) builds the memory small a layer at a time: the same rows as converting after."""
    model = _model(mem_init="zeros", pre_lnorm=True)  # pre-LayerNorm: zero rows project to non-zero keys
    for projected in (False, True):
        a = model.init_mems(3, projected=projected, store=store)
        b = model.init_mems(3, projected=projected).stored_as(store)
        assert a.store == store and all(x.dtype == y.dtype for x, y in zip(a.layers, b.layers))
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("projected", [False, True])
@pytest.mark.parametrize("store", ["auto", "bf16", "int8"])
@pytest.mark.parametrize("ext_len", [0, 2])
def test_rolling_memory_equals_the_pure_update_and_lets_the_old_rows_go(projected, store, ext_len):
    """A rolling memory (updated in place, a layer at a time) gives the same losses and memories as
    the pure update, returns the object it was given, and no old layer tensor survives the step:
    a full memory (ext_len 0) is shifted in place (the same tensors), any other is replaced."""
    import weakref
    model = _model(mem_len=12)
    model.set_lengths(ext_len=ext_len)
    x, y = _data(L=36)
    pure = model.init_mems(2, projected=projected, store=store)
    roll = model.init_mems(2, projected=projected, store=store, rolling=True)
    assert roll.rolling and not pure.rolling
    with torch.inference_mode():
        for s in range(0, 36, 4):
            a = model(x[:, s:s + 4], mems=pure, labels=y[:, s:s + 4])
            old = [weakref.ref(m) for m in roll.layers] if s else []  # the zeros of `empty` init may be shared
            in_place = bool(s) and not ext_len and roll.layers[0].size(1) == 12  # full: roll_rows_
            before = [m.data_ptr() for m in roll.layers + (roll.scales or [])]
            b = model(x[:, s:s + 4], mems=roll, labels=y[:, s:s + 4])
            assert b.mems is roll and a.mems is not pure
            torch.testing.assert_close(b.nll, a.nll, rtol=0, atol=0)
            for m, n in zip(a.mems.layers + (a.mems.scales or []), roll.layers + (roll.scales or [])):
                torch.testing.assert_close(n, m, rtol=0, atol=0)
            if in_place:
                assert before == [m.data_ptr() for m in roll.layers + (roll.scales or [])]  # the same storage
            else:
                assert all(r() is None for r in old), "an old memory layer is still referenced"
            pure = a.mems


@pytest.mark.parametrize("M,T", [(12, 4), (12, 5), (7, 7), (9, 1)])
def test_roll_rows_in_place_equals_update_mems(M, T):
    from txl.model.memory import roll_rows_, update_mems
    g = torch.Generator().manual_seed(M * 10 + T)
    mem, new = torch.randn(2, M, 3, generator=g), torch.randn(2, T, 3, generator=g)
    want = update_mems([new], [mem.clone()], M)[0]
    ptr = mem.data_ptr()
    got = roll_rows_(mem, new)
    assert got is mem and mem.data_ptr() == ptr
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_evaluate_tokens_is_unchanged_by_the_rolling_memory():
    """The scorer rolls its memory only without hooks: with a hook that keeps nothing, the pure update
    runs; both give the same loss."""
    from txl.evaluate import SegmentScorer

    class Noop:
        def update(self, model, batch, out, mems_in):
            pass
    model = _model(mem_len=8)
    toks = np.random.default_rng(0).integers(0, V, 400)
    a = evaluate_tokens(model, toks, tgt_len=4, mem_len=8, batch_size=2)
    b = evaluate_tokens(model, toks, tgt_len=4, mem_len=8, batch_size=2, hooks=[Noop()])
    assert a["loss"] == b["loss"] and a["tokens"] == b["tokens"]
    batch = {"input_ids": torch.as_tensor(toks[:8]).view(2, 4), "labels": torch.as_tensor(toks[1:9]).view(2, 4),
             "reset": True}
    for hooks, rolling in (([], True), ([Noop()], False)):
        scorer = SegmentScorer(model, hooks=hooks)
        with torch.inference_mode():
            scorer.step(batch)
        assert scorer.mems.rolling is rolling
