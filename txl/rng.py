"""Every random-number state a resumed run needs (python, numpy, torch CPU, CUDA), saved and restored.

The CUDA calls live in `cuda_rng` alone, so the save / restore logic is testable without a GPU.
Under DDP only rank 0's states are saved and every rank restores them: the ranks start from the same
seed and draw the same shapes, so their states are equal (the CPU states rely on the same fact).
"""
from __future__ import annotations

import random
import warnings
from typing import Optional

import numpy as np
import torch


def cuda_rng(states: Optional[dict] = None) -> Optional[dict]:
    """states None: {'all': per-device states, 'current': device index} (None without initialised
    CUDA); else set them: every saved device that exists here, then the current device from the
    saved current one (the device this rank drew from when it was saved)."""
    if states is None:
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return None
        return {"all": torch.cuda.get_rng_state_all(), "current": torch.cuda.current_device()}
    if not torch.cuda.is_available():
        return None
    n = torch.cuda.device_count()
    torch.cuda.set_rng_state_all(states["all"][:n])
    torch.cuda.set_rng_state(states["all"][states["current"]])
    return states


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": cuda_rng()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and cuda_rng(s["cuda"]) is None:
        warnings.warn("the checkpoint holds CUDA random states but no GPU is in use here: random draws on "
                      "the device (dropout) will not repeat the original run's", stacklevel=2)
