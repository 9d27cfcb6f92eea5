"""Segment-level recurrence: the memory, one (B, M, X) tensor per layer, detached (stop-gradient,
Dai et al. 2019 eq. 1). Never updated in place: update() returns a new memory.

Three kinds, chosen once (TransformerXL.init_mems) and carried by the object from then on:
  HiddenMemory  each layer's *inputs* for the last M positions, X = D. What training needs (the loss
                wants W_k, W_v's gradient on the memory rows); a plain list of tensors is read as this.
  KVMemory      each layer's keys / values, X = 2NH, for inference only: keys and values of a memory
                position never change once computed (relative positions enter through R, not through
                the keys), so a layer projects only its T new rows instead of all M + T each segment.
                Costs 2NH / D times the memory of hidden states (2x in the usual N*H = D).
  CompressiveMemory  hidden states, the first n_cmem rows of each layer's tensor being compressed
                slots (Rae et al. 2019): rows that leave the mem_len window are pooled c -> 1 into at
                most cmem_len slots instead of being dropped (compressive.py makes the slots).
Each attention layer gets its memory tensor and the memory's keys_values: the memory, not the layer,
decides how its rows become keys / values and what it keeps of the new segment.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Iterable

import torch
import torch.nn.functional as F


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

    hids: per layer (B, T, X); mems: per layer (B, M, X). Returns fresh tensors, (B, M', X),
    M' = min(mem_len, M + T - ext_len).
    """
    T, M = hids[0].size(1), mems[0].size(1)
    end = M + max(0, T - ext_len)
    beg = max(0, end - mem_len)
    # one copy: the kept tail of the old memory and the kept head of the segment, concatenated
    return [torch.cat([m[:, beg:].to(h.dtype), h[:, max(0, beg - M): end - M]], dim=1).detach()
            for h, m in zip(hids, mems)]


