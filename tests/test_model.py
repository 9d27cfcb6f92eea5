"""TransformerXL as a whole: causality, input validation, set_lengths, config isolation, bf16 autocast."""
import pytest
import torch

from txl.model import BACKENDS, TXLConfig, TransformerXL

KINDS = ["relative", "absolute", "rotary", "alibi"]
V = 64


def _cfg(**kw):
    seq = dict(tgt_len=6, mem_len=5)
    seq.update(kw.pop("seq", {}))
    base = dict(vocab_size=V, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, init_std=0.2, seq=seq)
    return TXLConfig(**{**base, **kw})


def _model(**kw):
    torch.manual_seed(0)
    return TransformerXL(_cfg(**kw)).eval()


def _ids(B=2, T=6, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- causality -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_mem", [False, True])
@pytest.mark.parametrize("same_length", [False, True])
def test_future_tokens_never_change_the_past(kind, with_mem, same_length):
    """Row 0 is the base sequence; row 1 + t0 changes only token t0. One batched forward."""
    model = _model(kind=kind, seq=dict(same_length=same_length))
    T = 6
    x = _ids(B=1, T=T).repeat(T + 1, 1)
    for t0 in range(T):
        x[1 + t0, t0] = (x[1 + t0, t0] + 1) % V
    y = _ids(B=1, T=T, seed=2).expand(T + 1, T)
    mems = [m.expand(T + 1, -1, -1) for m in model(_ids(B=1, seed=7)).mems] if with_mem else None
    out = model(x, mems=mems, labels=y)
    h, nll = out.hidden, out.nll
    for t0 in range(T):
        r = 1 + t0
        torch.testing.assert_close(h[r, :t0], h[0, :t0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(nll[r, :t0], nll[0, :t0], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(h[r, t0], h[0, t0])  # the change did arrive
        for m in out.mems:  # memory rows of positions before t0 are untouched too (last 5 of [M | T])
            keep = max(m.size(1) - (T - t0), 0)
            torch.testing.assert_close(m[r, :keep], m[0, :keep], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_attention_weights_are_causal_and_normalised(kind):
    model = _model(kind=kind)
    mems = model(_ids(seed=7)).mems  # M = 5
    out = model(_ids(T=4), mems=mems, need_weights=True)
    assert len(out.attn) == 2
    for p in out.attn:
        assert p.shape == (2, 2, 4, 9)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 4))
        future = torch.arange(9)[None, :] > torch.arange(4)[:, None] + 5
        assert (p[..., future] == 0).all()
    assert model(_ids(T=4), mems=mems).attn is None


# ---- bad input -----------------------------------------------------------------------------
def _bad_calls():
    x = _ids()
    mem = [torch.zeros(2, 3, 32)] * 2
    return [
        ("1-D ids", dict(input_ids=x[0]), "input_ids"),
        ("3-D ids", dict(input_ids=x[..., None]), "input_ids"),
        ("float ids", dict(input_ids=x.float()), "input_ids"),
        ("list ids", dict(input_ids=x.tolist()), "input_ids"),
        ("empty ids", dict(input_ids=x[:, :0]), "input_ids"),
        ("id >= V", dict(input_ids=torch.full((2, 6), V)), "input_ids"),
        ("id < 0", dict(input_ids=torch.full((2, 6), -1)), "input_ids"),
        ("label shape", dict(input_ids=x, labels=x[:, :5]), "labels"),
        ("label >= V", dict(input_ids=x, labels=torch.full((2, 6), V)), "labels"),
        ("label < 0", dict(input_ids=x, labels=torch.full((2, 6), -1)), "labels"),
        ("float labels", dict(input_ids=x, labels=x.float()), "labels"),
        ("mems layers", dict(input_ids=x, mems=mem[:1]), "mems"),
        ("mems batch", dict(input_ids=x, mems=[torch.zeros(3, 3, 32)] * 2), "mems"),
        ("mems D", dict(input_ids=x, mems=[torch.zeros(2, 3, 16)] * 2), "mems"),
        ("mems 2-D", dict(input_ids=x, mems=[torch.zeros(3, 32)] * 2), "mems"),
        ("mems M differ", dict(input_ids=x, mems=[torch.zeros(2, 3, 32), torch.zeros(2, 4, 32)]), "mems"),
        ("mems stacked", dict(input_ids=x, mems=torch.zeros(2, 2, 3, 32)), "mems"),
        ("mems None entry", dict(input_ids=x, mems=[mem[0], None]), "mems"),
    ]


@pytest.mark.parametrize("name,kw,arg", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_forward_input(name, kw, arg):
    model = _model()
    with pytest.raises(ValueError, match=arg):
        model(**kw)


@pytest.mark.parametrize("seq,arg", [
    (dict(tgt_len=0), "tgt_len"), (dict(tgt_len=-3), "tgt_len"), (dict(mem_len=-1), "mem_len"),
    (dict(ext_len=-1), "ext_len"), (dict(clamp_len=1.5), "clamp_len"),
    (dict(mem_len=0, same_length=True), "same_length"),
])
def test_bad_lengths(seq, arg):
    with pytest.raises(ValueError, match=arg):
        _cfg(seq=seq)
    model = _model()
    before = model.seq
    with pytest.raises(ValueError, match=arg):
        model.set_lengths(**seq)
    assert model.seq == before  # a rejected change leaves the lengths as they were


def test_set_lengths_unknown_field():
    with pytest.raises(ValueError, match="mem_length"):
        _model().set_lengths(mem_length=3)


@pytest.mark.parametrize("kw,arg", [
    (dict(vocab_size=0), "vocab_size"), (dict(n_layer=0), "n_layer"), (dict(dropout=1.0), "dropout"),
    (dict(kind="learned"), "kind"), (dict(mem_init="random"), "mem_init"), (dict(cutoffs=[40, 20]), "cutoffs"),
    (dict(cutoffs=[20, V]), "cutoffs"), (dict(tie_projs=[True, True]), "tie_projs"),
    (dict(cutoffs=[20], tie_projs=[True]), "tie_projs"), (dict(kind="rotary", d_head=15), "d_head"),
])
def test_bad_config(kw, arg):
    with pytest.raises(ValueError, match=arg):
        _cfg(**kw)


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match="backend") as e:
        TransformerXL(_cfg(attn=dict(backend="nope")))
    assert all(name in str(e.value) for name in BACKENDS)
    model = _model()
    model.cfg.attn.backend = "still_nope"  # switched after construction: the forward refuses too
    with pytest.raises(ValueError, match="rel_ref"):
        model(_ids())


# ---- set_lengths ---------------------------------------------------------------------------
def test_set_lengths_changes_lengths_not_weights():
    model = _model()
    x, y = _ids(), _ids(seed=2)
    mems = model(_ids(seed=7)).mems  # M = 5
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = model(x, mems=mems, labels=y)

    model.set_lengths(tgt_len=64, mem_len=8, clamp_len=2, same_length=True)
    assert (model.seq.tgt_len, model.seq.mem_len, model.seq.clamp_len, model.seq.same_length) == (64, 8, 2, True)
    sd = model.state_dict()
    assert sd.keys() == state.keys() and all(torch.equal(sd[k], state[k]) for k in state)

    model.set_lengths(clamp_len=-1, same_length=False)
    out = model(x, mems=mems, labels=y)
    torch.testing.assert_close(out.nll, base.nll, rtol=0, atol=0)  # mem_len only shapes the new memory
    assert out.mems[0].size(1) == 8 and base.mems[0].size(1) == 5

    model.set_lengths(clamp_len=2)  # distances > 2 now share one encoding: later queries change
    clamped = model(x, mems=mems, labels=y)
    assert not torch.allclose(clamped.nll, base.nll)

    model.set_lengths(clamp_len=-1, mem_len=6, same_length=True)  # each query sees at most 6 keys
    same = model(x, mems=mems, labels=y)
    torch.testing.assert_close(same.nll[:, 0], base.nll[:, 0])  # query 0 had 6 keys anyway; the rest had more
    assert not torch.allclose(same.nll[:, 1:], base.nll[:, 1:])


def test_set_lengths_does_not_reach_the_callers_config():
    cfg = _cfg()
    a, b = TransformerXL(cfg), TransformerXL(cfg)
    a.set_lengths(mem_len=2)
    assert cfg.seq.mem_len == 5 and b.seq.mem_len == 5 and a.seq.mem_len == 2
    assert all(blk.attn.cfg is a.cfg for blk in a.blocks)  # one config inside a model


# ---- bf16 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["relative", "rotary"])
@pytest.mark.parametrize("cutoffs,div_val", [([], 1), ([20, 40], 2)])
def test_bf16_autocast_cpu(kind, cutoffs, div_val):
    model = _model(kind=kind, cutoffs=cutoffs, div_val=div_val, init_std=0.02).train()
    x, y = _ids(), _ids(seed=2)
    mems = model(_ids(seed=7)).mems
    ref = model(x, mems=mems, labels=y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mems=mems, labels=y)
    out.loss.backward()
    assert out.nll.dtype == torch.float32  # the softmax runs in fp32
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out.nll, ref.nll, rtol=0.02, atol=0.05)
    assert all(m.size(1) == 5 for m in out.mems)


@pytest.mark.parametrize("pre_lnorm", [False, True])
def test_bf16_casts_once_per_layer_equal_autocast_per_use(pre_lnorm, monkeypatch):
    """The attention layer casts W_qkv and its input once under autocast (block.py) instead of at
    each of their 2-3 uses: the forward is bit-equal to autocast's own per-use casts, the gradients
    differ only by the rounding of bf16 sums (the uses' gradients meet before the cast back)."""
    def run(model, x, y, mems):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, mems=mems, labels=y)
        out.loss.backward()
        return out.nll, [p.grad.clone() for p in model.parameters()]
    model = _model(pre_lnorm=pre_lnorm, init_std=0.02).train()
    x, y = _ids(), _ids(seed=2)
    mems = model(_ids(seed=7)).mems
    once, g_once = run(model, x, y, mems)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False)  # the layer leaves casting to autocast
    per_use, g_per_use = run(model, x, y, mems)
    torch.testing.assert_close(once, per_use, rtol=0, atol=0)
    for a, b in zip(g_once, g_per_use):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("div_val", [1, 2])
def test_int32_ids_and_labels_match_int64(div_val):
    model = _model(cutoffs=[20, 40], div_val=div_val)
    x, y = _ids(), _ids(seed=2)
    a = model(x, labels=y)
    b = model(x.int(), labels=y.int())
    assert torch.equal(a.nll, b.nll) and torch.equal(a.hidden, b.hidden)
