"""txl.perf: the model-FLOPs formula against torch's FlopCounterMode, the GEMM probe, and the
ThroughputMonitor callback in a short Trainer run."""
import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.flop_counter import FlopCounterMode

from txl.model import TransformerXL, TXLConfig
from txl.perf import ThroughputMonitor, flops_breakdown, model_flops_per_token, probe_peak_flops

B, T, M = 3, 8, 12
BASE = dict(vocab_size=256, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, mem_init="zeros",
            attn=dict(backend="rel_ref"), seq=dict(tgt_len=T, mem_len=M))
# plain softmax; clusters with shrinking tables; one projected table (tied, untied projections);
# pre_lnorm (memory rows need their input gradient) with shared u, v; kinds without position projection
SETUPS = [dict(), dict(vocab_size=300, cutoffs=[50, 150], div_val=2), dict(cutoffs=[40, 100], d_embed=16),
          dict(cutoffs=[40, 100], d_embed=16, tie_projs=[False, False, False], tie_weight=False),
          dict(pre_lnorm=True, untie_r=False), dict(kind="alibi"), dict(kind="absolute"), dict(kind="rotary")]


def _counted(cfg, train: bool):
    torch.manual_seed(0)
    model = TransformerXL(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    y = x.roll(1, dims=1)  # a stream's targets: the inputs' cluster shares (the formula takes one set)
    mems = [torch.randn(B, M, cfg.d_model, generator=g) for _ in range(cfg.n_layer)]
    ends = [0] + cfg.cutoffs + [cfg.vocab_size]
    shares = [((y >= a) & (y < b)).double().mean().item() for a, b in zip(ends, ends[1:])]
    with FlopCounterMode(display=False) as fc:
        if train:
            model(x, mems=mems, labels=y).loss.backward()
        else:
            with torch.no_grad():
                model(x, mems=mems, labels=y)
    return fc.get_total_flops(), shares


@pytest.mark.parametrize("kw", SETUPS)
@pytest.mark.parametrize("train", [False, True])
def test_flops_formula_matches_flop_counter(kw, train):
    cfg = TXLConfig(**{**BASE, **kw})
    counted, shares = _counted(cfg, train)
    want = model_flops_per_token(cfg, T, M, batch_size=B, train=train, cluster_fractions=shares) * B * T
    assert counted == pytest.approx(want, rel=1e-12, abs=1e-6)  # exact (the division by B*T rounds)


def test_flops_parts_and_scaling():
    cfg = TXLConfig(**BASE)
    fwd = flops_breakdown(cfg, T, M, B, train=False)
    trn = flops_breakdown(cfg, T, M, B, train=True)
    # matmuls fed by trainable activations cost 3x; the position projection of fixed sinusoids 2x
    for k in ("attn", "out", "ff", "softmax"):
        assert trn[k] == pytest.approx(3 * fwd[k])
    assert trn["pos_proj"] == pytest.approx(2 * fwd["pos_proj"])
    # attention grows linearly with the keys; the position projection is shared by the batch
    longer = flops_breakdown(cfg, T, 3 * M, B, train=False)
    assert longer["attn"] / fwd["attn"] == pytest.approx((3 * M + T) / (M + T))
    assert flops_breakdown(cfg, T, M, 2 * B, train=False)["pos_proj"] == pytest.approx(fwd["pos_proj"] / 2)
    assert flops_breakdown(TXLConfig(**{**BASE, "kind": "alibi"}), T, M, B)["pos_proj"] == 0


@pytest.mark.parametrize("bad", [dict(tgt_len=0), dict(mem_len=-1), dict(batch_size=0),
                                 dict(cluster_fractions=[0.5, 0.5])])
def test_flops_bad_input(bad):
    args = {**dict(tgt_len=T, mem_len=M, batch_size=B), **bad}
    with pytest.raises(ValueError):
        model_flops_per_token(TXLConfig(**BASE), **args)


def test_probe_peak_flops():
    peak = probe_peak_flops(torch.float32, seconds=0.05, n=256)
    assert math.isfinite(peak) and 1e8 < peak < 1e15  # somewhere between a phone and a GPU cluster
    with pytest.raises(ValueError, match="dtype"):
        probe_peak_flops(torch.int32, seconds=0.01)


class _Tiny(pl.LightningModule):
    """The smallest module the callback understands: `.model`, `.train_mems`, dict batches."""

    def __init__(self):
        super().__init__()
        self.model = TransformerXL(TXLConfig(**{**BASE, "mem_init": "empty"}))
        self.train_mems = None

    def training_step(self, batch, batch_idx):
        out = self.model(batch["input_ids"], mems=self.train_mems, labels=batch["labels"])
        self.train_mems = out.mems
        return out.loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 256, (3, B, T), generator=g)
        batches = [dict(input_ids=x, labels=x.roll(-1, 1), reset=torch.tensor(i == 0)) for i, x in enumerate(ids)]
        return torch.utils.data.DataLoader(batches, batch_size=None)  # each item is a ready batch


def _fit(cb):
    seen = []

    class Spy(pl.Callback):  # what the monitor computed, step by step, and the memory it assumed
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((dict(cb.last), cb._mem, dict(trainer.callback_metrics)))

    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, Spy()])
    module = _Tiny()
    trainer.fit(module)
    return module, seen


def test_throughput_monitor_logs_consistent_values():
    cb = ThroughputMonitor(peak_flops=1e9)
    module, seen = _fit(cb)
    assert len(seen) == 3
    assert [mem for _, mem, _ in seen] == [0, T, M]  # empty memory first, then it fills up to mem_len
    for last, mem, logged in seen:
        tok_s, mfu = last["tokens_per_s"], last["mfu"]
        assert 0 < tok_s < 1e9
        fpt = model_flops_per_token(module.model.cfg, T, mem, B, train=True)
        assert mfu == pytest.approx(tok_s * fpt / 1e9, rel=1e-9)
        assert last["model_tflops"] == pytest.approx(tok_s * fpt / 1e12, rel=1e-9)
        assert float(logged["tokens_per_s"]) == pytest.approx(tok_s, rel=1e-5)
        assert float(logged["mfu"]) == pytest.approx(mfu, rel=1e-5)


def test_throughput_monitor_probes_peak():
    cb = ThroughputMonitor(probe_seconds=0.05)
    _, seen = _fit(cb)
    assert cb.peak_flops > 1e8
    assert all(0 < last["mfu"] < 1 for last, _, _ in seen)  # a tiny model is far from a GEMM's peak
    with pytest.raises(ValueError, match="peak_flops"):
        ThroughputMonitor(peak_flops=0)
