"""Sparse patterns: each equals dense rel_ref with the explicit mask (built here from the definitions),
forward and gradients, for every backend; the banded engine never touches keys the pattern hides;
bigbird's random blocks are reproducible; topk equals masked dense with the explicit top-k mask."""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import warnings

import pytest
import torch

from txl.model import causal_mask, rel_shift
from txl.model.attention import get_pattern
from txl.model.attention import BACKEND_CAPS, BACKENDS, RelativeTerm, rel_ref
from txl.model.config import AttnConfig, TXLConfig
from txl.model.block import MultiHeadAttention
from txl.model.positions import relative_distances, sinusoid

TOL = dict(rtol=1e-5, atol=1e-5)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---- the explicit masks, from the definitions ---------------------------------------------------
def expected_visible(a: AttnConfig, T: int, M: int, rand=None) -> torch.Tensor:
    """(T, K) bool, True = query i may see key j under causality and the pattern."""
    K = M + T
    vis = torch.zeros(T, K, dtype=torch.bool)
    bs = a.block_size
    for i in range(T):
        for j in range(K):
            d = M + i - j
            if d < 0:
                continue
            if a.pattern == "local":
                vis[i, j] = d < a.window
                continue
            kb, qb = math.floor((j - M) / bs), i // bs  # blocks anchored at the segment start
            glob = kb < math.floor(-M / bs) + a.n_global  # first n_global blocks present
            if a.pattern == "block_sparse":
                vis[i, j] = glob or qb - a.n_prev <= kb <= qb
            else:
                vis[i, j] = glob or d < a.window or kb in rand[qb]
    return vis


CONFIGS = [
    dict(pattern="local", window=1), dict(pattern="local", window=3), dict(pattern="local", window=40),
    dict(pattern="block_sparse", block_size=2), dict(pattern="block_sparse", block_size=3, n_prev=2),
    dict(pattern="block_sparse", block_size=2, n_prev=0, n_global=2),
    dict(pattern="bigbird", window=2, block_size=2, n_global=1, n_random=2, seed=5),
    dict(pattern="bigbird", window=1, block_size=3, n_random=1, seed=0),
]
SIZES = [(1, 0), (7, 0), (7, 5), (6, 9)]


def _rand(a, T, M):
    return get_pattern(a).random_blocks(T, M) if a.pattern == "bigbird" else None


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("T,M", SIZES)
def test_pattern_mask_is_the_definition(cfg, T, M):
    a = AttnConfig(**cfg)
    want = expected_visible(a, T, M, _rand(a, T, M))
    assert torch.equal(get_pattern(a).mask(T, M) | causal_mask(T, M), ~want)
    # the chunk plan covers every visible key, each at most once
    for q0, q1, spans in get_pattern(a).chunks(T, M):
        keys = [j for s, e in spans for j in range(s, e)]
        assert len(keys) == len(set(keys)) and keys == sorted(keys)
        assert set(want[q0:q1].any(0).nonzero().squeeze(1).tolist()) <= set(keys)


# ---- layer: banded engine (or flex's native mask) vs masked dense rel_ref --------------------------
def _pair(kind, backend, cfg):
    base = TXLConfig(d_model=32, n_head=2, d_head=16, kind=kind)
    torch.manual_seed(0)
    ref = MultiHeadAttention(base)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    c2 = copy.deepcopy(base)
    c2.attn = AttnConfig(backend=backend, **cfg)
    other = MultiHeadAttention(c2)
    other.load_state_dict(ref.state_dict())
    return ref, other


def _inputs(T, M, kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, 32, generator=g, requires_grad=True)
    mem = torch.randn(2, M, 32, generator=g)
    pe = sinusoid(relative_distances(M + T, 4), 32) if kind == "relative" else None
    return x, mem, pe


SPARSE_BACKENDS = sorted(b for b in BACKENDS if "local" in BACKEND_CAPS[b]["patterns"])


# every pattern x backend with memory (+ same_length); the other kinds and no memory on a subset
CASES = ([(cfg, b, "relative", 7, 9, False) for cfg in CONFIGS for b in SPARSE_BACKENDS]
         + [(cfg, b, "relative", 6, 9, True) for cfg in CONFIGS for b in SPARSE_BACKENDS]
         + [(CONFIGS[i], "rel_fused", kind, T, M, sl) for i in (1, 5, 6)
            for kind, T, M, sl in [("relative", 7, 0, False), ("rotary", 6, 9, False), ("alibi", 7, 5, True),
                                   ("absolute", 6, 9, False)]])


