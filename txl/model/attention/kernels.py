"""The backends: (q, k, v, pos, blocked, scale, ...) -> (out, probs or None), registered by name.

A backend decides how the scores are computed, never what they are: every backend must give
rel_ref's result (tests/test_attention_backends.py) and none owns parameters. The position term
arrives as a PositionTerm, so a backend may ask for it densely (rel_ref), pre-scaled the cheapest
way (rel_fused), for a sub-block only (the banded engine in patterns.py) or as a FlexAttention
score_mod that never materialises it (flex). Shapes: q (B, N, T, H) already holding the content
bias u; k, v (B, N, K, H); blocked (T, K) or (B, 1, T, K), True = hidden.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from .masks import fill_blocked_, neg_inf
from .registry import register_backend
from .terms import PositionTerm

_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)


def topk_blocked(score: torch.Tensor, blocked: torch.Tensor, k: int) -> torch.Tensor:
    """(..., T, K) True where a key is not among the query's k best allowed scores (or blocked)."""
    score = score.detach().masked_fill(blocked, neg_inf(score.dtype))
    if k >= score.size(-1):
        return blocked.expand(score.shape)
    keep = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    keep.scatter_(-1, score.topk(k, dim=-1).indices, True)
    return blocked | ~keep  # a query with fewer than k allowed keys keeps only those


def attend(score, v, blocked, dropatt=0.0, training=False, need_weights=False, topk=0):
    """Masked softmax of final (already scaled) scores (B, N, T, K), then the weighted sum of v."""
    if topk:
        blocked = topk_blocked(score, blocked, topk)
    score = score.masked_fill(blocked, neg_inf(score.dtype))
    prob = torch.softmax(score.float(), dim=-1).to(v.dtype)
    prob_d = F.dropout(prob, dropatt, training) if dropatt > 0 else prob
    return torch.matmul(prob_d, v), (prob if need_weights else None)


@register_backend("rel_ref", scores=("dot", "additive", "mixed"))
def rel_ref(q, k, v, pos: Optional[PositionTerm], blocked, scale: float, dropatt: float = 0.0,
            training: bool = False, need_weights: bool = False, topk: int = 0):
    """Readable reference: matmul scores AC + BD (rel_shift), scale, mask, softmax. The ground truth.
    topk > 0: keep only each query's topk best allowed keys (a score-dependent mask)."""
    score = torch.matmul(q, k.transpose(-1, -2))  # (B, N, T, K): AC
    if pos is not None:
        score = score + pos.dense()  # + BD
    return attend(score * scale, v, blocked, dropatt, training, need_weights, topk)


@register_backend("rel_fused", dynamic=False)
def rel_fused(q, k, v, pos: Optional[PositionTerm], blocked, scale: float, dropatt: float = 0.0,
              training: bool = False, need_weights: bool = False):
    """Same scores, fewest passes over (B, N, T, K): scale * BD (one matmul, shifted as a view) is
    masked in place and, when nothing needs its gradient, handed to the fused SDPA kernel as the
    float bias. With gradients (training) the fused CPU kernel cannot differentiate the bias and
    SDPA would fall back to its unfused path plus extra passes: do that math directly, in place."""
    if need_weights:
        return rel_ref(q, k, v, pos, blocked, scale, dropatt, training, True)
    neg = neg_inf(q.dtype)
    if pos is None:
        bias = torch.zeros(blocked.shape, dtype=q.dtype, device=q.device)
    else:
        bias = pos.scaled_dense(scale).to(q.dtype)  # (B|1, N, T, K), a fresh buffer: ours to overwrite
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or bias.requires_grad)
    if not grad:
        fill_blocked_(bias, blocked, neg)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropatt if training else 0.0,
                                             scale=scale)
        return out, None
    score = torch.matmul(q * scale, k.transpose(-1, -2)).add_(bias)  # (B, N, T, K)
    # The fill is outside autograd: a blocked score gets probability exactly 0 (every query sees a
    # key), so softmax's backward already gives it gradient 0; the fill's own backward (slice
    # CopySlices + masked_fill of the gradient) would only add ~3 (B, N, T, K) copies per layer.
    # Nothing saved for backward reads score (add_ and matmul save their inputs, softmax its output).
    with torch.no_grad():
        fill_blocked_(score, blocked, neg)
    # bf16 scores: the CPU softmax kernel accumulates in fp32 and rounds once, so the forward is
    # bit-equal to softmax(score.float()).to(bf16) without the two (B, N, T, K) cast copies (and
    # their backward casts; backward then differs by <= 1 bf16 ulp). fp32: the same call as before.
    prob = torch.softmax(score if score.dtype == torch.bfloat16 and score.device.type == "cpu" else score.float(),
                         dim=-1).to(v.dtype)
    prob = F.dropout(prob, dropatt, training) if dropatt > 0 else prob
    return torch.matmul(prob, v), None


_FLEX: dict = {}


