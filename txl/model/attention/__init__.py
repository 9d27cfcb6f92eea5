"""Attention: masks, the relative shift, position terms, kernels (backends) and patterns.

Shape legend (the whole package)
  B batch   T segment (query) length   M memory length   K = M + T keys
  N heads   H head dim                 D model dim

Coordinates: query i sits at window position M + i, key j at j; their distance is M + i - j
(masks.distance, the one place it is computed).

  registry.py  names -> backends / patterns, capabilities, the one compatibility check (no txl imports)
  masks.py     distance, causal_mask (+ same_length), fill_blocked_
  shift.py     rel_shift (the reference) and its fast views band_shift, full_shift
  terms.py     PositionTerm: RelativeTerm, AlibiTerm, BiasTerm
  kernels.py   the backends rel_ref, rel_fused, flex; additive and mixed scoring
  patterns.py  Dense, Local, BlockSparse, BigBird, TopK, Routing (+ its Centroids buffers): the only
               module naming a pattern

How `attention=local` reaches the tensor op: conf/attention/local.yaml sets model.attn.pattern ->
AttnConfig.pattern -> registry.get_pattern (PATTERNS) -> Local.run, which calls the backend
(BACKENDS[attn.backend]) on each query chunk with only the keys that chunk may see.
"""
from . import patterns as _patterns  # noqa: F401  (registers the patterns)
from .kernels import (additive_attention, additive_scores, attend, flex, mixed_attention, rel_fused, rel_ref,
                      topk_blocked)
from .masks import causal_mask, distance, distance_grid, fill_blocked_, neg_inf
from .patterns import Pattern
from .registry import (BACKEND_CAPS, BACKENDS, PATTERNS, POSITION_KINDS, SCORES, check, get_backend, get_pattern,
                       register_backend, register_pattern)
from .shift import band_shift, full_shift, rel_shift
from .terms import AlibiTerm, BiasTerm, PositionTerm, RelativeTerm

__all__ = ["additive_attention", "additive_scores", "attend", "flex", "mixed_attention", "rel_fused", "rel_ref", "topk_blocked",
           "causal_mask", "distance", "distance_grid", "fill_blocked_", "neg_inf", "Pattern", "BACKEND_CAPS",
           "BACKENDS", "PATTERNS", "POSITION_KINDS", "SCORES", "check", "get_backend", "get_pattern",
           "register_backend", "register_pattern", "band_shift", "full_shift", "rel_shift", "AlibiTerm",
           "BiasTerm", "PositionTerm", "RelativeTerm"]