@pytest.mark.parametrize("cfg,backend,kind,T,M,same_length", CASES, ids=str)
def test_pattern_equals_masked_dense(cfg, backend, kind, T, M, same_length):
    a = AttnConfig(**cfg)
    ref, other = _pair(kind, backend, cfg)
    x, mem, pe = _inputs(T, M, kind)
    blocked = causal_mask(T, M, same_length, mem_len=5)
    explicit = blocked | ~expected_visible(a, T, M, _rand(a, T, M))
    y_ref = ref(x, mem, explicit, pe)[0]
    dy = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], dy)
    with _quiet():
        y = other(x, mem, blocked, pe)[0]
    g = torch.autograd.grad(y, [x, *other.parameters()], dy)
    torch.testing.assert_close(y, y_ref, **TOL)
    for n, p, q in zip(["x"] + [n for n, _ in ref.named_parameters()], g, g_ref):
        torch.testing.assert_close(p, q, **TOL, msg=lambda m: f"grad {n}: {m}")
    if backend == "flex":  # and the real FlexAttention (no grad on CPU)
        with torch.no_grad():
            torch.testing.assert_close(other(x, mem, blocked, pe)[0], y_ref, **TOL)


def test_need_weights_with_a_pattern_gives_the_masked_probabilities():
    cfg = dict(pattern="local", window=3)
    ref, other = _pair("relative", "rel_fused", cfg)
    T, M = 4, 6
    x, mem, pe = _inputs(T, M, "relative")
    vis = expected_visible(AttnConfig(**cfg), T, M)
    _, prob, _ = other(x, mem, causal_mask(T, M), pe, need_weights=True)
    _, want, _ = ref(x, mem, ~vis, pe, need_weights=True)
    assert prob.shape == (2, 2, T, M + T)
    assert torch.equal(prob[..., ~vis], torch.zeros_like(prob[..., ~vis]))
    torch.testing.assert_close(prob, want)


# ---- the cheap patterns are cheap -------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dict(pattern="local", window=5), dict(pattern="block_sparse", block_size=4, n_prev=1)])
@pytest.mark.parametrize("backend", ["rel_ref", "rel_fused"])
def test_hidden_memory_is_never_computed(cfg, backend, monkeypatch):
    """Old memory is NaN: any projection or score that touched it would poison the output."""
    T, M = 8, 300
    ref, other = _pair("relative", backend, cfg)
    x, mem, pe = _inputs(T, M, "relative")
    lo = get_pattern(other.cfg.attn).visible_from(T, M)
    assert M - T <= lo < M  # nearly all memory is skipped
    poisoned = mem.clone()
    poisoned[:, :lo] = float("nan")
    explicit = causal_mask(T, M) | ~expected_visible(other.cfg.attn, T, M)
    want = ref(x, mem, explicit, pe)[0]
    seen = []
    fn = BACKENDS[backend]
    monkeypatch.setitem(BACKENDS, backend, lambda q, k, *a, **kw: seen.append(k.size(-2)) or fn(q, k, *a, **kw))
    y = other(x, poisoned, causal_mask(T, M), pe)[0]
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, want, **TOL)
    assert max(seen) <= T + 8  # keys per backend call: chunk + window, not M


@pytest.mark.parametrize("cfg,per_query", [(dict(pattern="local", window=256), 256 + 128),
                                           (dict(pattern="block_sparse", block_size=32, n_prev=1), 64)])
def test_work_independent_of_memory_length(cfg, per_query):
    a, T = AttnConfig(**cfg), 128
    work = {}
    for M in (1024, 16384):
        lo = get_pattern(a).visible_from(T, M)
        plan = get_pattern(a).chunks(T, M - lo)
        work[M] = sum((q1 - q0) * sum(e - s for s, e in spans) for q0, q1, spans in plan)
    assert work[1024] == work[16384] <= T * per_query


