"""eval.reset_mems_at_doc (txl.evaluate.DocBoundaries): a document scored after another equals the
same document scored alone; without the reset it does not. And txl-eval's progress bar: the
running figure it ends on is the reported result."""
import io
import json
import re
import dataclasses

import numpy as np
import pytest
import torch

from txl.evaluate import DocBoundaries, evaluate_tokens
from txl.metrics.context import TokenLosses
from txl.model import TransformerXL, TXLConfig

V = 40


def _model(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=V, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, dropout=0.0, dropatt=0.0)
    m = TransformerXL(TXLConfig(**{**base, **kw}))
    with torch.no_grad():  # larger weights than the init: the memory must change the losses visibly
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def _losses(model, tokens, tgt, mem, batch_size=1, doc_starts=None, projected=True):
    """(B, n_step) per-position NLL (position t of row g predicts token g*n_step + t + 1)."""
    h = TokenLosses()
    res = evaluate_tokens(model, tokens, tgt, mem, batch_size, hooks=[h], doc_starts=doc_starts,
                          projected_mems=projected)
    v = h.values()
    return v.reshape(batch_size, -1), res


def _docs(seed, *lengths):
    g = np.random.default_rng(seed)
    return [g.integers(0, V, n) for n in lengths]


def test_doc_boundaries_known_answer():
    """Row of 10 columns, tgt 4, a document at column 6: segment 1 (columns 4-7, memory 0-3) hides
    columns < 6 from queries 6 and 7 only; segment 2 (8-9, memory 4-7) hides 4-5 from both."""
    d = DocBoundaries([0, 6], n_step=10, batch_size=1, tgt_len=4)
    assert d.blocked(0, 4, 0, "cpu") is None  # the start lies after every key of segment 0
    b1 = d.blocked(1, 4, 4, "cpu")[0]  # (T=4, K=8): keys are columns 0..7
    want = np.zeros((4, 8), bool)
    want[2:, :6] = True
    np.testing.assert_array_equal(b1.numpy(), want)
    b2 = d.blocked(2, 2, 4, "cpu")[0]  # keys columns 4..9
    np.testing.assert_array_equal(b2.numpy(), np.array([[1, 1, 0, 0, 0, 0]] * 2, bool))
    assert d.blocked(3, 2, 4, "cpu") is None or not d.blocked(3, 2, 4, "cpu").any()
    # two streams of 10: token 13 starts a document in row 1 at column 3; row 0 is untouched
    d = DocBoundaries([0, 13], n_step=10, batch_size=2, tgt_len=4)
    b = d.blocked(0, 4, 0, "cpu")
    assert not b[0].any() and b[1, 3, :3].all() and not b[1, :3].any() and not b[1, 3, 3:].any()


@pytest.mark.parametrize("projected", [True, False])
def test_reset_scores_the_second_document_as_if_alone(projected):
    """Document B starts at a segment boundary (A is 3 segments): with the reset its per-token
    losses equal B evaluated alone, with a memory shorter than B (so memory matters)."""
    model = _model()
    a, b = _docs(1, 24, 29)
    text = np.concatenate([a, b])
    alone, _ = _losses(model, b, 8, 8, projected=projected)
    reset, res = _losses(model, text, 8, 8, doc_starts=[0, 24], projected=projected)
    plain, _ = _losses(model, text, 8, 8, projected=projected)
    torch.testing.assert_close(torch.from_numpy(reset[0, 24:]), torch.from_numpy(alone[0]), rtol=1e-5, atol=1e-5)
    assert np.abs(plain[0, 24:] - alone[0]).max() > 1e-2  # without the reset B sees A
    np.testing.assert_array_equal(reset[0, :24], plain[0, :24])  # A's tokens are scored as before
    # the rolling memory (no hooks) masks the same way: its loss is the hooked pass's mean
    roll = evaluate_tokens(model, text, 8, 8, doc_starts=[0, 24], projected_mems=projected)
    assert abs(roll["loss"] - res["loss"]) < 1e-6 and abs(res["loss"] - reset.mean()) < 1e-6


def test_reset_inside_a_segment_per_stream():
    """Two streams, a document starting mid-segment at a different column in each (13 and 5):
    with a memory covering the document, each B_g's losses equal B_g alone; the other queries of
    the same segment (A_g's tail) keep their full context."""
    model = _model()
    a1, b1, a2, b2, extra = _docs(2, 13, 19, 5, 27, 1)
    text = np.concatenate([a1, b1, a2, b2, extra])  # row 0 = a1 b1, row 1 = a2 b2 (32 columns each)
    reset, _ = _losses(model, text, 8, 64, batch_size=2, doc_starts=[0, 13, 32, 37])
    plain, _ = _losses(model, text, 8, 64, batch_size=2)
    for g, (a, b) in enumerate([(a1, b1), (a2, b2)]):
        alone, _ = _losses(model, b, 8, 64)
        # the row's last position predicts the next row's first token: not part of B_g alone
        torch.testing.assert_close(torch.from_numpy(reset[g, len(a):31]), torch.from_numpy(alone[0]),
                                   rtol=1e-5, atol=1e-5)
        assert np.abs(plain[g, len(a):31] - alone[0]).max() > 1e-2
        np.testing.assert_array_equal(reset[g, :len(a)], plain[g, :len(a)])


