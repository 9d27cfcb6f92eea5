"""Every backend equals rel_ref (forward and gradients, fp32, 1e-5) over position kinds, with and
without memory, same_length and clamp_len; the position terms' sub-block / scaled / flex forms equal
their dense form; additive scoring equals its formula; the registry rejects invalid combinations."""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from txl.model import TransformerXL, TXLConfig, causal_mask
from txl.model.attention import kernels as A
from txl.model.attention import (BACKEND_CAPS, BACKENDS, AlibiTerm, BiasTerm, RelativeTerm, additive_attention,
                                 band_shift, get_pattern, rel_ref)
from txl.model.config import POSITION_KINDS, AttnConfig
from txl.model.block import MultiHeadAttention
from txl.model.positions import relative_distances, sinusoid

TOL = dict(rtol=1e-5, atol=1e-5)
OTHERS = sorted(b for b in BACKENDS if b != "rel_ref")
CONF = Path(__file__).resolve().parent.parent / "conf" / "attention"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex's one-time CPU fallback notice
        yield


# ---- function level: q, k, v, u, v-bias, r as leaves ---------------------------------------------
def _leaves(kind, B=2, N=2, T=5, M=4, H=8, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    K = M + T
    shapes = dict(q=(B, N, T, H), k=(B, N, K, H), v=(B, N, K, H), u=(N, H), vb=(N, H), r=(N, K, H))
    return {n: torch.randn(s, generator=g).to(device).requires_grad_() for n, s in shapes.items()}


def _call(backend, kind, t, blocked, T, M):
    q = t["q"] + t["u"][:, None]
    pos = None
    if kind == "relative":
        pos = RelativeTerm(t["q"] + t["vb"][:, None], t["r"])
    elif kind == "alibi":
        pos = AlibiTerm(torch.tensor([0.5, 0.125], device=q.device), T, M)
    out, _ = BACKENDS[backend](q, t["k"], t["v"], pos, blocked, 0.3)
    return out


@pytest.mark.parametrize("backend", OTHERS)
@pytest.mark.parametrize("kind", ["relative", "alibi", "none"])
@pytest.mark.parametrize("M,same_length", [(0, False), (4, False), (4, True)])
def test_backend_equals_rel_ref_functional(backend, kind, M, same_length):
    T = 5
    blocked = causal_mask(T, M, same_length, mem_len=3)
    t = _leaves(kind, M=M)
    with _quiet():
        got = _call(backend, kind, t, blocked, T, M)
    dout = torch.randn_like(got)
    g_got = torch.autograd.grad(got, list(t.values()), dout, allow_unused=True)
    want = _call("rel_ref", kind, t, blocked, T, M)
    g_want = torch.autograd.grad(want, list(t.values()), dout, allow_unused=True)
    torch.testing.assert_close(got, want, **TOL)
    for name, a, b in zip(t, g_got, g_want):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"grad {name}: {m}")


# ---- layer level: every parameter, every kind ------------------------------------------------
def _layer_pair(kind, backend, attn_extra=None, seed=0):
    cfg = TXLConfig(d_model=32, n_head=2, d_head=16, kind=kind, attn=dict(backend="rel_ref", **(attn_extra or {})))
    torch.manual_seed(seed)
    ref = MultiHeadAttention(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    cfg2 = copy.deepcopy(cfg)
    cfg2.attn = AttnConfig(**{**cfg.attn.__dict__, "backend": backend})
    other = MultiHeadAttention(cfg2)
    other.load_state_dict(ref.state_dict())
    return ref, other


def _run_layer(layer, x, mem, blocked, pos_emb):
    with _quiet():
        y = layer(x, mem, blocked, pos_emb)[0]
    return y


def _inputs(T, M, kind, clamp_len, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, 32, generator=g, requires_grad=True)
    mem = torch.randn(2, M, 32, generator=g)
    pos_emb = sinusoid(relative_distances(M + T, clamp_len), 32) if kind == "relative" else None
    return x, mem, pos_emb


def assert_same_forward_and_grads(ref, other, x, mem, blocked, pos_emb):
    y_ref = _run_layer(ref, x, mem, blocked, pos_emb)
    dy = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], dy)
    y = _run_layer(other, x, mem, blocked, pos_emb)
    g = torch.autograd.grad(y, [x, *other.parameters()], dy)
    torch.testing.assert_close(y, y_ref, **TOL)
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    for n, a, b in zip(names, g, g_ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"grad {n}: {m}")


