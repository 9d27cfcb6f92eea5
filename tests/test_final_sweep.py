"""metrics.final_sweep: the context sweep that ends txl-train is txl-eval's sweep with the released
evaluation settings (same_length on except at memory 0, distances clamped), and recl.py --clamp-len."""
import json
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import load_script
from txl.config import MetricsNode
from txl.data import build_tokenizer
from txl.eval import evaluate_tokens
from txl.metrics.final_sweep import after_training, default_clamp_len, final_sweep
from txl.model import TransformerXL, TXLConfig

TEXT = "".join(f"def f{i % 13}(x):\n    return x * {i % 7} + g{i % 5}(x)\n" for i in range(40))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return TransformerXL(TXLConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=32, n_head=2, d_head=16,
                                   d_inner=64, init_std=0.1, seq=dict(tgt_len=8, mem_len=16))).eval()


def test_final_sweep_equals_eval_passes_with_clamp_and_same_length(tmp_path):
    tok = build_tokenizer("char", TEXT)
    ids = tok.encode(TEXT)
    model = _model(tok)
    before = asdict(model.seq)
    lines = []
    res = final_sweep(model, ids, "auto", tmp_path / "m", tgt_len=8, mem_len=16, clamp_len=6, batch_size=2,
                      max_tokens=600, echo=lines.append, source="t:test")
    assert asdict(model.seq) == before  # lengths restored
    assert res["contexts"] == [0, 4, 8, 16, 32] and res["clamp_len"] == 6 and res["same_length"] is True
    want = []
    for c in res["contexts"]:
        model.set_lengths(clamp_len=6, same_length=c > 0, mem_len=c)
        want.append(evaluate_tokens(model, ids[:600], 8, c, 2)["loss"])
    model.set_lengths(**before)
    np.testing.assert_allclose(res["loss"], want, atol=1e-6)
    model.set_lengths(clamp_len=-1, same_length=True, mem_len=32)  # the clamp really applies: unclamped differs at 32
    assert abs(evaluate_tokens(model, ids[:600], 8, 32, 2)["loss"] - want[-1]) > 1e-5
    assert lines[0].startswith("context sweep on t:test (") and lines[1].startswith("| eval_mem_len |")
    assert len(lines[1].splitlines()) == 2 + len(res["contexts"]) and len(lines) == 3
    assert json.loads((tmp_path / "m" / "final_sweep.json").read_text())["loss"] == res["loss"]
    assert (tmp_path / "m" / "final_sweep.png").is_file()


def test_after_training_off_and_default_clamp(tmp_path):
    c = SimpleNamespace(metrics=MetricsNode(final_sweep=None), trainer=SimpleNamespace(strategy="auto"))
    assert after_training(c, None, None, tmp_path) is None
    assert MetricsNode(final_sweep=[64, 0]).final_sweep == [0, 64]
    with pytest.raises(ValueError, match="metrics.final_sweep"):
        MetricsNode(final_sweep=[1])
    assert default_clamp_len(-1, 64, 128) == 192 and default_clamp_len(400, 64, 128) == 400


def test_recl_script_clamp_len(tmp_path, capsys):
    from txl.checkpoint import save_model
    tok = build_tokenizer("char", TEXT)
    model = _model(tok)
    path = tmp_path / "a.pt"
    save_model(path, model, tok.state_dict())
    text = tmp_path / "t.txt"
    text.write_text(TEXT[:300])
    mod = load_script("recl")
    assert mod.main([str(path), "--text", str(text), "--contexts", "0,32", "--clamp-len", "4"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model.set_lengths(clamp_len=4)
    ids = tok.encode(TEXT[:300])
    assert res["clamp_len"] == 4
    np.testing.assert_allclose(res["loss"][0], [evaluate_tokens(model, ids, 8, c)["loss"] for c in (0, 32)], atol=1e-6)
