"""LightningModule: owns the model, its memories across steps, losses, logging and optimizers.

Memory discipline (the paper's ordered training): the training memories carry over from one
step to the next (detached), reset when the stream starts a new epoch; validation has its own
memories, reset at every validation start, and runs with the eval lengths (seq.eval_*).
A checkpoint carries model, optimizer, scheduler, step (Lightning), plus — here — the RNG
states, the training memories of every rank and the stream position, so a resumed run
continues bit for bit.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import grad_norm

from txl.model import IGNORE, CompressiveMemory, TransformerXL, TXLConfig

LN2 = math.log(2.0)


class NonFiniteLossError(RuntimeError):
    pass


def lr_lambda(warmup: int, total: int, schedule: str, min_ratio: float):
    """Linear warm-up, then cosine decay to min_ratio * lr at `total` steps (or constant)."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        prog = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))
    return f


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


class TXLModule(pl.LightningModule):
    def __init__(self, model_cfg: TXLConfig, optim: Any, seq: Any, max_steps: int,
                 unit: Optional[str] = None, txl_meta: Optional[dict] = None):
        super().__init__()
        self.model = TransformerXL(model_cfg)
        self.optim_cfg, self.seq, self.max_steps = optim, seq, max_steps
        self.unit = unit  # 'byte' | 'char' | None: whether bits-per-unit is meaningful
        self.txl_meta = txl_meta or {}  # tokenizer, data and run config: travel in the checkpoint
        self.train_mems: Optional[list] = None
        self.next_pos = {"epoch": 0, "pos": 0}  # first stream segment not yet trained on
        self._pending_rng: Optional[dict] = None
        self.val_hooks: list = []  # extra validation metrics (txl.metrics) get (out, batch)

    # ---- training ---------------------------------------------------------------------------
    def on_train_start(self):
        if self._pending_rng is not None:  # restored here, after everything that may draw numbers
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def training_step(self, batch, batch_idx):
        ids, labels = batch["input_ids"], batch["labels"]
        if batch["reset"] or self.train_mems is None:
            self.train_mems = self.model.init_mems(ids.size(0))
        out = self.model(ids, mems=self.train_mems, labels=labels)
        self.train_mems = out.mems
        self.next_pos = {"epoch": int(batch["epoch"]), "pos": int(batch["pos"]) + 1}
        loss = out.loss
        if out.aux_loss is not None:  # memory=compressive: the compression's own objective (no gradient
            # reaches the main model through it); train_loss below stays the language-model loss
            self.log("train_recon", out.recon_loss.detach(), on_step=True, on_epoch=False, batch_size=ids.size(0))
            loss = loss + out.aux_loss
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite training loss ({loss.item()}) at step {self.global_step + 1}")
        log = dict(on_step=True, on_epoch=False, batch_size=ids.size(0), sync_dist=self.trainer.world_size > 1)
        self.log("train_loss", out.loss, prog_bar=True, **log)
        self.log("train_ppl", torch.exp(out.loss.detach().clamp(max=50)), **log)
        if self.unit:
            self.log(f"train_bp{self.unit[0]}", out.loss.detach() / LN2, **log)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=ids.size(0))
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.log("grad_norm", grad_norm(self.model, norm_type=2)["grad_2.0_norm_total"], on_step=True,
                 on_epoch=False, batch_size=1)

    # ---- validation / test: eval lengths, fresh memories ---------------------------------------
    def _eval_start(self):
        self._train_lengths = asdict(self.model.seq)
        self.model.set_lengths(tgt_len=self.seq.eval_tgt_len, mem_len=self.seq.eval_mem_len)
        self.eval_mems = None
        self._nll_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._n_tok = torch.zeros((), dtype=torch.float64, device=self.device)
        for h in self.val_hooks:
            h.reset()

    def _eval_step(self, batch):
        ids, labels = batch["input_ids"], batch["labels"]
        if batch["reset"] or self.eval_mems is None:
            # keys / values (KVMemory): each segment projects T rows, not eval_mem_len + T. Not
            # under FSDP: projecting reads W_k, W_v outside a block's forward, where they are sharded.
            from pytorch_lightning.strategies import FSDPStrategy
            fsdp = self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)
            self.eval_mems = self.model.init_mems(ids.size(0), projected=not fsdp)
        mems_in = self.eval_mems
        out = self.model(ids, mems=mems_in, labels=labels)
        self.eval_mems = out.mems
        self._nll_sum += out.nll.double().sum()
        self._n_tok += (labels != IGNORE).sum()
        for h in self.val_hooks:
            h.update(self.model, batch, out, mems_in)

    def _eval_end(self, prefix: str):
        s = self.trainer.strategy
        nll_sum, n_tok = s.reduce(self._nll_sum, reduce_op="sum"), s.reduce(self._n_tok, reduce_op="sum")
        loss = (nll_sum / n_tok.clamp(min=1)).float()
        self.log(f"{prefix}_loss", loss, prog_bar=True, sync_dist=False)
        self.log(f"{prefix}_ppl", torch.exp(loss.clamp(max=50)), sync_dist=False)
        if self.unit:
            self.log(f"{prefix}_bp{self.unit[0]}", loss / LN2, prog_bar=True, sync_dist=False)
        for h in self.val_hooks:
            h.finish(self, prefix)
        self.model.set_lengths(**self._train_lengths)

    def on_validation_epoch_start(self):
        self._eval_start()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_end(self):
        self._eval_end("val")

    def on_test_epoch_start(self):
        self._eval_start()

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_test_epoch_end(self):
        self._eval_end("test")

    # ---- optimizers ----------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim_cfg
        cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        # fused: one kernel over all parameters (CPU and CUDA), same update rule as the for-loop path.
        # Only at full precision: Lightning's mixed-precision plugins refuse to clip the gradients
        # of an optimizer that could unscale them itself.
        full = str(self.trainer.precision).startswith(("32", "64")) if self._trainer is not None else True
        opt = cls(self.model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                  fused=full)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(o.warmup_steps, self.max_steps, o.scheduler, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- checkpoint extras -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        mems = self.train_mems
        if mems is not None and self.trainer.world_size > 1:  # every rank owns its streams' memories
            mems = [self.all_gather(m) for m in mems]  # (W, B, M, D) each
        checkpoint["txl"] = {
            "model_config": self.model.cfg.to_dict(),
            "mems": [m.detach().cpu() for m in mems] if mems is not None else None,
            "mems_world": self.trainer.world_size,
            "mems_n_cmem": getattr(self.train_mems, "n_cmem", None),  # compressed slots in front (compressive)
            "stream": dict(self.next_pos),
            "rng": rng_state(),
            "unit": self.unit,
            **self.txl_meta,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        t = checkpoint["txl"]
        self.next_pos = dict(t["stream"])
        self._pending_rng = t["rng"]
        mems = t["mems"]
        if mems is not None:
            world = t.get("mems_world", 1)
            if world != self.trainer.world_size:
                raise ValueError(f"ckpt_path: saved with {world} processes, resumed with {self.trainer.world_size}: "
                                 "memories cannot be re-split (resume with the same world size)")
            if world > 1:
                mems = [m[self.trainer.global_rank] for m in mems]
            self.train_mems = [m.to(self.device) for m in mems]
            if t.get("mems_n_cmem") is not None:  # the first n_cmem rows are compressed slots
                self.train_mems = CompressiveMemory(self.train_mems, t["mems_n_cmem"])
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:
            dm.set_train_position(**self.next_pos)
