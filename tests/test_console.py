"""The console: thread choice (txl/runtime.py), known third-party noise gone, real warnings kept,
the progress bar's total after a resume, Hydra's job log not empty."""
from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import pytest

from conftest import tiny_train_args
from txl.runtime import choose_threads, cpu_procs, quiet_third_party, setup_threads, usable_cores

# One line of each known-harmless message a tiny run printed before (issue 13, item 9).
NOISE = [
    r"litlogger",                                   # logging-platform advertisement
    r"LeafSpec\)` is deprecated",                   # torch pytree deprecation, via lightning
    r"IterableDataset` has `__len__` defined",      # lightning data check
    r"`weights_only` was not set",                  # lightning checkpoint save
    r"anonymous setting has no effect",             # wandb, via lightning's WandbLogger
    r"resuming from a checkpoint that ended before the epoch ended",  # our datamodule does resume
]


def test_threads_default_is_the_affinity_not_the_machine():
    cores = len(os.sched_getaffinity(0))
    assert usable_cores() == cores
    assert choose_threads(None, env={})[0] == cores
    assert choose_threads(None, procs=2, env={})[0] == max(1, cores // 2)  # DDP CPU processes share the cores
    assert choose_threads(None, env={"OMP_NUM_THREADS": "1"}) == (1, f"OMP_NUM_THREADS=1, {cores} usable cores")
    assert choose_threads(1, env={"OMP_NUM_THREADS": "7"})[0] == 1  # the option beats the environment
    n, why = choose_threads(cores + 3, env={})
    assert n == cores and "capped" in why  # never more than the usable cores
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads must be an integer >= 1 or null"):
            choose_threads(bad, env={})
    with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
        choose_threads(None, env={"OMP_NUM_THREADS": "many"})


def test_cpu_procs():
    from types import SimpleNamespace as NS
    assert cpu_procs(NS(accelerator="cpu", strategy="ddp", devices=2)) == 2
    assert cpu_procs(NS(accelerator="cpu", strategy="auto", devices=1)) == 1
    assert cpu_procs(NS(accelerator="gpu", strategy="ddp", devices=8)) == 1
    assert cpu_procs(NS(accelerator="cpu", strategy="ddp", devices="auto")) == 1


def test_setup_threads_sets_torch_and_logs_once(caplog, monkeypatch):
    import torch
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))  # restored afterwards
    try:
        with caplog.at_level(logging.INFO, logger="txl.runtime"):
            assert setup_threads(1) == 1
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        lines = [r.getMessage() for r in caplog.records if r.name == "txl.runtime"]
        assert lines == ["threads: 1 (threads=1; set threads=N to change)"]
    finally:
        torch.set_num_threads(before)


def test_quiet_filters_only_the_known_messages(caplog):
    import torch.utils._pytree as pytree
    quiet_third_party()
    quiet_third_party()  # idempotent: one filter per message
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("default")
        quiet_third_party()  # simplefilter above reset the filters, as pytest does per test
        pytree.LeafSpec()  # the deprecation lightning triggers on every batch
        warnings.warn("Your `IterableDataset` has `__len__` defined. In combination with ...", UserWarning)
        warnings.warn("something else is deprecated", FutureWarning)  # a real warning
        warnings.warn("Your `IterableDataset` has `__len__` defined", RuntimeWarning)  # other category
    assert [str(w.message) for w in rec] == ["something else is deprecated",
                                             "Your `IterableDataset` has `__len__` defined"]
    rz = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    assert sum(type(f).__name__ == "_DropMessage" for f in rz.filters) == 1
    with caplog.at_level(logging.INFO):
        rz.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](x)")
        rz.info("GPU available: False, used: False")
        logging.getLogger("pytorch_lightning.trainer.connectors.checkpoint_connector").info(
            "`weights_only` was not set, defaulting to `False`.")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_wandb_logger_without_anonymous(tmp_path):
    from pytorch_lightning.loggers import WandbLogger
    from txl.runtime import quiet_wandb_logger
    lg = quiet_wandb_logger(WandbLogger(project="p", save_dir=str(tmp_path), mode="offline"))
    assert "anonymous" not in lg._wandb_init
    assert quiet_wandb_logger(WandbLogger(project="p", anonymous=True))._wandb_init["anonymous"] == "allow"


@pytest.mark.slow
def test_console_of_a_tiny_run_and_resume(run_cli, corpus_files, tmp_path):
    """Train 20 steps with wandb (offline) and a checkpoint at 10, resume from step 10 with the progress
    bar on, then evaluate: none of the noise, our thread line once, the bar's total after the resume,
    and eval.log holds our lines."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("logger=wandb", "trainer.max_steps=20", "trainer.val_check_interval=10", "checkpoint.every_n_steps=10")
    r1 = run_cli("train", *tiny_train_args(corpus_files, a, *common))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_cli("train", *tiny_train_args(corpus_files, b, *common, "logger=none", "trainer.enable_progress_bar=true",
                                           f"ckpt_path={a}/checkpoints/step-000010.ckpt"))
    assert r2.returncode == 0, r2.stderr[-3000:]
    r3 = run_cli("eval", f"ckpt_path={a}/checkpoints/last.ckpt", "eval.max_tokens=500", "threads=1",
                 f"hydra.run.dir={tmp_path / 'ev'}")
    assert r3.returncode == 0, r3.stderr[-3000:]
    for r in (r1, r2, r3):
        for pat in NOISE:
            assert not re.search(pat, r.stdout + r.stderr), f"noise {pat!r} in:\n{r.stderr[-3000:]}"
    assert r3.stdout.startswith("{") and len(r3.stdout.splitlines()) == 1  # log lines go to stderr
    assert r1.stderr.count("[txl.runtime][INFO] - threads: ") == 1
    bar = (r2.stdout + r2.stderr).replace("\r", "\n")  # Lightning's bar writes to stdout
    assert re.search(r"Epoch 0: .* 11/20 ", bar), bar[-2000:]  # resumed at step 10 of 20: the total is known
    assert not re.search(r"\b1\d/\?", bar), bar[-2000:]
    log = Path(tmp_path / "ev" / "eval.log").read_text()
    assert "threads: 1 (threads=1" in log
