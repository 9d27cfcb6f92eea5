"""The vocabulary decides: adaptive-softmax cutoffs, parameter count and training memory, before the
model is built (txl-train calls `fit_model` once the tokenizer exists).

Why: a word vocabulary is the data's, not the preset's. Built from a large text without
`min_freq` / `max_size` it can hold millions of types; a full softmax over them needs
tokens x vocabulary logits per step and the kernel kills the process without a word. Here the
size is known before anything is allocated, so the run either fits or stops with one line.

- `auto_cutoffs`: the paper's WikiText-103 cutoffs [20000, 40000, 200000] for 267,735 types,
  scaled to the vocabulary; used for word-level data when no `model.cutoffs` were given.
- `count_params`: exactly `sum(p.numel() for p in TransformerXL(cfg).parameters())` (shared
  tensors once): the embedding / softmax part in closed form (txl/model/adaptive.py's layout),
  one block counted on the meta device (no memory) times n_layer.
- `estimate_memory`: fp32 weights + gradients + Adam moments, plus the activations one training
  step keeps (softmax logits dominate for large vocabularies), per process.
- `memory_limit`: `trainer.memory_limit`, else the GPU's memory on GPU, else min(cgroup limit,
  physical RAM).
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from txl.model import TXLConfig

log = logging.getLogger(__name__)

PAPER_VOCAB = 267_735  # WikiText-103
PAPER_CUTOFFS = (20_000, 40_000, 200_000)
AUTO_MIN_VOCAB = 10_000  # word-level vocabularies above this get cutoffs by default
RANKED = ("word",)  # tokenizers whose ids are sorted by frequency (adaptive softmax assumes it)
F32 = 4
GiB = float(1 << 30)


# ---- cutoffs ----------------------------------------------------------------------------------
def auto_cutoffs(vocab_size: int) -> list[int]:
    """The paper's WikiText-103 cutoffs scaled to `vocab_size` (same shares of the vocabulary)."""
    s = vocab_size / PAPER_VOCAB
    return [max(1, round(a * s)) for a in PAPER_CUTOFFS]


def resolve_model(model: TXLConfig, vocab_size: int, tokenizer: str) -> tuple[TXLConfig, Optional[str]]:
    """Fill in the data's vocabulary; choose cutoffs when none were given (None); check given ones.

    -> (re-validated config, a log line when cutoffs were chosen here, else None)."""
    cutoffs, note = model.cutoffs, None
    if cutoffs is None:
        cutoffs = []
        if tokenizer in RANKED and vocab_size > AUTO_MIN_VOCAB:
            cutoffs = auto_cutoffs(vocab_size)
            note = (f"adaptive softmax: model.cutoffs={cutoffs}, div_val={model.div_val} (the paper's "
                    f"{list(PAPER_CUTOFFS)} for {PAPER_VOCAB:,} WikiText-103 types, scaled to {vocab_size:,}); "
                    "model.cutoffs=[] for a full softmax")
    elif cutoffs and cutoffs[-1] >= vocab_size:
        raise ValueError(f"model.cutoffs={cutoffs} do not fit the vocabulary: the {tokenizer} tokenizer built "
                         f"{vocab_size:,} types and every cutoff must be below {vocab_size:,} "
                         "(lower model.cutoffs, or model.cutoffs=[] for a full softmax)")
    return replace(model, vocab_size=vocab_size, cutoffs=list(cutoffs)), note


