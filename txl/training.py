"""The recipe around the model: when to validate, the best checkpoint, the end-of-training test,
and console lines for people. Wired by txl.train; each piece is a Lightning callback or a function.

Intervals are optimizer steps: Lightning counts `val_check_interval` in batches, so with
accumulate_grad_batches = A it is given interval * A (validation then runs right after the
optimizer step that completes the interval).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch


def lightning_val_check_interval(val_check_interval: int, accumulate_grad_batches: int) -> int:
    """trainer.val_check_interval (optimizer steps) -> Lightning's (training batches)."""
    return int(val_check_interval) * max(1, int(accumulate_grad_batches))


class FinalValidation(pl.Callback):
    """Validate after the last optimizer step too, whatever the interval (Lightning validates
    when a callback asks the loop to stop; the loop then ends at max_steps anyway)."""

    def __init__(self, max_steps: int):
        self.max_steps = int(max_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.max_steps:
            trainer.should_stop = True


class BestCheckpoint(pl.Callback):
    """best.ckpt beside last.ckpt: the weights of the lowest val_loss so far (the original keeps
    model.pt of its best validation). Written atomically (the trainer's checkpoint IO); the best
    figure and its step travel in every checkpoint, so a resumed run keeps comparing with it."""

    def __init__(self, dirpath: str, monitor: str = "val_loss"):
        self.path = Path(dirpath) / "best.ckpt"
        self.monitor = monitor
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != "fit":  # not trainer.validate / test
            return
        v = trainer.callback_metrics.get(self.monitor)
        if v is None:
            return
        v = float(v)
        if math.isfinite(v) and (self.best is None or v < self.best):
            self.best, self.best_step = v, int(trainer.global_step)
            trainer.save_checkpoint(self.path, weights_only=False)  # collective under DDP; rank 0 writes

    def state_dict(self):
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state):
        self.best, self.best_step = state.get("best"), state.get("best_step")


def _unit_name(unit: Optional[str]) -> Optional[str]:
    return f"bp{unit[0]}" if unit else None


class ConsoleLog(pl.Callback):
    """Lines for people, as the original prints them: `#params` at start; with the progress bar
    off, every `every` optimizer steps

        | step     20 | lr 2.500e-04 | ms/step  123.4 | loss  4.1234 | bpb  5.9489

    (loss and bits per unit, or ppl for word corpora, averaged over the interval and, under DDP,
    over ranks) and one line per validation / test naming its step. stdout; the JSON summary
    stays the last line."""

    def __init__(self, every: int, progress_bar: bool, file=None):
        self.every, self.lines = int(every), not progress_bar
        self.file = file or sys.stdout
        self._t0: Optional[float] = None
        self._last_step = 0
        self._val_t0: Optional[float] = None

    def _print(self, trainer, msg: str) -> None:
        if trainer.is_global_zero:
            print(msg, file=self.file, flush=True)

    def on_train_start(self, trainer, pl_module):
        n_all, n_nonemb = pl_module.count_params()
        self._print(trainer, f"#params = {n_all:,} (#non-embedding params = {n_nonemb:,})")
        self._t0, self._last_step = time.perf_counter(), int(trainer.global_step)
        pl_module.interval = {"loss": 0.0, "n": 0}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = int(trainer.global_step)
        if not self.lines or step == self._last_step or step % self.every:
            return  # no optimizer step completed here, or not a logging step
        iv = pl_module.interval
        loss = torch.as_tensor(iv["loss"], dtype=torch.float32, device=pl_module.device) / max(1, iv["n"])
        if trainer.world_size > 1:
            loss = trainer.strategy.reduce(loss, reduce_op="mean")
        loss = float(loss)
        now = time.perf_counter()
        ms = 1000.0 * (now - self._t0) / max(1, step - self._last_step)
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        unit = _unit_name(pl_module.unit)
        tail = f"{unit} {loss / math.log(2):8.4f}" if unit else f"ppl {math.exp(min(loss, 50)):9.2f}"
        self._print(trainer, f"| step {step:>7d} | lr {lr:.3e} | ms/step {ms:7.1f} | loss {loss:7.4f} | {tail}")
        self._t0, self._last_step = now, step
        pl_module.interval = {"loss": 0.0, "n": 0}

    def _eval_line(self, trainer, pl_module, prefix: str):
        if not self.lines or trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        parts = [f"{k} {float(m[k]):.4f}" for k in (f"{prefix}_loss", f"{prefix}_ppl", f"{prefix}_bpb",
                                                     f"{prefix}_bpc", f"{prefix}_fraction") if k in m]
        step = getattr(pl_module, "weights_step", None) if prefix == "test" else None
        step = int(trainer.global_step) if step is None else step  # the step of the weights scored
        self._print(trainer, f"| {prefix} at step {step} | " + " | ".join(parts))

    def on_validation_start(self, trainer, pl_module):
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if self._t0 is not None and self._val_t0 is not None:  # ms/step counts training time only
            self._t0 += time.perf_counter() - self._val_t0
        self._eval_line(trainer, pl_module, "val")

    def on_test_end(self, trainer, pl_module):
        self._eval_line(trainer, pl_module, "test")


def run_test_at_end(trainer: pl.Trainer, module, dm, best: BestCheckpoint, note) -> dict:
    """Score the test split (eval settings, whole split) with best.ckpt's weights (the original
    tests its best-validation model.pt), else the final ones. -> summary entries naming the step."""
    from txl.data import DataError
    if len(dm.load().split("test")) == 0:
        note("no test split: no end-of-training test (trainer.test_at_end)")
        return {}
    ckpt = best.path if best.best_step is not None and best.path.is_file() else None
    step = best.best_step if ckpt is not None else int(trainer.global_step)
    module.weights_step = step
    saved_limit = trainer.limit_test_batches
    trainer.limit_test_batches = 1.0  # the whole split, always
    try:
        trainer.test(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None, verbose=False,
                     weights_only=False)
    except DataError as e:  # e.g. a test split shorter than one eval batch: the run itself is done
        note(f"no end-of-training test: {str(e).splitlines()[0]}")
        return {}
    finally:
        trainer.limit_test_batches = saved_limit
    m = trainer.callback_metrics
    out = {k: round(float(m[k]), 6) for k in ("test_loss", "test_ppl", "test_bpb", "test_bpc") if k in m}
    out.update(test_weights_step=step, test_weights="best.ckpt" if ckpt else "final")
    return out