@pytest.mark.parametrize("backend", OTHERS)
@pytest.mark.parametrize("kind", POSITION_KINDS)
@pytest.mark.parametrize("M,same_length,clamp_len", [(0, False, -1), (6, False, -1), (6, True, 3)])
def test_layer_backend_equals_rel_ref(backend, kind, M, same_length, clamp_len):
    T = 5
    ref, other = _layer_pair(kind, backend)
    x, mem, pos_emb = _inputs(T, M, kind, clamp_len)
    assert_same_forward_and_grads(ref, other, x, mem, causal_mask(T, M, same_length, mem_len=4), pos_emb)


def test_layer_batched_mask():
    """blocked may also be (B, 1, T, K) (e.g. padding per sequence)."""
    T, M = 4, 3
    ref, other = _layer_pair("relative", "rel_fused")
    x, mem, pos_emb = _inputs(T, M, "relative", -1)
    blocked = causal_mask(T, M).expand(2, 1, T, M + T).clone()
    blocked[1, 0, :, 0] = True  # sequence 1 never sees key 0
    assert_same_forward_and_grads(ref, other, x, mem, blocked, pos_emb)


# ---- flex: the real FlexAttention on CPU without grad; the fallback with grad ----------------------
@pytest.mark.parametrize("kind", POSITION_KINDS)
@pytest.mark.parametrize("attn", [{}, dict(pattern="local", window=3),
                                  dict(pattern="bigbird", window=2, block_size=2, n_global=1, n_random=1)])
def test_flex_runs_flex_attention_without_grad(kind, attn, monkeypatch):
    T, M = 5, 6
    ref, other = _layer_pair(kind, "flex", attn)
    x, mem, pos_emb = _inputs(T, M, kind, -1)
    blocked = causal_mask(T, M)
    want = _run_layer(ref, x, mem, blocked, pos_emb)

    def no_fallback(*a, **k):
        raise AssertionError("flex fell back to rel_fused")
    monkeypatch.setattr(A, "rel_fused", no_fallback)
    with torch.no_grad():
        got = _run_layer(other, x, mem, blocked, pos_emb)
    torch.testing.assert_close(got, want, **TOL)


def test_flex_cpu_grad_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(A, "_WARNED", set())
    ref, other = _layer_pair("relative", "flex")
    x, mem, pos_emb = _inputs(4, 3, "relative", -1)
    with pytest.warns(UserWarning, match="no CPU backward"):
        other(x, mem, causal_mask(4, 3), pos_emb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        other(x, mem, causal_mask(4, 3), pos_emb)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", POSITION_KINDS)
@pytest.mark.parametrize("attn", [{}, dict(pattern="local", window=3)])
def test_flex_gpu_forward_and_grads(kind, attn):
    T, M = 5, 6
    ref, other = _layer_pair(kind, "flex", attn)
    ref, other = ref.cuda(), other.cuda()
    x, mem, pos_emb = _inputs(T, M, kind, -1)
    x = x.detach().cuda().requires_grad_()
    blocked = causal_mask(T, M, device="cuda")
    ref_blocked = blocked
    if attn:  # rel_ref with the explicit local mask
        ref_blocked = blocked | get_pattern(other.cfg.attn).mask(T, M, "cuda")
        ref.cfg.attn = AttnConfig()
    y_ref = ref(x, mem.cuda(), ref_blocked, None if pos_emb is None else pos_emb.cuda())[0]
    y = other(x, mem.cuda(), blocked, None if pos_emb is None else pos_emb.cuda())[0]
    dy = torch.randn_like(y)
    g_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], dy)
    g = torch.autograd.grad(y, [x, *other.parameters()], dy)
    torch.testing.assert_close(y, y_ref, **TOL)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **TOL)


