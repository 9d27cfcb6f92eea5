"""txl-train: compose the config, wire data + model + trainer, fit. No math here.

    txl-train                                   # default: data=pystdlib model=small, CPU, wandb offline
    txl-train experiment=wt103_base trainer=gpu
    txl-train ... ckpt_path=outputs/.../checkpoints/last.ckpt   # exact resume
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from txl.config import register, to_objects

CONF_DIR = os.environ.get("TXL_CONF_DIR", str(Path(__file__).resolve().parent.parent / "conf"))
ARCH_FIELDS = ("vocab_size", "n_layer", "d_model", "n_head", "d_head", "d_inner", "d_embed", "cutoffs",
               "div_val", "kind", "untie_r", "pre_lnorm", "tie_weight", "tie_projs")


def fail(msg: str, code: int = 2) -> None:
    print(f"txl-train: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def check_writable(*dirs: Path) -> None:
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / ".txl-write-probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"cannot write to {d} ({e.strerror or e})") from None


def make_logger(cfg, run_dir: Path):
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
    name = cfg.logger.name
    if name == "none":
        return False
    if name == "csv":
        return CSVLogger(save_dir=str(run_dir), name="", version="")
    if name == "tensorboard":
        return TensorBoardLogger(save_dir=str(run_dir), name="", version="tb")
    # wandb: offline (no account, no network) unless the user has configured wandb
    configured = any(os.environ.get(k) for k in ("WANDB_API_KEY", "WANDB_MODE")) or (
        Path.home().joinpath(".netrc").is_file() and "api.wandb.ai" in Path.home().joinpath(".netrc").read_text())
    mode = cfg.logger.mode or (None if configured else "offline")
    kw = {"mode": mode} if mode else {}
    return WandbLogger(project=cfg.logger.project, save_dir=str(run_dir), config=cfg.resolved, **kw)


def check_resume(ckpt_path: str, model_cfg) -> None:
    from txl.checkpoint import CheckpointError, read_checkpoint
    ck = read_checkpoint(ckpt_path)
    if "txl" not in ck or "state_dict" not in ck:
        raise CheckpointError(f"ckpt_path: {ckpt_path} is not a txl-train checkpoint (a txl-convert model file "
                              "cannot be resumed; use it with txl-eval)")
    saved = ck["txl"]["model_config"]
    now = model_cfg.to_dict()
    diff = [k for k in ARCH_FIELDS if saved.get(k) != now.get(k)]
    if diff:
        k = diff[0]
        raise CheckpointError(f"ckpt_path: incompatible config: model.{k} is {now.get(k)!r} here but "
                              f"{saved.get(k)!r} in {ckpt_path}")


def run(cfg: DictConfig) -> dict:
    import pytorch_lightning as pl
    import torch

    from txl.callbacks import AtomicCheckpointIO, StepCheckpoint
    from txl.data import TXLDataModule
    from txl.lit import TXLModule
    from txl.perf import ThroughputMonitor

    resolved = OmegaConf.to_container(cfg, resolve=True)
    c = to_objects(cfg)  # every __post_init__ check runs here, before any work
    torch.set_flush_denormal(True)  # denormal attention probabilities slow CPU GEMMs up to ~40x
    c.resolved = resolved
    run_dir = Path(c.run_dir or ".").resolve()
    ckpt_dir = Path(c.checkpoint.dirpath or run_dir / "checkpoints")
    check_writable(run_dir, ckpt_dir)
    pl.seed_everything(c.seed, workers=True, verbose=False)

    dm = TXLDataModule(c.data.corpus_config(), batch_size=c.data.batch_size, tgt_len=c.seq.tgt_len,
                       ext_len=c.seq.ext_len, eval_tgt_len=c.seq.eval_tgt_len,
                       eval_batch_size=c.data.eval_batch_size)
    tok = dm.load().tokenizer
    model_cfg = replace(c.model, vocab_size=tok.vocab_size)  # the vocabulary decides; re-validated
    if c.ckpt_path:
        check_resume(c.ckpt_path, model_cfg)
    meta = {"tokenizer": tok.state_dict(), "data": asdict(c.data), "seq": asdict(c.seq), "config": resolved}
    module = TXLModule(model_cfg, c.optim, c.seq, c.trainer.max_steps, unit=getattr(tok, "unit", None),
                       txl_meta=meta)
    from txl.metrics import build_val_hooks  # long-range metrics at every validation (txl/metrics)
    module.val_hooks = build_val_hooks(c.metrics, c.data, tok)
    ckpt_cb = StepCheckpoint(str(ckpt_dir), c.checkpoint.every_n_steps)
    t = c.trainer
    strategy = t.strategy
    if strategy in ("ddp", "ddp_spawn") and t.accelerator == "cpu":
        from pytorch_lightning.strategies import DDPStrategy
        strategy = DDPStrategy(process_group_backend="gloo", start_method="spawn" if strategy == "ddp_spawn" else "popen")
    elif strategy == "fsdp":
        from pytorch_lightning.strategies import FSDPStrategy
        from txl.model.layers import Block
        strategy = FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy="FULL_SHARD")
    trainer = pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_steps=t.max_steps, val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps, gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches, enable_progress_bar=t.enable_progress_bar,
        logger=make_logger(c, run_dir), callbacks=[ckpt_cb, ThroughputMonitor(t.peak_flops)], plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=str(run_dir),
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=c.ckpt_path, weights_only=False)
    if c.logger.name == "wandb" and trainer.is_global_zero:  # flush now, so the summary stays the last line
        import wandb
        wandb.finish()
    sweep = None
    if ckpt_cb.signal is None and trainer.is_global_zero:  # metrics.final_sweep: ppl per eval_mem_len on test
        from txl.metrics.final_sweep import after_training
        sweep = after_training(c, module.model, dm.load(), run_dir)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    summary = {"step": trainer.global_step, "run_dir": str(run_dir), "last_ckpt": str(ckpt_dir / "last.ckpt"),
               **{k: round(v, 6) for k, v in metrics.items() if k.split("/")[0] in ("val_loss", "val_ppl", "val_bpb", "val_bpc")}}
    if sweep is not None:
        summary["context_sweep"] = {k: sweep[k] for k in ("contexts", "ppl")}
    if ckpt_cb.signal is not None:
        summary["stopped_by_signal"] = ckpt_cb.signal
    if trainer.is_global_zero:
        print(json.dumps(summary), flush=True)
    if ckpt_cb.signal is not None:
        sys.exit(128 + ckpt_cb.signal)
    return summary


def _task(cfg: DictConfig) -> None:
    from txl.checkpoint import CheckpointError
    from txl.lit import NonFiniteLossError
    try:
        run(cfg)
    except NonFiniteLossError as e:
        fail(f"{e}; stopped, the last good checkpoint is kept", code=1)
    except (ValueError, CheckpointError, FileNotFoundError, PermissionError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def precheck_run_dir(argv: list[str], tool: str = "txl-train") -> None:
    """Hydra creates hydra.run.dir before our code runs: refuse an unwritable one in one line."""
    for a in argv:
        if a.startswith("hydra.run.dir="):
            p = Path(a.split("=", 1)[1]).expanduser().absolute()
            q = p
            while not q.exists():
                q = q.parent
            if not q.is_dir() or not os.access(q, os.W_OK):
                print(f"{tool}: error: hydra.run.dir: cannot create {p} ({q} is not a writable directory)",
                      file=sys.stderr)
                sys.exit(2)


def main() -> None:
    register()
    precheck_run_dir(sys.argv[1:])
    hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
