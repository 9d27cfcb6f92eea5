"""One Transformer-XL block: multi-head attention over [memory + segment], then a position-wise FF.

Shapes: x (B, T, D) segment input; mem this layer's memory: its cached inputs (B, M, D), or their
keys / values (B, M, 2NH), with keys_values the memory's own rule for turning them into keys / values
(memory.py; default: hidden states); K = M + T. The configured pattern object runs the backend
(attention/patterns.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import (BACKEND_CAPS, AlibiTerm, RelativeTerm, additive_attention, get_backend, get_pattern,
                        mixed_attention)
from .compressive import CompressedRelativeTerm
from .config import TXLConfig
from .memory import HiddenMemory
from .positions import alibi_slopes, rotate


class MultiHeadAttention(nn.Module):
    """Attention of the T segment queries over [memory + segment].

    cfg.kind picks the position encoding (relative owns r_proj and, untied, u / v), cfg.attn
    how the scores are computed (backend), which keys are seen (pattern) and how a query meets a
    key (score; additive owns score_q / score_k / score_w). Keys no query may see under the pattern
    (old memory outside a local window) are dropped before they are projected.
    """

    def __init__(self, cfg: TXLConfig):
        super().__init__()
        N, H, D = cfg.n_head, cfg.d_head, cfg.d_model
        self.cfg = cfg  # validated when it was built (TXLConfig.__post_init__)
        self.qkv = nn.Linear(D, 3 * N * H, bias=False)
        self.out = nn.Linear(N * H, D, bias=False)
        self.ln = nn.LayerNorm(D)
        self.drop = nn.Dropout(cfg.dropout)
        self.scale = 1.0 / H ** 0.5
        if cfg.kind == "relative":
            self.r_proj = nn.Linear(D, N * H, bias=False)  # W_kR
            if cfg.untie_r:  # content bias u and position bias v, per layer
                self.u = nn.Parameter(torch.zeros(N, H))
                self.v = nn.Parameter(torch.zeros(N, H))
        if cfg.attn.score in ("additive", "mixed"):  # Bahdanau: w . tanh(W_q q + W_k k), per additive head
            A = N if cfg.attn.score == "additive" else cfg.attn.n_additive_heads
            self.score_q = nn.Parameter(torch.zeros(A, H, H))
            self.score_k = nn.Parameter(torch.zeros(A, H, H))
            self.score_w = nn.Parameter(torch.zeros(A, H))
        self.pattern_state = get_pattern(cfg.attn).init_state(N, H)  # None, or buffers (routing centroids)

    def project_kv(self, h: torch.Tensor) -> torch.Tensor:
        """Keys / values of layer inputs h (B, L, D) -> (B, L, 2NH): what a KVMemory keeps."""
        w_kv = self.qkv.weight[self.cfg.n_head * self.cfg.d_head:]
        return F.linear(self.ln(h) if self.cfg.pre_lnorm else h, w_kv)

    # no-grad calls over a long memory attend a few batch rows at a time, so that every (T, K)
    # transient (keys / values, position scores, the kernel's bias) shrinks by the chunk factor
    # while the GEMMs stay large (K rows each). 2**22 elements: 16 MB of fp32 scores per chunk.
    chunk_elems = 1 << 22

    def forward(self, x: torch.Tensor, mem: torch.Tensor, blocked: torch.Tensor,
                pos_emb: Optional[torch.Tensor] = None, u: Optional[torch.Tensor] = None,
                v: Optional[torch.Tensor] = None, need_weights: bool = False,
                keys_values=HiddenMemory.keys_values, cpos=None):
        """-> (y (B, T, D), attention probs or None, what the memory keeps of this segment (B, T, X)).
        cpos: compressive.CompressedPositions when the first cpos.n_slots memory rows are compressed
        slots (their distances are not one per key column; pos_emb then covers the other keys)."""
        cfg = self.cfg
        pattern = get_pattern(cfg.attn).bind(self.pattern_state)
        B, T, D = x.shape
        C = 0 if cpos is None else cpos.n_slots
        M = mem.size(1) - C  # below: memory rows besides the compressed slots
        N, H = cfg.n_head, cfg.d_head
        lo = 0 if need_weights or C else pattern.visible_from(T, M)  # keys before lo: invisible to every query
        if lo:
            mem, blocked, M = mem[:, lo:], blocked[..., lo:], M - lo
        if pos_emb is not None:  # rows are distances ... 1, 0: keep the last K (callers may pass only those)
            if pos_emb.size(0) < M + T:
                raise ValueError(f"pos_emb must hold >= {M + T} distances (K), got {pos_emb.size(0)}")
            pos_emb = pos_emb[pos_emb.size(0) - (M + T):]
        r = None
        if cfg.kind == "relative":  # W_kR R once for the whole batch, plus a zero row (the rel-shift's
            # spare column), laid out (N, H, K+1) as the position-score matmul reads it best
            pe = torch.cat([pos_emb, pos_emb.new_zeros(1, D)])  # (K+1, D)
            r_t = torch.matmul(self.r_proj.weight, pe.t()).view(N, H, M + T + 1)
            r = (r_t[..., : M + T].transpose(1, 2), r_t)  # (N, K, H) view, (N, H, K+1)
            if C:  # the slots' distances, (N, E, H), and which one each (query, slot) pair has
                rc = F.linear(cpos.emb, self.r_proj.weight).view(-1, N, H).transpose(0, 1)
                r = r + (rc, cpos.index)
        M = M + C
        step = max(1, self.chunk_elems // (N * T * (M + T)))
        if step < B and not need_weights and not torch.is_grad_enabled():
            per_row = blocked.dim() == 4 and blocked.size(0) > 1  # (B, 1, T, K): sliced with the rows
            parts = [self._attend(x[i:i + step], mem[i:i + step], blocked[i:i + step] if per_row else blocked,
                                  r, u, v, lo, pattern, keys_values, False) for i in range(0, B, step)]
            return torch.cat([p[0] for p in parts]), None, torch.cat([p[2] for p in parts])
        return self._attend(x, mem, blocked, r, u, v, lo, pattern, keys_values, need_weights)

    def _attend(self, x, mem, blocked, r, u, v, lo: int, pattern, keys_values, need_weights: bool):
        cfg, a = self.cfg, self.cfg.attn
        B, T, D = x.shape
        N, H = cfg.n_head, cfg.d_head
        # Queries only for the segment; keys / values of [memory + segment] as the memory keeps them
        hx = self.ln(x) if cfg.pre_lnorm else x
        w_qkv = self.qkv.weight
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            # Cast once what autocast would cast at every use: the weight's slices are not leaves (its
            # cast cache skips them) and hx feeds two projections; one cast each, one cast back in backward.
            amp = torch.get_autocast_dtype(dev)
            w_qkv, hx = w_qkv.to(amp), hx.to(amp)
        w_q, w_kv = w_qkv.split([N * H, 2 * N * H])
        q = F.linear(hx, w_q).view(B, T, N, H).transpose(1, 2)  # (B, N, T, H)
        kv, new = keys_values(mem, x, hx, w_kv, self.ln if cfg.pre_lnorm else None)  # (B, K, 2NH)
        M = mem.size(1)
        k, val = kv.view(B, M + T, 2, N, H).permute(2, 0, 3, 1, 4)  # each (B, N, K, H)
        pos = None
        if cfg.kind == "relative":
            u, v = (self.u, self.v) if cfg.untie_r else (u, v)
            pos = RelativeTerm(q + v[:, None].to(q.dtype), r[0], r_t=r[1])
            if len(r) > 2:  # compressed slots in front: CompressedRelativeTerm adds their columns
                pos = CompressedRelativeTerm(pos, pos.q_pos, r[2].to(q.dtype), r[3])
            q = q + u[:, None].to(q.dtype)
        elif cfg.kind == "rotary":  # memory keys keep their window positions, queries continue after
            win = torch.arange(lo, lo + M + T, device=x.device)
            q, k = rotate(q, win[M:]), rotate(k, win)
        elif cfg.kind == "alibi":  # the paper's slopes act on scaled scores: undo the 1/sqrt(H)
            pos = AlibiTerm(alibi_slopes(N).to(device=x.device, dtype=q.dtype) / self.scale, T, M)
        if a.score == "additive":  # dense only (registry.check)
            o, prob = additive_attention(q, k, val, pos, blocked, self.scale, self.score_q, self.score_k,
                                         self.score_w, cfg.dropatt, self.training, need_weights)
        elif a.score == "mixed":  # additive heads, then dot heads (dense rel_ref only)
            o, prob = mixed_attention(q, k, val, pos, blocked, self.scale, self.score_q, self.score_k, self.score_w,
                                      a.n_additive_heads, cfg.dropatt, self.training, need_weights)
        else:
            o, prob = pattern.run(get_backend(a.backend), q, k, val, pos, blocked, self.scale, cfg.dropatt,
                                  self.training, need_weights, BACKEND_CAPS[a.backend]["native_mask"])
        o = self.drop(self.out(o.transpose(1, 2).reshape(B, T, N * H)))  # (B, T, D)
        y = x + o if cfg.pre_lnorm else self.ln(x + o)
        return y, prob, new


class PositionwiseFF(nn.Module):
    def __init__(self, cfg: TXLConfig):
        super().__init__()
        self.pre_lnorm = cfg.pre_lnorm
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_inner)
        self.fc2 = nn.Linear(cfg.d_inner, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.ln(x) if self.pre_lnorm else x
        h = self.drop(self.fc2(self.drop(F.relu(self.fc1(h)))))
        return x + h if self.pre_lnorm else self.ln(x + h)


class Block(nn.Module):
    def __init__(self, cfg: TXLConfig):
        super().__init__()
        self.attn = MultiHeadAttention(cfg)
        self.ff = PositionwiseFF(cfg)

    def forward(self, x, mem, blocked, pos_emb=None, u=None, v=None, need_weights=False,
                keys_values=HiddenMemory.keys_values, cpos=None):
        y, prob, new = self.attn(x, mem, blocked, pos_emb, u, v, need_weights, keys_values, cpos)
        return self.ff(y), prob, new