# ---- position terms: block / scaled_dense / score_mod equal dense ----------------------------
def _explicit_bd(q_pos, r, M):
    B, N, T, H = q_pos.shape
    K = r.size(1)
    out = torch.zeros(B, N, T, K, dtype=q_pos.dtype)
    for i in range(T):
        for j in range(M + i + 1):
            out[..., i, j] = (q_pos[..., i, :] * r[:, K - 1 - (M + i - j)]).sum(-1)
    return out


@pytest.mark.parametrize("T,M", [(1, 0), (5, 0), (5, 7)])
def test_relative_term_forms(T, M):
    torch.manual_seed(0)
    K = M + T
    q_pos, r = torch.randn(2, 3, T, 4, dtype=torch.float64), torch.randn(3, K, 4, dtype=torch.float64)
    term = RelativeTerm(q_pos, r)
    vis = torch.arange(K)[None] <= torch.arange(T)[:, None] + M
    want = _explicit_bd(q_pos, r, M)
    torch.testing.assert_close(term.dense()[..., vis], want[..., vis])
    torch.testing.assert_close(term.scaled_dense(0.5)[..., vis], 0.5 * want[..., vis])
    for q0 in range(T):
        for q1 in range(q0 + 1, T + 1):
            for k0 in range(0, M + q1):
                for k1 in (k0 + 1, M + q1):
                    got = term.block(q0, q1, k0, k1)
                    v = vis[q0:q1, k0:k1]
                    torch.testing.assert_close(got[..., v], want[..., q0:q1, k0:k1][..., v])


def test_band_shift_is_the_documented_gather():
    C, L = 3, 5
    x = torch.arange(2 * C * (L + C), dtype=torch.float32).view(2, C, L + C)
    got = band_shift(x, L)
    for t in range(C):
        for c in range(L):
            assert torch.equal(got[:, t, c], x[:, t, c + C - 1 - t])


def test_alibi_and_bias_term_forms():
    T, M = 4, 3
    alibi = AlibiTerm(torch.tensor([1.0, 0.25]), T, M)
    d = alibi.dense()
    for i in range(T):
        for j in range(M + i + 1):
            torch.testing.assert_close(d[0, :, i, j], -torch.tensor([1.0, 0.25]) * (M + i - j))
    torch.testing.assert_close(alibi.block(1, 3, 2, 6), d[..., 1:3, 2:6])
    torch.testing.assert_close(alibi.scaled_dense(0.5), 0.5 * d)
    b = BiasTerm(torch.randn(2, T, M + T))
    torch.testing.assert_close(b.block(1, 3, 2, 6), b.dense()[..., 1:3, 2:6])
    assert b.dense().shape == (1, 2, T, M + T)


# ---- additive compatibility --------------------------------------------------------------
def test_additive_equals_its_formula_with_grads():
    torch.manual_seed(0)
    B, N, T, M, H = 2, 2, 3, 2, 4
    K = M + T
    leaves = [torch.randn(s, requires_grad=True) for s in
              [(B, N, T, H), (B, N, K, H), (B, N, K, H), (N, H, H), (N, H, H), (N, H), (B, N, T, H), (N, K, H)]]
    q, k, v, wq, wk, w, qv, r = leaves
    blocked = causal_mask(T, M)
    got, prob = additive_attention(q, k, v, RelativeTerm(qv, r), blocked, 0.5, wq, wk, w, need_weights=True)
    rows = []
    for i in range(T):
        s = []
        for j in range(K):
            if j > M + i:
                s.append(torch.full((B, N), float("-inf")))
                continue
            e = (torch.tanh(torch.einsum("bnh,nhg->bng", q[:, :, i], wq) + torch.einsum("bnh,nhg->bng", k[:, :, j], wk))
                 * w).sum(-1)
            bd = (qv[:, :, i] * r[:, K - 1 - (M + i - j)]).sum(-1)
            s.append(e + 0.5 * bd)
        rows.append(torch.stack(s, -1))
    p = torch.stack(rows, -2).softmax(-1)  # (B, N, T, K)
    want = p @ v
    torch.testing.assert_close(prob, p)
    torch.testing.assert_close(got, want)
    dy = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy)):
        torch.testing.assert_close(a, b)