# ---- bigbird randomness ---------------------------------------------------------------------
def test_bigbird_random_blocks_reproducible_and_seeded():
    a = AttnConfig(pattern="bigbird", window=4, block_size=4, n_global=1, n_random=3, seed=7)
    T, M = 32, 64
    r1, r2 = get_pattern(a).random_blocks(T, M), get_pattern(a).random_blocks(T, M)
    assert r1 == r2
    assert torch.equal(get_pattern(a).mask(T, M), get_pattern(a).mask(T, M))
    other = get_pattern(AttnConfig(**{**a.__dict__, "seed": 8})).random_blocks(T, M)
    assert other != r1
    kb_min = -(M // 4)
    for b, blocks in enumerate(r1):
        assert len(blocks) == len(set(blocks)) == 3  # enough candidates here: exactly n_random
        for kb in blocks:
            assert kb_min + a.n_global <= kb < b  # not global, strictly before the query block
            assert M + kb * 4 < M + b * 4 - a.window + 1  # not inside the block's window


# ---- topk -------------------------------------------------------------------------------------
def _leaves(T=6, M=5, H=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = M + T
    return [torch.randn(s, generator=g).requires_grad_() for s in
            [(2, 2, T, H), (2, 2, K, H), (2, 2, K, H), (2, 2, T, H), (2, K, H)]]


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("same_length", [False, True])
def test_topk_equals_masked_dense_with_explicit_topk_mask(k, same_length):
    T, M = 6, 5
    q, kk, v, qv, r = leaves = _leaves(T, M)
    blocked = causal_mask(T, M, same_length, mem_len=4)
    got, _ = rel_ref(q, kk, v, RelativeTerm(qv, r), blocked, 0.3, topk=k)
    with torch.no_grad():  # the explicit selection, from scores computed here
        score = (q @ kk.transpose(-1, -2) + rel_shift(qv @ r.transpose(-1, -2))) * 0.3
        score = score.masked_fill(blocked, float("-inf"))
        keep = torch.zeros_like(score, dtype=torch.bool)
        for idx in itertools.product(*map(range, score.shape[:-1])):
            allowed = (~blocked[idx[-1]]).nonzero().squeeze(1).tolist()
            best = sorted(allowed, key=lambda j: -float(score[idx][j]))[:k]
            keep[idx][best] = True
    assert torch.equal(keep.sum(-1), (~blocked).sum(-1).clamp(max=k).expand(2, 2, T))
    want, _ = rel_ref(q, kk, v, RelativeTerm(qv, r), blocked | ~keep, 0.3)
    torch.testing.assert_close(got, want, **TOL)
    dy = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy)):
        torch.testing.assert_close(a, b, **TOL)


def test_topk_at_least_all_keys_is_dense():
    T, M = 6, 5
    q, kk, v, qv, r = _leaves(T, M)
    blocked = causal_mask(T, M)
    dense, _ = rel_ref(q, kk, v, RelativeTerm(qv, r), blocked, 0.3)
    for k in (M + T, 100):
        torch.testing.assert_close(rel_ref(q, kk, v, RelativeTerm(qv, r), blocked, 0.3, topk=k)[0], dense,
                                   rtol=0, atol=0)
    assert not torch.allclose(rel_ref(q, kk, v, RelativeTerm(qv, r), blocked, 0.3, topk=2)[0], dense)


# ---- the README's path: attention=local -> local.yaml -> AttnConfig.pattern -> registry -> Local.run --------
def test_attention_local_reaches_local_run(monkeypatch):
    from pathlib import Path

    from omegaconf import OmegaConf

    from txl.model import TransformerXL
    from txl.model.attention import PATTERNS
    from txl.model.attention.patterns import Local

    conf = Path(__file__).resolve().parent.parent / "conf" / "attention" / "local.yaml"
    root = OmegaConf.create({"seq": {"tgt_len": 8, "mem_len": 8}})
    root.model = OmegaConf.merge(OmegaConf.structured(TXLConfig), OmegaConf.load(conf))
    cfg = OmegaConf.to_object(root)["model"]
    assert PATTERNS[cfg.attn.pattern] is Local and isinstance(get_pattern(cfg.attn), Local)
    calls, run = [], Local.run
    monkeypatch.setattr(Local, "run", lambda self, *a, **kw: calls.append(1) or run(self, *a, **kw))
    model = TransformerXL(cfg)
    model(torch.randint(0, cfg.vocab_size, (1, 8)))
    assert len(calls) == cfg.n_layer  # each layer's attention went through Local.run
