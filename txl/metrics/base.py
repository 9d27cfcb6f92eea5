"""The metric protocol shared by validation (Lightning, DDP) and txl-eval."""
from __future__ import annotations

from typing import Dict

import torch

from txl.model import IGNORE  # noqa: F401  (labels of positions that are not scored; re-exported)


class Metric:
    """update() per batch; state() -> {name: float64 tensor} summed over ranks; summary(state)
    -> JSON-able dict; scalars(summary, prefix) -> {log key: float}."""

    name = "metric"

    def __init__(self):
        self.reset()

    def reset(self) -> None: ...

    def update(self, model, batch: dict, out, mems_in: list) -> None: ...

    def state(self, model, device) -> Dict[str, torch.Tensor]:
        return {}

    def summary(self, state: Dict[str, torch.Tensor]) -> dict:
        return {}

    def scalars(self, summary: dict, prefix: str) -> Dict[str, float]:
        return {}