def test_additive_owns_parameters_and_trains():
    cfg = TXLConfig(vocab_size=30, attn=dict(score="additive"), seq=dict(tgt_len=4, mem_len=4))
    model = TransformerXL(cfg)
    names = {n for n, _ in model.named_parameters()}
    assert {"blocks.0.attn.score_q", "blocks.0.attn.score_k", "blocks.0.attn.score_w"} <= names
    assert not any("score_" in n for n, _ in TransformerXL(TXLConfig(vocab_size=30)).named_parameters())
    ids = torch.randint(0, 30, (2, 4))
    out = model(ids, labels=ids)
    out = model(ids, mems=out.mems, labels=ids)
    out.loss.backward()
    assert model.blocks[0].attn.score_w.grad.abs().sum() > 0


# ---- the registry --------------------------------------------------------------------------
@pytest.mark.parametrize("kw,words", [
    (dict(backend="nope"), ["backend", *BACKENDS]),
    (dict(pattern="nope"), ["pattern", "dense", "local", "block_sparse", "bigbird", "topk"]),
    (dict(score="nope"), ["score", "dot", "additive"]),
    (dict(backend="rel_fused", score="additive"), ["additive", "rel_fused", "rel_ref"]),
    (dict(backend="flex", pattern="topk", topk=2), ["topk", "flex", "rel_ref"]),
    (dict(backend="rel_fused", pattern="topk", topk=2), ["topk", "rel_ref"]),
    (dict(score="additive", pattern="local", window=2), ["additive", "dense"]),
    (dict(pattern="local"), ["window", ">= 1"]),
    (dict(pattern="block_sparse"), ["block_size"]),
    (dict(pattern="bigbird", window=2), ["block_size"]),
    (dict(pattern="topk"), ["topk"]),
    (dict(window=-1), ["window", ">= 0"]),
    (dict(n_random=1.5), ["n_random"]),
])
def test_invalid_combinations_rejected(kw, words):
    with pytest.raises(ValueError) as e:
        AttnConfig(**kw)
    msg = str(e.value)
    assert all(w in msg for w in words), msg
    assert "\n" not in msg


def test_validate_kind_uses_backend_capabilities(monkeypatch):
    monkeypatch.setitem(BACKEND_CAPS, "toy", dict(BACKEND_CAPS["rel_ref"], kinds=("relative",)))
    AttnConfig(backend="toy").validate("relative")
    with pytest.raises(ValueError, match=r"kind='alibi'.*\['relative'\]"):
        AttnConfig(backend="toy").validate("alibi")
    with pytest.raises(ValueError, match="toy"):  # the model asks at construction
        TransformerXL(TXLConfig(kind="alibi", attn=dict(backend="toy")))


def test_registered_backend_is_selectable():
    calls = []

    @A.register_backend("counting")
    def counting(*args, **kw):
        calls.append(1)
        return rel_ref(*args, **kw)
    try:
        model = TransformerXL(TXLConfig(vocab_size=30, attn=dict(backend="counting")))
        model(torch.randint(0, 30, (1, 3)))
        assert len(calls) == model.cfg.n_layer
    finally:
        BACKENDS.pop("counting")
        BACKEND_CAPS.pop("counting")


# ---- the Hydra options -----------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_attention_yaml_builds_and_runs(path):
    assert path.read_text().startswith("# @package model\n")
    root = OmegaConf.create({"seq": {"tgt_len": 8, "mem_len": 8}})
    root.model = OmegaConf.merge(OmegaConf.structured(TXLConfig), OmegaConf.load(path))  # unknown keys fail
    cfg = OmegaConf.to_object(root)["model"]
    assert cfg.attn.backend in BACKENDS
    model = TransformerXL(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    with _quiet():
        out = model(ids, labels=ids)
        out = model(ids, mems=out.mems, labels=ids)
    assert torch.isfinite(out.loss)
    if path.stem in ("local", "block_sparse", "bigbird", "topk", "additive", "absolute", "rotary", "alibi"):
        assert path.stem in (cfg.attn.pattern, cfg.attn.score, cfg.kind)
