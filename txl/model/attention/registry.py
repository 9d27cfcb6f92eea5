"""Names -> objects: the backends (how scores are computed), the patterns (which keys a query sees)
and the one place where a (backend, pattern, score, kind) combination is checked.

Imports nothing of txl (and no torch): config.py, kernels.py and patterns.py all import this module,
never each other, so there is no import circle. A backend declares capabilities, never pattern
names: `dynamic` (it can apply a score-dependent mask, e.g. top-k) and `native_mask` (it applies
a static sparse mask itself, from the full (T, K) mask, instead of the banded engine).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Optional

POSITION_KINDS = ("relative", "absolute", "rotary", "alibi")  # TXLConfig.kind; positions.py
SCORES = ("dot", "additive", "mixed")  # mixed: additive heads and dot heads (kernels.mixed_attention)

# A backend: (q, k, v, pos, blocked, scale, dropatt, training, need_weights) -> (out, probs or None)
# q (B, N, T, H) already holds the content bias u; k, v (B, N, K, H); blocked (T, K) or (B, 1, T, K).
Backend = Callable[..., tuple]
BACKENDS: dict[str, Backend] = {}
BACKEND_CAPS: dict[str, Mapping] = {}  # what each backend supports
PATTERNS: dict[str, type] = {}  # pattern name -> class (patterns.py registers them, in order)


class Caps(Mapping):
    """A backend's capabilities. caps["patterns"] is derived from its flags and the registered
    pattern classes at the time it is read (so registration order does not matter)."""

    def __init__(self, scores, kinds, native_mask: bool, dynamic: bool):
        self._d = dict(scores=tuple(scores), kinds=tuple(kinds), native_mask=native_mask, dynamic=dynamic)

    def __getitem__(self, key):
        if key == "patterns":
            return tuple(n for n, p in PATTERNS.items() if self._d["dynamic"] or not p.dynamic)
        return self._d[key]

    def __iter__(self):
        return iter(("patterns", *self._d))

    def __len__(self):
        return len(self._d) + 1


def register_backend(name: str, scores=("dot",), kinds=POSITION_KINDS, native_mask: bool = False,
                     dynamic: bool = True):
    """Decorator: BACKENDS[name] = fn with its capabilities. native_mask: the backend applies static
    sparse patterns itself from the full (T, K) mask (flex); otherwise they run through the banded
    engine (patterns.Static.run), which calls the backend on each query chunk with only the keys
    that chunk may see. dynamic: the backend accepts topk=k (a mask computed from the scores)."""
    def deco(fn):
        BACKENDS[name] = fn
        BACKEND_CAPS[name] = Caps(scores, kinds, native_mask, dynamic)
        return fn
    return deco


def register_pattern(cls):
    """Class decorator: PATTERNS[cls.name] = cls."""
    PATTERNS[cls.name] = cls
    return cls


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid backends: {sorted(BACKENDS)}")
    return BACKENDS[name]


def get_pattern(a):
    """The pattern object for an AttnConfig-like `a` (fields pattern, window, block_size, ...)."""
    if a.pattern not in PATTERNS:
        raise ValueError(f"attention.pattern must be one of {list(PATTERNS)}, got {a.pattern!r}")
    return PATTERNS[a.pattern](a)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check(a, kind: Optional[str] = None) -> None:
    """The one compatibility check: names known, the pattern's required fields set, and the backend
    able to run this pattern, score and (when given) position kind. One clear line per failure."""
    _need(a.score in SCORES, f"attention.score must be one of {list(SCORES)}, got {a.score!r}")
    _need(a.pattern in PATTERNS, f"attention.pattern must be one of {list(PATTERNS)}, got {a.pattern!r}")
    _need(a.backend in BACKEND_CAPS,
          f"unknown attention backend {a.backend!r}; valid backends: {sorted(BACKEND_CAPS)}")
    pat = PATTERNS[a.pattern]
    for name in pat.requires:
        _need(getattr(a, name) >= 1,
              f"attention.{name} must be >= 1 for pattern={a.pattern!r}, got {getattr(a, name)}")
    caps = BACKEND_CAPS[a.backend]
    for field, value in (("pattern", a.pattern), ("score", a.score)):
        ok = sorted(b for b, c in BACKEND_CAPS.items() if value in c[field + "s"])
        _need(value in caps[field + "s"], f"attention.{field}={value!r} is not supported by backend "
                                          f"{a.backend!r}; backends that support it: {ok}")
    if a.score in ("additive", "mixed"):  # O(T*K*H) tanh features: only the dense reference computes it
        full = [n for n, p in PATTERNS.items() if p.full]
        _need(pat.full, f"attention.score={a.score!r} needs pattern={full[0]!r}, got {a.pattern!r}")
    if kind is not None:
        _need(kind in caps["kinds"], f"attention backend {a.backend!r} does not support kind={kind!r}; "
                                     f"supported kinds: {list(caps['kinds'])}")
