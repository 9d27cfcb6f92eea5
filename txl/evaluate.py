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

    def step(self, batch: dict, labels: Optional[torch.Tensor] = None, docs: Optional["DocBoundaries"] = None):
        """batch: {'input_ids', 'labels': Long[B, T], 'reset', 'pos', ...} (labels: an override, e.g.
        warm-up positions set to IGNORE; hooks then see it as the batch's labels). docs: hide every
        earlier document's keys from a document's tokens (DocBoundaries). -> the model's output."""
        ids = batch["input_ids"]
        if labels is None:
            labels = batch["labels"]
        else:
            batch = {**batch, "labels": labels}
        if batch["reset"] or self.mems is None:
            self.mems = self.model.init_mems(ids.size(0), projected=self.projected, store=self.mem_dtype,
                                             rolling=not self.hooks)
        mems_in = self.mems
        blocked = None
        if docs is not None:
            blocked = docs.blocked(batch["pos"], ids.size(1), mems_in.layers[0].size(1), ids.device)
        out = self.model(ids, mems=mems_in, labels=labels, blocked=blocked)
        self.mems = out.mems
        self.nll_sum += out.nll.double().sum()
        self.n_tok += (labels != IGNORE).sum()
        for h in self.hooks:
            h.update(self.model, batch, out, mems_in)
        return out


class DocBoundaries:
    """eval.reset_mems_at_doc: a document's tokens see nothing of the documents before it.

    Stream row g of an OrderedStream holds tokens [g*n_step, (g+1)*n_step) as columns 0..n_step-1;
    the memory before a segment starting at column s0 holds columns [s0 - M, s0) of the same row
    (eval has ext_len 0). A document starting at token d lies in row d // n_step at column
    c = d % n_step. For each query (input column q) let start(q) be the latest document start
    c <= q of its row; keys at columns < start(q) are hidden (memory rows and earlier positions of
    the same segment alike). So from its first token on, a document is scored as if its stream had
    started there with an empty memory: the old document's rows are masked while they stay in the
    memory (they leave it after mem_len columns), other streams are untouched. A query before its
    row's first document start sees everything (row g > 0 begins inside a document). Exactly equal
    to scoring the document alone (mem_init=empty, same_length off) when the two see the same key
    windows: the document starts at a segment boundary, or the memory covers the document.
    Targets: the query at the old document's last token predicts the new document's first token,
    with the old document as its context."""

    def __init__(self, doc_starts, n_step: int, batch_size: int, tgt_len: int):
        d = np.asarray(doc_starts, dtype=np.int64)
        d = d[(d > 0) & (d < n_step * batch_size)]
        rows, cols = d // n_step, d % n_step
        self.cols = [np.sort(cols[(rows == g) & (cols > 0)]) for g in range(batch_size)]  # col 0: nothing before
        self.tgt_len = tgt_len

    def blocked(self, pos: int, T: int, M: int, device) -> Optional[torch.Tensor]:
        """(B, T, M + T) bool for segment `pos` with M memory rows, or None if it hides nothing."""
        s0 = pos * self.tgt_len
        keys = np.arange(s0 - M, s0 + T)                                  # [K] key columns
        first = [np.searchsorted(c, s0 - M, side="right") for c in self.cols]  # O(log D) per row
        if not any(j < len(c) and c[j] < s0 + T for j, c in zip(first, self.cols)):
            return None                                                   # no start among these keys
        q = np.arange(s0, s0 + T)                                         # [T] query columns
        out = np.zeros((len(self.cols), T, M + T), dtype=bool)
        for g, c in enumerate(self.cols):
            i = np.searchsorted(c, q, side="right") - 1                   # latest start <= q
            start = np.where(i >= 0, c[np.maximum(i, 0)] if len(c) else 0, np.iinfo(np.int64).min)
            out[g] = keys[None, :] < start[:, None]
        return torch.from_numpy(out).to(device)


def mean_nll(nll_sum: torch.Tensor, n_tok: torch.Tensor, where: str) -> torch.Tensor:
    """nll_sum / n_tok as float32; no scored token is an error naming `where` (not a loss of 0)."""
    if float(n_tok) == 0:
        raise ValueError(f"{where}: no token was scored, so there is no loss to report")
    return (nll_sum / n_tok).float()


