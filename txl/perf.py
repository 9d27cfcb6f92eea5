"""Throughput accounting: a model-FLOPs formula, a GEMM peak probe, and a Lightning callback that
logs tokens/s and MFU (model FLOPs utilisation = model FLOPs per second / peak FLOPs per second).

Model FLOPs are the matmul FLOPs of the model (2 per multiply-add): queries only for the T segment
positions, keys / values for all K = M + T positions, the position projection once per segment
(shared by the batch) over K + 1 rows (the K distances plus the zero row the relative shift reads
as its spare column: txl computes it inside the same GEMM), attention scores AC and BD and the
weighted sum over all K keys (masked entries included, as every dense kernel computes them), the
feed-forward, the adaptive embedding projections and the adaptive softmax (tail clusters only for
the tokens that fall in them). Elementwise work (LayerNorm, softmax, Adam) is not counted, as
usual for MFU. With the `rel_ref` backend (and the position kinds without a position term) this
equals torch's FlopCounterMode count exactly (tests/test_perf.py); other backends' fused kernels
are counted differently by FlopCounterMode, not computed differently.

Backward = 2x forward for a matmul whose input needs a gradient, 1x (weight gradient only) where
it does not: the position projection of the fixed sinusoids and the memory rows' key/value
projection (the memory is stop-gradient, Dai et al. eq. 1) — except under pre_lnorm, where the
memory rows pass through the trainable LayerNorm first, so their input gradient is needed too.
So training is slightly under 3x forward.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import pytorch_lightning as pl
import torch


def _cluster_sizes(cfg) -> tuple[list[int], list[int], list[bool]]:
    """Per cluster: vocabulary size, embedding dim, and whether it has a projection to d_model."""
    ends = [0] + list(cfg.cutoffs) + [cfg.vocab_size]
    sizes = [b - a for a, b in zip(ends, ends[1:])]
    if cfg.div_val == 1:
        dims = [cfg.d_embed] * len(sizes)
        projs = [cfg.d_embed != cfg.d_model] * len(sizes)
    else:
        dims = [cfg.d_embed // cfg.div_val ** i for i in range(len(sizes))]
        projs = [True] * len(sizes)
    return sizes, dims, projs


def flops_breakdown(cfg, tgt_len: int, mem_len: int, batch_size: int = 1, train: bool = True,
                    cluster_fractions: Optional[Sequence[float]] = None) -> dict[str, float]:
    """Model FLOPs per input token, by part (see the module docstring). cfg: a TXLConfig.

    tgt_len T, mem_len M: the segment and the memory actually attended (K = M + T keys).
    batch_size: only the position projection depends on it (computed once per segment).
    cluster_fractions: share of the tokens in each vocabulary cluster (head first), inputs (the
    embedding's projections) and targets (the softmax's tails) alike, as in a token stream;
    default: the clusters' share of the vocabulary. Attention patterns and additive scoring are counted as dense.
    """
    T, M, B = int(tgt_len), int(mem_len), int(batch_size)
    if T <= 0 or M < 0 or B <= 0:
        raise ValueError(f"need tgt_len > 0, mem_len >= 0, batch_size > 0; got {T}, {M}, {B}")
    K = M + T
    D, NH, Di = cfg.d_model, cfg.n_head * cfg.d_head, cfg.d_inner
    sizes, dims, projs = _cluster_sizes(cfg)
    if cluster_fractions is None:
        cluster_fractions = [s / cfg.vocab_size for s in sizes]
    if len(cluster_fractions) != len(sizes):
        raise ValueError(f"cluster_fractions needs one share per cluster ({len(sizes)}), got {len(cluster_fractions)}")
    full = 3.0 if train else 1.0  # forward + input grad + weight grad
    frozen_in = 2.0 if train else 1.0  # forward + weight grad only (input needs no gradient)
    rel = cfg.kind == "relative"
    mem_in = full if cfg.pre_lnorm else frozen_in  # pre_lnorm: LN(memory) carries the LN's gradient
    layer = {
        "qkv": full * 2 * D * 3 * NH + mem_in * 2 * D * 2 * NH * M / T,
        "pos_proj": frozen_in * 2 * D * NH * (K + 1) / (T * B) if rel else 0.0,  # + the zero spare row
        "attn": full * 2 * K * NH * (3 if rel else 2),  # AC (+ BD) + probabilities x values
        "out": full * 2 * NH * D,
        "ff": full * 4 * D * Di,
    }
    out = {k: v * cfg.n_layer for k, v in layer.items()}
    # adaptive embedding: projections only (lookups are free); adaptive softmax: the head scores the
    # shortlist plus one logit per tail cluster for every token, a tail cluster only its own tokens.
    n_tail = len(sizes) - 1
    out["embed"] = full * sum(f * 2 * d * D for f, d, p in zip(cluster_fractions, dims, projs) if p)
    head = 2 * dims[0] * (sizes[0] + n_tail) + (2 * D * dims[0] if projs[0] else 0)
    tails = sum(f * (2 * d * s + (2 * D * d if p else 0))
                for f, s, d, p in zip(cluster_fractions[1:], sizes[1:], dims[1:], projs[1:]))
    out["softmax"] = full * (head + tails)
    return out


def model_flops_per_token(cfg, tgt_len: int, mem_len: int, batch_size: int = 1, train: bool = True,
                          cluster_fractions: Optional[Sequence[float]] = None) -> float:
    """Total of flops_breakdown: training (forward + backward) FLOPs per token, or forward only."""
    return sum(flops_breakdown(cfg, tgt_len, mem_len, batch_size, train, cluster_fractions).values())


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def probe_peak_flops(dtype=torch.float32, seconds: float = 0.5, device="cpu", n: int = 1024) -> float:
    """Best FLOP/s of an n x n x n GEMM over ~`seconds` (a practical peak for MFU, not the datasheet's)."""
    dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be one of fp32, bf16, fp16, got {dtype!r}")
    if seconds <= 0 or n <= 0:
        raise ValueError(f"seconds and n must be > 0, got {seconds}, {n}")
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = a @ b  # warm-up: library init, thread pool
    best, end = 0.0, time.perf_counter() + seconds
    while True:
        sync()
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        sync()
        dt = time.perf_counter() - t0
        best = max(best, 2 * n ** 3 / max(dt, 1e-9))
        if time.perf_counter() >= end:
            return best


class ThroughputMonitor(pl.Callback):
    """Logs `tokens_per_s` and `mfu` (plus `model_tflops`) after every training batch.

    Time is measured from batch start to batch end (forward, backward, optimizer step; CUDA is
    synchronised), tokens are the batch's input positions over all ranks. peak_flops: FLOP/s of
    ONE device; default: probe_peak_flops at train start in the trainer's precision (bf16 when
    the precision says so, else fp32). The model is `pl_module.model` (a TransformerXL) or the
    module itself; its memory length is read from `pl_module.train_mems` when there is one.
    """

    def __init__(self, peak_flops: Optional[float] = None, prefix: str = "", probe_seconds: float = 0.5):
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"peak_flops must be > 0 (FLOP/s of one device) or None to probe, got {peak_flops!r}")
        self.peak_flops, self.prefix, self.probe_seconds = peak_flops, prefix, probe_seconds
        self.last: dict = {}
        self._t0: Optional[float] = None
        self._mem: int = 0

    @staticmethod
    def _model(pl_module):
        return getattr(pl_module, "model", pl_module)

    def on_train_start(self, trainer, pl_module):
        if self.peak_flops is None:
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            self.peak_flops = probe_peak_flops(dtype, self.probe_seconds, pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        mems = getattr(pl_module, "train_mems", None)
        cfg = self._model(pl_module).cfg
        reset = isinstance(batch, dict) and bool(batch.get("reset", False))
        if mems is not None and not reset:
            self._mem = mems[0].size(1)
        else:  # the step starts from fresh memories
            self._mem = cfg.seq.mem_len if cfg.mem_init == "zeros" else 0
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t0 is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        dt = max(time.perf_counter() - self._t0, 1e-9)
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        B, T = ids.shape
        cfg = self._model(pl_module).cfg
        fpt = model_flops_per_token(cfg, T, self._mem, B, train=True)
        tok_s = B * T * trainer.world_size / dt
        flops = tok_s * fpt
        self.last = dict(tokens_per_s=tok_s, mfu=flops / (self.peak_flops * trainer.world_size),
                         model_tflops=flops / 1e12)
        for k, v in self.last.items():
            pl_module.log(self.prefix + k, v, on_step=True, on_epoch=False, batch_size=B)
