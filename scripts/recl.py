#!/usr/bin/env python3
"""Relative effective context length (RECL, Dai et al. 2019 §4.3, appendix C) of a model group.

    .venv/bin/python scripts/recl.py runA/checkpoints/last.ckpt runB/checkpoints/last.ckpt \\
        --text book.txt --contexts 0,64,128,256,512 --r 0.1,0.5,1.0 [--names xl,nomem] [--png recl.png]

Every checkpoint scores the same text once per context (= eval_mem_len; tgt_len common to all,
see txl/metrics/recl.py for the exact definitions). Prints the paper-style Markdown table (RECL per
model and r; '+' = still gaining at the largest context), the perplexity per context, then one
JSON line with everything (also written to --json-out). The checkpoints must tokenize the text
identically (same vocabulary): RECL compares losses token by token.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np


def _floats(s: str, name: str) -> List[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name}: comma-separated numbers, got {s!r}") from None


def default_name(path: str) -> str:
    p = Path(path)
    return p.parent.parent.name if p.parent.name == "checkpoints" else p.stem


def parse(argv: Optional[list] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpts", nargs="+", help="checkpoints (txl-train .ckpt or txl-model files)")
    ap.add_argument("--text", required=True, help="UTF-8 text file scored by every model")
    ap.add_argument("--contexts", default="auto", help="eval_mem_len values: 'auto' or 0,64,128,... (default auto)")
    ap.add_argument("--r", default="0.1,0.5,1.0", help="top-r fractions of hardest tokens (default 0.1,0.5,1.0)")
    ap.add_argument("--threshold", type=float, default=0.01, help="relative perplexity gain threshold (0.01)")
    ap.add_argument("--tgt-len", type=int, default=None, help="segment length (default: the smallest eval_tgt_len)")
    ap.add_argument("--same-length", action="store_true", help="every query sees the same number of keys")
    ap.add_argument("--clamp-len", type=int, default=None,
                    help="clamp relative distances at this length (default: each checkpoint's own clamp_len)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--names", default=None, help="comma-separated model names (default: run directory names)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json-out", default=None, help="also write the JSON here")
    ap.add_argument("--losses-out", default=None, help="also write the per-token losses [model, context, token] (.npz)")
    ap.add_argument("--png", default=None, help="perplexity vs context plot, RECL at the first r starred")
    return ap.parse_args(argv)


def run(a: argparse.Namespace) -> dict:
    from txl.checkpoint import load_model
    from txl.data import tokenizer_from_state
    from txl.eval import load_text_tokens
    from txl.metrics.context import sweep
    from txl.metrics.recl import gain_profile, parse_contexts, recl, recl_table, sweep_table

    rs = _floats(a.r, "r")
    if not rs or not all(0 < r <= 1 for r in rs):
        raise ValueError(f"--r: values in (0, 1], got {a.r}")
    if not 0 < a.threshold < 1:
        raise ValueError(f"--threshold: must be in (0, 1), got {a.threshold}")
    names = a.names.split(",") if a.names else [default_name(p) for p in a.ckpts]
    if len(names) != len(a.ckpts):
        raise ValueError(f"--names: {len(names)} names for {len(a.ckpts)} checkpoints")
    models, tokens = [], None
    for path in a.ckpts:
        model, tok_state, ck = load_model(path, map_location=a.device)
        if tok_state is None:
            raise ValueError(f"ckpts: {path} carries no vocabulary")
        t = load_text_tokens(a.text, tokenizer_from_state(tok_state))
        if a.max_tokens:
            t = t[: a.max_tokens]
        if tokens is not None and not np.array_equal(t, tokens):
            raise ValueError(f"ckpts: {path} tokenizes the text differently from {a.ckpts[0]} (RECL needs one vocabulary)")
        tokens = t
        saved = ck.get("txl", {}).get("seq") or {}
        models.append((model, saved.get("eval_tgt_len") or model.cfg.seq.tgt_len,
                       saved.get("eval_mem_len", model.cfg.seq.mem_len)))
    tgt = a.tgt_len or min(m[1] for m in models)
    contexts = parse_contexts(a.contexts, tgt, max(m[2] for m in models), where="--contexts")
    if a.same_length and contexts[0] == 0:
        print("recl: --same-length is off for context 0 (nothing to equalise)", file=sys.stderr)
    mats = []
    for name, (model, _, _) in zip(names, models):
        model.set_lengths(ext_len=0, **({} if a.clamp_len is None else {"clamp_len": a.clamp_len}))
        res = sweep(model, tokens, tgt, contexts, a.batch_size, same_length=a.same_length, progress=sys.stderr.isatty())
        mats.append(res["token_losses"])
        print(f"recl: {name}: " + " ".join(f"{c}:{l:.4f}" for c, l in zip(contexts, res["loss"])), file=sys.stderr)
    losses = np.stack(mats)  # (N, C, n_tokens)
    results = {r: recl(losses, contexts, r, a.threshold) for r in rs}
    mean = losses.mean(-1)  # (N, C)
    out = {"models": names, "ckpts": list(a.ckpts), "text": a.text, "tokens": int(losses.shape[-1]),
           "tgt_len": tgt, "same_length": a.same_length, "clamp_len": a.clamp_len, "contexts": contexts, "threshold": a.threshold,
           "loss": mean.round(6).tolist(), "ppl": np.exp(np.minimum(mean, 700)).round(4).tolist(),
           "recl": {f"{r:g}": [{"model": n, **x} for n, x in zip(names, results[r])] for r in rs},
           # every step's gain past the threshold too: the paper's (min credit) and each model's own
           "profile": {f"{r:g}": gain_profile(losses, r) for r in rs}}
    if a.losses_out:
        np.savez_compressed(a.losses_out, losses=losses.astype(np.float32), contexts=np.array(contexts),
                            models=np.array(names))
        out["losses_out"] = a.losses_out
    print(f"## RECL (threshold {a.threshold:g}, contexts {contexts}, tgt_len {tgt}, {out['tokens']} tokens)\n")
    print(recl_table(names, results) + "\n")
    for n, row in zip(names, mean):
        print(f"### {n}\n\n{sweep_table(contexts, row.tolist())}\n")
    if a.png:
        from txl.metrics.plots import plot_sweep
        plot_sweep({n: (contexts, row.tolist()) for n, row in zip(names, mean)}, a.png,
                   {n: x["recl"] for n, x in zip(names, results[rs[0]])}, title=f"RECL (r = {rs[0]:g})")
        out["png"] = a.png
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out), flush=True)
    return out


def main(argv: Optional[list] = None) -> int:
    a = parse(argv)
    from txl.checkpoint import CheckpointError
    try:
        run(a)
    except (ValueError, CheckpointError, OSError) as e:
        print(f"recl: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
