"""Learning-rate schedules as pure functions: step index -> multiplier of optim.lr.

`k` is the number of optimizer steps already taken, so the multiplier at k is the one the (k+1)-th
step runs with (torch's LambdaLR, stepped after every optimizer step, calls the function with k).

    cosine    (txl's)  linear warm-up (k+1)/W for k < W, then a cosine from 1 to min_lr_ratio over
                       the steps after warm-up, [W, total]
    constant           linear warm-up, then 1
    original           the released train.py exactly: the first step runs at the full lr; after step
                       k the warm-up sets k/W while k < W; from k = W the cosine of
                       CosineAnnealingLR(T_max=total, eta_min) evaluated at k, i.e. over ALL steps
                       from 0, towards an absolute eta_min (it jumps from (W-1)/W to cos(k=W))
"""
from __future__ import annotations

import math
from typing import Callable

SCHEDULERS = ("cosine", "constant", "original")


def _cosine(progress: float, floor: float) -> float:
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_multiplier(k: int, schedule: str, warmup: int, total: int, min_lr_ratio: float = 0.0,
                  eta_min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr for the optimizer step that follows `k` completed steps."""
    if schedule not in SCHEDULERS:
        raise ValueError(f"optim.scheduler must be one of {list(SCHEDULERS)}, got {schedule!r}")
    if schedule == "original":
        if 0 < k < warmup:
            return k / warmup
        return _cosine(k / max(1, total), eta_min_ratio)  # k = 0: cos(0) = 1, the full lr
    if warmup and k < warmup:
        return (k + 1) / warmup
    if schedule == "constant":
        return 1.0
    return _cosine(min(1.0, (k - warmup) / max(1, total - warmup)), min_lr_ratio)


def lr_lambda(warmup: int, total: int, schedule: str, min_ratio: float = 0.0,
              eta_min_ratio: float = 0.0) -> Callable[[int], float]:
    """The LambdaLR function of a schedule (see lr_multiplier)."""
    def f(k: int) -> float:
        return lr_multiplier(k, schedule, warmup, total, min_ratio, eta_min_ratio)
    return f
