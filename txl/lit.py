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
from dataclasses import asdict
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import grad_norm

from txl.evaluate import LN2, SegmentScorer, mean_nll
from txl.model import TransformerXL, TXLConfig
from txl.rng import rng_state, set_rng_state  # noqa: F401  (CPU + CUDA states)



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


class TXLModule(pl.LightningModule):
    def __init__(self, model_cfg: TXLConfig, optim: Any, seq: Any, max_steps: int,
                 unit: Optional[str] = None, txl_meta: Optional[dict] = None, compile: bool = False):
        super().__init__()
        self.model = TransformerXL(model_cfg)
        # trainer.compile: the compiled forward is kept outside the module tree (not a submodule), so
        # parameters and checkpoints keep their names; it shares self.model's parameters
        object.__setattr__(self, "_fwd", torch.compile(self.model) if compile else self.model)
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
        out = self._fwd(ids, mems=self.train_mems, labels=labels)
        self.train_mems = out.mems
        self.next_pos = {"epoch": int(batch["epoch"]), "pos": int(batch["pos"]) + 1}
        loss = out.loss
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite training loss ({loss.item()}) at step {self.global_step + 1}")
        log = dict(on_step=True, on_epoch=False, batch_size=ids.size(0), sync_dist=self.trainer.world_size > 1)
        self.log("train_loss", loss, prog_bar=True, **log)
        self.log("train_ppl", torch.exp(loss.detach().clamp(max=50)), **log)
        if self.unit:
            self.log(f"train_bp{self.unit[0]}", loss.detach() / LN2, **log)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=ids.size(0))
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.log("grad_norm", grad_norm(self.model, norm_type=2)["grad_2.0_norm_total"], on_step=True,
                 on_epoch=False, batch_size=1)

    # ---- validation / test: eval lengths, fresh memories ---------------------------------------
    def _eval_start(self):
        self._train_lengths = asdict(self.model.seq)
        self.model.set_lengths(tgt_len=self.seq.eval_tgt_len, mem_len=self.seq.eval_mem_len)
        for h in self.val_hooks:
            h.reset()
        # keys / values (KVMemory): each segment projects T rows, not eval_mem_len + T. Not
        # under FSDP: projecting reads W_k, W_v outside a block's forward, where they are sharded.
        from pytorch_lightning.strategies import FSDPStrategy
        fsdp = self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)
        self._scorer = SegmentScorer(self._fwd, projected=not fsdp, hooks=self.val_hooks)  # txl.evaluate

    def _eval_step(self, batch):
        self._scorer.step(batch)

    def _eval_end(self, prefix: str):
        s = self.trainer.strategy
        nll_sum, n_tok = s.reduce(self._scorer.nll_sum, reduce_op="sum"), s.reduce(self._scorer.n_tok, reduce_op="sum")
        loss = mean_nll(nll_sum, n_tok, f"{prefix} split")
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
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:
            dm.set_train_position(**self.next_pos)
