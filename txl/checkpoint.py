"""txl checkpoints: what travels with the weights, and atomic writes.

A txl model file (written by txl-convert, readable by txl-eval / txl-generate):
    {"format": "txl-model", "version": 1, "model_config": TXLConfig.to_dict(),
     "state_dict": model.state_dict(), "tokenizer": tokenizer state dict or None, "meta": {...}}
A Lightning training checkpoint carries the same "txl" entries under checkpoint["txl"], so both
load through `load_model`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from txl.files import atomic_write
from txl.model import TransformerXL, TXLConfig

FORMAT, VERSION = "txl-model", 1


class CheckpointError(ValueError):
    pass


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through txl.files.atomic_write: never a half file; a failed write raises WriteError."""
    atomic_write(path, lambda f: torch.save(obj, f))


def model_payload(model: TransformerXL, tokenizer: Optional[dict] = None, meta: Optional[dict] = None) -> dict:
    return {"format": FORMAT, "version": VERSION, "model_config": model.cfg.to_dict(),
            "state_dict": model.state_dict(), "tokenizer": tokenizer, "meta": meta or {}}


def save_model(path, model: TransformerXL, tokenizer: Optional[dict] = None, meta: Optional[dict] = None) -> None:
    atomic_save(model_payload(model, tokenizer, meta), path)


def read_checkpoint(path) -> dict:
    """Load a txl model file or a txl Lightning checkpoint; one clear error for every failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path: no such file: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated / not a torch file
        raise CheckpointError(f"ckpt_path: cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"ckpt_path: {path} is not a txl checkpoint")
    return ck


def load_model(path, map_location="cpu") -> tuple[TransformerXL, Optional[dict], dict]:
    """-> (model, tokenizer state or None, the raw checkpoint dict)."""
    ck = read_checkpoint(path)
    if ck.get("format") == FORMAT:
        cfg_d, sd, tok = ck["model_config"], ck["state_dict"], ck.get("tokenizer")
    elif "txl" in ck and "state_dict" in ck:  # Lightning checkpoint written by txl-train
        cfg_d, tok = ck["txl"]["model_config"], ck["txl"].get("tokenizer")
        sd = {k[len("model."):]: v for k, v in ck["state_dict"].items() if k.startswith("model.")}
    else:
        raise CheckpointError(f"ckpt_path: {path} is neither a txl model file nor a txl-train checkpoint")
    model = TransformerXL(TXLConfig.from_dict(cfg_d))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"ckpt_path: {path} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(map_location), tok, ck
