"""Typed, self-validating model configuration (names in configs, classes in code)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from .attention import registry
from .attention.patterns import Dense
from .attention.registry import POSITION_KINDS

MEM_INITS = ("empty", "zeros")
MEMORY_KINDS = ("hidden", "compressive")
COMPRESSION_FNS = ("mean", "max", "conv")  # txl/model/compressive.py COMPRESSIONS


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class SeqConfig:
    """Every length the model uses; changeable after construction (eval uses longer memory)."""

    tgt_len: int = 128
    mem_len: int = 128
    ext_len: int = 0
    clamp_len: int = -1  # <= 0: no clamping
    same_length: bool = False

    def __post_init__(self):
        _need(isinstance(self.tgt_len, int) and self.tgt_len > 0, f"tgt_len must be an integer > 0, got {self.tgt_len!r}")
        _need(isinstance(self.mem_len, int) and self.mem_len >= 0, f"mem_len must be an integer >= 0, got {self.mem_len!r}")
        _need(isinstance(self.ext_len, int) and self.ext_len >= 0, f"ext_len must be an integer >= 0, got {self.ext_len!r}")
        _need(isinstance(self.clamp_len, int), f"clamp_len must be an integer (<= 0 disables), got {self.clamp_len!r}")
        if self.same_length:
            # same_length gives every query the same number of keys (mem_len + 1 ... ); with no
            # memory there is nothing to equalise and the mask would hide the whole window.
            _need(self.mem_len > 0, "same_length=True needs mem_len > 0 (it equalises the attention span over memory)")


@dataclass
class AttnConfig:
    """How attention is computed (backend), which keys a query may see (pattern: see
    attention/patterns.py for each one and its fields), how a query and a key are compared (score).
    Backend and pattern never change parameters; score does (additive scoring owns extra weights).

    Backends declare what they support (attention.register_backend); invalid combinations fail
    here (attention.registry.check), listing the valid choices. score='additive' (Bahdanau,
    w . tanh(W_q q + W_k k) per head) holds a (B, N, T, K, H) tensor: memory O(T * K * d), so it is
    dense rel_ref only.
    """

    backend: str = "rel_ref"
    pattern: str = Dense.name
    window: int = 0  # number of most recent keys a query sees (incl. itself)
    block_size: int = 0  # key block size
    n_prev: int = 1  # previous key blocks seen besides the query's own
    n_global: int = 0  # global blocks (first blocks of the key axis)
    n_random: int = 0  # random blocks per query block
    topk: int = 0  # keys kept per query (dynamic pattern)
    seed: int = 0  # random pattern seed (bigbird's blocks, routing's initial centroids)
    n_clusters: int = 0  # routing: k-means centroids per head
    ema_decay: float = 0.999  # routing: centroid <- decay * centroid + (1 - decay) * assigned mean
    score: str = "dot"
    n_additive_heads: int = 0  # score='mixed': heads 0 .. n-1 score additively, the others by dot product

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int":
                _need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                      f"attention.{f.name} must be an integer >= 0, got {v!r}")
        _need(isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0,
              f"attention.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        _need(self.score == "mixed" or not self.n_additive_heads,
              f"attention.n_additive_heads is for score='mixed', got score={self.score!r}")
        registry.check(self)

    def validate(self, kind: str) -> "AttnConfig":
        """The checks that also depend on the position kind (TXLConfig calls this)."""
        registry.check(self, kind)
        return self


@dataclass
class MemoryConfig:
    """What the model remembers between segments (memory.py). hidden: the last mem_len layer inputs
    (Transformer-XL). compressive (Rae et al. 2019): rows leaving the mem_len window are compressed
    by `compression_rate` (c rows -> 1 slot, `compression_fn`) into up to `cmem_len` slots; attention
    reads [compressed memory; memory; segment]. recon_loss_weight scales the attention-reconstruction
    loss that alone trains the compression (conv); 0 turns it off."""

    kind: str = "hidden"
    cmem_len: int = 0
    compression_rate: int = 3
    compression_fn: str = "conv"
    recon_loss_weight: float = 1.0

    def __post_init__(self):
        _need(self.kind in MEMORY_KINDS, f"memory.kind must be one of {list(MEMORY_KINDS)}, got {self.kind!r}")
        _need(self.compression_fn in COMPRESSION_FNS,
              f"memory.compression_fn must be one of {list(COMPRESSION_FNS)}, got {self.compression_fn!r}")
        for name in ("cmem_len", "compression_rate"):
            v = getattr(self, name)
            _need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                  f"memory.{name} must be an integer >= 0, got {v!r}")
        _need(self.compression_rate >= 1, f"memory.compression_rate must be >= 1, got {self.compression_rate}")
        _need(self.recon_loss_weight >= 0, f"memory.recon_loss_weight must be >= 0, got {self.recon_loss_weight}")
        if self.kind == "compressive":
            _need(self.cmem_len >= 1, f"memory=compressive needs memory.cmem_len >= 1, got {self.cmem_len}")

    @property
    def compressive(self) -> bool:
        return self.kind == "compressive"


@dataclass
class TXLConfig:
    vocab_size: Optional[int] = 256  # None: not known yet (txl-train fills in the tokenizer's size)
    n_layer: int = 2
    d_model: int = 32
    n_head: int = 2
    d_head: int = 16
    d_inner: int = 64
    d_embed: Optional[int] = None  # None: d_model
    dropout: float = 0.0
    dropatt: float = 0.0
    pre_lnorm: bool = False
    untie_r: bool = True
    kind: str = "relative"  # position kind: changes parameters
    mem_init: str = "empty"  # first-segment memory: none (original code) or mem_len zeros (TF / HF)
    cutoffs: Optional[list] = field(default_factory=list)  # None: not chosen yet (txl-train: txl.budget)
    div_val: int = 1
    tie_weight: bool = True
    tie_projs: Optional[list] = None  # per cluster; None: [False] + [True] * len(cutoffs) (WT103 setting)
    init_std: float = 0.02
    proj_init_std: float = 0.01
    seq: SeqConfig = field(default_factory=SeqConfig)
    attn: AttnConfig = field(default_factory=AttnConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self):
        if isinstance(self.memory, str):  # model.memory=compressive: that kind with its defaults
            self.memory = MemoryConfig(kind=self.memory)
        elif isinstance(self.memory, dict):
            self.memory = MemoryConfig(**self.memory)
        if isinstance(self.seq, dict):
            self.seq = SeqConfig(**self.seq)
        if isinstance(self.attn, dict):
            self.attn = AttnConfig(**self.attn)
        self.cutoffs = None if self.cutoffs is None else [int(c) for c in self.cutoffs]
        if self.d_embed is None:
            self.d_embed = self.d_model
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "d_head", "d_inner", "d_embed", "div_val"):
            v = getattr(self, name)
            _need((v is None and name == "vocab_size") or (isinstance(v, int) and v > 0),
                  f"{name} must be an integer > 0, got {v!r}")
        for name in ("dropout", "dropatt"):
            v = getattr(self, name)
            _need(0.0 <= v < 1.0, f"{name} must be in [0, 1), got {v!r}")
        _need(self.kind in POSITION_KINDS, f"kind must be one of {list(POSITION_KINDS)}, got {self.kind!r}")
        _need(self.mem_init in MEM_INITS, f"mem_init must be one of {list(MEM_INITS)}, got {self.mem_init!r}")
        # vocab_size / cutoffs None: the data decides later (txl.budget.resolve_model re-validates)
        c = self.cutoffs if self.cutoffs is not None else []
        top = [self.vocab_size] if self.vocab_size is not None else []
        _need(all(a < b for a, b in zip([0] + c, c + top)),
              f"cutoffs must be strictly increasing within (0, vocab_size={self.vocab_size}), got {c}")
        if self.tie_projs is None and self.cutoffs is not None:
            self.tie_projs = [False] + [True] * len(c)
        _need(self.tie_projs is None or self.cutoffs is None or len(self.tie_projs) == len(c) + 1,
              f"tie_projs needs one flag per cluster ({len(c) + 1}), got {len(self.tie_projs or [])}")
        if self.div_val > 1:
            _need(self.d_embed // self.div_val ** len(c) > 0,
                  f"div_val={self.div_val} with {len(c)} cutoffs shrinks d_embed={self.d_embed} to 0")
        if self.kind in ("rotary",):
            _need(self.d_head % 2 == 0, f"kind=rotary needs an even d_head, got {self.d_head}")
        _need(self.attn.n_additive_heads <= self.n_head,
              f"attention.n_additive_heads must be <= n_head={self.n_head}, got {self.attn.n_additive_heads}")
        self.attn.validate(self.kind)  # backend x kind combinations fail here, i.e. at compose time
        if self.memory.compressive:  # compressed slots get their own distances (centre of their span):
            # only the relative term knows distances; a pattern would have to place the slots
            _need(self.kind == "relative", f"memory=compressive needs kind='relative', got {self.kind!r}")
            _need(self.attn.pattern == Dense.name,
                  f"memory=compressive needs attention.pattern='dense', got {self.attn.pattern!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TXLConfig":
        return cls(**d)
