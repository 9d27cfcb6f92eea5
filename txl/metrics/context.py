"""Context sweep: the same text scored with several evaluation memory lengths.

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


def sweep(model, tokens, tgt_len: int, contexts: Sequence[int], batch_size: int = 1, warmup_tokens: int = 0,
          precision: str = "32", same_length: bool = False, reuse: Optional[dict] = None,
          progress: bool = False, doc_starts=None) -> dict:
    """Score `tokens` once per memory length in `contexts` -> {'contexts', 'loss', 'tokens',
    'token_losses' [n_contexts, n_tokens]}. reuse: {mem_len: per-token losses} already measured.
    same_length is switched off for mem_len 0 (it needs a memory to equalise). doc_starts: as
    evaluate_tokens' (each document scored without the ones before it)."""
    from dataclasses import asdict
    rows, losses = [], []
    saved = asdict(model.seq)
    for c in contexts:
        if reuse and c in reuse:
            v = reuse[c]
        else:
            model.set_lengths(same_length=same_length and c > 0, mem_len=c)
            h = TokenLosses()
            evaluate_tokens(model, tokens, tgt_len, c, batch_size, warmup_tokens, precision, progress, hooks=[h],
                            doc_starts=doc_starts)
            v = h.values()
        rows.append(v)
        losses.append(float(v.mean()) if len(v) else math.nan)
        if progress:
            import sys
            print(f"context sweep: eval_mem_len={c} loss={losses[-1]:.4f}", file=sys.stderr, flush=True)
    model.set_lengths(**saved)
    n = {len(v) for v in rows}
    if len(n) != 1:
        raise ValueError(f"context sweep: passes scored different token counts {sorted(n)}")
    return {"contexts": list(contexts), "loss": losses, "tokens": n.pop(), "token_losses": np.stack(rows)}


def summarize_sweep(res: dict, threshold: float = 0.01) -> dict:
    """JSON-able sweep result: losses, ppl and the ECL of the mean losses. (No RECL of a group of
    one: its per-token min(l(c), l(c')) counts every token's noise between two passes as a gain,
    so it always looks saturated; RECL means something only across models, scripts/recl.py.)"""
    ctx, L = res["contexts"], res["loss"]
    return {"contexts": ctx, "loss": [round(x, 6) for x in L], "ppl": [round(math.exp(min(x, 700)), 4) for x in L],
            "tokens": res["tokens"], "ecl": ecl(L, ctx, threshold)}

