"""The training progress bar, with its total also after a mid-epoch resume.

Lightning sets the bar's total in `on_train_epoch_start`, which it skips when a run resumes in the
middle of an epoch (every step checkpoint of a long epoch), so a resumed run showed "Training: 58/?".
"""
from __future__ import annotations

from pytorch_lightning.callbacks import TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is not None and bar.total is None:  # resumed mid-epoch: on_train_epoch_start never ran
            left = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches  # batches still to run
            total = min(batch_idx + 1 + left if trainer.max_steps > 0 else float("inf"), trainer.num_training_batches)
            if total != float("inf"):
                bar.total = int(total)
                bar.set_description(f"Epoch {trainer.current_epoch}")
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def progress_callbacks(enabled: bool) -> list:
    """[ProgressBar()] when the bar is on (Lightning refuses a bar callback with enable_progress_bar=False)."""
    return [ProgressBar()] if enabled else []