def test_reset_refuses_compressive_memory():
    model = _model(memory=dict(kind="compressive", cmem_len=4), seq=dict(tgt_len=4, mem_len=4))
    with pytest.raises(ValueError, match="reset_mems_at_doc: not supported with memory=compressive"):
        evaluate_tokens(model, np.arange(20) % V, 4, 4, doc_starts=[0, 8])


@pytest.mark.parametrize("unit", [None, "byte"])
def test_progress_bar_ends_on_the_reported_figures(unit):
    model = _model()
    text = np.concatenate(_docs(3, 200))
    out = io.StringIO()
    res = evaluate_tokens(model, text, 8, 16, batch_size=2, progress=out, unit=unit)
    shown = out.getvalue()
    assert re.findall(r"ppl=([0-9.e+]+)", shown)[-1] == f"{res['ppl']:.5g}"
    assert re.findall(r"(\d+)/(\d+)", shown)[-1] == ("13", "13")  # 99 columns: 13 segments of <= 8
    assert "tok/s=" in shown
    if unit == "byte":
        assert re.findall(r"bpb=([0-9.e+]+)", shown)[-1] == f"{res['loss'] / np.log(2):.5g}"
    quiet = io.StringIO()
    evaluate_tokens(model, text, 8, 16, batch_size=2, progress=False)
    assert quiet.getvalue() == ""


def _write_ckpt(tmp_path, corpus_cfg, tok):
    """A txl-train-style checkpoint (model + tokenizer + data config) of a random model."""
    model = _model(vocab_size=tok.vocab_size, seq=dict(tgt_len=8, mem_len=8))
    ck = {"txl": {"model_config": model.cfg.to_dict(), "tokenizer": tok.state_dict(),
                  "data": dataclasses.asdict(corpus_cfg)},
          "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    path = tmp_path / "m.ckpt"
    torch.save(ck, path)
    return path


def test_txl_eval_reset_mems_at_doc(tmp_path, run_cli, cli_env):
    """txl-eval on a corpus whose test split is a directory of documents: reset on / off give
    different losses, the documents are counted; off equals the run without the option."""
    from txl.data import CorpusConfig, load_corpus
    for i in range(3):
        d = tmp_path / "docs" / f"d{i}.txt"
        d.parent.mkdir(exist_ok=True)
        d.write_text("".join(f"w{(i * 5 + j * 3) % 17} w{j % 7}\n" for j in range(40)))
    (tmp_path / "tr.txt").write_text("".join(f"w{j % 17} w{j % 7}\n" for j in range(200)))
    cfg = CorpusConfig(source="text_files", tokenizer="word", train=str(tmp_path / "tr.txt"),
                       valid=str(tmp_path / "tr.txt"), test=str(tmp_path / "docs"), cache_dir=cli_env["TXL_CACHE"])
    corpus = load_corpus(cfg)
    assert corpus.doc_starts("test").tolist() == [0, 122, 244]
    ckpt = _write_ckpt(tmp_path, cfg, corpus.tokenizer)
    outs = {}
    for flag in ("true", "false"):
        r = run_cli("eval", f"ckpt_path={ckpt}", f"eval.reset_mems_at_doc={flag}", "eval.progress=true",
                    "metrics.enabled=false", f"hydra.run.dir={tmp_path / flag}")
        assert r.returncode == 0, r.stderr[-1500:]
        outs[flag] = json.loads(r.stdout.strip().splitlines()[-1])
        assert re.findall(r"ppl=([0-9.e+]+)", r.stderr)[-1] == f"{outs[flag]['ppl']:.5g}"
    assert outs["true"]["documents"] == 3 and outs["true"]["reset_mems_at_doc"] is True
    assert outs["true"]["tokens"] == outs["false"]["tokens"] == 363
    assert abs(outs["true"]["loss"] - outs["false"]["loss"]) > 1e-4
    r = run_cli("eval", f"ckpt_path={ckpt}", "metrics.enabled=false", f"hydra.run.dir={tmp_path / 'default'}")
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["loss"] == outs["false"]["loss"]
    assert "ppl=" not in r.stderr  # not a TTY: no bar
    # the same documents as eval.text_file (a glob): the same documents, the same result
    r = run_cli("eval", f"ckpt_path={ckpt}", f"eval.text_file={tmp_path / 'docs' / '*.txt'}", "metrics.enabled=false",
                "eval.reset_mems_at_doc=true", f"hydra.run.dir={tmp_path / 'glob'}")
    assert r.returncode == 0, r.stderr[-1500:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["documents"] == 3 and res["loss"] == outs["true"]["loss"] and res["tokens"] == 363
