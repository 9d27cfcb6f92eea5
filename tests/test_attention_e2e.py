"""End to end under the CLIs: attention=routing trains (centroids move and are in the checkpoint), its
validation draws the attention maps, txl-eval metrics.attention_maps=true writes them next to eval.json;
attention=mixed trains."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_train_args

pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"


def _centroids(path):
    ck = torch.load(path, map_location="cpu", weights_only=False)
    return {k: v for k, v in ck["state_dict"].items() if k.endswith("centroids")}


def test_routing_trains_and_txl_eval_draws_attention_maps(corpus_files, run_cli, tmp_path):
    d = tmp_path / "run"
    r = run_cli("train", *tiny_train_args(corpus_files, d, "attention=routing", "model.attn.window=4",
                                          "model.attn.ema_decay=0.5", "trainer.max_steps=6",
                                          "trainer.val_check_interval=6", "trainer.limit_val_batches=2",
                                          "metrics.attention_maps=true"))
    assert r.returncode == 0, r.stderr[-2000:]
    cent = _centroids(d / "checkpoints" / "last.ckpt")
    assert len(cent) == 2 and all(v.shape == (2, 4, 16) for v in cent.values())  # tiny: 2 layers, 2 heads x 16
    from txl.model.attention.patterns import Centroids
    start = Centroids(2, 4, 16, 0.5, 0).centroids  # what training started from (seed 0)
    assert all(not torch.allclose(v, start) for v in cent.values())  # moved by the EMA
    assert (d / "metrics" / "val_attention_map_L0.png").read_bytes()[:8] == PNG  # drawn at validation
    e = tmp_path / "eval"
    r = run_cli("eval", f"ckpt_path={d / 'checkpoints' / 'last.ckpt'}", f"eval.text_file={corpus_files[2]}",
                "eval.max_tokens=200", "metrics.attention_maps=true", f"hydra.run.dir={e}")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["metrics"]["attention_maps"]["memory"] == 16
    for f in ("eval_attention_map_L0.png", "eval_attention_map_L1.png", "eval_attention_distance.png"):
        assert (e / f).read_bytes()[:8] == PNG, f


def test_mixed_score_trains(corpus_files, run_cli, tmp_path):
    r = run_cli("train", *tiny_train_args(corpus_files, tmp_path, "attention=mixed", "trainer.max_steps=6",
                                          "trainer.val_check_interval=6", "trainer.limit_val_batches=2"))
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    sq = [v for k, v in ck["state_dict"].items() if k.endswith("score_q")]
    assert len(sq) == 2 and all(v.shape == (1, 16, 16) for v in sq)  # n_additive_heads=1 of 2
