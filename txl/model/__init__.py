"""txl.model: the Transformer-XL model in plain PyTorch (imports only torch)."""
from .attention import BACKENDS, causal_mask, get_backend, get_pattern, register_backend, rel_shift
from .config import AttnConfig, MemoryConfig, SeqConfig, TXLConfig
from .memory import CompressiveMemory, HiddenMemory, KVMemory, Memory, init_mems, update_mems
from .transformer import IGNORE, TransformerXL, TXLOutput

ProjectedMems = KVMemory  # the old name of the keys / values memory, importable for one release

__all__ = ["BACKENDS", "causal_mask", "get_backend", "get_pattern", "register_backend", "rel_shift", "AttnConfig",
           "MemoryConfig", "SeqConfig", "CompressiveMemory", "TXLConfig", "HiddenMemory", "KVMemory", "Memory", "init_mems", "update_mems", "IGNORE",
           "TransformerXL", "TXLOutput"]
