"""metrics.attention_maps: the plotted matrices (one segment's attention over [memory | segment]) are
probability rows over the visible keys; the distance profile is the brute-force mean; txl-eval writes
the PNGs (in process here; tests/test_routing_e2e.py runs the CLI)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import eval_config
from txl.checkpoint import save_model
from txl.data import build_tokenizer
from txl.eval import evaluate_tokens
from txl.metrics.attention_maps import AttentionMaps, capture, distance_profile, draw_maps
from txl.model import TransformerXL, TXLConfig, causal_mask

TEXT = "".join(f"def g{i}(y):\n    return y - {i % 9}\n" for i in range(12))
PNG = b"\x89PNG\r\n\x1a\n"


def _model(tok, **attn):
    torch.manual_seed(0)
    return TransformerXL(TXLConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=32, n_head=2, d_head=16,
                                   d_inner=64, init_std=0.1, attn=attn or {}, seq=dict(tgt_len=8, mem_len=12))).eval()


def _rows_are_probabilities(p, T, M):
    hidden = causal_mask(T, M)  # (T, K)
    assert p.shape[-2:] == (T, M + T)
    assert torch.equal(p[..., hidden], torch.zeros_like(p[..., hidden]))
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))


def test_capture_rows_sum_to_one_over_visible_keys_and_distance_profile():
    tok = build_tokenizer("char", TEXT)
    model = _model(tok)
    ids = torch.tensor(tok.encode(TEXT)[:16]).view(1, 16)
    mems = model(ids[:, :8]).mems
    probs = capture(model, ids[:, 8:], mems)
    assert len(probs) == 2 and probs[0].shape == (2, 8, 16)
    for p in probs:
        _rows_are_probabilities(p, 8, 8)
    p = probs[1]
    N, T, K = p.shape
    M = K - T
    want = torch.zeros(K, dtype=torch.float64)
    for d in range(K):  # brute force: mean over heads and queries i having key j = M + i - d
        vals = [float(p[n, i, M + i - d]) for n in range(N) for i in range(T) if 0 <= M + i - d < K]
        want[d] = sum(vals) / len(vals)
    torch.testing.assert_close(distance_profile(p, M), want)
    assert float(distance_profile(p, M).sum()) > 0


def test_draw_maps_writes_one_png_per_layer_and_the_distance_plot(tmp_path):
    tok = build_tokenizer("char", TEXT)
    model = _model(tok)
    ids = torch.tensor(tok.encode(TEXT)[:8]).view(1, 8)
    probs = capture(model, ids, model(ids).mems)
    paths = draw_maps(probs, 8, tmp_path, "x", keys=list("abcdefghijklmnop"), queries=list("ijklmnop"))
    assert sorted(paths) == ["attention_distance", "attention_map_L0", "attention_map_L1"]
    for p in paths.values():
        assert Path(p).read_bytes()[:8] == PNG and Path(p).stat().st_size > 2000


@pytest.mark.parametrize("segment,want_M", [(0, 0), (1, 8), (2, 12), (99, 12)])
def test_attention_maps_metric_captures_the_chosen_segment(segment, want_M):
    tok = build_tokenizer("char", TEXT)
    model = _model(tok)
    ids = tok.encode(TEXT)[:41]  # 5 segments of 8
    m = AttentionMaps(tok, segment)
    evaluate_tokens(model, ids, 8, 12, hooks=[m], projected_mems=True)
    s = m.summary({})
    assert s["segment"] == min(segment, 4) and s["memory"] == want_M and s["keys"] == want_M + 8
    for p in m.probs:
        _rows_are_probabilities(p, 8, want_M)
    start = 8 * s["segment"]  # the key labels are the stream's tokens: memory then segment
    assert m.keys == [int(i) for i in ids[start - want_M: start + 8]]
    # the captured probabilities are the model's on that segment (memory from the stream)
    model.set_lengths(tgt_len=8, mem_len=12)
    t = torch.tensor(ids[:start + 8]).view(1, -1)
    mems = None
    for a in range(0, start, 8):
        mems = model(t[:, a:a + 8], mems=mems).mems
    want = capture(model, t[:, start:start + 8], mems)
    for a, b in zip(m.probs, want):
        torch.testing.assert_close(a, b)


def test_txl_eval_writes_attention_maps(tmp_path, capsys):
    from txl.eval import run
    tok = build_tokenizer("char", TEXT)
    ckpt = tmp_path / "m.pt"
    save_model(ckpt, _model(tok), tok.state_dict())
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = run(eval_config(ckpt, text, tmp_path, "metrics.attention_maps=true", "seq.eval_tgt_len=8"))
    capsys.readouterr()
    s = out["metrics"]["attention_maps"]
    assert (s["segment"], s["layers"], s["heads"], s["queries"], s["memory"]) == (1, 2, 2, 8, 8)
    for f in ("eval_attention_map_L0.png", "eval_attention_map_L1.png", "eval_attention_distance.png"):
        assert (tmp_path / f).read_bytes()[:8] == PNG, f
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"]["attention_maps"] == s


def test_validation_hook_draws_the_maps_and_hands_them_to_wandb(tmp_path):
    from omegaconf import OmegaConf

    from txl.config import MetricsNode
    from txl.metrics.hooks import ValMetrics, build_val_hooks, wandb_payload
    tok = build_tokenizer("char", TEXT)
    model = _model(tok)
    cfg = OmegaConf.to_object(OmegaConf.structured(MetricsNode(attention_maps=True, position_buckets=0,
                                                               context_buckets=False, attention_stats=False)))
    (hook,) = build_val_hooks(cfg, tokenizer=tok)
    assert isinstance(hook, ValMetrics) and [m.name for m in hook.metrics] == ["attention_maps"]
    hook.reset()
    evaluate_tokens(model, tok.encode(TEXT)[:33], 8, 12, batch_size=2, hooks=[hook])
    rec = {"step": 5, "prefix": "val", "attention_maps": hook.metrics[0].summary({})}
    images = hook.write(rec, tmp_path, "val")
    assert {"attention_map_L0", "attention_map_L1", "attention_distance"} <= set(images)
    assert (tmp_path / "val_attention_map_L1.png").read_bytes()[:8] == PNG
    wandb = pytest.importorskip("wandb")
    pay = wandb_payload(rec, "val", images)
    assert isinstance(pay["val_metrics/attention_map_L0_png"], wandb.Image)
