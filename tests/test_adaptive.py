"""Adaptive input embedding and projected adaptive log-softmax: normalisation, NLL order, cluster
layout, weight tying (same tensor objects) and gradients through tied weights."""
import pytest
import torch
import torch.nn.functional as F

from txl.model import TXLConfig, TransformerXL
from txl.model.adaptive import AdaptiveEmbedding, AdaptiveLogSoftmax, tie_adaptive

V = 100
CUTS = [20, 45, 70]
# (cutoffs, div_val, d_embed) with d_proj = 32: no clusters, clusters with one shared table,
# clusters with one table but projected (d_embed != d_proj), shrinking tables.
SETUPS = [([], 1, 32), ([], 1, 16), (CUTS, 1, 32), (CUTS, 1, 16), (CUTS, 2, 32), ([60], 4, 16)]


def _crit(cutoffs, div_val, d_embed, seed=0):
    torch.manual_seed(seed)
    crit = AdaptiveLogSoftmax(V, d_embed, 32, cutoffs, div_val)
    with torch.no_grad():
        for p in crit.parameters():
            p.normal_(0.0, 0.5)  # far from uniform so the checks are sharp
    return crit


def _targets(cutoffs, n_extra=20, seed=0):
    """Every cluster's first and last token plus random ones, scrambled so clusters interleave."""
    g = torch.Generator().manual_seed(seed)
    ends = [0] + cutoffs + [V]
    t = [x for lo, hi in zip(ends, ends[1:]) for x in (lo, hi - 1)]
    t = torch.cat([torch.tensor(t), torch.randint(0, V, (n_extra,), generator=g)])
    return t[torch.randperm(len(t), generator=g)]