def _flex_attention(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention
    if device.type == "cpu":  # eager CPU flex: unfused but exact (the only way to test it here)
        return flex_attention
    if "compiled" not in _FLEX:  # GPUs: the fused kernel needs torch.compile
        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["compiled"]


@register_backend("flex", native_mask=True, dynamic=False)
def flex(q, k, v, pos: Optional[PositionTerm], blocked, scale: float, dropatt: float = 0.0,
         training: bool = False, need_weights: bool = False):
    """FlexAttention: the position term as a score_mod (relative: raw (q+v).r indexed by distance,
    ALiBi: from indices), the mask (causal & pattern) as a block_mask whose empty blocks the GPU
    kernel skips. Falls back to rel_fused (one warning) where flex cannot do the job: attention
    dropout in training, and any call needing gradients on CPU (torch has no CPU flex backward).
    need_weights: rel_ref (flex does not return probabilities)."""
    if need_weights:
        return rel_ref(q, k, v, pos, blocked, scale, dropatt, training, True)
    if training and dropatt > 0:
        _warn_once("attention backend 'flex' has no attention dropout: using rel_fused for dropatt > 0")
        return rel_fused(q, k, v, pos, blocked, scale, dropatt, training)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or (pos is not None and pos.requires_grad))
    if grad and q.device.type == "cpu":
        _warn_once("attention backend 'flex': FlexAttention has no CPU backward in this torch; "
                   "computing with rel_fused whenever gradients are needed on CPU")
        return rel_fused(q, k, v, pos, blocked, scale, dropatt, training)
    from torch.nn.attention.flex_attention import create_block_mask
    B, T, K = q.size(0), q.size(-2), k.size(-2)
    if blocked.dim() == 2:
        mask_mod, mB = (lambda b, h, qi, ki: ~blocked[qi, ki]), None
    else:
        full = blocked.expand(B, 1, T, K)
        mask_mod, mB = (lambda b, h, qi, ki: ~full[b, 0, qi, ki]), B
    block_mask = create_block_mask(mask_mod, mB, None, T, K, device=q.device)
    score_mod = pos.score_mod(scale) if pos is not None else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = _flex_attention(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    return out, None


# ---- additive (Bahdanau) scoring: a score, not a backend (dense rel_ref math only) ----------------
def additive_scores(q, k, w_q, w_k, w):
    """e[b, n, i, j] = w_n . tanh(W_q,n q_i + W_k,n k_j). q (B, N, T, H), k (B, N, K, H),
    w_q, w_k (N, H, H), w (N, H) -> (B, N, T, K). Memory O(B N T K H): dense only."""
    qa = torch.matmul(q, w_q)  # (B, N, T, H)
    ka = torch.matmul(k, w_k)  # (B, N, K, H)
    feat = torch.tanh(qa.unsqueeze(-2) + ka.unsqueeze(-3))  # (B, N, T, K, H)
    return torch.matmul(feat, w[:, None, :, None]).squeeze(-1)


def additive_attention(q, k, v, pos: Optional[PositionTerm], blocked, scale: float, w_q, w_k, w,
                       dropatt: float = 0.0, training: bool = False, need_weights: bool = False):
    """score = additive content term (unscaled, as Bahdanau) + scale * position term (the paper's
    BD for kind=relative, where q already holds u so the content term sees q + u)."""
    score = additive_scores(q, k, w_q, w_k, w)
    if pos is not None:
        score = score + pos.dense() * scale
    return attend(score, v, blocked, dropatt, training, need_weights)


def mixed_attention(q, k, v, pos: Optional[PositionTerm], blocked, scale: float, w_q, w_k, w, n_additive: int,
                    dropatt: float = 0.0, training: bool = False, need_weights: bool = False):
    """Mixed compatibility: heads 0 .. A-1 (A = n_additive = w_q.size(0)) score additively, exactly as
    additive_attention, the other N - A heads by the scaled dot product, exactly as rel_ref; each
    head keeps its position term. w_q, w_k (A, H, H), w (A, H).

    Why fixed additive / dot heads and not a learned per-head gate g * additive + (1 - g) * dot: the
    additive term is the expensive one (a (B, A, T, K, H) tanh tensor); with a gate every head pays
    for it at any g, while here only the A additive heads do, so memory and time scale with A / N.
    A sigmoid gate also never reaches its limits 0 / 1, whereas A = 0 and A = N are exactly the
    dot and the additive scorers (tests/test_mixed_score.py), and no new parameter or schedule is
    needed: the output projection already learns how much each head contributes.
    """
    A = n_additive
    dot = torch.matmul(q[:, A:], k[:, A:].transpose(-1, -2))  # (B, N-A, T, K): AC of the dot heads
    add = additive_scores(q[:, :A], k[:, :A], w_q, w_k, w)  # (B, A, T, K), unscaled as in Bahdanau
    if pos is not None:
        bd = pos.dense()  # (B|1, N, T, K)
        dot, add = dot + bd[:, A:], add + bd[:, :A] * scale
    score = torch.cat([add, dot * scale], dim=1)  # (B, N, T, K)
    return attend(score, v, blocked, dropatt, training, need_weights)
