"""Compressive memory (Rae et al. 2019, "Compressive Transformers for Long-Range Sequence Modelling").

Rows that leave the mem_len window are not dropped but compressed, c = compression_rate rows into
one slot, into a second memory of at most cmem_len slots; attention reads
[compressed memory; memory; segment] (memory.CompressiveMemory holds both as one tensor per layer).

Positions. A compressed slot stands for the *centre* of the c positions it was made from: slot s of
C (oldest first) covers the window positions [-(C - s) * c, -(C - s) * c + c - 1] before memory row 0,
so its distance from query i (window position M + i) is M + i + (C - s) * c - (c - 1) / 2 (a
half-integer for even c; sinusoids take any real distance). With c = 1 this is exactly the distance
of the same row in a plain memory of M + C rows (tests/test_compressive.py checks the equality).
Distances are clamped at clamp_len like every other.

Compression functions (kernel = stride = c): mean-pool, max-pool, a 1-D convolution per layer
(parameters here, initialised to the mean-pool so that training starts from it). The convolution is
trained only by the attention-reconstruction loss: per layer, the content-based attention of the
segment's (detached) layer inputs over the rows being compressed vs over their compressed slots,
mean squared error of the two outputs, with the layer's projections detached (stop-gradient into the
main model, as in the paper). The memories themselves are detached: the language-model loss never
reaches the compression.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention.terms import PositionTerm, RelativeTerm
from .memory import CompressiveMemory, evict_rows
from .positions import sinusoid


def mean_pool(x: torch.Tensor, c: int) -> torch.Tensor:
    """(B, n * c, D) -> (B, n, D): the mean of each span of c rows."""
    B, L, D = x.shape
    return x.view(B, L // c, c, D).mean(2)


def max_pool(x: torch.Tensor, c: int) -> torch.Tensor:
    """(B, n * c, D) -> (B, n, D): the element-wise max of each span of c rows."""
    B, L, D = x.shape
    return x.view(B, L // c, c, D).amax(2)


def conv_compress(x: torch.Tensor, c: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(B, n * c, D) -> (B, n, D): 1-D convolution over time, kernel = stride = c.
    weight (D_out, D_in, c), bias (D,)."""
    return F.conv1d(x.transpose(1, 2), weight, bias, stride=c).transpose(1, 2)


COMPRESSIONS = {"mean": mean_pool, "max": max_pool, "conv": conv_compress}


def content_attention(h: torch.Tensor, m: torch.Tensor, attn) -> torch.Tensor:
    """Content-only attention of one layer's queries from h (B, T, D) over rows m (B, L, D), with the
    layer's weights detached -> (B, N, T, H). What the reconstruction loss compares."""
    cfg = attn.cfg
    N, H = cfg.n_head, cfg.d_head
    B, T, _ = h.shape
    if cfg.pre_lnorm:
        def norm(z):
            return F.layer_norm(z, z.shape[-1:], attn.ln.weight.detach(), attn.ln.bias.detach(), attn.ln.eps)
        h, m = norm(h), norm(m)
    w_q, w_kv = attn.qkv.weight.detach().split([N * H, 2 * N * H])
    q = F.linear(h, w_q).view(B, T, N, H).transpose(1, 2)
    k, v = F.linear(m, w_kv).view(B, m.size(1), 2, N, H).permute(2, 0, 3, 1, 4)  # each (B, N, L, H)
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scale, dim=-1)
    return torch.matmul(p, v)


@dataclass
class CompressedPositions:
    """What a layer needs to place n_slots compressed keys: emb (E, D) sinusoids for the distances
    base, base + 1, ..., base + E - 1 (clamped); index (T, n_slots) the row of emb holding the
    distance of query i to slot s."""

    n_slots: int
    emb: torch.Tensor
    index: torch.Tensor


def slot_distances(T: int, M: int, C: int, c: int, device=None):
    """(base, E, index (T, C)): query i's distance to slot s is base + index[i, s], base = M + (c + 1) / 2
    (slot C - 1 seen from query 0), index = i + (C - 1 - s) * c; E = T + (C - 1) * c distinct ones."""
    i = torch.arange(T, device=device)[:, None]
    s = torch.arange(C, device=device)[None, :]
    return M + (c + 1) / 2, T + (C - 1) * c, i + (C - 1 - s) * c


