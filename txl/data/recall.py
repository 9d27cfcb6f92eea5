"""The synthetic_recall source: a generated long-range copy probe (data.options; txl.metrics.synthetic)."""
from __future__ import annotations

from typing import Dict, List, Optional

from txl.data.errors import DataError

# A generated long-range probe made of episodes: a payload digit, D-2 noise letters, a marker (one
# per distance D), then the payload again: the copy stands exactly D tokens after its source and
# nothing but that source predicts it. Episodes never overlap (the payload is always the most
# recent digit) and are separated by 0..gap noise letters. Recall accuracy at the markers
# (txl.metrics.synthetic) says whether the model reaches D tokens into the past; chance is
# 1/values. Tokens are ASCII: 'a'.. noise, '0'.. payloads, 'A'.. markers.
RECALL_MARKERS = "ABCDEFGHIJ"  # marker of the k-th distance in `distances`
RECALL_DEFAULTS: Dict[str, object] = {"distances": [32, 96, 192], "alphabet": 16, "values": 10, "gap": 8,
                                       "train_tokens": 500_000, "eval_tokens": 25_000, "seed": 0}


def recall_options(options: Optional[Dict[str, object]]) -> Dict[str, object]:
    """data.options for synthetic_recall, defaults filled in and every value checked."""
    opts = dict(RECALL_DEFAULTS)
    unknown = sorted(set(options or {}) - set(opts))
    if unknown:
        raise DataError(f"data.options: unknown synthetic_recall option(s) {unknown} (known: {sorted(opts)})")
    opts.update(options or {})
    d = opts["distances"]
    d = [d] if isinstance(d, int) else list(d)
    if not d or len(d) > len(RECALL_MARKERS) or len(set(d)) != len(d) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 2 for x in d):
        raise DataError(f"data.options.distances: 1 to {len(RECALL_MARKERS)} distinct integers >= 2, got {d}")
    opts["distances"] = d
    for k, lo, hi in (("alphabet", 1, 26), ("values", 2, 10), ("gap", 0, 10 ** 6)):
        v = opts[k]
        if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
            raise DataError(f"data.options.{k}: an integer in [{lo}, {hi}], got {v!r}")
    for k in ("train_tokens", "eval_tokens"):
        if not (isinstance(opts[k], int) and opts[k] >= 4 * max(d)):
            raise DataError(f"data.options.{k}: an integer >= 4 * max(distances) = {4 * max(d)}, got {opts[k]!r}")
    if not isinstance(opts["seed"], int):
        raise DataError(f"data.options.seed: an integer, got {opts['seed']!r}")
    return opts


def recall_text(n: int, distances: List[int], alphabet: int, values: int, gap: int, seed: int) -> bytes:
    """n ASCII tokens of back-to-back episodes (distance drawn uniformly per episode):
    [0..gap noise] payload [D-2 noise] marker payload, so token s+D = token s for the payload s."""
    import numpy as np
    rng = np.random.default_rng(seed)
    codes = (ord("a") + rng.integers(0, alphabet, n)).astype(np.uint8)  # noise everywhere first
    s = 0
    while True:
        k = int(rng.integers(0, len(distances)))
        s += int(rng.integers(0, gap + 1))
        if s + distances[k] >= n:
            break
        codes[s] = codes[s + distances[k]] = ord("0") + int(rng.integers(0, values))
        codes[s + distances[k] - 1] = ord(RECALL_MARKERS[k])
        s += distances[k] + 1
    return codes.tobytes()


