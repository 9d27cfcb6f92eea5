"""Bad input through the CLIs: exit != 0, one clear line naming the cause, nothing half-written."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import tiny_train_args

pytestmark = pytest.mark.slow


def _last_line(r) -> str:
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def _files(d):
    return sorted(p.name for p in d.rglob("*.ckpt")) if d.exists() else []


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus_files, run_cli):
    d = tmp_path_factory.mktemp("ok")
    r = run_cli("train", *tiny_train_args(corpus_files, d, "trainer.max_steps=4", "trainer.val_check_interval=4",
                                         "trainer.limit_val_batches=1"))
    assert r.returncode == 0, r.stderr[-2000:]
    return d / "checkpoints" / "last.ckpt"


def _with(corpus_files, **kw):
    tr, va, te = corpus_files
    paths = {"train": tr, "valid": va, "test": te, **kw}
    return [f"data.{k}={v}" for k, v in paths.items()]


@pytest.mark.parametrize("case", ["missing", "empty", "short", "non_utf8"])
def test_bad_corpus_files(case, tmp_path, corpus_files, run_cli):
    bad = tmp_path / "bad.txt"
    if case == "empty":
        bad.write_text("")
    elif case == "short":
        bad.write_text("def f(): pass\n")
    elif case == "non_utf8":
        bad.write_bytes(b"caf\xe9 au lait\n" * 500)
    run = tmp_path / "run"
    args = [a for a in tiny_train_args(corpus_files, run) if not a.startswith("data.valid=")] + [f"data.valid={bad}"]
    r = run_cli("train", *args)
    line = _last_line(r)
    assert r.returncode != 0
    assert line.startswith("txl-train: error:") and "data.valid" in line, r.stderr[-1500:]
    assert {"missing": "not found", "empty": "empty", "short": "fewer than", "non_utf8": "UTF-8"}[case] in line
    assert _files(run) == []


@pytest.mark.parametrize("override,needle", [("seq.tgt_len=0", "seq.tgt_len"), ("seq.mem_len=-4", "seq.mem_len"),
                                             ("seq.ext_len=16", "seq.ext_len"), ("model.n_head=0", "n_head"),
                                             ("trainer.peak_flops=-1", "trainer.peak_flops")])
def test_bad_lengths(override, needle, tmp_path, corpus_files, run_cli):
    r = run_cli("train", *tiny_train_args(corpus_files, tmp_path), override)
    assert r.returncode != 0 and needle in _last_line(r), r.stderr[-1500:]


def test_unknown_config_option(tmp_path, corpus_files, run_cli):
    r = run_cli("train", *tiny_train_args(corpus_files, tmp_path), "model.d_modle=64")
    assert r.returncode != 0 and "d_modle" in r.stderr and "Key 'd_modle' not in" in r.stderr


def test_unwritable_run_dir(tmp_path, corpus_files, run_cli):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = run_cli("train", *tiny_train_args(corpus_files, blocker / "run"))
    assert r.returncode != 0 and "hydra.run.dir" in _last_line(r) and "Traceback" not in r.stderr


@pytest.mark.parametrize("case", ["missing", "truncated", "incompatible", "not_a_checkpoint"])
def test_bad_resume_checkpoint(case, ckpt, tmp_path, corpus_files, run_cli):
    extra = []
    if case == "missing":
        path = tmp_path / "nope.ckpt"
    elif case == "truncated":
        path = tmp_path / "trunc.ckpt"
        path.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif case == "not_a_checkpoint":
        path = tmp_path / "junk.ckpt"
        torch.save({"hello": 1}, path)
    else:
        path, extra = ckpt, ["model.d_model=48"]
    before = path.read_bytes() if path.exists() else None
    run = tmp_path / "run"
    r = run_cli("train", *tiny_train_args(corpus_files, run), f"ckpt_path={path}", *extra)
    line = _last_line(r)
    assert r.returncode != 0 and line.startswith("txl-train: error: ckpt_path"), r.stderr[-1500:]
    if case == "incompatible":
        assert "d_model" in line
    assert _files(run) == []
    if before is not None:
        assert path.read_bytes() == before  # the checkpoint given is never touched


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(ckpt, tmp_path, corpus_files, run_cli):
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    ck["state_dict"]["model.blocks.0.ff.fc1.weight"].fill_(float("nan"))
    bad = tmp_path / "nan.ckpt"
    torch.save(ck, bad)
    good = tmp_path / "run" / "checkpoints"
    good.mkdir(parents=True)
    shutil.copy(ckpt, good / "last.ckpt")
    before = (good / "last.ckpt").read_bytes()
    r = run_cli("train", *tiny_train_args(corpus_files, tmp_path / "run", "trainer.max_steps=8",
                                         "checkpoint.every_n_steps=1", f"ckpt_path={bad}"))
    assert r.returncode == 1 and "non-finite training loss" in _last_line(r), r.stderr[-1500:]
    assert _last_line(r).endswith(f"this run saved no checkpoint; the earlier {good / 'last.ckpt'} is kept")
    assert _files(tmp_path / "run") == ["last.ckpt"] and (good / "last.ckpt").read_bytes() == before


def test_eval_bad_inputs(ckpt, tmp_path, run_cli):
    unknown = tmp_path / "greek.txt"
    unknown.write_text("ΩΨΦ" * 200, encoding="utf-8")
    cases = {
        "missing ckpt": ([f"ckpt_path={tmp_path / 'nope.ckpt'}"], "ckpt_path"),
        "missing text": ([f"ckpt_path={ckpt}", f"eval.text_file={tmp_path / 'none.txt'}"], "not found"),
        "unknown tokens": ([f"ckpt_path={ckpt}", f"eval.text_file={unknown}"], "no token known"),
        "bad length": ([f"ckpt_path={ckpt}", "seq.eval_tgt_len=0"], "eval_tgt_len"),
        "bad mems": ([f"ckpt_path={ckpt}", "eval.mems=kv"], "eval.mems"),
        "no ckpt_path": ([], "txl-eval: error: ckpt_path is required"),
    }
    for name, (args, needle) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        r = run_cli("eval", *args, f"hydra.run.dir={out}")
        assert r.returncode != 0 and needle in _last_line(r), (name, r.stderr[-1500:])
        assert not (out / "eval.json").exists()


def test_converted_checkpoint_evaluates(tmp_path, run_cli):
    """txl-convert output (HF layout with its vocabulary) -> txl-eval on a text file."""
    from test_convert import _txl_model, _write_hf_dir, _write_vocab
    model = _txl_model(vocab_size=300, cutoffs=[50, 150], div_val=2)
    hf = tmp_path / "hf"
    _write_hf_dir(model, hf)
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(298)]
    _write_vocab(hf, words)
    out = tmp_path / "m.pt"
    r = run_cli("convert", "--hf", str(hf), "--out", str(out))
    assert r.returncode == 0, r.stderr[-1500:]
    text = tmp_path / "t.txt"
    text.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 298}" for j in range(12)) for i in range(40)) + "\n")
    r = run_cli("eval", f"ckpt_path={out}", f"eval.text_file={text}", "seq.eval_tgt_len=8", "seq.eval_mem_len=16",
                f"hydra.run.dir={tmp_path / 'ev'}")
    assert r.returncode == 0, r.stderr[-1500:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["tokens"] == 40 * 13 - 1 and res["bpc"] is None and res["loss"] > 0


def test_disk_full_while_saving(ckpt, tmp_path, corpus_files, cli_env):
    """A write that fails (here: a file-size limit, EFBIG; a full disk gives ENOSPC the same way):
    one line naming the path and errno, exit 74, no temp file, the previous last.ckpt intact; an
    orphan temp file of an earlier kill -9 is removed at the start."""
    import resource
    import signal
    import subprocess
    import sys

    from conftest import ROOT
    run = tmp_path / "run"
    good = run / "checkpoints"
    good.mkdir(parents=True)
    shutil.copy(ckpt, good / "last.ckpt")
    before = (good / "last.ckpt").read_bytes()
    (good / ".last.ckpt.999-0badc0de.txl-tmp").write_bytes(b"half a file")

    def limit():  # checkpoints (~330 KB) no longer fit; the token cache and logs do
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    r = subprocess.run([sys.executable, "-m", "txl.train", *tiny_train_args(corpus_files, run, "trainer.max_steps=2")],
                       cwd=str(ROOT), env=cli_env, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert r.returncode == 74, r.stderr[-2000:]
    # the first checkpoint written at step 2 fails: best.ckpt (final validation) or the step file
    assert _last_line(r) in [f"txl-train: error: cannot write {good / n}: [Errno 27] File too large"
                             for n in ("best.ckpt", "step-000002.ckpt")], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in good.iterdir()) == ["last.ckpt"] and (good / "last.ckpt").read_bytes() == before
