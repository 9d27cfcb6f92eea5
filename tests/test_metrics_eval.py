"""txl-eval's metrics and context sweep, and scripts/recl.py, against in-process recomputation."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import eval_config, load_script
from txl.checkpoint import save_model
from txl.data import build_tokenizer
from txl.eval import evaluate_tokens
from txl.metrics.context import TokenLosses
from txl.metrics.recl import ecl, gain_profile, recl
from txl.model import TransformerXL, TXLConfig

TEXT = "".join(f"def f{i}(x):\n    return x * {i % 7} + {i % 5}\n" for i in range(20))  # ~600 chars


@pytest.fixture(autouse=True)
def one_thread():  # B=1 segments of 8 tokens: threading only adds overhead
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ckpt(tmp_path, name, seed, text=TEXT):
    tok = build_tokenizer("char", text)
    torch.manual_seed(seed)
    model = TransformerXL(TXLConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=32, n_head=2, d_head=16,
                                    d_inner=64, init_std=0.1, seq=dict(tgt_len=8, mem_len=16))).eval()
    path = tmp_path / f"{name}.pt"
    save_model(path, model, tok.state_dict())
    return str(path), model, tok


def _token_losses(model, ids, mem):
    h = TokenLosses()
    evaluate_tokens(model, ids, 8, mem, hooks=[h])
    return h.values()


def test_eval_metrics_and_context_sweep(tmp_path, capsys):
    from txl.eval import run
    ckpt, model, tok = _ckpt(tmp_path, "m", 0)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = run(eval_config(ckpt, text, tmp_path, "metrics.context_sweep=[0,8,16,32]"))
    lines = capsys.readouterr()
    assert json.loads(lines.out.strip().splitlines()[-1]) == json.loads(json.dumps(out))  # one JSON line, last
    assert "| eval_mem_len | loss | ppl |" in lines.err
    ids = tok.encode(TEXT)
    sw = out["context_sweep"]
    assert sw["mem_len"] == [0, 8, 16, 32] and sw["loss"][2] == pytest.approx(out["loss"], abs=1e-6)
    for c, loss in zip(sw["mem_len"], sw["loss"]):  # every context = an independent evaluation
        model.set_lengths(same_length=False)
        assert loss == pytest.approx(evaluate_tokens(model, ids, 8, c)["loss"], abs=2e-6)
    full = json.loads((tmp_path / "context_sweep.json").read_text())
    want = ecl(full["loss"], [0, 8, 16, 32])  # from the (rounded) losses of the file
    assert full["ecl"]["ecl"] == want["ecl"] == sw["ecl"]
    np.testing.assert_allclose(full["ecl"]["gains"], want["gains"], atol=1e-5)
    pos = out["metrics"]["position"]
    assert sum(l * n for l, n in zip(pos["loss"], pos["tokens"])) / sum(pos["tokens"]) == pytest.approx(
        out["loss"], abs=1e-6)
    for f in ("context_sweep.png", "eval_loss_by_position.png", "eval_attention.png", "eval.json"):
        assert (tmp_path / f).is_file(), f


def test_recl_script_matches_the_pure_function(tmp_path, capsys):
    a, ma, tok = _ckpt(tmp_path, "a", 0)
    b, mb, _ = _ckpt(tmp_path, "b", 1)
    text = tmp_path / "t.txt"
    text.write_text(TEXT[:400])
    js = tmp_path / "recl.json"
    rc = load_script("recl").main([a, b, "--text", str(text), "--contexts", "0,8,16", "--r", "0.5,1.0", "--names", "A,B",
                         "--json-out", str(js), "--png", str(tmp_path / "recl.png"), "--losses-out", str(tmp_path / "l.npz")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| Model | r = 0.5 | r = 1 |" in out
    res = json.loads(out.strip().splitlines()[-1])
    assert res == json.loads(js.read_text())
    ids = tok.encode(TEXT[:400])
    L = np.stack([[_token_losses(m, ids, c) for c in (0, 8, 16)] for m in (ma, mb)])
    for r in (0.5, 1.0):
        want = recl(L, [0, 8, 16], r)
        assert [x["recl"] for x in res["recl"][f"{r:g}"]] == [w["recl"] for w in want]
        np.testing.assert_allclose([x["gains"] for x in res["recl"][f"{r:g}"]][0], want[0]["gains"], rtol=1e-9)
        prof = gain_profile(L, r)
        np.testing.assert_allclose(res["profile"][f"{r:g}"]["own"], prof["own"], rtol=1e-9, atol=1e-7)
        assert res["profile"][f"{r:g}"]["min"][0][:len(want[0]["gains"])] == pytest.approx(want[0]["gains"])
    np.testing.assert_allclose(res["loss"], L.mean(-1), atol=1e-6)
    saved = np.load(tmp_path / "l.npz")
    np.testing.assert_allclose(saved["losses"], L, atol=1e-5)
    assert saved["contexts"].tolist() == [0, 8, 16] and saved["models"].tolist() == ["A", "B"]
    assert math.isclose(res["ppl"][0][0], math.exp(res["loss"][0][0]), rel_tol=1e-4)
    assert (tmp_path / "recl.png").is_file()


def test_recl_script_refuses_different_vocabularies(tmp_path, capsys):
    a, _, _ = _ckpt(tmp_path, "a", 0)
    b, _, _ = _ckpt(tmp_path, "b", 0, text=TEXT + "QZ")
    text = tmp_path / "t.txt"
    text.write_text(TEXT[:200])
    assert load_script("recl").main([a, b, "--text", str(text), "--contexts", "0,8"]) == 2
    assert "tokenizes the text differently" in capsys.readouterr().err
    assert load_script("recl").main([a, "--text", str(text), "--r", "0"]) == 2
    assert "--r: values in (0, 1]" in capsys.readouterr().err


def test_eval_projected_mems_equal_hidden_mems(tmp_path):
    """txl-eval's default (memories as keys / values) scores a text exactly as hidden-state memories."""
    _, model, tok = _ckpt(tmp_path, "m", 0)
    ids = tok.encode(TEXT)
    model.set_lengths(same_length=True, clamp_len=20)
    hid, proj = TokenLosses(), TokenLosses()
    a = evaluate_tokens(model, ids, 8, 24, batch_size=2, warmup_tokens=5, hooks=[hid], projected_mems=False)
    b = evaluate_tokens(model, ids, 8, 24, batch_size=2, warmup_tokens=5, hooks=[proj], projected_mems=True)
    assert a["tokens"] == b["tokens"] > 0 and b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    np.testing.assert_allclose(proj.values(), hid.values(), atol=1e-5)
