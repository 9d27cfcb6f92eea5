"""Callbacks: step-numbered atomic checkpoints + last.ckpt, and SIGTERM/SIGINT → checkpoint, stop."""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from txl.checkpoint import atomic_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temp file, fsync, rename: a crash never leaves a truncated checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_save(checkpoint, path)


class StepCheckpoint(pl.Callback):
    """step-000123.ckpt every `every_n_steps` steps and at the end, each copied to last.ckpt."""

    def __init__(self, dirpath: str, every_n_steps: int = 0):
        self.dirpath, self.every = Path(dirpath), every_n_steps
        self.last_saved: Optional[int] = None
        self.signal: Optional[int] = None
        self._prev_step: Optional[int] = None
        self._old = {}

    def save(self, trainer: pl.Trainer) -> Path:
        step = trainer.global_step
        path = self.dirpath / f"step-{step:06d}.ckpt"
        trainer.save_checkpoint(path)  # collective under DDP; rank 0 writes
        if trainer.is_global_zero:
            tmp = self.dirpath / ".last.ckpt.tmp"
            shutil.copyfile(path, tmp)
            os.replace(tmp, self.dirpath / "last.ckpt")
        trainer.strategy.barrier("txl-last-ckpt")
        self.last_saved = step
        return path

    # -- signals: remember, act at the next step boundary (a consistent state to save)
    def on_train_start(self, trainer, pl_module):
        self._prev_step = trainer.global_step
        def handler(signum, frame):
            self.signal = signum
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, handler)
            except ValueError:  # not the main thread
                pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        stepped, self._prev_step = step != self._prev_step, step  # an optimizer step ended with this batch
        if self.every and stepped and step % self.every == 0:  # optimizer steps, also under accumulation
            self.save(trainer)
        stop = self.signal is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            if self.last_saved != step:
                self.save(trainer)
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        if self.last_saved != trainer.global_step:
            self.save(trainer)
        for s, h in self._old.items():
            signal.signal(s, h)
