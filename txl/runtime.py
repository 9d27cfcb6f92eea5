"""Process set-up shared by the CLIs: how many CPU threads, and which third-party console lines to drop.

    from txl.runtime import quiet_third_party, setup_threads
    quiet_third_party()
    setup_threads(cfg.threads)            # None: OMP_NUM_THREADS if set, else the usable cores

Threads: torch's default is one thread per *visible* core, even when the process may only run on
some of them (taskset, cgroups, SLURM) or when other processes keep those cores busy; oversubscribed
threads then wait on each other at every op, which on small models (d_model <= 512) costs more than
the parallel GEMM gains (measured: 0.05 it/s with the default count on a loaded 2-core machine,
1.85 it/s with one thread). So the default is the cores this process may run on
(`os.sched_getaffinity`), split between the CPU processes of one node (DDP), never more.

Noise: each filter names one known-harmless message (by text, category and emitting logger), so
every other warning still shows.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from typing import Any, Optional

log = logging.getLogger("txl.runtime")


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity: taskset, cgroup cpusets, SLURM), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS / Windows have no affinity API
        return max(1, os.cpu_count() or 1)


def cpu_procs(trainer: Any) -> int:
    """Training processes sharing this node's cores: `devices` CPU processes under DDP, else 1."""
    try:
        if trainer.accelerator == "cpu" and str(trainer.strategy).startswith("ddp"):
            return max(1, int(trainer.devices))
    except (AttributeError, TypeError, ValueError):  # devices="auto" / a list: let the default stand
        pass
    return 1


def choose_threads(n: Optional[int], procs: int = 1, env: Optional[dict] = None) -> tuple[int, str]:
    """(threads, why). n: the `threads` option (None: OMP_NUM_THREADS if set, else usable cores / procs)."""
    env = os.environ if env is None else env
    usable = usable_cores()
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"threads must be an integer >= 1 or null (the usable cores), got {n!r}")
        if n > usable:
            return usable, f"threads={n} capped to the {usable} usable cores"
        return n, f"threads={n}"
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp:
        if not omp.isdigit() or int(omp) < 1:
            raise ValueError(f"OMP_NUM_THREADS must be an integer >= 1, got {omp!r}")
        return min(int(omp), usable), f"OMP_NUM_THREADS={omp}, {usable} usable cores"
    share = max(1, usable // max(1, procs))
    return share, f"{usable} usable cores" + (f" / {procs} processes" if procs > 1 else "")


def setup_threads(n: Optional[int] = None, procs: int = 1) -> int:
    """Set torch's intra-op (and, if still possible, inter-op) thread count; log the choice once.

    OMP_NUM_THREADS is exported too, so processes started from here (DDP workers) get the same count."""
    import torch
    threads, why = choose_threads(n, procs)
    torch.set_num_threads(threads)
    try:  # only allowed before the first inter-op parallel work; later calls raise
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass
    os.environ["OMP_NUM_THREADS"] = str(threads)
    log.info("threads: %d (%s; set threads=N to change)", threads, why)
    return threads


# ---- third-party console noise --------------------------------------------------------------------
# (message regex, category) of warnings known to be harmless here, each with where it comes from and why.
_WARNINGS = (
    # torch 2.13 deprecated LeafSpec; pytorch_lightning.utilities._pytree still builds one per batch.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # pytorch_lightning.utilities.data: our OrderedStream defines __len__ on purpose (progress-bar total);
    # the warning concerns num_workers > 1, and our loaders use num_workers=0.
    (r"Your `IterableDataset` has `__len__` defined", UserWarning),
    # pytorch_lightning.loops.training_epoch_loop: resuming mid-epoch. TXLDataModule.load_state_dict
    # restores the stream position (resume is tested for equal per-step losses), so it is resumable.
    (r"You're resuming from a checkpoint that ended before the epoch ended", UserWarning),
)
# (logger name, message regex) of INFO records known to be harmless.
_LOG_RECORDS = (
    # pytorch_lightning.trainer.connectors.logger_connector: an advertisement for a logging platform.
    ("pytorch_lightning.utilities.rank_zero", r"Tip: For seamless cloud logging.*litlogger"),
    # Trainer.save_checkpoint without weights_only: we always save the full state (resume needs it).
    ("pytorch_lightning.trainer.connectors.checkpoint_connector", r"`weights_only` was not set, defaulting to `False`"),
)


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_third_party() -> None:
    """Drop the known-harmless third-party lines above; everything else stays visible. Idempotent."""
    for message, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, pattern in _LOG_RECORDS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.pattern.pattern == pattern for f in lg.filters):
            lg.addFilter(_DropMessage(pattern))


def quiet_wandb_logger(logger: Any) -> Any:
    """Lightning's WandbLogger always passes anonymous=None to wandb.init, and wandb >= 0.19 warns that
    "the anonymous setting has no effect" whatever its value: leave the key out."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
    return logger
