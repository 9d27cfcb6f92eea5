"""LightningModule: owns the model, its memories across steps, losses, logging and optimizers.

Memory discipline (the paper's ordered training): the training memories carry over from one
step to the next (detached), reset when the stream starts a new epoch; validation has its own
memories, reset at every validation start, and runs with the eval settings (seq.eval_*: lengths,
clamp_len, same_length); the end-of-training test (test_step) runs the same way on the test split.
data.batch_chunk splits a training batch into row chunks, each with its own rows of the memory,
gradients accumulated: the same step as the whole batch, in less activation memory.
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
from txl.model import CompressiveMemory, TransformerXL, TXLConfig
from txl.rng import rng_state, set_rng_state  # noqa: F401  (CPU + CUDA states)
from txl.schedule import lr_lambda  # noqa: F401  (re-exported: txl.lit.lr_lambda)


class NonFiniteLossError(RuntimeError):
    pass




class TXLModule(pl.LightningModule):
    def __init__(self, model_cfg: TXLConfig, optim: Any, seq: Any, max_steps: int,
                 unit: Optional[str] = None, txl_meta: Optional[dict] = None, batch_chunk: int = 1,
                 compile: bool = False):
        super().__init__()
        self.model = TransformerXL(model_cfg)
        # trainer.compile: the compiled forward is kept outside the module tree (not a submodule), so
        # parameters and checkpoints keep their names; it shares self.model's parameters
        object.__setattr__(self, "_fwd", torch.compile(self.model) if compile else self.model)
        self.optim_cfg, self.seq, self.max_steps = optim, seq, max_steps
        self.unit = unit  # 'byte' | 'char' | None: whether bits-per-unit is meaningful
        self.txl_meta = txl_meta or {}  # tokenizer, data and run config: travel in the checkpoint
        self.batch_chunk = int(batch_chunk)
        self.train_mems: Optional[list] = None
        self.next_pos = {"epoch": 0, "pos": 0}  # first stream segment not yet trained on
        self._pending_rng: Optional[dict] = None
        self.val_hooks: list = []  # extra validation metrics (txl.metrics) get (out, batch)
        self.interval = {"loss": 0.0, "n": 0}  # training loss summed since the last console line
        self.last_eval_step: dict = {}  # prefix -> global step of its last figures ("every figure names its step")

    def count_params(self) -> tuple[int, int]:
        """(all, non-embedding) parameter counts; non-embedding = the transformer blocks, as the
        original's `#non emb params` (its model.layers)."""
        n_all = sum(p.numel() for p in self.model.parameters())
        return n_all, sum(p.numel() for p in self.model.blocks.parameters())

    # ---- training ---------------------------------------------------------------------------
    def on_train_start(self):
        if self._pending_rng is not None:  # restored here, after everything that may draw numbers
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def _chunked_loss(self, ids, labels):
        """Forward (and backward for all but the last chunk) of batch_chunk row chunks.

        Each chunk uses its own rows of the memory, so chunking changes no token's context. The
        loss of chunk c is weighted n_c / n (its share of the scored tokens), so the accumulated
        gradients are those of the whole batch's mean loss. The last chunk's weighted loss is
        returned for Lightning's backward; the earlier ones are back-propagated here through the
        strategy (precision scaling, DDP) with the same 1 / accumulate_grad_batches Lightning applies.
        Returns (loss to back-propagate, detached mean loss of the batch, new memories)."""
        n = (labels != -100).sum().clamp(min=1)
        chunks = list(zip(ids.chunk(self.batch_chunk), labels.chunk(self.batch_chunk)))
        rows = [c[0].size(0) for c in chunks]
        mem_chunks = list(zip(*[m.split(rows) for m in self.train_mems]))  # per chunk: a list of (b, M, D)
        new_mems, total, last = [], torch.zeros((), device=ids.device), None
        acc = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        for c, ((x, y), mems) in enumerate(zip(chunks, mem_chunks)):
            out = self.model(x, mems=list(mems), labels=y)
            if not torch.isfinite(out.loss):
                raise NonFiniteLossError(f"non-finite training loss ({out.loss.item()}) at step {self.global_step + 1}")
            part = out.loss * ((y != -100).sum() / n)
            total = total + part.detach()
            new_mems.append(out.mems)
            if c < len(chunks) - 1:
                if self._trainer is not None:
                    self.trainer.strategy.backward(part / acc, None)
                else:
                    (part / acc).backward()
            else:
                last = part
        mems = [torch.cat(ms, dim=0) for ms in zip(*new_mems)]
        return last, total, mems

    def training_step(self, batch, batch_idx):
        ids, labels = batch["input_ids"], batch["labels"]
        if batch["reset"] or self.train_mems is None:
            self.train_mems = self.model.init_mems(ids.size(0))
        if self.batch_chunk > 1:
            if self.model.compressor is not None:
                raise ValueError("data.batch_chunk > 1 is not supported with memory=compressive (use batch_chunk=1)")
            if ids.size(0) % self.batch_chunk:
                raise ValueError(f"data.batch_chunk ({self.batch_chunk}) must divide the per-process batch "
                                 f"({ids.size(0)} rows)")
            if self._trainer is not None and batch_idx % self.trainer.accumulate_grad_batches == 0:
                # Lightning zeroes the gradients after training_step, before its backward: that would
                # drop the chunks back-propagated here, so zero now and skip its call (optimizer_zero_grad)
                self.trainer.optimizers[0].zero_grad()
                self._zeroed_in_step = True
            loss, mean, self.train_mems = self._chunked_loss(ids, labels)
        else:
            out = self._fwd(ids, mems=self.train_mems, labels=labels)
            self.train_mems = out.mems
            loss = mean = out.loss
            if out.aux_loss is not None:  # memory=compressive: the compression's own objective (no gradient
                # reaches the main model through it); train_loss below stays the language-model loss
                self.log("train_recon", out.recon_loss.detach(), on_step=True, on_epoch=False, batch_size=ids.size(0))
                loss = loss + out.aux_loss
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"non-finite training loss ({loss.item()}) at step {self.global_step + 1}")
        self.next_pos = {"epoch": int(batch["epoch"]), "pos": int(batch["pos"]) + 1}
        mean = mean.detach()
        self.interval["loss"] = self.interval["loss"] + mean  # a tensor: no device sync per step
        self.interval["n"] += 1
        log = dict(on_step=True, on_epoch=False, batch_size=ids.size(0), sync_dist=self.trainer.world_size > 1)
        self.log("train_loss", mean, prog_bar=True, **log)
        self.log("train_ppl", torch.exp(mean.clamp(max=50)), **log)
        if self.unit:
            self.log(f"train_bp{self.unit[0]}", mean / LN2, **log)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=ids.size(0))
        return loss

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        if getattr(self, "_zeroed_in_step", False):  # batch_chunk: already zeroed before its chunks
            self._zeroed_in_step = False
            return
        optimizer.zero_grad()

    def on_before_optimizer_step(self, optimizer):
        self.log("grad_norm", grad_norm(self.model, norm_type=2)["grad_2.0_norm_total"], on_step=True,
                 on_epoch=False, batch_size=1)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if not self.optim_cfg.clip_nonemb or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        # the original's --clip_nonemb: the norm of the transformer blocks' gradients only, the
        # embedding / softmax / shared u, v gradients left unclipped
        from pytorch_lightning.strategies import FSDPStrategy
        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError("optim.clip_nonemb=true is not supported with trainer=fsdp (sharded gradients)")
        torch.nn.utils.clip_grad_norm_(self.model.blocks.parameters(), gradient_clip_val)

    # ---- validation / test: eval settings, fresh memories --------------------------------------
    def _eval_start(self):
        self._train_lengths = asdict(self.model.seq)
        s = self.seq
        # getattr: a seq object from before eval_clamp_len / eval_same_length keeps the training values
        self.model.set_lengths(tgt_len=s.eval_tgt_len, mem_len=s.eval_mem_len,
                               clamp_len=getattr(s, "eval_clamp_len", self.model.seq.clamp_len),
                               same_length=getattr(s, "eval_same_length", self.model.seq.same_length))
        for h in self.val_hooks:
            h.reset()
        # keys / values (KVMemory): each segment projects T rows, not eval_mem_len + T. Not
        # under FSDP: projecting reads W_k, W_v outside a block's forward, where they are sharded.
        from pytorch_lightning.strategies import FSDPStrategy
        fsdp = self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)
        self._scorer = SegmentScorer(self._fwd, projected=not fsdp, hooks=self.val_hooks)  # txl.evaluate

    def _eval_step(self, batch):
        self._scorer.step(batch)

    def _split_tokens(self, prefix: str) -> Optional[int]:
        """Scored tokens in one full pass over the split (all ranks), for the fraction a cap keeps."""
        loaders = self.trainer.val_dataloaders if prefix == "val" else self.trainer.test_dataloaders
        ds = getattr(loaders, "dataset", None)
        if ds is None or not hasattr(ds, "n_step"):
            return None
        return int(ds.batch_size * ds.world_size * ds.n_step)

    def _eval_end(self, prefix: str):
        s = self.trainer.strategy
        nll_sum, n_tok = s.reduce(self._scorer.nll_sum, reduce_op="sum"), s.reduce(self._scorer.n_tok, reduce_op="sum")
        loss = mean_nll(nll_sum, n_tok, f"{prefix} split")
        self.log(f"{prefix}_loss", loss, prog_bar=True, sync_dist=False)
        self.log(f"{prefix}_ppl", torch.exp(loss.clamp(max=50)), sync_dist=False)
        if self.unit:
            self.log(f"{prefix}_bp{self.unit[0]}", loss / LN2, prog_bar=True, sync_dist=False)
        total = self._split_tokens(prefix)
        if total and float(n_tok) < total:  # a cap (limit_val_batches) scored only part of the split
            self.log(f"{prefix}_fraction", float(n_tok) / total, sync_dist=False)
        self.last_eval_step[prefix] = int(self.global_step)
        for h in self.val_hooks:
            h.finish(self, prefix)
        self.model.set_lengths(**self._train_lengths)

    def on_validation_epoch_start(self):
        self._eval_start()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_end(self):
        self._eval_end("val")

    # the end-of-training test (trainer.test_at_end): the test split, the same way as validation
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
            opt, lr_lambda(o.warmup_steps, self.max_steps, o.scheduler, o.min_lr_ratio,
                           getattr(o, "eta_min", 0.0) / o.lr))
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
