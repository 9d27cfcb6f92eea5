"""Faults and bad input, unit level (issue 9): each test names the defect it guards against.
No CLI subprocess with torch here; the end-to-end versions are in test_pipeline / test_cli_errors."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from txl.checkpoint import atomic_save
from txl.model import TransformerXL, TXLConfig

ROOT = Path(__file__).resolve().parent.parent


def _model(vocab=40):
    torch.manual_seed(0)
    return TransformerXL(TXLConfig(vocab_size=vocab, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64,
                                   seq=dict(tgt_len=8, mem_len=8))).eval()


# -- 1. zero scored tokens: an error naming the cause, never {"loss": 0, "ppl": 1} ------------------------
def test_zero_scored_tokens_is_an_error_not_a_perfect_score():
    from txl.evaluate import evaluate_tokens, mean_nll
    m = _model()
    toks = np.random.default_rng(0).integers(0, 40, 641)  # 64 streams of 10 tokens
    with pytest.raises(ValueError, match=r"eval.warmup_tokens=10 covers every stream.*64 streams are 10 tokens"):
        evaluate_tokens(m, toks, 8, 8, batch_size=64, warmup_tokens=10)
    res = evaluate_tokens(m, toks, 8, 8, batch_size=64, warmup_tokens=9)  # one token per stream left
    assert res["tokens"] == 64 and res["loss"] > 0
    # validation's reduction (TXLModule._eval_end) shares the guard
    with pytest.raises(ValueError, match="val split: no token was scored"):
        mean_nll(torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64), "val split")


def test_eval_run_zero_tokens_with_metrics_and_bits_per_byte_key(tmp_path):
    """Through txl-eval's run (metrics on): zero scored tokens is the one-line cause, not an unpack
    error; a byte model's JSON names bits-per-byte 'bpb' (and keeps 'bpc' as its alias)."""
    from conftest import eval_config
    from txl.checkpoint import save_model
    from txl.data import build_tokenizer
    from txl.eval import run
    tok = build_tokenizer("byte", "")
    path = tmp_path / "m.pt"
    save_model(path, _model(256), tok.state_dict())
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(32, 127)) * 4)

    def ev(*extra):
        return run(eval_config(path, text, tmp_path, *extra))

    with pytest.raises(ValueError, match="warmup_tokens=640 covers every stream"):
        ev("eval.batch_size=4", "eval.warmup_tokens=640")
    out = ev("metrics.enabled=false")
    assert out["unit"] == "byte" and out["bpb"] == out["bpc"] == pytest.approx(out["loss"] / np.log(2), abs=1e-6)
    # eval.output where nothing can be written: refused before the evaluation, naming eval.output
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="^eval.output: cannot write to"):
        ev(f"eval.output={blocker / 'sub' / 'eval.json'}")
    # a non-UTF-8 file for a char model: the advice names no training setting eval does not take
    ctok = build_tokenizer("char", "abc def\n")
    cpath = tmp_path / "c.pt"
    save_model(cpath, _model(ctok.vocab_size), ctok.state_dict())
    text.write_bytes(b"abc\xff\xfe def" * 20)
    with pytest.raises(ValueError) as e:
        ev(f"ckpt_path={cpath}")
    assert "not valid UTF-8" in str(e.value) and "data.tokenizer=" not in str(e.value).split("(a model")[0]


