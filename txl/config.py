"""Hydra schemas: the typed shape of conf/train.yaml and conf/eval.yaml.

Registered in Hydra's ConfigStore so unknown keys and wrong types fail at compose time; value
ranges are checked by the dataclasses' __post_init__ when `to_objects` builds them (before any
work starts). The model node *is* txl.model.TXLConfig: names in configs, classes in code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from txl.data import CorpusConfig
from txl.model import TXLConfig
from txl.model.config import SeqConfig, _need
from txl.schedule import SCHEDULERS


@dataclass
class SeqNode:
    """Every sequence length, defined once; the model and data nodes interpolate these.

    The training lengths default to the model's own (txl.model.SeqConfig: one default per length).
    The eval_* settings apply to validation, the end-of-training test and txl-eval (never to
    training), as the released scripts pass clamp_len / same_length to eval.py only; null:
      eval_tgt_len     -> tgt_len
      eval_mem_len     -> mem_len + tgt_len - eval_tgt_len when the eval segment is shorter (the
                          original's rule: the same attention span as in training), else mem_len
      eval_clamp_len   -> clamp_len
      eval_same_length -> same_length
    """

    tgt_len: int = SeqConfig.tgt_len
    mem_len: int = SeqConfig.mem_len
    ext_len: int = SeqConfig.ext_len
    eval_tgt_len: Optional[int] = None
    eval_mem_len: Optional[int] = None
    clamp_len: int = SeqConfig.clamp_len  # training
    same_length: bool = SeqConfig.same_length  # training
    eval_clamp_len: Optional[int] = None
    eval_same_length: Optional[bool] = None

    def __post_init__(self):
        if self.eval_tgt_len is None:
            self.eval_tgt_len = self.tgt_len
        if self.eval_mem_len is None:
            self.eval_mem_len = default_eval_mem_len(self.tgt_len, self.mem_len, self.eval_tgt_len)
        if self.eval_clamp_len is None:
            self.eval_clamp_len = self.clamp_len
        if self.eval_same_length is None:
            self.eval_same_length = self.same_length
        for k in ("tgt_len", "eval_tgt_len"):
            _need(getattr(self, k) > 0, f"seq.{k} must be > 0, got {getattr(self, k)}")
        for k in ("mem_len", "eval_mem_len", "ext_len"):
            _need(getattr(self, k) >= 0, f"seq.{k} must be >= 0, got {getattr(self, k)}")
        _need(self.ext_len < self.tgt_len, f"seq.ext_len ({self.ext_len}) must be < seq.tgt_len ({self.tgt_len})")
        if self.same_length:
            _need(self.mem_len > 0, "seq.same_length=true needs seq.mem_len > 0")
        if self.eval_same_length:
            _need(self.eval_mem_len > 0, "seq.eval_same_length=true needs seq.eval_mem_len > 0")


def default_eval_mem_len(tgt_len: int, mem_len: int, eval_tgt_len: int) -> int:
    """The original train.py's evaluation memory: a shorter eval segment gets the difference as
    extra memory, so every query keeps the training attention span mem_len + tgt_len."""
    if mem_len > 0 and eval_tgt_len < tgt_len:
        return mem_len + tgt_len - eval_tgt_len
    return mem_len


@dataclass
class DataNode(CorpusConfig):
    """The corpus (txl.data.CorpusConfig's fields) plus how it is batched."""

    name: Optional[str] = "pystdlib"
    batch_size: int = 16  # global: split over DDP ranks
    eval_batch_size: int = 8
    batch_chunk: int = 1  # split each training batch into this many row chunks (memory, not maths)
    options: Dict[str, Any] = field(default_factory=dict)  # source-specific (e.g. synthetic_recall)

    def __post_init__(self):
        super().__post_init__()
        _need(self.batch_size > 0, f"data.batch_size must be > 0, got {self.batch_size}")
        _need(self.eval_batch_size > 0, f"data.eval_batch_size must be > 0, got {self.eval_batch_size}")
        _need(self.batch_chunk > 0 and self.batch_size % self.batch_chunk == 0,
              f"data.batch_chunk must be > 0 and divide data.batch_size ({self.batch_size}), got {self.batch_chunk}")

    def corpus_config(self) -> CorpusConfig:
        return CorpusConfig.from_dict({f.name: getattr(self, f.name) for f in fields(self)}, strict=False)


@dataclass
class OptimNode:
    name: str = "adam"  # adam | adamw
    lr: float = 2.5e-4
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: str = "cosine"  # cosine | constant | original (txl/schedule.py)
    min_lr_ratio: float = 0.0  # cosine: final lr = min_lr_ratio * lr
    eta_min: float = 0.0  # original: the absolute floor of its cosine (--eta_min)
    clip_nonemb: bool = False  # clip the gradient norm of the transformer blocks only (--clip_nonemb)

    def __post_init__(self):
        _need(self.name in ("adam", "adamw"), f"optim.name must be one of ['adam', 'adamw'], got {self.name!r}")
        _need(self.scheduler in SCHEDULERS,
              f"optim.scheduler must be one of {list(SCHEDULERS)}, got {self.scheduler!r}")
        _need(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _need(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _need(0 <= self.eta_min <= self.lr, f"optim.eta_min must be within [0, optim.lr={self.lr}], got {self.eta_min}")


@dataclass
class TrainerNode:
    """Passed to lightning Trainer (plus `strategy` resolved by txl.train)."""

    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | fsdp
    precision: str = "32-true"
    max_steps: int = 1000
    val_check_interval: int = 250  # optimizer steps (also at the last step, always)
    limit_val_batches: Any = 1.0  # 1.0: the whole split; a cap logs val_fraction (share of tokens scored)
    log_every_n_steps: int = 10
    gradient_clip_val: float = 0.25
    accumulate_grad_batches: int = 1
    enable_progress_bar: bool = True  # off: one human-readable line every log_every_n_steps
    test_at_end: bool = True  # score the test split (eval lengths, whole split) with best.ckpt's weights
    peak_flops: Optional[float] = None  # FLOP/s of ONE device, for the logged mfu; None: GEMM probe at start
    # memory one process may use (txl/budget.py): null = GPU memory / cgroup limit / RAM; '16GB'; 'off'
    memory_limit: Any = None
    compile: bool = False  # torch.compile the model for training and validation (docs/perf.md: measured)

    def __post_init__(self):
        from txl.budget import parse_size
        parse_size(self.memory_limit)  # a bad size fails here, before any work
        _need(self.peak_flops is None or self.peak_flops > 0,
              f"trainer.peak_flops must be > 0 (FLOP/s of one device) or null to probe, got {self.peak_flops}")
        _need(self.max_steps > 0, f"trainer.max_steps must be > 0, got {self.max_steps}")
        _need(self.val_check_interval > 0, f"trainer.val_check_interval must be > 0, got {self.val_check_interval}")
        _need(self.log_every_n_steps > 0, f"trainer.log_every_n_steps must be > 0, got {self.log_every_n_steps}")


@dataclass
class LoggerNode:
    name: str = "wandb"  # wandb | csv | tensorboard | none
    project: str = "txl"
    mode: Optional[str] = None  # wandb: None = offline unless the user configured wandb

    def __post_init__(self):
        _need(self.name in ("wandb", "csv", "tensorboard", "none"),
              f"logger.name must be one of ['wandb', 'csv', 'tensorboard', 'none'], got {self.name!r}")


@dataclass
class CheckpointNode:
    every_n_steps: int = 0  # 0: only at the end (and on SIGTERM / SIGINT)
    dirpath: Optional[str] = None  # default: <run dir>/checkpoints
    keep_last_n: Optional[int] = None  # keep the newest N step-*.ckpt files (null: keep all)

    def __post_init__(self):
        _need(self.every_n_steps >= 0, f"checkpoint.every_n_steps must be >= 0, got {self.every_n_steps}")


@dataclass
class MetricsNode:
    """Long-range dependency metrics (txl.metrics), logged at every validation and by txl-eval.

    Files go to <run dir>/metrics/ (train) or next to eval.json (eval); docs/metrics.md explains
    how to read them."""

    enabled: bool = True
    position_buckets: int = 8  # loss by position in the segment: buckets of tgt_len (0: off)
    nomem_batches: int = 4  # ... also scored without memory on the first N eval batches (0: off)
    context_buckets: bool = True  # loss by available context, log2 buckets
    attention_stats: bool = True  # mean attended distance / memory mass per layer and head
    attention_batches: int = 2  # on the first N eval batches ...
    attention_rows: int = 4  # ... and their first rows: one extra forward pass each
    recall: bool = True  # synthetic_recall: accuracy vs distance
    plots: bool = True  # PNGs next to the JSON
    context_sweep: Any = None  # txl-eval: null | auto | [eval_mem_len, ...] (auto: 0, tgt/2, tgt, 2tgt, ...)
    sweep_max: Optional[int] = None  # auto: largest memory (default max(4 tgt_len, 2 mem_len))
    cmem_sweep: Any = None  # txl-eval, memory=compressive: null | auto | [cmem_len, ...] (auto: 0, C/2, C, 2C)
    threshold: float = 0.01  # effective context: the next context must gain this relative perplexity
    attention_maps: bool = False  # PNG heat maps of one segment's attention (txl/metrics/attention_maps.py)
    attention_maps_segment: int = 1  # ... of this segment of the stream (0: the first, without memory)
    final_sweep: Any = None  # txl-train: context sweep on the test split at the end (null: off; auto | list)
    final_sweep_tokens: int = 65536  # ... on its first N tokens (0: all)

    def __post_init__(self):
        for k in ("position_buckets", "nomem_batches", "attention_batches", "attention_maps_segment"):
            _need(getattr(self, k) >= 0, f"metrics.{k} must be >= 0, got {getattr(self, k)}")
        _need(self.attention_rows >= 1, f"metrics.attention_rows must be >= 1, got {self.attention_rows}")
        _need(0 < self.threshold < 1, f"metrics.threshold must be in (0, 1), got {self.threshold}")
        _need(self.sweep_max is None or self.sweep_max >= 1, f"metrics.sweep_max must be >= 1, got {self.sweep_max}")
        _need(self.final_sweep_tokens >= 0, f"metrics.final_sweep_tokens must be >= 0, got {self.final_sweep_tokens}")
        for k, what in (("context_sweep", "eval_mem_len"), ("final_sweep", "eval_mem_len"), ("cmem_sweep", "cmem_len")):
            cs = getattr(self, k)
            if cs is not None and cs != "auto":
                from txl.metrics.recl import parse_contexts
                setattr(self, k, parse_contexts(list(cs) if not isinstance(cs, str) else cs,
                                                where=f"metrics.{k} ('auto' or a list of {what} >= 0)"))


def _unresolved_model() -> TXLConfig:
    """TXLConfig's defaults with the derived fields left open: the schema must not freeze
    d_embed (= d_model) or tie_projs (one per cluster) before the size and cutoffs are chosen."""
    m = TXLConfig()
    m.d_embed, m.tie_projs = None, None
    # ---- the vocabulary is the data's (txl/budget.py) ---------------------------------------
    # vocab_size: the tokenizer's, filled in by txl-train; cutoffs left unset (None) are chosen
    # from the vocabulary (word-level: the paper's, scaled), given ones are checked against it.
    m.vocab_size, m.cutoffs = None, None
    return m


@dataclass
class TrainSchema:
    seq: SeqNode = field(default_factory=SeqNode)
    data: DataNode = field(default_factory=DataNode)
    model: TXLConfig = field(default_factory=_unresolved_model)
    optim: OptimNode = field(default_factory=OptimNode)
    trainer: TrainerNode = field(default_factory=TrainerNode)
    logger: LoggerNode = field(default_factory=LoggerNode)
    checkpoint: CheckpointNode = field(default_factory=CheckpointNode)
    metrics: MetricsNode = field(default_factory=MetricsNode)
    seed: int = 1234
    ckpt_path: Optional[str] = None
    run_dir: Optional[str] = None  # default: Hydra's output dir
    # ---- process (txl/runtime.py) ----
    threads: Optional[int] = None  # CPU threads; None: OMP_NUM_THREADS if set, else the usable cores (affinity)


@dataclass
class EvalNode:
    text_file: Optional[str] = None  # default: the checkpoint's own test split
    split: str = "test"
    batch_size: int = 1
    warmup_tokens: int = 0  # leading tokens that only fill memory (not scored)
    max_tokens: Optional[int] = None
    output: Optional[str] = None  # default: <run dir>/eval.json
    device: str = "cpu"
    precision: str = "32"  # 32 | bf16
    # projected: memories kept as keys / values, so a segment projects T rows instead of M + T
    # (1.3-1.5x faster at long memory, 2x the memory's size); hidden: as in training (least memory)
    mems: str = "projected"
    # memory storage dtype (compute stays in the model's dtype): auto = as computed | fp32 | bf16 | int8
    mem_dtype: str = "auto"
    # true: a document's tokens see nothing of the documents before it (txl.evaluate.DocBoundaries)
    reset_mems_at_doc: bool = False
    progress: Optional[bool] = None  # the bar on stderr (tokens/s, running ppl); null: when stderr is a TTY
    # memory=compressive: compressed slots kept at evaluation (None: the checkpoint's cmem_len; 0: none)
    cmem_len: Optional[int] = None

    def __post_init__(self):
        _need(self.cmem_len is None or self.cmem_len >= 0,
              f"eval.cmem_len must be >= 0 (compressed slots; null: the checkpoint's own), got {self.cmem_len}")
        _need(self.mems in ("projected", "hidden"), f"eval.mems must be projected|hidden, got {self.mems!r}")
        _need(self.mem_dtype in ("auto", "fp32", "bf16", "int8"),
              f"eval.mem_dtype must be auto|fp32|bf16|int8, got {self.mem_dtype!r}")
        _need(self.batch_size > 0, f"eval.batch_size must be > 0, got {self.batch_size}")
        _need(self.warmup_tokens >= 0, f"eval.warmup_tokens must be >= 0, got {self.warmup_tokens}")
        _need(self.split in ("train", "valid", "test"), f"eval.split must be train|valid|test, got {self.split!r}")
        _need(self.precision in ("32", "bf16"), f"eval.precision must be 32|bf16, got {self.precision!r}")


@dataclass
class EvalSeqNode:
    """Overrides of the checkpoint's evaluation settings (None: keep the checkpoint's).

    clamp_len / same_length: the names before eval_clamp_len / eval_same_length, accepted as
    aliases for one release."""

    eval_tgt_len: Optional[int] = None
    eval_mem_len: Optional[int] = None
    eval_clamp_len: Optional[int] = None
    eval_same_length: Optional[bool] = None
    clamp_len: Optional[int] = None
    same_length: Optional[bool] = None

    def __post_init__(self):
        _need(self.eval_tgt_len is None or self.eval_tgt_len > 0, f"seq.eval_tgt_len must be > 0, got {self.eval_tgt_len}")
        _need(self.eval_mem_len is None or self.eval_mem_len >= 0,
              f"seq.eval_mem_len must be >= 0, got {self.eval_mem_len}")
        for new, old in (("eval_clamp_len", "clamp_len"), ("eval_same_length", "same_length")):
            a, b = getattr(self, new), getattr(self, old)
            _need(a is None or b is None or a == b, f"seq.{old} is the old name of seq.{new}: give one, not both")
            if a is None:
                setattr(self, new, b)


@dataclass
class EvalSchema:
    ckpt_path: Optional[str] = None
    seq: EvalSeqNode = field(default_factory=EvalSeqNode)
    run_dir: Optional[str] = None
    eval: EvalNode = field(default_factory=EvalNode)
    metrics: MetricsNode = field(default_factory=MetricsNode)
    seed: int = 1234
    # ---- process (txl/runtime.py) ----
    threads: Optional[int] = None  # CPU threads; None: OMP_NUM_THREADS if set, else the usable cores (affinity)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="txl_train_schema", node=TrainSchema)
    cs.store(name="txl_eval_schema", node=EvalSchema)


def to_objects(cfg: DictConfig) -> Any:
    """Resolve interpolations and build the dataclasses (runs every __post_init__ check)."""
    return OmegaConf.to_object(cfg)


# ---- cross-field and range checks the node classes above do not make (run by the CLIs right
#      after to_objects, before any work; one line each, naming the setting) ----------------------
def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def validate_train(c: "TrainSchema", cuda_available: Optional[bool] = None) -> None:
    t, o = c.trainer, c.optim
    _need(isinstance(t.accumulate_grad_batches, int) and t.accumulate_grad_batches >= 1,
          f"trainer.accumulate_grad_batches must be an integer >= 1, got {t.accumulate_grad_batches}")
    _need(t.gradient_clip_val is None or (_finite(t.gradient_clip_val) and t.gradient_clip_val >= 0),
          f"trainer.gradient_clip_val must be a finite number >= 0 (0: off), got {t.gradient_clip_val}")
    _need(_finite(o.lr) and o.lr > 0, f"optim.lr must be a finite number > 0, got {o.lr}")
    _need(len(o.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in o.betas),
          f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")
    _need(_finite(o.weight_decay) and o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _need(_finite(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1,
          f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    k = c.checkpoint.keep_last_n
    _need(k is None or k >= 1, f"checkpoint.keep_last_n must be >= 1 or null (keep all), got {k}")
    if str(t.precision).startswith("16"):
        on_cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and cuda_available is False)
        _need(not on_cpu, f"trainer.precision={t.precision} needs a GPU (on CPU, Lightning would silently "
                          "use bf16); use trainer.precision=bf16-mixed or 32-true")


def validate_eval(c: "EvalSchema") -> None:
    m = c.eval.max_tokens
    _need(m is None or m >= 2, f"eval.max_tokens must be >= 2 (or null: the whole text), got {m}")
