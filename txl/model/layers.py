"""One Transformer-XL block: multi-head attention over [memory + segment], then a position-wise FF.

Shapes: x (B, T, D) segment input; mem (B, M, D) cached inputs of this layer; K = M + T.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import BiasTerm, RelativeTerm, get_backend
from .config import TXLConfig
from .positions import alibi_bias, rotate


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: TXLConfig):
        super().__init__()
        N, H, D = cfg.n_head, cfg.d_head, cfg.d_model
        self.cfg = cfg
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

    def forward(self, x: torch.Tensor, mem: torch.Tensor, blocked: torch.Tensor,
                pos_emb: Optional[torch.Tensor] = None, u: Optional[torch.Tensor] = None,
                v: Optional[torch.Tensor] = None, need_weights: bool = False):
        cfg = self.cfg
        B, T, D = x.shape
        M = mem.size(1)
        N, H = cfg.n_head, cfg.d_head
        cat = torch.cat([mem.to(x.dtype), x], dim=1) if M else x  # (B, K, D)
        h = self.ln(cat) if cfg.pre_lnorm else cat
        q, k, val = self.qkv(h).split(N * H, dim=-1)  # each (B, K, N*H)
        q = q[:, -T:].view(B, T, N, H).transpose(1, 2)  # (B, N, T, H): only the segment queries
        k = k.view(B, M + T, N, H).transpose(1, 2)  # (B, N, K, H)
        val = val.view(B, M + T, N, H).transpose(1, 2)
        pos = None
        if cfg.kind == "relative":
            u, v = (self.u, self.v) if cfg.untie_r else (u, v)
            r = self.r_proj(pos_emb).view(M + T, N, H).transpose(0, 1)  # (N, K, H)
            pos = RelativeTerm(q + v[:, None].to(q.dtype), r)
            q = q + u[:, None].to(q.dtype)
        elif cfg.kind == "rotary":  # memory keys keep positions 0..M-1, queries continue at M..K-1
            win = torch.arange(M + T, device=x.device)
            q, k = rotate(q, win[M:]), rotate(k, win)
        elif cfg.kind == "alibi":
            pos = BiasTerm(alibi_bias(N, T, M, device=x.device).to(q.dtype))
        backend = get_backend(cfg.attn.backend)
        o, prob = backend(q, k, val, pos, blocked, self.scale, cfg.dropatt, self.training, need_weights)
        o = self.drop(self.out(o.transpose(1, 2).reshape(B, T, N * H)))  # (B, T, D)
        y = x + o if cfg.pre_lnorm else self.ln(x + o)
        return y, prob


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

    def forward(self, x, mem, blocked, pos_emb=None, u=None, v=None, need_weights=False):
        y, prob = self.attn(x, mem, blocked, pos_emb, u, v, need_weights)
        return self.ff(y), prob