# -- 2. run directories: unique by default, one live run each ---------------------------------------------
def test_default_run_dirs_differ_for_runs_started_in_the_same_second():
    code = ("from omegaconf import OmegaConf; from hydra.core.utils import setup_globals; setup_globals(); from txl.cli import register_resolvers; "
            "register_resolvers(); c = OmegaConf.load('conf/{}.yaml'); print(c.hydra.run.dir)")
    for tool in ("train", "eval"):
        dirs = [subprocess.run([sys.executable, "-c", code.format(tool)], cwd=ROOT, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip() for _ in range(2)]
        assert dirs[0] and dirs[0] != dirs[1], dirs


def test_run_dir_lock_refuses_a_live_holder_not_a_stale_file(tmp_path):
    from txl.cli import LOCK_NAME, RunDirLocked, lock_run_dir, release_run_dirs
    d = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from txl.cli import lock_run_dir; "
                               f"lock_run_dir({str(d)!r}); print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked, match=rf"run dir {d} is in use by a live run \(pid {holder.pid}\)"):
            lock_run_dir(d)
    finally:
        holder.kill()
        holder.wait()
    assert (d / LOCK_NAME).read_text().strip() == str(holder.pid)  # the dead holder's file stays ...
    try:
        lock_run_dir(d)  # ... and blocks nothing
        assert (d / LOCK_NAME).read_text().strip() == str(os.getpid())
    finally:
        release_run_dirs()


# -- 3. a resumed run appends to metrics.csv ---------------------------------------------------------------
def test_csv_logger_continues_an_existing_metrics_file(tmp_path):
    from txl.callbacks import AppendingCSVLogger
    for run, rows in ((0, [{"train_loss": 1.0}, {"train_loss": 0.9}]), (1, [{"train_loss": 0.8, "val_loss": 0.7}])):
        lg = AppendingCSVLogger(save_dir=str(tmp_path), name="", version="")
        for i, r in enumerate(rows):
            lg.log_metrics(r, step=10 * run + i)
        lg.save()
    import csv
    with open(tmp_path / "metrics.csv") as f:
        got = [(int(r["step"]), r["train_loss"], r["val_loss"]) for r in csv.DictReader(f)]
    assert got == [(0, "1.0", ""), (1, "0.9", ""), (10, "0.8", "0.7")]


# -- 5. resume settings that would train nothing, skip data or fail on a shape ----------------------------
def test_resume_refuses_max_steps_tgt_len_and_batch_size_changes(tmp_path):
    from txl.checkpoint import CheckpointError
    from txl.train import check_resume
    cfg = _model().cfg
    path = tmp_path / "ck.ckpt"
    torch.save({"state_dict": {}, "global_step": 30,
                "txl": {"model_config": cfg.to_dict(), "seq": {"tgt_len": 16, "ext_len": 0}, "data": {"batch_size": 4}}},
               path)

    def c(max_steps=60, tgt_len=16, batch_size=4):
        return SimpleNamespace(trainer=SimpleNamespace(max_steps=max_steps), seq=SimpleNamespace(tgt_len=tgt_len, ext_len=0),
                               data=SimpleNamespace(batch_size=batch_size))
    check_resume(str(path), cfg, c())
    for kw, msg in ((dict(max_steps=30), "trainer.max_steps=30 is not past the checkpoint's step 30"),
                    (dict(tgt_len=32), "seq.tgt_len=32 differs from the checkpoint's seq.tgt_len=16"),
                    (dict(batch_size=8), "data.batch_size=8 differs from the checkpoint's data.batch_size=4")):
        with pytest.raises(CheckpointError, match=msg):
            check_resume(str(path), cfg, c(**kw))


# -- 6. disk full while saving: one line with path and errno, a distinct exit code, no temp file ----------
@pytest.fixture
def file_size_limit():
    """Writes beyond `limit` bytes fail with EFBIG (as a full disk fails with ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    yield lambda limit: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old)


def test_failed_checkpoint_write_is_one_line_and_leaves_no_temp_file(tmp_path, file_size_limit):
    from txl.cli import EXIT_IO, exit_code
    from txl.files import WriteError
    path = tmp_path / "last.ckpt"
    atomic_save({"w": torch.zeros(10)}, path)
    before = path.read_bytes()
    file_size_limit(100_000)
    with pytest.raises(WriteError) as e:
        atomic_save({"w": torch.zeros(100_000)}, path)
    file_size_limit(resource.RLIM_INFINITY)
    assert str(e.value) == f"cannot write {path}: [Errno 27] File too large" and e.value.errno == 27
    assert exit_code(e.value) == EXIT_IO == 74
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"] and path.read_bytes() == before


def test_orphan_temp_files_are_removed(tmp_path):
    from txl.files import remove_orphan_temps
    names = [".last.ckpt.123-abcdef01.txl-tmp", ".step-000005.ckpt.x1y2.tmp", ".last.ckpt.tmp", "last.ckpt",
             "step-000005.ckpt", "notes.tmp"]
    for n in names:
        (tmp_path / n).write_text("x")
    assert len(remove_orphan_temps(tmp_path)) == 3
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "notes.tmp", "step-000005.ckpt"]


# -- 7. a second SIGTERM / SIGINT exits at once ----------------------------------------------------------
def test_second_signal_exits_immediately(monkeypatch):
    import txl.callbacks as cb
    exits = []
    monkeypatch.setattr(cb, "_exit_now", exits.append)
    s = cb.StepCheckpoint("unused")
    s.handle(signal.SIGTERM)
    assert s.signal == signal.SIGTERM and exits == []  # first: checkpoint at the next step boundary
    s.handle(signal.SIGINT)
    assert exits == [128 + signal.SIGINT]


def test_signal_during_validation_stops_after_it_without_another_step(tmp_path):
    from txl.callbacks import SignalStop, StepCheckpoint
    tr = _FakeTrainer()
    tr.global_step, tr.world_size, tr.state = 7, 1, SimpleNamespace(fn="fit")
    cb = StepCheckpoint(str(tmp_path), 5)
    cb.on_validation_end(tr, None)  # no signal: nothing happens
    cb.signal = signal.SIGTERM
    with pytest.raises(SignalStop):
        cb.on_validation_end(tr, None)
    assert cb.last_saved == 7 and (tmp_path / "step-000007.ckpt").is_file()


# -- 10. one file mode for every checkpoint (umask), keep_last_n ---------------------------------------
class _FakeTrainer:
    is_global_zero, global_step = True, 0
    strategy = SimpleNamespace(barrier=lambda name: None)

    def save_checkpoint(self, path):
        atomic_save({"step": self.global_step}, path)


def test_checkpoint_files_share_one_mode_and_old_steps_are_pruned(tmp_path):
    from txl.callbacks import StepCheckpoint
    old = os.umask(0o027)
    try:
        cb, tr = StepCheckpoint(str(tmp_path), 1, keep_last_n=2), _FakeTrainer()
        for step in range(1, 5):
            tr.global_step = step
            cb.save(tr)
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "step-000003.ckpt", "step-000004.ckpt"]
    assert {(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {0o640}
    assert torch.load(tmp_path / "last.ckpt")["step"] == 4


# -- config values that slipped through: one line each, before any work --------------------------------
def test_bad_config_values_are_refused_by_name():
    from txl.config import EvalNode, EvalSchema, OptimNode, TrainerNode, TrainSchema, validate_eval, validate_train
    from txl.generate import GenerateSchema
    cases = [
        (dict(trainer=TrainerNode(accumulate_grad_batches=0)), "trainer.accumulate_grad_batches must be an integer >= 1"),
        (dict(optim=OptimNode(lr=float("inf"))), "optim.lr must be a finite number > 0, got inf"),
        (dict(optim=OptimNode(betas=(0.9, 1.5))), "optim.betas"),
        (dict(trainer=TrainerNode(gradient_clip_val=float("nan"))), "trainer.gradient_clip_val"),
        (dict(trainer=TrainerNode(precision="16-mixed")), "trainer.precision=16-mixed needs a GPU"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
            validate_train(TrainSchema(**kw))
    validate_train(TrainSchema())
    with pytest.raises(ValueError, match="trainer.precision=16-mixed needs a GPU"):  # auto without a GPU
        validate_train(TrainSchema(trainer=TrainerNode(accelerator="auto", precision="16-mixed")), cuda_available=False)
    validate_train(TrainSchema(trainer=TrainerNode(accelerator="auto", precision="16-mixed")), cuda_available=True)
    with pytest.raises(ValueError, match="eval.max_tokens must be >= 2"):
        validate_eval(EvalSchema(eval=EvalNode(max_tokens=-5)))
    for t in (1e-45, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0.001"):
            GenerateSchema(temperature=t)


def test_nonfinite_message_names_the_checkpoint_that_is_kept(tmp_path):
    from txl.train import nonfinite_message
    e = RuntimeError("non-finite training loss (nan) at step 2")
    cb = SimpleNamespace(last_saved=None)
    assert nonfinite_message(e, cb, tmp_path).endswith("stopped, no checkpoint was saved")
    (tmp_path / "last.ckpt").write_text("x")
    assert "the earlier" in nonfinite_message(e, cb, tmp_path)
    assert nonfinite_message(e, SimpleNamespace(last_saved=5), tmp_path).endswith(f"{tmp_path / 'last.ckpt'} (step 5)")


# -- on GPU: CUDA random states travel in the checkpoint ---------------------------------------------
def test_cuda_rng_states_are_saved_and_restored(monkeypatch):
    import txl.rng as rng
    calls = []

    def fake_cuda(states=None):  # a 2-device CUDA: get returns states, set records them
        if states is None:
            return {"all": [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)], "current": 1}
        calls.append(states)
        return states
    monkeypatch.setattr(rng, "cuda_rng", fake_cuda)
    s = rng.rng_state()
    assert s["cuda"]["current"] == 1 and [int(t) for t in s["cuda"]["all"]] == [1, 2]
    torch.manual_seed(5)
    a = torch.rand(3)
    s = rng.rng_state()
    b = torch.rand(3)
    rng.set_rng_state(s)
    assert torch.equal(torch.rand(3), b) and not torch.equal(a, b) and calls == [s["cuda"]]
    rng.set_rng_state({**s, "cuda": None})  # a checkpoint from a CPU run (or before this field)
    assert len(calls) == 1
    monkeypatch.setattr(rng, "cuda_rng", lambda states=None: None)  # saved on GPU, resumed without one
    with pytest.warns(UserWarning, match="CUDA random states but no GPU"):
        rng.set_rng_state(s)


@pytest.mark.gpu
def test_cuda_rng_round_trip_on_a_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from txl.rng import rng_state, set_rng_state
    torch.cuda.manual_seed_all(3)
    torch.rand(4, device="cuda")
    s = rng_state()
    assert s["cuda"] is not None and len(s["cuda"]["all"]) == torch.cuda.device_count()
    want = torch.rand(1000, device="cuda")
    torch.rand(10, device="cuda")
    set_rng_state(s)
    assert torch.equal(torch.rand(1000, device="cuda"), want)


# -- issue 10 §3: no library -> CLI import; eval / generate do not import train --------------------------
def test_no_library_module_imports_a_cli_module():
    import ast
    cli_modules = {"txl.train", "txl.eval", "txl.generate", "txl.convert"}
    bad = []
    for p in sorted((ROOT / "txl").rglob("*.py")):
        mod = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for n in names:
                if n in cli_modules and n != mod and (mod not in cli_modules or n == "txl.train"):
                    bad.append(f"{mod} imports {n}")
    assert bad == []
