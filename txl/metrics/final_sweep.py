"""The context sweep that ends a training run (`metrics.final_sweep`, on by default in txl-train).

The trained model scores the start of the held-out test split once per evaluation memory length
(the `txl-eval metrics.context_sweep` measurement, txl/metrics/context.py) the way the released
Transformer-XL evaluation scripts do: `same_length` on (every query sees the same number of keys;
off at memory 0, where there is nothing to equalise) and relative distances clamped. It prints a
few lines (the table and the effective context) and writes
<run dir>/metrics/final_sweep.json and final_sweep.png.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np


def default_clamp_len(clamp_len: int, tgt_len: int, mem_len: int) -> int:
    """The configured clamp_len if > 0; otherwise the longest distance seen in training
    (tgt_len + mem_len - 1, +1 for safety): longer memories then reuse the farthest trained
    position instead of sinusoid phases the model never saw."""
    return clamp_len if clamp_len > 0 else tgt_len + mem_len


def final_sweep(model, tokens: np.ndarray, spec: Any, out_dir: Path, *, tgt_len: int, mem_len: int,
                clamp_len: int, same_length: bool = True, batch_size: int = 8, max_tokens: int = 0,
                sweep_max: Optional[int] = None, threshold: float = 0.01, unit: Optional[str] = None,
                source: str = "test", echo: Callable[[str], None] = print) -> dict:
    """Sweep `tokens[:max_tokens]` (0: all) over the eval_mem_len values `spec` ('auto' | list),
    segment tgt_len, batch_size parallel streams. Restores the model's lengths; returns the
    JSON-able result (contexts, loss, ppl, tokens, ecl, ...)."""
    from txl.metrics.context import summarize_sweep, sweep
    from txl.metrics.plots import plot_sweep
    from txl.metrics.recl import parse_contexts, sweep_table

    contexts = parse_contexts(spec, tgt_len, mem_len, sweep_max, where="metrics.final_sweep")
    if max_tokens:
        tokens = tokens[:max_tokens]
    batch_size = max(1, min(batch_size, (len(tokens) - 1) // max(1, tgt_len)))  # a short split: fewer streams
    saved = asdict(model.seq)
    try:
        model.set_lengths(clamp_len=clamp_len, ext_len=0)
        res = sweep(model, tokens, tgt_len, contexts, batch_size, same_length=same_length)
    finally:
        model.set_lengths(**saved)
    full = summarize_sweep(res, threshold)
    full.update(text=source, tgt_len=tgt_len, clamp_len=clamp_len, same_length=same_length, batch_size=batch_size)
    e = full["ecl"]
    change = math.exp(full["loss"][-1] - full["loss"][0]) - 1.0  # relative perplexity change, first -> last
    echo(f"context sweep on {source} ({full['tokens']} tokens, tgt_len {tgt_len}, clamp_len {clamp_len}, "
         f"same_length {str(same_length).lower()}):")
    echo(sweep_table(full["contexts"], full["loss"], unit))
    echo(f"perplexity {full['ppl'][0]:.3f} -> {full['ppl'][-1]:.3f} ({change:+.1%}) from eval_mem_len "
         f"{contexts[0]} to {contexts[-1]}; effective context (next step gains < {e['threshold']:g}): "
         f"{e['ecl']}{'+' if e['saturated'] else ''}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "final_sweep.json").write_text(json.dumps(full, indent=2) + "\n")
    full["png"] = plot_sweep({source: (full["contexts"], full["loss"])}, out_dir / "final_sweep.png",
                             {source: e["ecl"]}, title=f"context sweep (tgt_len {tgt_len})")
    return full


def after_training(c, model, corpus, run_dir: Path, echo: Callable[[str], None] = print) -> Optional[dict]:
    """txl-train's hook (rank 0, after fit): the sweep that `c.metrics` asks for, or None when it is
    off. The test split (valid if the corpus has none); the memory lengths are relative to the
    evaluation segment c.seq.eval_tgt_len."""
    m = c.metrics
    if not m.enabled or m.final_sweep is None:
        return None
    if c.trainer.strategy == "fsdp":  # sharded parameters: rank 0 alone cannot run the model
        echo("context sweep: skipped under FSDP (run txl-eval metrics.context_sweep=auto on the checkpoint)")
        return None
    source = "test" if len(corpus.test) > 1 else "valid"
    s = c.seq
    return final_sweep(model, corpus.split(source), m.final_sweep, run_dir / "metrics", tgt_len=s.eval_tgt_len,
                       mem_len=s.mem_len, clamp_len=default_clamp_len(s.eval_clamp_len, s.tgt_len, s.mem_len),
                       batch_size=c.data.eval_batch_size, max_tokens=m.final_sweep_tokens, sweep_max=m.sweep_max,
                       threshold=m.threshold, unit=getattr(corpus.tokenizer, "unit", None),
                       source=f"{corpus.name}:{source}", echo=echo)