class EvalProgress:
    """txl-eval's bar (stderr): segments done, tokens/s, and the running perplexity (bits per byte /
    char for byte / char models) of the tokens scored so far. The running figure costs a host sync,
    so it is read at most every `every` seconds, and once more after the last segment: the figure
    left on the bar is the final result."""

    def __init__(self, total: int, unit: Optional[str] = None, file=None, every: float = 0.5):
        from tqdm import tqdm
        self.unit, self.every, self.shown = unit, every, {}
        self.bar = tqdm(total=total, desc="eval", unit="seg", file=file or sys.stderr, leave=False,
                        mininterval=every, dynamic_ncols=True)
        self.t0 = self.last = time.perf_counter()

    def update(self, scorer: "SegmentScorer", tokens_done: int, final: bool = False) -> None:
        self.bar.update(1)
        now = time.perf_counter()
        if not final and now - self.last < self.every:
            return
        self.last = now
        n = float(scorer.n_tok)
        loss = float(scorer.nll_sum) / n if n else float("nan")
        self.shown = {"tok/s": f"{tokens_done / max(now - self.t0, 1e-9):.0f}", "ppl": f"{math.exp(min(loss, 700)):.5g}"}
        if self.unit:
            self.shown["bpb" if self.unit == "byte" else "bpc"] = f"{loss / LN2:.5g}"
        self.bar.set_postfix(self.shown, refresh=final)

    def close(self) -> None:
        self.bar.close()


@torch.inference_mode()
def evaluate_tokens(model, tokens: np.ndarray, tgt_len: int, mem_len: int, batch_size: int = 1,
                    warmup_tokens: int = 0, precision: str = "32", progress: bool = False,
                    hooks: Optional[list] = None, projected_mems: bool = True, mem_dtype: str = "auto",
                    doc_starts=None, unit: Optional[str] = None) -> dict:
    """Score `tokens` as batch_size ordered streams, tgt_len at a time, memory carried.

    The first `warmup_tokens` of every stream only fill the memory (not scored). The model's
    other lengths (clamp_len, same_length) are left as set. Returns loss (nats/token) and counts.
    doc_starts: token offsets where documents start; given, no document sees an earlier one
    (DocBoundaries). progress: True (a bar on stderr, EvalProgress) or a file to draw it on;
    unit: 'byte' | 'char' adds bits per unit to the bar.
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
    docs = None
    if doc_starts is not None:
        if getattr(model, "compressor", None) is not None:
            raise ValueError("eval.reset_mems_at_doc: not supported with memory=compressive (its compressed "
                             "slots pool rows of several documents)")
        docs = DocBoundaries(doc_starts, stream.n_step, batch_size, tgt_len)
    scorer = SegmentScorer(model, projected=projected_mems, hooks=hooks or [], mem_dtype=mem_dtype)
    t0 = time.perf_counter()
    bar = EvalProgress(len(stream), unit, None if progress is True else progress) if progress else None
    try:
        for batch in stream:
            batch = {**batch, "input_ids": batch["input_ids"].to(dev), "labels": batch["labels"].to(dev)}
            labels = None
            if warmup_tokens:
                col = batch["pos"] * tgt_len + torch.arange(batch["input_ids"].size(1), device=dev)
                labels = batch["labels"].masked_fill(col[None, :] < warmup_tokens, IGNORE)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                scorer.step(batch, labels, docs)
            if bar is not None:
                done = min((batch["pos"] + 1) * tgt_len, stream.n_step) * batch_size
                bar.update(scorer, done, final=batch["pos"] == len(stream) - 1)
    finally:
        if bar is not None:
            bar.close()
    dt = time.perf_counter() - t0
    if float(scorer.n_tok) == 0:  # every position IGNORE (e.g. labels of ext context only)
        mean_nll(scorer.nll_sum, scorer.n_tok, "eval")  # raises
    loss = float(scorer.nll_sum) / float(scorer.n_tok)  # float64, as summed
    return {"tokens": int(scorer.n_tok), "loss": loss, "tgt_len": tgt_len, "ppl": math.exp(min(loss, 700)),
            "seconds": round(dt, 3), "tokens_per_s": round(stream.batch_size * stream.n_step / max(dt, 1e-9), 1)}
