"""The evaluation loop: ordered streams scored a segment at a time, memory carried across segments.

One loop for every consumer: `SegmentScorer.step` is validation's per-batch step (txl.lit.TXLModule,
Lightning drives the batches) and `evaluate_tokens` drives it over a token array for txl-eval and
the context sweep (txl.metrics.context). Loss = sum of token NLLs / number of scored tokens, summed
in float64; zero scored tokens is an error, never a loss of 0.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch

from txl.model.transformer import IGNORE

LN2 = math.log(2.0)


class SegmentScorer:
    """Score consecutive batches of B ordered streams with one model, memory carried.

    projected: memories as keys / values (txl.model.KVMemory: each segment projects T rows,
    not M + T; same result). mem_dtype: the memory's storage dtype (txl.model.memory.STORES; compute
    stays in the model's dtype). hooks: metrics with update(model, batch, out, mems_in) (txl.metrics).
    Without hooks the memory is rolling (updated in place a layer at a time: the old and the new
    memory never coexist); hooks read the memory a segment was scored with, so they keep the pure update.
    nll_sum / n_tok: float64 scalars on the model's device (no host sync per batch)."""

    def __init__(self, model, projected: bool = True, hooks: Sequence = (), mem_dtype: str = "auto"):
        self.model, self.projected, self.hooks = model, projected, list(hooks)
        self.mem_dtype = mem_dtype
        dev = next(model.parameters()).device
        self.nll_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self.n_tok = torch.zeros((), dtype=torch.float64, device=dev)
        self.mems = None

    def step(self, batch: dict, labels: Optional[torch.Tensor] = None):
        """batch: {'input_ids', 'labels': Long[B, T], 'reset', ...} (labels: an override, e.g. warm-up
        positions set to IGNORE; hooks then see it as the batch's labels). -> the model's output."""
        ids = batch["input_ids"]
        if labels is None:
            labels = batch["labels"]
        else:
            batch = {**batch, "labels": labels}
        if batch["reset"] or self.mems is None:
            self.mems = self.model.init_mems(ids.size(0), projected=self.projected, store=self.mem_dtype,
                                             rolling=not self.hooks)
        mems_in = self.mems
        out = self.model(ids, mems=mems_in, labels=labels)
        self.mems = out.mems
        self.nll_sum += out.nll.double().sum()
        self.n_tok += (labels != IGNORE).sum()
        for h in self.hooks:
            h.update(self.model, batch, out, mems_in)
        return out


def mean_nll(nll_sum: torch.Tensor, n_tok: torch.Tensor, where: str) -> torch.Tensor:
    """nll_sum / n_tok as float32; no scored token is an error naming `where` (not a loss of 0)."""
    if float(n_tok) == 0:
        raise ValueError(f"{where}: no token was scored, so there is no loss to report")
    return (nll_sum / n_tok).float()


@torch.inference_mode()
def evaluate_tokens(model, tokens: np.ndarray, tgt_len: int, mem_len: int, batch_size: int = 1,
                    warmup_tokens: int = 0, precision: str = "32", progress: bool = False,
                    hooks: Optional[list] = None, projected_mems: bool = True, mem_dtype: str = "auto") -> dict:
    """Score `tokens` as batch_size ordered streams, tgt_len at a time, memory carried.

    The first `warmup_tokens` of every stream only fill the memory (not scored). The model's
    other lengths (clamp_len, same_length) are left as set. Returns loss (nats/token) and counts.
    """
    from txl.data.stream import OrderedStream
    model.eval()
    if len(tokens) < 2:
        raise ValueError(f"eval text: {len(tokens)} token(s); at least 2 are needed to score one")
    if batch_size > len(tokens) - 1:
        raise ValueError(f"eval.batch_size={batch_size} streams need at least {batch_size + 1} tokens; "
                         f"the text has {len(tokens)}")
    tgt_len = max(1, min(tgt_len, (len(tokens) - 1) // batch_size))  # a short text is one short segment
    model.set_lengths(tgt_len=tgt_len, mem_len=mem_len)
    stream = OrderedStream(tokens, batch_size, tgt_len, name="eval text")
    if warmup_tokens >= stream.n_step:  # before any work: nothing would be scored
        raise ValueError(f"eval.warmup_tokens={warmup_tokens} covers every stream: {len(tokens)} tokens in "
                         f"eval.batch_size={batch_size} streams are {stream.n_step} tokens each, so no token "
                         "is scored; lower eval.warmup_tokens or eval.batch_size")
    dev = next(model.parameters()).device
    scorer = SegmentScorer(model, projected=projected_mems, hooks=hooks or [], mem_dtype=mem_dtype)
    t0 = time.perf_counter()
    it = stream
    if progress:
        from tqdm import tqdm
        it = tqdm(stream, total=len(stream), desc="eval", unit="seg", file=sys.stderr, leave=False)
    for batch in it:
        batch = {**batch, "input_ids": batch["input_ids"].to(dev), "labels": batch["labels"].to(dev)}
        labels = None
        if warmup_tokens:
            col = batch["pos"] * tgt_len + torch.arange(batch["input_ids"].size(1), device=dev)
            labels = batch["labels"].masked_fill(col[None, :] < warmup_tokens, IGNORE)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            scorer.step(batch, labels)
    dt = time.perf_counter() - t0
    if float(scorer.n_tok) == 0:  # every position IGNORE (e.g. labels of ext context only)
        mean_nll(scorer.nll_sum, scorer.n_tok, "eval")  # raises
    loss = float(scorer.nll_sum) / float(scorer.n_tok)  # float64, as summed
    return {"tokens": int(scorer.n_tok), "loss": loss, "tgt_len": tgt_len, "ppl": math.exp(min(loss, 700)),
            "seconds": round(dt, 3), "tokens_per_s": round(stream.batch_size * stream.n_step / max(dt, 1e-9), 1)}
