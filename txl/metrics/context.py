"""Context sweep: the same text scored with several evaluation memory lengths (or, for a
memory=compressive model, several numbers of compressed slots: `over='cmem_len'`).

`TokenLosses` is an evaluate_tokens hook that keeps every scored token's NLL in text order, so
sweeps of several models line up token by token (the per-token loss matrices RECL needs).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from txl.evaluate import evaluate_tokens  # the one evaluation loop (library, not the eval CLI)
from txl.metrics.base import IGNORE
from txl.metrics.recl import ecl


class TokenLosses:
    """Per-token NLL of an evaluate_tokens pass, in text order (the stream's rows one after the
    other), scored tokens only: identical token sets for any two passes with the same text,
    tgt_len, batch_size and warmup."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.nll, self.keep = [], []

    def update(self, model, batch, out, mems_in):
        labels = batch["labels"].to(out.nll.device)
        self.nll.append(out.nll.detach().double().cpu())  # (B, T)
        self.keep.append((labels != IGNORE).cpu())

    def values(self) -> np.ndarray:
        if not self.nll:
            return np.zeros(0)
        nll, keep = torch.cat(self.nll, dim=1), torch.cat(self.keep, dim=1)  # (B, n_step): row = stretch of text
        return nll[keep].numpy()  # boolean indexing reads row-major: text order


SWEEPS = ("mem_len", "cmem_len")  # what a sweep varies: eval_mem_len, or a compressive model's slots


def sweep(model, tokens, tgt_len: int, contexts: Sequence[int], batch_size: int = 1, warmup_tokens: int = 0,
          precision: str = "32", same_length: bool = False, reuse: Optional[dict] = None,
          progress: bool = False, over: str = "mem_len", doc_starts=None) -> dict:
    """Score `tokens` once per value in `contexts` -> {'contexts', 'loss', 'tokens',
    'token_losses' [n_contexts, n_tokens]}. reuse: {value: per-token losses} already measured.
    over='mem_len': the values are memory lengths (same_length is switched off for mem_len 0: it
    needs a memory to equalise); over='cmem_len': compressed slots of a memory=compressive model
    (TransformerXL.set_cmem_len), at the model's current mem_len. The model's lengths and slot count
    are restored afterwards. doc_starts: as evaluate_tokens' (each document scored without the ones
    before it)."""
    from dataclasses import asdict
    if over not in SWEEPS:
        raise ValueError(f"sweep: over must be one of {SWEEPS}, got {over!r}")
    rows, losses = [], []
    saved, saved_c = asdict(model.seq), model.cmem_len
    try:
        for c in contexts:
            if reuse and c in reuse:
                v = reuse[c]
            else:
                if over == "mem_len":
                    model.set_lengths(same_length=same_length and c > 0, mem_len=c)
                else:
                    model.set_cmem_len(c)
                h = TokenLosses()
                evaluate_tokens(model, tokens, tgt_len, model.seq.mem_len, batch_size, warmup_tokens, precision,
                                progress, hooks=[h], doc_starts=doc_starts)
                v = h.values()
            rows.append(v)
            losses.append(float(v.mean()) if len(v) else math.nan)
            if progress:
                import sys
                what = "context sweep: eval_mem_len" if over == "mem_len" else "cmem sweep: cmem_len"
                print(f"{what}={c} loss={losses[-1]:.4f}", file=sys.stderr, flush=True)
    finally:
        model.set_lengths(**saved)
        if saved_c is not None:
            model.set_cmem_len(saved_c)
    n = {len(v) for v in rows}
    if len(n) != 1:
        raise ValueError(f"{over} sweep: passes scored different token counts {sorted(n)}")
    return {"contexts": list(contexts), "loss": losses, "tokens": n.pop(), "token_losses": np.stack(rows)}


def summarize_sweep(res: dict, threshold: float = 0.01) -> dict:
    """JSON-able sweep result: losses, ppl and the ECL of the mean losses. (No RECL of a group of
    one: its per-token min(l(c), l(c')) counts every token's noise between two passes as a gain,
    so it always looks saturated; RECL means something only across models, scripts/recl.py.)"""
    ctx, L = res["contexts"], res["loss"]
    return {"contexts": ctx, "loss": [round(x, 6) for x in L], "ppl": [round(math.exp(min(x, 700)), 4) for x in L],
            "tokens": res["tokens"], "ecl": ecl(L, ctx, threshold)}