# ---- parameters -------------------------------------------------------------------------------
def _clusters(cfg: TXLConfig) -> tuple[list[int], list[int]]:
    """Per cluster (head first): number of types, embedding width."""
    ends = [0] + list(cfg.cutoffs) + [cfg.vocab_size]
    sizes = [b - a for a, b in zip(ends, ends[1:])]
    dims = [cfg.d_embed] * len(sizes) if cfg.div_val == 1 else [cfg.d_embed // cfg.div_val ** i for i in range(len(sizes))]
    return sizes, dims


def vocab_params(cfg: TXLConfig) -> int:
    """Parameters of the adaptive embedding + adaptive softmax, tied tensors counted once."""
    sizes, dims = _clusters(cfg)
    V, E, D, nc = cfg.vocab_size, cfg.d_embed, cfg.d_model, len(cfg.cutoffs)
    tie_projs = cfg.tie_projs or [False] + [True] * nc
    if cfg.div_val == 1:  # one table (V, E); projections only when E != D
        emb_w, emb_p = V * E, (D * E if D != E else 0)
        out_w, out_b = V * E, V
        out_p = sum(D * E for t in tie_projs if not t) if D != E else 0
    else:
        emb_w = sum(n * d for n, d in zip(sizes, dims))
        emb_p = sum(D * d for d in dims)
        out_w, out_b = emb_w, V
        out_p = sum(D * d for d, t in zip(dims, tie_projs) if not t)
    clusters = nc * E + nc if nc else 0  # head logits of the tail clusters
    return emb_w + emb_p + (0 if cfg.tie_weight else out_w) + out_b + out_p + clusters


def block_params(cfg: TXLConfig) -> int:
    """Parameters of one block, counted on the meta device (allocates nothing)."""
    import torch

    from txl.model.block import Block
    with torch.device("meta"):
        return sum(p.numel() for p in Block(cfg).parameters())


def count_params(cfg: TXLConfig) -> int:
    """== sum(p.numel() for p in TransformerXL(cfg).parameters()), without building it."""
    shared_uv = 2 * cfg.n_head * cfg.d_head if cfg.kind == "relative" and not cfg.untie_r else 0
    return vocab_params(cfg) + cfg.n_layer * block_params(cfg) + shared_uv


# ---- memory -----------------------------------------------------------------------------------
def _zipf_share(lo: int, hi: int, V: int) -> float:
    """Share of running text whose token ranks in [lo, hi) under Zipf's law (p(rank r) ~ 1 / r)."""
    h = lambda k: math.log(k) + 0.5772 if k > 0 else 0.0  # harmonic number H_k
    return (h(hi) - h(lo)) / h(V)


@dataclass
class MemoryEstimate:
    params: int
    vocab_params: int
    state: int  # bytes: weights + gradients + two Adam moments (fp32)
    softmax: int  # bytes: embedding + softmax activations of one step (logits dominate)
    layers: int  # bytes: the blocks' activations kept for backward, plus the memories

    @property
    def total(self) -> int:
        return self.state + self.softmax + self.layers


def estimate_memory(cfg: TXLConfig, batch_size: int, tgt_len: int, mem_len: int, ranked: bool = True,
                    params: Optional[int] = None) -> MemoryEstimate:
    """Peak training memory of one process (batch_size: that process's streams).

    Softmax: the head's (n, shortlist + clusters) logits live about four times at the backward
    peak (logits, saved log-softmax, the loss gradient, the logits' gradient); a tail cluster sees the tokens whose target falls
    in it: twice its Zipf share of n when ids are frequency-ranked (word), else all n. A dense
    embedding gradient adds one table-sized transient. Layers: per layer, the (B, N, T, K) score
    tensors (AC, BD, shifted BD, scores, probabilities, dropout) and the per-token activations backward needs.
    """
    P = count_params(cfg) if params is None else params
    Pv = vocab_params(cfg)
    n, K, B, T = batch_size * tgt_len, mem_len + tgt_len, batch_size, tgt_len
    sizes, dims = _clusters(cfg)
    V, nc = cfg.vocab_size, len(cfg.cutoffs)
    ends = [0] + list(cfg.cutoffs) + [V]
    logits = n * (sizes[0] + nc)
    for i in range(1, nc + 1):
        rows = n if not ranked else min(n, math.ceil(2 * n * _zipf_share(ends[i], ends[i + 1], V)))
        logits += rows * sizes[i]
    softmax = 4 * F32 * logits + F32 * Pv + F32 * n * (cfg.d_embed + 2 * cfg.d_model)
    NH, D, Di = cfg.n_head * cfg.d_head, cfg.d_model, cfg.d_inner
    per_layer = B * (K * (3 * NH + D) + T * (12 * D + 4 * Di)) + 6 * B * cfg.n_head * T * K
    layers = F32 * (cfg.n_layer * per_layer + cfg.n_layer * B * mem_len * D)
    return MemoryEstimate(P, Pv, 4 * F32 * P, softmax, layers)


# ---- the limit --------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}


def parse_size(v: Any) -> Optional[int]:
    """trainer.memory_limit: null (detect) | 'off' (no check, -> 0) | bytes | '16GB' / '512MiB'."""
    if v is None:
        return None
    if isinstance(v, str) and v.strip().lower() == "off":
        return 0
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(v).lower())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"trainer.memory_limit must be null, 'off', a byte count or a size such as '16GB' / "
                         f"'512MiB', got {v!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _cgroup_limit() -> Optional[int]:
    """The smallest memory limit on this process's cgroup path (v2 memory.max, v1 limit_in_bytes)."""
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    cands = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            base, name = root, "memory.max"
        elif "memory" in parts[1].split(","):
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        p = Path(parts[2].lstrip("/"))
        for d in [p, *p.parents]:  # a parent's limit binds too; inside a container only "/" may exist
            cands.append(base / d / name)
    cands += [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]
    limits = []
    for f in cands:
        try:
            s = f.read_text().strip()
        except OSError:
            continue
        if s.isdigit() and int(s) < 1 << 60:  # "max" / 2**63-ish: no limit
            limits.append(int(s))
    return min(limits) if limits else None