@pytest.mark.parametrize("cutoffs,div_val,d_embed", SETUPS)
def test_log_prob_normalised(cutoffs, div_val, d_embed):
    crit = _crit(cutoffs, div_val, d_embed)
    lp = crit.log_prob(torch.randn(30, 32))
    assert lp.shape == (30, V)
    torch.testing.assert_close(lp.logsumexp(-1), torch.zeros(30), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cutoffs,div_val,d_embed", SETUPS)
def test_nll_is_log_prob_at_target_in_position_order(cutoffs, div_val, d_embed):
    crit = _crit(cutoffs, div_val, d_embed)
    t = _targets(cutoffs)
    h = torch.randn(len(t), 32)
    want = -crit.log_prob(h).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(crit.nll(h, t), want, rtol=1e-5, atol=1e-5)
    # row k's NLL depends on row k only: permuting the rows permutes the NLL
    perm = torch.randperm(len(t))
    torch.testing.assert_close(crit.nll(h[perm], t[perm]), want[perm], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d_embed", [32, 16])
def test_cluster_layout_explicit(d_embed):
    """div_val 1: head = shortlist + one logit per tail cluster, tail i hanging off column
    cutoffs[0] + i - 1; p(t) = p_head(cluster) * p_tail(t | cluster)."""
    crit = _crit(CUTS, 1, d_embed)
    h = torch.randn(8, 32)
    W, b = crit.layers[0].weight, crit.layers[0].bias
    ends = [0] + CUTS + [V]
    want = torch.empty(8, V)
    for i, (lo, hi) in enumerate(zip(ends, ends[1:])):
        z = h @ crit.projs[i] if d_embed != 32 else h  # (8, d_embed): project into cluster i's space
        if i == 0:
            head = torch.cat([z @ W[lo:hi].T + b[lo:hi], z @ crit.cluster_weight.T + crit.cluster_bias], 1)
            head = head.log_softmax(-1)
            want[:, lo:hi] = head[:, :hi]
        else:
            want[:, lo:hi] = head[:, CUTS[0] + i - 1, None] + (z @ W[lo:hi].T + b[lo:hi]).log_softmax(-1)
    torch.testing.assert_close(crit.log_prob(h), want, rtol=1e-5, atol=1e-5)


def test_no_cutoffs_is_plain_softmax():
    crit = _crit([], 1, 32)
    h = torch.randn(5, 32)
    torch.testing.assert_close(crit.log_prob(h), F.log_softmax(crit.layers[0](h), -1))
    assert not hasattr(crit, "cluster_weight")


def test_embedding_lookup_per_cluster():
    torch.manual_seed(0)
    emb = AdaptiveEmbedding(V, 32, 16, CUTS, div_val=2)
    with torch.no_grad():  # the module leaves init to the model; give every weight finite values
        for p in emb.parameters():
            p.normal_(0.0, 0.1)
    ids = _targets(CUTS).view(2, -1)
    got = emb(ids)
    ends = [0] + CUTS + [V]
    for b in range(2):
        for t in range(ids.size(1)):
            tok = int(ids[b, t])
            i = max(k for k in range(len(ends) - 1) if ends[k] <= tok)
            want = emb.projs[i] @ emb.layers[i].weight[tok - ends[i]] * 16 ** 0.5
            torch.testing.assert_close(got[b, t], want, rtol=1e-5, atol=1e-5)


# ---- tying ---------------------------------------------------------------------------------
def _txl(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=V, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, cutoffs=CUTS,
                seq=dict(tgt_len=6, mem_len=6))
    return TransformerXL(TXLConfig(**{**base, **kw}))


@pytest.mark.parametrize("div_val,d_embed", [(1, 16), (2, 32), (1, 32)])
def test_tied_weights_are_the_same_tensors(div_val, d_embed):
    m = _txl(div_val=div_val, d_embed=d_embed)  # default tie_projs: all clusters but the first
    for e, o in zip(m.embed.layers, m.head.layers):
        assert o.weight is e.weight
    if d_embed == 32 and div_val == 1:  # no projections at all
        assert len(m.embed.projs) == 0 and len(m.head.projs) == 0
        return
    assert len(m.head.projs) == len(CUTS) + 1
    for i, p in enumerate(m.head.projs):
        shared = m.embed.projs[0] if div_val == 1 else m.embed.projs[i]
        assert (p is shared) == (i > 0), i
    # an optimizer step through one name is seen through the other
    with torch.no_grad():
        m.embed.layers[-1].weight.add_(1.0)
    assert torch.equal(m.head.layers[-1].weight, m.embed.layers[-1].weight)


@pytest.mark.parametrize("div_val,d_embed", [(1, 16), (2, 32)])
def test_untied_when_asked(div_val, d_embed):
    m = _txl(div_val=div_val, d_embed=d_embed, tie_weight=False, tie_projs=[False] * (len(CUTS) + 1))
    emb_ids = {id(p) for p in m.embed.parameters()}
    assert not emb_ids & {id(p) for p in m.head.parameters()}
    for e, o in zip(m.embed.layers, m.head.layers):
        assert not torch.equal(e.weight, o.weight)
    m = _txl(div_val=div_val, d_embed=d_embed, tie_projs=[True] * (len(CUTS) + 1))
    assert m.head.projs[0] is (m.embed.projs[0])


@pytest.mark.parametrize("div_val,d_embed", [(1, 16), (2, 32)])
def test_tied_gradient_is_sum_of_both_uses(div_val, d_embed):
    """A tied tensor's grad = grad through the embedding + grad through the softmax (untied twin)."""
    tied = _txl(div_val=div_val, d_embed=d_embed)
    untied = _txl(div_val=div_val, d_embed=d_embed, tie_weight=False, tie_projs=[False] * (len(CUTS) + 1))
    untied.load_state_dict(tied.state_dict())  # same numbers, separate tensors
    x = _targets(CUTS, n_extra=24).view(2, -1)
    y = x.roll(-1, 1)
    for m in (tied, untied):
        m(x, labels=y).loss.backward()
    for i, (e, o) in enumerate(zip(untied.embed.layers, untied.head.layers)):
        assert e.weight.grad.abs().sum() > 0 and o.weight.grad.abs().sum() > 0  # both ends contribute
        torch.testing.assert_close(tied.embed.layers[i].weight.grad, e.weight.grad + o.weight.grad)
    for i in range(1, len(CUTS) + 1):
        j = 0 if div_val == 1 else i
        want = untied.embed.projs[j].grad + (untied.head.projs[i].grad if div_val > 1 else
                                              sum(untied.head.projs[k].grad for k in range(1, len(CUTS) + 1)))
        torch.testing.assert_close(tied.embed.projs[j].grad, want)


def test_model_nll_matches_log_probs():
    m = _txl(div_val=2)
    x = _targets(CUTS, n_extra=24).view(2, -1)
    y = x.flip(1)
    y[0, 3] = -100
    out = m(x, labels=y, return_log_probs=True)
    want = -out.log_probs.gather(2, y.clamp(min=0)[..., None]).squeeze(2)
    keep = y != -100
    torch.testing.assert_close(out.nll[keep], want[keep], rtol=1e-5, atol=1e-5)
    assert out.nll[0, 3] == 0
    torch.testing.assert_close(out.loss, want[keep].mean(), rtol=1e-5, atol=1e-5)
