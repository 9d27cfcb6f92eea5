"""Segment-level recurrence: the cached hidden states. Pure functions; never in place.

mems is a list with one (B, M, D) tensor per layer: the *input* of that layer for the last M
positions seen. They are detached (stop-gradient, Dai et al. 2019 eq. 1).
"""
from __future__ import annotations

import torch


class ProjectedMems(list):
    """Memories kept as each layer's keys / values (B, M, 2*N*H) instead of its inputs (B, M, D).

    For inference only (torch.no_grad / inference_mode): keys and values of a memory position never
    change once computed (relative positions enter through R, not through the keys), so a layer
    projects only its T new rows instead of all M + T each segment. Costs 2*N*H / D times the
    memory of hidden-state mems (2x in the usual N*H = D). Training cannot use it: the loss needs
    the gradient of W_k, W_v on the memory rows. `model.init_mems(B, projected=True)` or
    `model.project_mems(mems)` make one; the model hands back the same type in `out.mems`.
    """


def init_mems(n_layer: int, batch_size: int, d_model: int, mem_len: int, mode: str,
              device=None, dtype=None) -> list[torch.Tensor]:
    """`empty`: no memory on the first segment (original PyTorch code).
    `zeros`: mem_len zero vectors (TF code and the Hugging Face port)."""
    M = mem_len if mode == "zeros" else 0
    return [torch.zeros(batch_size, M, d_model, device=device, dtype=dtype) for _ in range(n_layer)]


@torch.no_grad()
def update_mems(hids: list[torch.Tensor], mems: list[torch.Tensor], mem_len: int,
                ext_len: int = 0) -> list[torch.Tensor]:
    """New memory = last mem_len positions of [old memory + this segment], minus the trailing
    ext_len positions (they come back as the next segment's extended context).

    hids: per layer (B, T, X); mems: per layer (B, M, X), X = D (hidden states) or 2NH
    (ProjectedMems, whose type is kept). Returns fresh tensors, (B, M', X),
    M' = min(mem_len, M + T - ext_len).
    """
    T, M = hids[0].size(1), mems[0].size(1)
    end = M + max(0, T - ext_len)
    beg = max(0, end - mem_len)
    # one copy: the kept tail of the old memory and the kept head of the segment, concatenated
    new = [torch.cat([m[:, beg:].to(h.dtype), h[:, max(0, beg - M): end - M]], dim=1).detach()
           for h, m in zip(hids, mems)]
    return type(mems)(new) if isinstance(mems, ProjectedMems) else new
