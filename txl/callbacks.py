"""Callbacks: step-numbered atomic checkpoints + last.ckpt, SIGTERM/SIGINT -> checkpoint, stop; a CSV
logger that appends to the run's metrics.csv (a resume keeps the earlier rows)."""
from __future__ import annotations

import csv
import os
import re
import signal
import sys
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from txl.checkpoint import atomic_save
from txl.files import atomic_copy

STEP_RE = re.compile(r"step-(\d+)\.ckpt$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temp file, fsync, rename: a crash never leaves a truncated checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_save(checkpoint, path)


class SignalStop(BaseException):
    """Raised after the checkpoint a signal asked for: ends fit() at once (no validation, no more steps).
    A BaseException, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def _exit_now(code: int) -> None:  # the one place a second signal ends the process (tests replace it)
    os._exit(code)


class StepCheckpoint(pl.Callback):
    """step-000123.ckpt every `every_n_steps` steps and at the end, each copied to last.ckpt;
    keep_last_n: prune all but the newest N step files (None: keep all)."""

    def __init__(self, dirpath: str, every_n_steps: int = 0, keep_last_n: Optional[int] = None):
        self.dirpath, self.every, self.keep = Path(dirpath), every_n_steps, keep_last_n
        self.last_saved: Optional[int] = None
        self.signal: Optional[int] = None
        self._prev_step: Optional[int] = None
        self._old = {}
        self._trainer = None

    def save(self, trainer: pl.Trainer) -> Path:
        step = trainer.global_step
        path = self.dirpath / f"step-{step:06d}.ckpt"
        trainer.save_checkpoint(path)  # collective under DDP; rank 0 writes
        if trainer.is_global_zero:
            atomic_copy(path, self.dirpath / "last.ckpt")
            self.prune()
        trainer.strategy.barrier("txl-last-ckpt")
        self.last_saved = step
        return path

    def prune(self) -> None:
        if not self.keep:
            return
        steps = sorted((int(m.group(1)), p) for p in self.dirpath.glob("step-*.ckpt") if (m := STEP_RE.search(p.name)))
        for _, p in steps[:-self.keep]:
            p.unlink(missing_ok=True)

    # -- signals: remember, act at the next step boundary (a consistent state to save); a second
    #    signal ends the process at once (the last complete checkpoint is intact: writes are atomic)
    def handle(self, signum, frame=None):
        if self.signal is not None:
            print(f"txl-train: second signal {signum}: exiting now", file=sys.stderr, flush=True)
            launcher = getattr(getattr(self._trainer, "strategy", None), "launcher", None)
            for p in getattr(launcher, "procs", None) or []:  # DDP children started by this process
                p.kill()
            _exit_now(128 + signum)
        self.signal = signum

    def on_train_start(self, trainer, pl_module):
        self._trainer = trainer
        self._prev_step = trainer.global_step
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self.handle)
            except ValueError:  # not the main thread
                pass

    def _stop_requested(self, trainer) -> bool:
        stop = self.signal is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        return stop

    def _stop(self, trainer):
        if self.last_saved != trainer.global_step:
            self.save(trainer)
        raise SignalStop(self.signal if self.signal is not None else signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        stepped, self._prev_step = step != self._prev_step, step  # an optimizer step ended with this batch
        if self.every and stepped and step % self.every == 0:  # optimizer steps, also under accumulation
            self.save(trainer)
        if self._stop_requested(trainer):
            self._stop(trainer)

    def on_validation_end(self, trainer, pl_module):
        # a signal during validation: after it (the state between two steps, as ModelCheckpoint saves)
        if trainer.state.fn == "fit" and self._stop_requested(trainer):
            self._stop(trainer)

    def on_train_end(self, trainer, pl_module):
        if self.last_saved != trainer.global_step:
            self.save(trainer)
        self.restore_handlers()

    def on_exception(self, trainer, pl_module, exception):
        self.restore_handlers()

    def restore_handlers(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one continues it (its header
    becomes the known columns, so new columns rewrite the header and keep every earlier row)."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(set(header))


class AppendingCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