def on_gpu(accelerator: str) -> bool:
    import torch
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def memory_limit(setting: Any, accelerator: str) -> tuple[int, str]:
    """-> (bytes one process may use, where the number comes from); 0 bytes: no check."""
    v = parse_size(setting)
    if v is not None:
        return v, "trainer.memory_limit"
    import torch
    if on_gpu(accelerator) and torch.cuda.is_available():
        return torch.cuda.mem_get_info()[1], f"memory of {torch.cuda.get_device_name()}"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cg = _cgroup_limit()
    return (cg, "cgroup memory limit") if cg is not None and cg < ram else (ram, "physical RAM")


# ---- txl-train's entry point ------------------------------------------------------------------
def _world(t) -> tuple[int, int]:
    """(processes per machine, processes in all) of the trainer config."""
    local = t.devices if isinstance(t.devices, int) and t.devices > 0 else (
        len(t.devices) if isinstance(t.devices, (list, tuple)) else 1)
    return local, local * max(1, t.num_nodes)


def fit_model(c, vocab_size: int, tokenizer: str) -> TXLConfig:
    """The model config for this vocabulary; raises ValueError (one line) when training cannot fit.

    c: txl-train's config objects (model, data, seq, trainer)."""
    cfg, note = resolve_model(c.model, vocab_size, tokenizer)
    local, world = _world(c.trainer)
    B = max(1, c.data.batch_size // world)
    ranked = tokenizer in RANKED
    P = count_params(cfg)

    def est(m: TXLConfig) -> MemoryEstimate:
        return estimate_memory(m, B, c.seq.tgt_len, c.seq.mem_len, ranked, params=None if m is not cfg else P)

    e = est(cfg)
    from pytorch_lightning.utilities.rank_zero import rank_zero_only
    if rank_zero_only.rank == 0:  # once, not once per DDP process
        log.info("txl-train: vocabulary %s types (%s tokenizer)", f"{vocab_size:,}", tokenizer)
        if note:
            log.info("txl-train: %s", note)
        log.info("txl-train: model %s parameters (embedding + softmax %s); training needs ~%.2f GiB per process",
                 f"{P:,}", f"{e.vocab_params:,}", e.total / GiB)
    limit, where = memory_limit(getattr(c.trainer, "memory_limit", None), c.trainer.accelerator)
    share = 1 if on_gpu(c.trainer.accelerator) else local  # CPU processes of one machine share its RAM
    if limit and e.total * share > limit:
        raise ValueError(_too_big(cfg, e, share, limit, where, est, tokenizer))
    return cfg


def _too_big(cfg, e, share, limit, where, est, tokenizer) -> str:
    need = e.total * share
    fix = []
    if tokenizer == "word":
        lo, hi = 3, cfg.vocab_size  # the largest vocabulary that fits, same model otherwise
        while lo < hi:
            mid = (lo + hi + 1) // 2
            kept = [x for x in cfg.cutoffs if x < mid]
            m = replace(cfg, vocab_size=mid, cutoffs=kept, tie_projs=cfg.tie_projs[:len(kept) + 1])
            lo, hi = (mid, hi) if est(m).total * share <= limit else (lo, mid - 1)
        fix.append(f"data.max_size={lo}" if lo > 3 else "data.max_size=N")
        fix.append("data.min_freq=N (drop rare types)")
    if not cfg.cutoffs:
        auto = auto_cutoffs(cfg.vocab_size)
        if all(a < b for a, b in zip([0] + auto, auto + [cfg.vocab_size])):
            fix.append(f"an adaptive softmax (model.cutoffs={auto})")
    else:
        fix.append("smaller model.cutoffs / model.div_val > 1")
    return (f"the model does not fit in memory: vocabulary {cfg.vocab_size:,} types, {e.params:,} parameters, "
            f"training needs ~{need / GiB:.2f} GiB (weights + Adam {e.state * share / GiB:.2f}, embedding + softmax "
            f"activations {e.softmax * share / GiB:.2f}, layers {e.layers * share / GiB:.2f}) but the limit is "
            f"{limit / GiB:.2f} GiB ({where}); try {', '.join(fix)}, data.batch_size or seq.tgt_len")
