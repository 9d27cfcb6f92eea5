"""txl.metrics: loss by position / context, attention statistics, recall counting, ECL / RECL, the
validation hook's files. Known answers or independent recomputations; tiny models, seconds."""
import json
import math

import numpy as np
import pytest
import torch

from txl.eval import evaluate_tokens
from txl.metrics import build_val_hooks
from txl.metrics.attention_stats import AttentionStats, attention_sums
from txl.metrics.context import TokenLosses
from txl.metrics.hooks import ValMetrics, draw, read_jsonl, wandb_payload
from txl.metrics.position import LossByContext, LossByPosition, available_context, log2_bucket, position_buckets
from txl.metrics.recl import auto_contexts, ecl, hard_tokens, parse_contexts, recl, recl_table, relative_gain, gain_profile
from txl.metrics.synthetic import RecallAccuracy, recall_counts
from txl.model import TransformerXL, TXLConfig
from txl.model.attention import causal_mask

V = 48


@pytest.fixture(autouse=True)
def one_thread():  # tiny matrices: threading only adds overhead
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(mem_len=8, tgt_len=8, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = TXLConfig(vocab_size=V, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, init_std=0.1,
                    seq=dict(tgt_len=tgt_len, mem_len=mem_len), **kw)
    return TransformerXL(cfg).eval()


def _tokens(n=161, seed=3):
    return np.random.default_rng(seed).integers(0, V, n)


def _summ(m, model):
    return m.summary(m.state(model, "cpu"))


class Collect:  # an independent record of what evaluate_tokens scored
    def __init__(self):
        self.rows = []

    def update(self, model, batch, out, mems_in):
        self.rows.append((batch["labels"].clone(), out.nll.clone(), mems_in[0].size(1)))


# ---------------------------------------------------------------------------- position / context
def test_position_buckets_and_short_segment():
    assert position_buckets(64, 64, 8).tolist() == [i // 8 for i in range(64)]
    assert position_buckets(5, 64, 8).tolist() == [0] * 5  # a short last segment keeps the edges
    assert position_buckets(10, 10, 3).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_available_context_known_answers():
    T = 8
    assert available_context(T, 0).tolist() == list(range(1, T + 1))  # no memory: capped at the segment
    assert available_context(T, 16).tolist() == [17 + t for t in range(T)]
    assert available_context(T, 16, filled=4).tolist() == [5 + t for t in range(T)]  # zeros-init padding
    assert available_context(T, 16, same_length=True, mem_len=16).tolist() == [16] * T  # paper's eval setting
    assert log2_bucket(torch.tensor([1, 2, 3, 4, 7, 8, 1023, 1024])).tolist() == [0, 1, 1, 2, 2, 3, 9, 10]


def test_loss_by_position_matches_manual_and_overall_loss():
    model, toks = _model(), _tokens()
    col, pos = Collect(), LossByPosition(n_buckets=4, nomem_batches=0)
    res = evaluate_tokens(model, toks, 8, 8, batch_size=2, hooks=[col, pos])
    s = _summ(pos, model)
    sums, cnt = np.zeros(4), np.zeros(4)
    for labels, nll, _ in col.rows:
        for t in range(labels.size(1)):
            keep = labels[:, t] != -100
            sums[t // 2] += float(nll[keep, t].double().sum())
            cnt[t // 2] += int(keep.sum())
    np.testing.assert_allclose(s["loss"], sums / cnt, rtol=1e-12)
    assert s["tokens"] == cnt.astype(int).tolist() and s["edges"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    overall = sum(v * c for v, c in zip(s["loss"], s["tokens"]) if v is not None) / sum(s["tokens"])
    assert overall == pytest.approx(res["loss"], rel=1e-9)  # the buckets partition the scored tokens


def test_no_memory_sample_equals_a_memoryless_forward():
    model, toks = _model(), _tokens()
    pos = LossByPosition(n_buckets=8, nomem_batches=1)  # one bucket per position
    col = Collect()
    evaluate_tokens(model, toks, 8, 8, batch_size=2, hooks=[col, pos])
    s = _summ(pos, model)
    # batch 0 has an empty memory (skipped); batch 1 is the sample
    from txl.data.stream import OrderedStream
    b1 = OrderedStream(toks, 2, 8).segment(1)
    with torch.no_grad():
        ref0 = model(b1["input_ids"], labels=b1["labels"]).nll.double().mean(0)
    ref1 = col.rows[1][1].double().mean(0)
    torch.testing.assert_close(torch.tensor(s["sample_nomem"], dtype=torch.float64), ref0)
    torch.testing.assert_close(torch.tensor(s["sample_mem"], dtype=torch.float64), ref1)
    assert s["sample_tokens"] == 16


def test_context_of_a_memoryless_model_is_capped_at_the_segment():
    model, toks = _model(mem_len=0), _tokens(n=3 * 8 * 4 + 1)
    ctx = LossByContext()
    evaluate_tokens(model, toks, 8, 0, batch_size=3, hooks=[ctx])
    b = {r["bucket"]: r["tokens"] for r in _summ(ctx, model)["buckets"]}
    # 4 segments x 3 rows; positions 0 | 1-2 | 3-6 | 7 see 1 | 2-3 | 4-7 | 8 keys
    assert b == {"1": 12, "2-3": 24, "4-7": 48, "8-15": 12}


def test_context_with_memory_and_same_length():
    model, toks = _model(mem_len=16), _tokens(n=4 * 8 + 1)
    col, ctx = Collect(), LossByContext()
    evaluate_tokens(model, toks, 8, 16, batch_size=1, hooks=[col, ctx])
    # segments see memory 0, 8, 16, 16 -> contexts t+1, t+9, t+17, t+17
    expect = {}
    for M in (0, 8, 16, 16):
        for t in range(8):
            k = int(math.floor(math.log2(M + t + 1)))
            expect[k] = expect.get(k, 0) + 1
    got = {int(math.log2(r["lo"])): r["tokens"] for r in _summ(ctx, model)["buckets"]}
    assert got == expect
    model.set_lengths(same_length=True)
    ctx2 = LossByContext()
    evaluate_tokens(model, toks, 8, 16, batch_size=1, hooks=[ctx2])
    rows = _summ(ctx2, model)["buckets"]
    # same_length hides keys more than mem_len back: the two full-memory segments see exactly 16
    # keys each, the half-filled one min(t + 9, 16) (only its last query reaches 16)
    assert [(r["bucket"], r["tokens"]) for r in rows][-1] == ("16-31", 16 + 1)


# ---------------------------------------------------------------------------- attention statistics
def test_uniform_attention_distance_is_the_mean_key_distance():
    T, M, B, N = 5, 3, 2, 2
    vis = (~causal_mask(T, M)).double()
    probs = (vis / vis.sum(-1, keepdim=True)).expand(B, N, T, M + T)
    d, m, n = attention_sums(probs, M)
    i = torch.arange(T, dtype=torch.float64)
    torch.testing.assert_close(d / n, ((M + i) / 2).mean().expand(N))
    torch.testing.assert_close(m / n, (M / (M + i + 1)).mean().expand(N))


def test_attention_stats_on_a_model_with_uniform_attention():
    model = _model(mem_len=8)
    N, H = model.cfg.n_head, model.cfg.d_head
    with torch.no_grad():  # zero queries and content / position biases: every score is 0 -> uniform
        for blk in model.blocks:
            blk.attn.qkv.weight[: N * H].zero_()
            blk.attn.u.zero_()
            blk.attn.v.zero_()
    st = AttentionStats(batches=2, rows=2)
    evaluate_tokens(model, _tokens(), 8, 8, batch_size=2, hooks=[st])
    s = _summ(st, model)
    i = torch.arange(8, dtype=torch.float64)
    # batch 0 (no memory yet) is skipped; batches 1 and 2 see 8 memory keys
    dist, mem = ((8 + i) / 2).mean().item(), (8 / (8 + i + 1)).mean().item()
    assert s["queries"] == 32
    np.testing.assert_allclose(s["distance"], [[dist] * N] * 2, rtol=1e-6)
    np.testing.assert_allclose(s["memory_mass"], [[mem] * N] * 2, rtol=1e-6)


def test_attention_stats_without_memory_spend_nothing_on_memory():
    model = _model(mem_len=0)
    st = AttentionStats(batches=3, rows=1)
    evaluate_tokens(model, _tokens(), 8, 0, batch_size=2, hooks=[st])
    s = _summ(st, model)
    assert s["queries"] == 24 and np.all(np.array(s["memory_mass"]) == 0)
    assert np.all(np.array(s["distance"]) <= 7) and np.all(np.array(s["distance"]) > 0)


# ---------------------------------------------------------------------------- recall counting
def test_recall_counts_known_answer():
    ids = torch.tensor([[5, 9, 1, 7, 9], [9, 2, 7, 9, 3]])
    labels = torch.tensor([[1, 4, 2, 3, 6], [2, 2, 0, 5, -100]])
    pred = torch.tensor([[0, 4, 0, 3, 0], [1, 0, 1, 5, 0]])
    c = recall_counts(pred, labels, ids, {16: 9, 32: 7})
    # marker 9: (0,1) right, (0,4) wrong, (1,0) wrong, (1,3) right; marker 7: (0,3) right, (1,2) wrong
    assert c.tolist() == [[2.0, 4.0], [1.0, 2.0]]
    m = RecallAccuracy({16: 9, 32: 7})
    s = m.summary({"counts": c})
    assert m.scalars(s, "val") == {"val_recall_acc/d00016": 0.5, "val_recall_acc/d00032": 0.5}


# ---------------------------------------------------------------------------- ECL / RECL
def test_ecl_known_answer():
    L = [2.0, 1.0, 0.995, 0.5]  # gains: 1-e^-1, 1-e^-0.005 (< 0.01): stop at the second context
    r = ecl(L, [0, 100, 200, 300])
    assert r["ecl"] == 100 and not r["saturated"]
    assert r["gains"][0] == pytest.approx(1 - math.exp(-1.0))
    assert ecl([3.0, 2.0, 1.0], [0, 1, 2]) == {"ecl": 2, "saturated": True, "gains": pytest.approx(
        [1 - math.exp(-1)] * 2), "threshold": 0.01}


def test_recl_single_model_steps():
    l0, l1, l2 = [2.0] * 4, [1.0] * 4, [1.0] * 4
    out = recl(np.array([[l0, l1, l2]]), [0, 100, 200], r=1.0)
    assert out[0]["recl"] == 100 and out[0]["gains"] == pytest.approx([1 - math.exp(-1), 0.0])


def test_recl_baseline_is_the_best_model_at_the_short_context():
    # model A: good at c=0 (loss 1), no gain; model B: bad at c=0 (loss 3), reaches 1.5 at c=100.
    # The baseline is A's loss 1: B's improvement to 1.5 never beats it -> no credit, RECL 0 for both.
    A = [[1.0] * 10, [1.0] * 10]
    B = [[3.0] * 10, [1.5] * 10]
    out = recl(np.array([A, B]), [0, 100], r=1.0)
    assert [o["recl"] for o in out] == [0, 0] and out[1]["gains"] == [0.0]
    # B improving below the baseline (0.5 on half the tokens) gets exactly that credit
    B[1] = [0.5] * 5 + [1.5] * 5
    g = relative_gain(np.array([A, B]), 1, 0, 1, r=1.0)
    assert g == pytest.approx(1 - math.exp(0.5 * 0.5 - 1.0 + 0.5))  # f(c,c') = (5*0.5 + 5*1)/10 = 0.75


def test_recl_top_r_focuses_on_hard_tokens():
    delta = 0.05
    short = np.array([1.0] * 90 + [3.0] * 10)  # 10 hard tokens
    long = short.copy()
    long[90:] -= delta  # only the hard tokens gain
    L = np.stack([short, long])[None]  # (1, 2, 100)
    assert relative_gain(L, 0, 0, 1, r=0.1) == pytest.approx(1 - math.exp(-delta))
    assert relative_gain(L, 0, 0, 1, r=1.0) == pytest.approx(1 - math.exp(-0.1 * delta))
    assert recl(L, [0, 64], r=0.1)[0] == {"recl": 64, "saturated": True, "gains": [pytest.approx(1 - math.exp(-delta))]}
    assert recl(L, [0, 64], r=1.0)[0]["recl"] == 0
    assert sorted(hard_tokens(short, 0.1).tolist()) == list(range(90, 100))
    table = recl_table(["xl"], {0.1: recl(L, [0, 64], 0.1), 1.0: recl(L, [0, 64], 1.0)})
    assert table.splitlines()[-1] == "| xl | 64+ | 0 |"


def test_recl_min_credit_counts_noise_that_the_mean_does_not():
    # a model whose per-token losses only fluctuate (+-0.5, mean unchanged) between two contexts:
    # the paper's min(b, l) keeps every drop and none of the rises -> a 'gain'; its own change is 0
    short = np.array([2.0] * 10)
    long = short + np.array([0.5, -0.5] * 5)
    L = np.stack([short, long])[None]  # (1, 2, 10)
    assert relative_gain(L, 0, 0, 1, r=1.0) == pytest.approx(1 - math.exp(-0.25))
    assert relative_gain(L, 0, 0, 1, r=1.0, credit="own") == pytest.approx(0.0, abs=1e-12)
    prof = gain_profile(np.concatenate([L, L], axis=1), r=1.0)  # contexts short, long, short, long: every step
    assert prof["min"][0][0] == pytest.approx(1 - math.exp(-0.25)) and prof["own"][0][0] == pytest.approx(0.0, abs=1e-12)
    assert len(prof["min"][0]) == len(prof["own"][0]) == 3 and prof["own"][0][1] == pytest.approx(0.0, abs=1e-12)
    # "own" measures a model against itself, not against the group's best: B (1 nat worse everywhere)
    # gaining 0.2 nats on every token gets 1 - e^-0.2, although it never beats A (min credit 0)
    A = np.stack([short, short])
    G = np.stack([A, np.stack([short + 1.0, short + 0.8])])  # (2 models, 2 contexts, 10)
    assert relative_gain(G, 1, 0, 1, r=1.0, credit="own") == pytest.approx(1 - math.exp(-0.2))
    assert relative_gain(G, 1, 0, 1, r=1.0) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="credit"):
        relative_gain(L, 0, 0, 1, r=1.0, credit="max")


def test_contexts_parsing_and_errors():
    assert auto_contexts(64, 64) == [0, 32, 64, 128, 256]
    assert auto_contexts(8, 64) == [0, 4, 8, 16, 32, 64, 128]
    assert parse_contexts("128,0,64") == [0, 64, 128] and parse_contexts("auto", 64, 64, 128) == [0, 32, 64, 128]
    for bad in ("0", "a,b", [0, -1], [5]):
        with pytest.raises(ValueError):
            parse_contexts(bad)
    with pytest.raises(ValueError, match="r: must be in"):
        recl(np.zeros((1, 2, 3)), [0, 1], r=0.0)
    with pytest.raises(ValueError, match="losses"):
        recl(np.zeros((2, 3)), [0, 1], r=0.5)


# ---------------------------------------------------------------------------- hook files, wandb payload
def test_val_metrics_files_and_wandb_payload(tmp_path):
    pytest.importorskip("wandb")
    import wandb
    model, toks = _model(), _tokens()
    from omegaconf import OmegaConf

    from txl.config import MetricsNode
    cfg = OmegaConf.to_object(OmegaConf.structured(MetricsNode(nomem_batches=1)))
    (hook,) = build_val_hooks(cfg)
    assert isinstance(hook, ValMetrics) and [m.name for m in hook.metrics] == ["position", "context", "attention"]
    for step in (10, 20):
        hook.reset()
        evaluate_tokens(model, toks, 8, 8, batch_size=2, hooks=[hook])
        rec = {"step": step, "prefix": "val", **{m.name: _summ(m, model) for m in hook.metrics}}
        hook.plots = step == 20  # draw once, from both records
        images = hook.write(rec, tmp_path, "val")
    hist = read_jsonl(tmp_path / "val.jsonl")
    assert [r["step"] for r in hist] == [10, 20] and hist[1]["position"] == json.loads(json.dumps(rec["position"]))
    assert set(images) == {"position", "context", "attention"}
    for p in images.values():
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    pay = wandb_payload(rec, "val", images)
    assert isinstance(pay["val_metrics/attention"], wandb.Table)
    assert {"val_metrics/loss_by_position", "val_metrics/loss_by_context", "val_metrics/position_png"} <= set(pay)
    assert draw([], tmp_path, "x") == {}


def test_metrics_node_validation():
    from txl.config import MetricsNode
    assert MetricsNode(context_sweep=[128, 0]).context_sweep == [0, 128]
    assert MetricsNode(context_sweep="auto").context_sweep == "auto"
    for kw in (dict(position_buckets=-1), dict(threshold=0.0), dict(context_sweep=[3]), dict(sweep_max=0),
               dict(attention_rows=0)):
        with pytest.raises(ValueError, match="metrics"):
            MetricsNode(**kw)
    assert build_val_hooks(MetricsNode(enabled=False)) == []


def test_token_losses_are_in_text_order():
    model, toks = _model(), _tokens(n=2 * 24 + 1)
    col, tl = Collect(), TokenLosses()
    evaluate_tokens(model, toks, 8, 8, batch_size=2, hooks=[col, tl])
    nll = torch.cat([r[1] for r in col.rows], dim=1)  # (2 rows, 24 columns): row 0 is text 0..23
    np.testing.assert_array_equal(tl.values(), nll.reshape(-1).double().numpy())