class CompressedRelativeTerm(PositionTerm):
    """The relative term over [C compressed slots; memory; segment]: the slots' columns by gather
    (their distances are not one per key column), the rest the usual RelativeTerm."""

    def __init__(self, rel: RelativeTerm, q_pos: torch.Tensor, rc: torch.Tensor, index: torch.Tensor):
        self.rel, self.q_pos, self.rc, self.index = rel, q_pos, rc, index  # rc (N, E, H), index (T, C)
        self.requires_grad = rel.requires_grad or rc.requires_grad

    def _slots(self, scale: float) -> torch.Tensor:
        raw = torch.matmul(self.q_pos * scale, self.rc.transpose(-1, -2))  # (B, N, T, E)
        B, N, T, _ = raw.shape
        return raw.gather(-1, self.index.expand(B, N, T, self.index.size(-1)))  # (B, N, T, C)

    def dense(self):
        return torch.cat([self._slots(1.0), self.rel.dense()], dim=-1)

    def scaled_dense(self, scale):
        return torch.cat([self._slots(scale), self.rel.scaled_dense(scale)], dim=-1)


def newest(slots: torch.Tensor, n: int) -> torch.Tensor:
    """The last n of (B, S, D) slots (all of them when S <= n; none for n = 0, unlike [:, -n:])."""
    return slots[:, slots.size(1) - min(slots.size(1), n):]


class Compressor(nn.Module):
    """The compression of a model with memory=compressive (one per model; conv: one kernel per layer)."""

    def __init__(self, cfg):
        super().__init__()
        mc = cfg.memory
        self.fn, self.rate, self.cmem_len, self.weight = mc.compression_fn, mc.compression_rate, mc.cmem_len, \
            mc.recon_loss_weight
        D, L = cfg.d_model, cfg.n_layer
        if self.fn == "conv":
            self.conv_w = nn.Parameter(torch.zeros(L, D, D, self.rate))  # per layer (D_out, D_in, c)
            self.conv_b = nn.Parameter(torch.zeros(L, D))

    @torch.no_grad()
    def reset_parameters(self):
        if self.fn == "conv":  # the mean-pool: each tap the identity / c
            eye = torch.eye(self.conv_w.size(1), dtype=self.conv_w.dtype, device=self.conv_w.device)
            self.conv_w.copy_((eye / self.rate)[None, :, :, None].expand_as(self.conv_w))
            self.conv_b.zero_()

    def compress(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """(B, n * c, D) -> (B, n, D)."""
        if self.fn == "conv":
            return conv_compress(x, self.rate, self.conv_w[layer].to(x.dtype), self.conv_b[layer].to(x.dtype))
        return COMPRESSIONS[self.fn](x, self.rate)

    def update(self, mems: CompressiveMemory, new: list, mem_len: int, ext_len: int, blocks=None):
        """-> (next CompressiveMemory, reconstruction loss or None). new: per layer the segment's layer
        inputs (B, T, D); blocks: the model's blocks, given when the reconstruction loss is wanted."""
        cm, keep, recon = [], [], []
        want = (blocks is not None and self.weight > 0 and torch.is_grad_enabled()
                and any(p.requires_grad for p in self.parameters()))
        # cmem_len 0 (an evaluation setting, TransformerXL.set_cmem_len): no slots, so rows leave one
        # at a time and are dropped -- exactly the memory of a Transformer-XL with this mem_len
        rate = self.rate if self.cmem_len else 1
        for i, h in enumerate(new):
            old_c, mem = mems.split(i)
            kept, out = evict_rows(mem, h, mem_len, ext_len, rate)
            old_c = newest(old_c, self.cmem_len)
            if out.size(1) and self.cmem_len:
                if want:
                    slots = self.compress(i, out)  # with the graph into the compression weights only
                    hq = h.detach()
                    target = content_attention(hq, out, blocks[i].attn)
                    recon.append(F.mse_loss(content_attention(hq, slots, blocks[i].attn), target))
                    slots = slots.detach()
                else:
                    with torch.no_grad():
                        slots = self.compress(i, out)
                old_c = newest(torch.cat([old_c.to(slots.dtype), slots], dim=1), self.cmem_len)
            cm.append(old_c.detach())
            keep.append(kept)
        n = cm[0].size(1)
        nxt = CompressiveMemory((torch.cat([c, k], dim=1) for c, k in zip(cm, keep)), n)
        if recon:
            loss = torch.stack(recon).mean()
        elif want:  # nothing evicted yet: a zero that still touches every weight (DDP wants each one used)
            loss = sum(p.sum() for p in self.parameters()) * 0.0
        else:
            loss = None
        return nxt, loss

    def positions(self, T: int, M: int, C: int, clamp_len: int, d_model: int, device=None,
                  dtype=None) -> Optional[CompressedPositions]:
        """Distances of the T queries to C slots in front of M memory rows (module docstring)."""
        if not C:
            return None
        base, E, index = slot_distances(T, M, C, self.rate, device)
        d = base + torch.arange(E, device=device, dtype=torch.float64)
        if clamp_len > 0:
            d = d.clamp(max=clamp_len)
        return CompressedPositions(C, sinusoid(d, d_model).to(dtype), index)
