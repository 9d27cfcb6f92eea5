"""Segment-level recurrence: the memory, one (B, M, X) tensor per layer, detached (stop-gradient,
Dai et al. 2019 eq. 1). update() returns a new memory, unless the memory is `rolling` (below).

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

Storage dtype (`store`, inference): `auto` keeps rows in the dtype they were computed in (fp32, or
bf16 under autocast); `fp32` / `bf16` cast them when stored; `int8` keeps each row (one position of
one stream, its X values) as int8 with one fp32 absmax scale per row. Reads give the compute dtype
back (a layer's rows are upcast when it reads them, one layer at a time), so the compute dtype never
changes; only the memory held between segments shrinks (bf16 2x, int8 ~4x).

Rolling (`rolling=True`, inference): the model updates the memory in place, each layer right after
that layer has read it, and returns the same object. The old and the new memory then never coexist
(the high-water mark is the memory plus one layer, not twice the memory; once full, a layer is
shifted in place, roll_rows_, so not even one layer is held twice), which matters when the memory
is long; the price is that the memory handed in is consumed (nobody may read it afterwards:
metrics that re-run a segment on its input memory need the pure update). A compressive memory is
updated by its compressor and is never rolling.
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


@torch.no_grad()
def roll_rows_(mem: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """In place: mem (B, M, X) <- the last M rows of [mem + new], new (B, T, X) with T <= M, the same
    dtype: update_mems' result for a full memory and ext_len 0, with no second (B, M, X) buffer. The
    kept rows move T places forward in blocks of T rows (source and destination of one copy never
    overlap, and front-to-back each block is read before it is overwritten), then new fills the tail."""
    M, T = mem.size(1), new.size(1)
    for j in range(0, M - T, T):
        n = min(T, M - T - j)
        mem[:, j:j + n].copy_(mem[:, j + T:j + T + n])
    mem[:, M - T:].copy_(new)
    return mem


STORES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., X) -> (int8 (..., X), fp32 scale (..., 1)): symmetric absmax per row, so that
    |dequantize_rows(q, s) - x| <= s / 2 = absmax(row) / 254 elementwise (round to nearest)."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays exact
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """int8 rows (..., X) and their (..., 1) scales -> (..., X) in dtype (computed in fp32: one pass,
    int8 * fp32 promotes inside the kernel, no fp32 copy of the codes)."""
    return torch.mul(q, scale).to(dtype)


def check_store(store: str) -> str:
    if store not in STORES:
        raise ValueError(f"memory dtype must be one of {sorted(STORES)}, got {store!r}")
    return store


class Memory(Sequence):
    """Base: a sequence of per-layer (B, M, X) tensors (index it, iterate it, len() = layers).

    store: the storage dtype (module docstring); layers hold the stored tensors (int8: the codes,
    `scales` their per-row (B, M, 1) fp32 scales); indexing gives a layer's rows readable by the
    model (int8 dequantized to fp32; fp32 / bf16 as stored, upcast by keys_values)."""

    kind = ""
    inference_only = False
    rolling = False  # set on an instance: update in place (module docstring)

    def __init__(self, layers: Iterable[torch.Tensor] = (), store: str = "auto",
                 scales: Iterable[torch.Tensor] | None = None):
        self.store = check_store(store)
        self.scales = list(scales) if scales is not None else None
        # rows given in a float dtype are encoded layer by layer as `layers` yields them (a generator
        # then holds one full-precision layer at a time, never the whole memory)
        if store == "int8" and self.scales is None:
            self.layers, self.scales = [], []
            for m in layers:
                q, s = quantize_rows(m)
                self.layers.append(q)
                self.scales.append(s)
        elif STORES[store] is not None and store != "int8":
            self.layers = [m.to(STORES[store]) for m in layers]
        else:
            self.layers = list(layers)

    @classmethod
    def init(cls, n_layer: int, batch_size: int, width: int, mem_len: int, mode: str, device=None,
             dtype=None, store: str = "auto") -> "Memory":
        """The first segment's memory (see init_mems for `mode`), built a layer at a time."""
        M = mem_len if mode == "zeros" else 0
        return cls((torch.zeros(batch_size, M, width, device=device, dtype=dtype) for _ in range(n_layer)), store)

    def stored_as(self, store: str) -> "Memory":
        """The same rows kept in another storage dtype (int8 re-encodes what it reads)."""
        if store == self.store:
            return self
        return type(self)((self[i] for i in range(len(self))), store)

    def _like(self, layers, scales=None) -> "Memory":
        return type(self)(layers, self.store, scales)

    def nbytes(self) -> int:
        """Bytes held by the stored rows (and int8 scales)."""
        return sum(t.numel() * t.element_size() for t in self.layers + (self.scales or []))

    def __getitem__(self, i):
        if self.scales is not None:
            if isinstance(i, slice):
                return [self[j] for j in range(*i.indices(len(self)))]
            return dequantize_rows(self.layers[i], self.scales[i])
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def __repr__(self):
        return f"{type(self).__name__}({[tuple(m.shape) for m in self.layers]})"

    def width(self, cfg) -> tuple[int, str]:
        """(X, its name) for a model config."""
        raise NotImplementedError

    def map(self, fn) -> "Memory":
        """The same kind of memory with fn applied to every layer's tensor (e.g. a row slice; int8:
        to the per-row scales alike)."""
        return self._like([fn(m) for m in self.layers], None if self.scales is None else [fn(x) for x in self.scales])

    def detach(self) -> "Memory":
        if self.rolling:  # the same object (it is updated in place), its tensors detached
            self.layers = [m.detach() for m in self.layers]
            return self
        return self._like([m.detach() for m in self.layers], self.scales)

    def update_layer(self, i: int, new: torch.Tensor, mem_len: int, ext_len: int = 0) -> None:
        """In place: layer i's rows <- the last mem_len of [its rows + new] (update_mems); new (B, T, X)
        is what keys_values returned for this segment. Stored rows are never re-encoded: only the
        segment's new rows are cast / quantized, then concatenated (the old tensor is let go), or, for a
        full rolling memory, shifted in place with the new rows at its end (roll_rows_)."""
        new = new.detach()
        scale = None
        if self.store == "int8":
            new, scale = quantize_rows(new)
        elif STORES[self.store] is not None:
            new = new.to(STORES[self.store])
        old = self.layers[i]
        # a rolling memory owns its tensors: once full, shift it in place (no second copy of the layer)
        if (self.rolling and not ext_len and old.size(1) == mem_len and 0 < new.size(1) <= mem_len
                and new.dtype == old.dtype and not torch.is_grad_enabled()
                and (torch.is_inference_mode_enabled() or not old.is_inference())):
            roll_rows_(old, new)
            if scale is not None:
                roll_rows_(self.scales[i], scale)
            return
        if scale is not None:
            self.scales[i] = update_mems([scale], [self.scales[i]], mem_len, ext_len)[0]
        self.layers[i] = update_mems([new], [old], mem_len, ext_len)[0]

    def update(self, new: list[torch.Tensor], mem_len: int, ext_len: int = 0) -> "Memory":
        """new: per layer what keys_values returned for this segment, (B, T, X) -> the next memory:
        a new object (this one unchanged), or this one updated in place when it is rolling."""
        out = self if self.rolling else self._like(list(self.layers), None if self.scales is None else list(self.scales))
        for i, h in enumerate(new):
            out.update_layer(i, h, mem_len, ext_len)
        return out

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
        d = {"kind": self.kind, "layers": [m.detach().cpu() for m in self.layers]}
        if self.store != "auto":
            d["store"] = self.store
        if self.scales is not None:
            d["scales"] = [s.cpu() for s in self.scales]
        return d

    @staticmethod
    def from_state_dict(d: dict, device=None) -> "Memory":
        if d.get("kind") not in MEMORIES:
            raise ValueError(f"memory kind must be one of {sorted(MEMORIES)}, got {d.get('kind')!r}")
        return MEMORIES[d["kind"]]._load(d, [m.to(device) for m in d["layers"]], device)

    @classmethod
    def _load(cls, d: dict, layers: list, device=None) -> "Memory":
        scales = [s.to(device) for s in d["scales"]] if d.get("scales") is not None else None
        return cls(layers, d.get("store", "auto"), scales)


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
        return KVMemory((block.attn.project_kv(self[i].to(block.attn.qkv.weight.dtype))
                         for i, block in enumerate(blocks)), self.store)


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
        if not mem.size(1):
            return kv_new, kv_new
        # [memory + segment] in one buffer: a memory stored small is upcast while copied in (no
        # full-size cast temporary); the same values as cat([mem.to(dtype), kv_new])
        B, M, X = mem.shape
        kv = kv_new.new_empty(B, M + kv_new.size(1), X)
        kv[:, :M].copy_(mem)
        kv[:, M:].copy_(kv_new)
        return kv, kv_new

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

    def _like(self, layers, scales=None):
        return CompressiveMemory(layers, self.n_cmem)

    def stored_as(self, store):
        if store != "auto":
            raise ValueError("a compressive memory keeps its rows as computed (eval.mem_dtype=auto)")
        return self

    @classmethod
    def init(cls, *args, **kwargs):
        if kwargs.get("store", "auto") != "auto":
            raise ValueError("a compressive memory keeps its rows as computed (eval.mem_dtype=auto)")
        kwargs.pop("store", None)
        m = HiddenMemory.init(*args, **kwargs)
        return CompressiveMemory(m.layers, 0)

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
    def _load(cls, d, layers, device=None):
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
