"""txl-eval's eval.cmem_len and metrics.cmem_sweep for memory=compressive checkpoints, against
in-process evaluations of the same weights (and a plain Transformer-XL for cmem_len 0)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import eval_config, load_script
from txl.checkpoint import load_model, save_model
from txl.data import build_tokenizer
from txl.eval import evaluate_tokens
from txl.model import TransformerXL, TXLConfig

ROOT = Path(__file__).resolve().parent.parent
TEXT = "".join(f"def g{i}(y):\n    return y + {i % 9} * {i % 4}\n" for i in range(24))  # ~700 chars
T, M, C = 8, 8, 8  # tgt_len, mem_len, cmem_len (c = 3: the slots reach 24 positions past the memory)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _cfg(vocab, compressive=True):
    memory = dict(kind="compressive", cmem_len=C, compression_rate=3, compression_fn="conv") if compressive else {}
    return TXLConfig(vocab_size=vocab, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, init_std=0.1,
                     seq=dict(tgt_len=T, mem_len=M), memory=memory)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(compressive checkpoint, the same weights without the compressor as a Transformer-XL, text file)."""
    d = tmp_path_factory.mktemp("cmem")
    tok = build_tokenizer("char", TEXT)
    torch.manual_seed(0)
    cm = TransformerXL(_cfg(tok.vocab_size)).eval()
    with torch.no_grad():  # a conv that is not the mean-pool it starts as
        cm.compressor.conv_w.add_(0.05 * torch.randn_like(cm.compressor.conv_w))
    txl = TransformerXL(_cfg(tok.vocab_size, compressive=False)).eval()
    sd = {k: v for k, v in cm.state_dict().items() if not k.startswith("compressor.")}
    txl.load_state_dict(sd, strict=True)  # every other weight is shared
    paths = d / "cm.pt", d / "txl.pt", d / "t.txt"
    save_model(paths[0], cm, tok.state_dict())
    save_model(paths[1], txl, tok.state_dict())
    paths[2].write_text(TEXT)
    return tuple(str(p) for p in paths)


def _eval(ckpt, text, run_dir, *overrides):
    from txl.eval import run
    return run(eval_config(ckpt, text, run_dir, "eval.mems=hidden", "metrics.attention_stats=false", *overrides))


def _direct(ckpt, cmem_len):
    """An evaluation of a freshly loaded model at cmem_len, without txl-eval."""
    model, tok_state, _ = load_model(ckpt)
    model.set_cmem_len(cmem_len)
    ids = build_tokenizer("char", TEXT).encode(TEXT)
    return evaluate_tokens(model, ids, T, M, projected_mems=False)["loss"]


def test_cmem_len_zero_equals_transformer_xl_with_the_same_weights(ckpts, tmp_path):
    cm, txl, text = ckpts
    zero = _eval(cm, text, tmp_path / "a", "eval.cmem_len=0")
    plain = _eval(txl, text, tmp_path / "b")
    trained = _eval(cm, text, tmp_path / "c")
    assert zero["cmem_len"] == 0 and "cmem_len" not in plain and trained["cmem_len"] == C
    assert zero["tokens"] == plain["tokens"]
    assert zero["loss"] == plain["loss"]  # equal, not close: no slot, the same computation
    assert abs(trained["loss"] - plain["loss"]) > 1e-3  # the slots do change the result


def test_cmem_len_at_eval(ckpts, tmp_path):
    cm, _, text = ckpts
    default = _eval(cm, text, tmp_path / "a")
    same = _eval(cm, text, tmp_path / "b", f"eval.cmem_len={C}")
    half = _eval(cm, text, tmp_path / "c", f"eval.cmem_len={C // 2}")
    assert same["loss"] == default["loss"] and same["cmem_len"] == default["cmem_len"] == C
    assert default["loss"] == pytest.approx(_direct(cm, C), abs=1e-6)
    assert half["cmem_len"] == C // 2 and half["loss"] == pytest.approx(_direct(cm, C // 2), abs=1e-6)
    assert abs(half["loss"] - default["loss"]) > 1e-4


