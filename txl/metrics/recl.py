"""Effective context length of one model (ECL) and of a model group (RECL, Dai et al. 2019 §4.3
and appendix C), as pure functions of loss matrices.

Context c here is the evaluation memory length (seq.eval_mem_len): every token additionally sees
the tokens before it in its own segment, and deeper layers reach further through the memory, so
"context" is the knob the model is evaluated with, not a hard cut of the text (exact per-token
cuts would need one forward pass per token).

ECL (one model; mean losses L(c_0) .. L(c_n) over increasing contexts): the relative perplexity
gain of a step is g(c_k, c_k+1) = (exp L(c_k) - exp L(c_k+1)) / exp L(c_k) = 1 - exp(L(c_k+1) - L(c_k)).
Walking up from c_0, ECL is the first c_k whose step gains less than the threshold (default
0.01); the longest context after which going further no longer pays. When every step pays, ECL
is the largest context swept (`saturated`: the true value is at least that).

RECL (a group of N models; per-token losses l_i(c, t), shape [N, n_contexts, n_tokens], the same
tokens for every model and context):
  baseline      b(c, t) = min_i l_i(c, t)                       the best model at the short context
  hard tokens   T(c) = the ceil(r * n_tokens) tokens with the largest b(c, t)
  relative loss f_i(c, c') = mean_{t in T(c)} min(b(c, t), l_i(c', t))   (f_i(c, c) = mean b)
  relative gain g_i(c, c') = (exp f_i(c, c) - exp f_i(c, c')) / exp f_i(c, c)
  RECL_i: start at c = c_0, c' = the next context; while g_i(c, c') >= threshold move up; RECL is
          the c where it stops (the paper: step Delta = 100, threshold 0.01).
The per-token min also counts a token's noise between two evaluations as a gain. That noise cancels
out across models, so compare RECL within a group; a group of one model always looks saturated.
A model only gets credit for beating the group's best short-context loss, so a model that is
already good at short contexts is not penalised; small r restricts the test to the tokens the
short context predicts worst (those that need long-range information).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import numpy as np


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def auto_contexts(tgt_len: int, mem_len: int, max_len: Optional[int] = None) -> List[int]:
    """0, tgt/2, tgt, 2 tgt, 4 tgt, ... up to max_len (default max(4 tgt, 2 mem_len))."""
    top = max_len if max_len is not None else max(4 * tgt_len, 2 * mem_len)
    out, c = [0], max(1, tgt_len // 2)
    while c <= top:
        out.append(c)
        c = tgt_len if c < tgt_len else 2 * c
    return sorted(set(out))


def auto_cmem_lens(cmem_len: int) -> List[int]:
    """metrics.cmem_sweep=auto: 0 (the same weights as a Transformer-XL of the same mem_len: what
    the slots buy), cmem_len / 2 and cmem_len (how much of the trained slot budget is used), 2 cmem_len
    (slots at distances never seen in training: does more compressed memory still help?)."""
    return sorted({0, cmem_len // 2, cmem_len, 2 * cmem_len})


def parse_contexts(spec: Union[str, Sequence[int]], tgt_len: int = 0, mem_len: int = 0,
                   max_len: Optional[int] = None, where: str = "contexts") -> List[int]:
    """'auto' | '0,64,128' | [0, 64, 128] -> sorted distinct ints >= 0 (at least two)."""
    if isinstance(spec, str):
        if spec.strip() == "auto":
            return auto_contexts(tgt_len, mem_len, max_len)
        try:
            spec = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"{where}: 'auto' or comma-separated integers >= 0, got {spec!r}") from None
    vals = list(spec)
    _need(all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in vals),
          f"{where}: integers >= 0, got {vals}")
    vals = sorted(set(int(v) for v in vals))
    _need(len(vals) >= 2, f"{where}: at least two distinct context lengths, got {vals}")
    return vals


# ------------------------------------------------------------------------------------------ ECL
def step_gains(mean_losses: Sequence[float]) -> List[float]:
    """Relative perplexity gain of each step: 1 - exp(L[k+1] - L[k])."""
    L = [float(x) for x in mean_losses]
    return [1.0 - math.exp(b - a) for a, b in zip(L, L[1:])]


def ecl(mean_losses: Sequence[float], contexts: Sequence[int], threshold: float = 0.01) -> dict:
    _need(len(mean_losses) == len(contexts) >= 2, "ecl: one mean loss per context, at least two contexts")
    _need(threshold > 0, f"threshold: must be > 0, got {threshold}")
    g = step_gains(mean_losses)
    k = next((k for k, x in enumerate(g) if x < threshold), None)
    return {"ecl": int(contexts[-1] if k is None else contexts[k]), "saturated": k is None, "gains": g,
            "threshold": threshold}


# ----------------------------------------------------------------------------------------- RECL
def _check(losses: np.ndarray) -> np.ndarray:
    losses = np.asarray(losses, dtype=np.float64)
    _need(losses.ndim == 3 and min(losses.shape) > 0,
          f"losses: a [n_models, n_contexts, n_tokens] array, got shape {losses.shape}")
    _need(bool(np.isfinite(losses).all()), "losses: must be finite")
    return losses


def hard_tokens(baseline: np.ndarray, r: float) -> np.ndarray:
    """Indices of the ceil(r * n) tokens with the largest baseline loss (ties: earlier first)."""
    _need(0 < r <= 1, f"r: must be in (0, 1], got {r}")
    k = max(1, math.ceil(r * len(baseline) - 1e-9))
    return np.argsort(-baseline, kind="stable")[:k]


def relative_gain(losses: np.ndarray, i: int, c: int, c2: int, r: float, credit: str = "min") -> float:
    """g_i(contexts[c], contexts[c2]) over the group `losses` [N, C, n_tokens] (indices c, c2).
    credit "min" is the paper's: min(b, l_i(c')) against the baseline b. "own" is a diagnostic on
    the same hard tokens T(c): model i's own mean loss at c' against its own at c (no per-token min,
    no group baseline), so a token that gets worse counts against the model."""
    _need(credit in ("min", "own"), f"credit: 'min' or 'own', got {credit!r}")
    losses = _check(losses)
    b = losses[:, c].min(0)  # (n_tokens,) baseline at the short context
    T = hard_tokens(b, r)
    if credit == "own":
        return 1.0 - math.exp(losses[i, c2, T].mean() - losses[i, c, T].mean())
    f_short = b[T].mean()  # f_i(c, c): the baseline itself
    f_long = np.minimum(b[T], losses[i, c2, T]).mean()
    return 1.0 - math.exp(f_long - f_short)


def gain_profile(losses: np.ndarray, r: float) -> dict:
    """Every step's relative gain for every model, not stopping at the threshold:
    {'min': [N][C-1] (the paper's credit), 'own': [N][C-1] (each model's own change, no min)}."""
    losses = _check(losses)
    N, C, _ = losses.shape
    return {k: [[relative_gain(losses, i, c, c + 1, r, k) for c in range(C - 1)] for i in range(N)]
            for k in ("min", "own")}


def recl(losses: np.ndarray, contexts: Sequence[int], r: float, threshold: float = 0.01) -> List[dict]:
    """RECL of every model in the group: [{'recl', 'saturated', 'gains'}] in model order."""
    losses = _check(losses)
    N, C, _ = losses.shape
    _need(len(contexts) == C and C >= 2, f"contexts: one per loss column ({C}), at least two, got {list(contexts)}")
    _need(list(contexts) == sorted(set(contexts)), f"contexts: strictly increasing, got {list(contexts)}")
    _need(threshold > 0, f"threshold: must be > 0, got {threshold}")
    out = []
    for i in range(N):
        gains, stop = [], None
        for k in range(C - 1):
            gains.append(relative_gain(losses, i, k, k + 1, r))
            if gains[-1] < threshold:
                stop = k
                break
        out.append({"recl": int(contexts[C - 1] if stop is None else contexts[stop]), "saturated": stop is None,
                    "gains": gains})
    return out


def recl_table(names: Sequence[str], results: dict) -> str:
    """Markdown table like the paper's Table 8. results: {r: recl(...) list}; '+' marks saturated."""
    rs = list(results)
    lines = ["| Model | " + " | ".join(f"r = {r:g}" for r in rs) + " |",
             "|---|" + "---:|" * len(rs)]
    for i, name in enumerate(names):
        cells = [f"{results[r][i]['recl']}{'+' if results[r][i]['saturated'] else ''}" for r in rs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(contexts: Sequence[int], losses: Sequence[float], unit: Optional[str] = None,
                name: str = "eval_mem_len") -> str:
    """Markdown table of a sweep: the swept length (`name`), loss, ppl (and bits per unit)."""
    head = f"| {name} | loss | ppl |" + (f" bp{unit[0]} |" if unit else "")
    lines = [head, "|---:|---:|---:|" + ("---:|" if unit else "")]
    for c, l in zip(contexts, losses):
        lines.append(f"| {c} | {l:.4f} | {math.exp(min(l, 700)):.3f} |" + (f" {l / math.log(2):.4f} |" if unit else ""))
    return "\n".join(lines)