class Memory(Sequence):
    """Base: a sequence of per-layer (B, M, X) tensors (index it, iterate it, len() = layers)."""

    kind = ""
    inference_only = False

    def __init__(self, layers: Iterable[torch.Tensor] = ()):
        self.layers = list(layers)

    @classmethod
    def init(cls, n_layer: int, batch_size: int, width: int, mem_len: int, mode: str, device=None,
             dtype=None) -> "Memory":
        """The first segment's memory (see init_mems for `mode`)."""
        return cls(init_mems(n_layer, batch_size, width, mem_len, mode, device, dtype))

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def __repr__(self):
        return f"{type(self).__name__}({[tuple(m.shape) for m in self.layers]})"

    def width(self, cfg) -> tuple[int, str]:
        """(X, its name) for a model config."""
        raise NotImplementedError

    def map(self, fn) -> "Memory":
        """The same kind of memory with fn applied to every layer's tensor (e.g. a row slice)."""
        return type(self)(fn(m) for m in self.layers)

    def detach(self) -> "Memory":
        return self.map(torch.Tensor.detach)

    def update(self, new: list[torch.Tensor], mem_len: int, ext_len: int = 0) -> "Memory":
        """new: per layer what keys_values returned for this segment, (B, T, X)."""
        return type(self)(update_mems(new, self.layers, mem_len, ext_len))

    @staticmethod
    def keys_values(mem: torch.Tensor, x: torch.Tensor, hx: torch.Tensor, w_kv: torch.Tensor,
                    norm) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys / values of [mem + segment] -> (kv (B, M + T, 2NH), what this memory keeps of the
        segment (B, T, X)). mem (B, M, X) one layer's rows of this memory (the layer may have dropped
        leading rows no query sees), x (B, T, D) the layer input, hx = norm(x) (or x), w_kv (2NH, D)
        the layer's key / value projection, norm its pre-LayerNorm or None."""
        raise NotImplementedError

    def hidden(self, layer: int) -> torch.Tensor:
        """(B, M, D) the hidden states of `layer`, where this memory keeps them."""
        raise NotImplementedError

    def projected(self, blocks) -> "KVMemory":
        """The same memory as keys / values (blocks: the model's blocks, each with attn.project_kv)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"kind": self.kind, "layers": [m.detach().cpu() for m in self.layers]}

    @staticmethod
    def from_state_dict(d: dict, device=None) -> "Memory":
        if d.get("kind") not in MEMORIES:
            raise ValueError(f"memory kind must be one of {sorted(MEMORIES)}, got {d.get('kind')!r}")
        return MEMORIES[d["kind"]]._load(d, [m.to(device) for m in d["layers"]])

    @classmethod
    def _load(cls, d: dict, layers: list) -> "Memory":
        return cls(layers)


class HiddenMemory(Memory):
    kind = "hidden"

    def width(self, cfg):
        return cfg.d_model, "D"

    def hidden(self, layer):
        return self.layers[layer]

    @staticmethod
    def keys_values(mem, x, hx, w_kv, norm):
        if not mem.size(1):
            return F.linear(hx, w_kv), x
        mem = mem.to(x.dtype)
        hm = norm(mem) if norm is not None else mem
        # With gradients the memory rows are projected apart so that autograd never forms the
        # (useless) gradient of the detached memory; without, one GEMM over [memory + segment]
        # (the concatenated inputs are half the bytes of the outputs).
        if torch.is_grad_enabled():
            return torch.cat([F.linear(hm, w_kv), F.linear(hx, w_kv)], dim=1), x  # (B, K, 2NH)
        return F.linear(torch.cat([hm, hx], dim=1), w_kv), x

    @torch.no_grad()
    def projected(self, blocks):
        return KVMemory(block.attn.project_kv(m) for block, m in zip(blocks, self.layers))


class KVMemory(Memory):
    kind = "kv"
    inference_only = True

    def width(self, cfg):
        return 2 * cfg.n_head * cfg.d_head, "2NH"

    def hidden(self, layer):
        raise ValueError("a KVMemory keeps keys / values, not hidden states")

    @staticmethod
    def keys_values(mem, x, hx, w_kv, norm):
        kv_new = F.linear(hx, w_kv)  # (B, T, 2NH): the memory's rows were projected when they were new
        return (torch.cat([mem.to(kv_new.dtype), kv_new], dim=1) if mem.size(1) else kv_new), kv_new

    def projected(self, blocks):
        return self


class CompressiveMemory(HiddenMemory):
    """Hidden states laid out [compressed slots (n_cmem); memory rows] per layer, (B, n_cmem + M, D):
    attention reads the tensor as one memory; only positions (TransformerXL) tell the two apart.
    Rows leave the memory c at a time (a compressed slot stands for c rows): evicted rows that do
    not yet fill a span of c stay in front of the memory, so M is mem_len + (0 .. c - 1)."""

    kind = "compressive"

    def __init__(self, layers: Iterable[torch.Tensor] = (), n_cmem: int = 0):
        super().__init__(layers)
        self.n_cmem = n_cmem

    def map(self, fn):
        return CompressiveMemory((fn(m) for m in self.layers), self.n_cmem)

    def split(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(compressed slots (B, n_cmem, D), memory rows (B, M, D)) of one layer."""
        m = self.layers[layer]
        return m[:, :self.n_cmem], m[:, self.n_cmem:]

    def __repr__(self):
        return f"CompressiveMemory(n_cmem={self.n_cmem}, {[tuple(m.shape) for m in self.layers]})"

    def update(self, new, mem_len, ext_len=0):
        raise ValueError("a CompressiveMemory is updated by the model's compressor (compressive.py)")

    def projected(self, blocks):
        raise ValueError("a compressive memory cannot be kept as keys / values (its slots are compressed "
                         "hidden states); evaluate with eval.mems=hidden")

    def state_dict(self) -> dict:
        return {**super().state_dict(), "n_cmem": self.n_cmem}

    @classmethod
    def _load(cls, d, layers):
        return cls(layers, int(d["n_cmem"]))


@torch.no_grad()
def evict_rows(mem: torch.Tensor, h: torch.Tensor, mem_len: int, ext_len: int, rate: int):
    """One layer's memory rows (B, M, D) + segment (B, T, D) -> (kept (B, M', D), to compress
    (B, n * rate, D)): the rows beyond the last mem_len of [memory + segment] (minus the trailing
    ext_len, as update_mems) leave in whole spans of `rate`, oldest first; the rest stay."""
    T = h.size(1)
    full = torch.cat([mem.to(h.dtype), h[:, :max(0, T - ext_len)]], dim=1)
    n_out = max(0, full.size(1) - mem_len)
    n_c = n_out // rate * rate
    return full[:, n_c:].detach(), full[:, :n_c].detach()


MEMORIES = {c.kind: c for c in (HiddenMemory, KVMemory, CompressiveMemory)}


def as_memory(mems) -> Memory:
    """A Memory as is; a plain list / tuple of (B, M, D) tensors as the hidden states it is."""
    return mems if isinstance(mems, Memory) else HiddenMemory(mems)