def test_cmem_sweep_entries_equal_single_evaluations(ckpts, tmp_path, capsys):
    cm, _, text = ckpts
    out = _eval(cm, text, tmp_path, "metrics.cmem_sweep=auto")
    err = capsys.readouterr().err
    assert "| cmem_len | loss | ppl |" in err and "effective compressed memory" in err
    sw = out["cmem_sweep"]
    assert sw["cmem_len"] == [0, C // 2, C, 2 * C]  # auto: 0, C/2, C, 2C
    assert sw["loss"][2] == pytest.approx(out["loss"], abs=1e-6)  # the entry at the eval's own cmem_len
    for v, loss in zip(sw["cmem_len"], sw["loss"]):  # each entry = an independent evaluation
        assert loss == pytest.approx(_direct(cm, v), abs=2e-6), v
    full = json.loads((tmp_path / "cmem_sweep.json").read_text())
    assert full["over"] == "cmem_len" and full["contexts"] == sw["cmem_len"] and full["mem_len"] == M
    assert (tmp_path / "cmem_sweep.png").is_file() and not (tmp_path / "context_sweep.json").exists()
    # a list, at a non-default eval.cmem_len (the main pass is then the sweep's entry at 2)
    out2 = _eval(cm, text, tmp_path / "l", "eval.cmem_len=2", "metrics.cmem_sweep=[2,16]")
    assert out2["cmem_sweep"]["loss"] == pytest.approx([out2["loss"], sw["loss"][3]], abs=2e-6)


def test_cmem_refusals(ckpts, tmp_path, cli_env):
    cm, txl, text = ckpts
    with pytest.raises(ValueError, match="metrics.cmem_sweep: this checkpoint's memory is not compressive"):
        _eval(txl, text, tmp_path, "metrics.cmem_sweep=auto")
    with pytest.raises(ValueError, match="needs eval.cmem_len >= 1"):
        _eval(cm, text, tmp_path, "eval.cmem_len=0", "metrics.cmem_sweep=auto")
    for ckpt, arg, needle in ((txl, "eval.cmem_len=4", "eval.cmem_len: this model has memory kind 'hidden'"),
                              (cm, "eval.cmem_len=-1", "eval.cmem_len must be >= 0"),
                              (cm, "metrics.cmem_sweep=[4]", "metrics.cmem_sweep ('auto' or a list of cmem_len")):
        r = subprocess.run([sys.executable, "-m", "txl.eval", f"ckpt_path={ckpt}", f"eval.text_file={text}",
                            f"run_dir={tmp_path / 'x'}", arg], capture_output=True, text=True, env=cli_env,
                           cwd=str(ROOT), timeout=120)
        lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
        assert r.returncode != 0 and lines and needle in lines[-1], (arg, r.stderr[-1500:])
        assert "Traceback" not in r.stderr and not (tmp_path / "x" / "eval.json").exists()


def test_cmem_recall_script_arguments_and_a_two_step_run(tmp_path, capsys):
    import numpy as np

    from txl.data import CorpusConfig, load_corpus
    from txl.data.sources import RECALL_MARKERS
    s = load_script("cmem_recall")
    for bad, needle in ((["--mem", "7"], "--mem: an even number"), (["--models", "txl,big"], "--models: a subset"),
                        (["--distances", "1x"], "comma-separated integers"), (["--steps", "0"], "--steps")):
        with pytest.raises(SystemExit):
            s.parse(bad)
        assert needle in capsys.readouterr().err, bad
    assert [sum(s.lengths(m, 16)) for m in s.MODELS] == [16, 16, 8]  # equal attention cost, then half
    doc = s.main(["--steps", "2", "--seeds", "0", "--models", "txl,cmem", "--mix", "--distances", "6,20", "--tgt", "4",
                  "--mem", "8", "--train-tokens", "3000", "--eval-tokens", "1000", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "cmem_recall.json").read_text())["table"] == doc["table"]
    assert [(r["model"], r["mem_len"], r["cmem_len"]) for r in doc["results"]] == [("txl", 8, 0), ("cmem", 4, 4)]
    opts = doc["args"]
    corpus = load_corpus(CorpusConfig(source="synthetic_recall", tokenizer="char", cache_dir=str(tmp_path / "cache"),
                                      options={"distances": [6, 20], "alphabet": 4, "values": opts["values"], "gap": 4,
                                               "train_tokens": 3000, "eval_tokens": 1000}))
    valid = corpus.valid
    scored = valid[: 8 * ((len(valid) - 1) // 8)]  # the inputs of 8 ordered streams (txl.data.stream)
    for k, d in enumerate([6, 20]):  # every marker among them scored once
        mid = corpus.tokenizer.encode(RECALL_MARKERS[k])[0]
        n = int(np.sum(scored == mid))
        for r in doc["results"]:
            assert r["n"][d] == n > 0 and 0 <= r["accuracy"][d] <= 1
    assert "| compressive, mem 4 + cmem 4, c = 3 | 12 |" in doc["table"]
    one = s.main(["--steps", "2", "--seeds", "0", "--models", "cmem", "--distances", "6,20", "--tgt", "4",
                  "--mem", "8", "--train-tokens", "3000", "--eval-tokens", "1000", "--out", str(tmp_path / "d")])
    (r,) = one["results"]  # default: one model per D, gathered in one row
    assert sorted(r["accuracy"]) == [6, 20] and len(r["val_loss"]) == 2
