"""Adaptive input embedding and projected adaptive log-softmax (Baevski & Auli 2019; Grave et al. 2017).

The vocabulary is split by `cutoffs` into a head shortlist and tail clusters; cluster i gets
embedding size d_embed // div_val**i and a projection to/from d_proj (= d_model).
The head scores the shortlist plus one logit per tail cluster; tail cluster i (1-based) hangs
off head column cutoffs[0] + i - 1 (TF / Hugging Face convention; the original PyTorch code
used column -i, which convert.py undoes). Per-token NLL is returned in *position order*.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def _cluster_dims(d_embed: int, n_clusters: int, div_val: int) -> list[int]:
    return [d_embed // div_val ** i for i in range(n_clusters)]


class AdaptiveEmbedding(nn.Module):
    def __init__(self, vocab_size: int, d_embed: int, d_proj: int, cutoffs: list[int], div_val: int = 1):
        super().__init__()
        self.ends = [0] + list(cutoffs) + [vocab_size]
        self.d_proj, self.div_val = d_proj, div_val
        self.scale = d_proj ** 0.5
        n = len(self.ends) - 1
        if div_val == 1:  # one table; one projection only if the sizes differ
            self.layers = nn.ModuleList([nn.Embedding(vocab_size, d_embed)])
            self.projs = nn.ParameterList([nn.Parameter(torch.empty(d_proj, d_embed))] if d_proj != d_embed else [])
        else:
            dims = _cluster_dims(d_embed, n, div_val)
            self.layers = nn.ModuleList([nn.Embedding(self.ends[i + 1] - self.ends[i], d) for i, d in enumerate(dims)])
            self.projs = nn.ParameterList([nn.Parameter(torch.empty(d_proj, d)) for d in dims])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        if self.div_val == 1:
            emb = self.layers[0](ids)
            if len(self.projs):
                emb = F.linear(emb, self.projs[0])
        else:
            flat = ids.reshape(-1)
            emb = None
            for i, (layer, proj) in enumerate(zip(self.layers, self.projs)):
                lo, hi = self.ends[i], self.ends[i + 1]
                idx = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
                e = F.linear(layer(flat.index_select(0, idx) - lo), proj)  # (n_i, D)
                if emb is None:
                    emb = e.new_zeros(flat.numel(), self.d_proj)
                emb = emb.index_copy(0, idx, e.to(emb.dtype))
            emb = emb.view(*ids.shape, self.d_proj)
        return emb * self.scale


class AdaptiveLogSoftmax(nn.Module):
    """Projected adaptive log-softmax; with no cutoffs it is a plain (optionally projected) softmax."""

    def __init__(self, vocab_size: int, d_embed: int, d_proj: int, cutoffs: list[int], div_val: int = 1):
        super().__init__()
        self.ends = [0] + list(cutoffs) + [vocab_size]
        self.n_clusters = len(cutoffs)
        self.shortlist = self.ends[1]
        self.div_val = div_val
        n = self.n_clusters + 1
        if self.n_clusters:
            self.cluster_weight = nn.Parameter(torch.zeros(self.n_clusters, d_embed))
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters))
        if div_val == 1:
            self.layers = nn.ModuleList([nn.Linear(d_embed, vocab_size)])
            self.projs = nn.ParameterList([nn.Parameter(torch.empty(d_proj, d_embed)) for _ in range(n)]
                                          if d_proj != d_embed else [])
        else:
            dims = _cluster_dims(d_embed, n, div_val)
            self.layers = nn.ModuleList([nn.Linear(d, self.ends[i + 1] - self.ends[i]) for i, d in enumerate(dims)])
            self.projs = nn.ParameterList([nn.Parameter(torch.empty(d_proj, d)) for d in dims])

    def _cluster(self, i: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(weight, bias, proj) of cluster i; the head (i = 0) also scores the tail clusters."""
        if self.div_val == 1:
            lo, hi = self.ends[i], self.ends[i + 1]
            w, b = self.layers[0].weight[lo:hi], self.layers[0].bias[lo:hi]
        else:
            w, b = self.layers[i].weight, self.layers[i].bias
        if i == 0 and self.n_clusters:
            w = torch.cat([w, self.cluster_weight], 0)
            b = torch.cat([b, self.cluster_bias], 0)
        proj = self.projs[i] if len(self.projs) else None
        return w, b, proj

    @staticmethod
    def _logit(h: torch.Tensor, w, b, proj) -> torch.Tensor:
        if proj is not None:
            h = F.linear(h, proj.t())  # (n, d_proj) -> (n, d_i)
        return F.linear(h, w, b)

    def log_prob(self, h: torch.Tensor) -> torch.Tensor:
        """h (n, D) -> log-probabilities over the full vocabulary (n, V), each row sums to 1."""
        head = F.log_softmax(self._logit(h, *self._cluster(0)).float(), dim=-1)
        if not self.n_clusters:
            return head
        parts = [head[:, : self.shortlist]]
        for i in range(1, self.n_clusters + 1):
            tail = F.log_softmax(self._logit(h, *self._cluster(i)).float(), dim=-1)
            parts.append(head[:, self.shortlist + i - 1, None] + tail)
        return torch.cat(parts, dim=-1)

    def nll(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """h (n, D), target (n,) in [0, V) -> NLL (n,) in the same (position) order.

        One head cross-entropy over all rows, against the target itself (shortlist) or its
        cluster's logit (tail), then per tail cluster one gather of its rows, whose in-cluster
        NLL is added at their positions: no per-cluster pass over the head, no reordering.
        """
        target = target.long()  # cross_entropy takes int64 class indices
        head = self._logit(h, *self._cluster(0)).float()  # (n, shortlist + n_clusters)
        if not self.n_clusters:
            return F.cross_entropy(head, target, reduction="none")
        cluster = torch.bucketize(target, self._bounds(target.device), right=True)  # (n,) 0 = head
        col = torch.where(cluster == 0, target, self.shortlist - 1 + cluster)
        out = F.cross_entropy(head, col, reduction="none")  # -log p(cluster), or -log p(t) in the shortlist
        for i in range(1, self.n_clusters + 1):
            idx = (cluster == i).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            tail = self._logit(h.index_select(0, idx), *self._cluster(i)).float()  # (n_i, V_i)
            out = out.index_add(0, idx, F.cross_entropy(tail, target.index_select(0, idx) - self.ends[i],
                                                        reduction="none"))
        return out

    def _bounds(self, device) -> torch.Tensor:
        """The cutoffs as a tensor (for bucketize), cached per device."""
        b = getattr(self, "_bounds_t", None)
        if b is None or b.device != torch.device(device):
            b = self._bounds_t = torch.tensor(self.ends[1:-1], device=device)
        return b


def tie_adaptive(emb: AdaptiveEmbedding, crit: AdaptiveLogSoftmax, tie_weight: bool, tie_projs: list[bool]) -> None:
    """Share tensors (not copies) between the input embedding and the output softmax."""
    if tie_weight:
        for e, o in zip(emb.layers, crit.layers):
            o.weight = e.weight
    if len(crit.projs):
        for i, tie in enumerate(tie_projs):
            if tie and len(emb.projs):
                # div_val == 1 has one input projection shared by every output cluster
                crit.projs[i] = emb.projs[0] if emb.div_val == 1 else emb.projs[i]
