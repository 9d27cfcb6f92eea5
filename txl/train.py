"""txl-train: compose the config, wire data + model + trainer, fit. No math here.

    txl-train                                   # default: data=pystdlib model=small, CPU, wandb offline
    txl-train experiment=wt103_base trainer=gpu
    txl-train ... ckpt_path=outputs/.../checkpoints/last.ckpt   # exact resume
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from txl.cli import CONF_DIR, EXIT_NONFINITE, check_writable, error_line, exit_code, fail  # noqa: F401
from txl.config import register, to_objects

ARCH_FIELDS = ("vocab_size", "n_layer", "d_model", "n_head", "d_head", "d_inner", "d_embed", "cutoffs",
               "div_val", "kind", "untie_r", "pre_lnorm", "tie_weight", "tie_projs")


def make_logger(cfg, run_dir: Path):
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
    name = cfg.logger.name
    if name == "none":
        return False
    if name == "csv":  # appends to an existing metrics.csv: a resumed run keeps the earlier rows
        from txl.callbacks import AppendingCSVLogger
        return AppendingCSVLogger(save_dir=str(run_dir), name="", version="")
    if name == "tensorboard":
        return TensorBoardLogger(save_dir=str(run_dir), name="", version="tb")
    # wandb: offline (no account, no network) unless the user has configured wandb
    configured = any(os.environ.get(k) for k in ("WANDB_API_KEY", "WANDB_MODE")) or (
        Path.home().joinpath(".netrc").is_file() and "api.wandb.ai" in Path.home().joinpath(".netrc").read_text())
    mode = cfg.logger.mode or (None if configured else "offline")
    kw = {"mode": mode} if mode else {}
    from txl.runtime import quiet_wandb_logger
    return quiet_wandb_logger(WandbLogger(project=cfg.logger.project, save_dir=str(run_dir), config=cfg.resolved, **kw))


def check_resume(ckpt_path: str, model_cfg, c=None) -> None:
    """Refuse, in one line naming the setting and the checkpoint's value, a resume that would
    train nothing, skip data or fail on a shape: architecture, max_steps, tgt_len, batch_size."""
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
    if c is None:
        return
    step = ck.get("global_step", 0)
    if c.trainer.max_steps <= step:
        raise CheckpointError(f"trainer.max_steps={c.trainer.max_steps} is not past the checkpoint's step {step}: "
                              f"nothing to train (raise trainer.max_steps above {step})")
    for node, key in (("seq", "tgt_len"), ("seq", "ext_len"), ("data", "batch_size")):
        was = (ck["txl"].get(node) or {}).get(key)
        here = getattr(getattr(c, node), key)
        if was is not None and was != here:  # the stream position is counted in segments of this shape
            raise CheckpointError(f"{node}.{key}={here} differs from the checkpoint's {node}.{key}={was}: a resume "
                                  f"must keep it (the saved data position and memories depend on it)")


def nonfinite_message(e: BaseException, ckpt_cb, ckpt_dir: Path) -> str:
    last = ckpt_dir / "last.ckpt"
    if ckpt_cb.last_saved is not None:
        kept = f"the last good checkpoint is {last} (step {ckpt_cb.last_saved})"
    elif last.is_file():
        kept = f"this run saved no checkpoint; the earlier {last} is kept"
    else:
        kept = "no checkpoint was saved"
    return f"{error_line(e)}; stopped, {kept}"


def run(cfg: DictConfig) -> dict:
    import pytorch_lightning as pl
    import torch

    from txl.callbacks import AtomicCheckpointIO, SignalStop, StepCheckpoint
    from txl.cli import is_launch_rank_zero, lock_run_dir
    from txl.config import validate_train
    from txl.files import remove_orphan_temps
    from txl.data import TXLDataModule
    from txl.lit import TXLModule
    from txl.perf import ThroughputMonitor
    from txl.progress import progress_callbacks

    resolved = OmegaConf.to_container(cfg, resolve=True)
    c = to_objects(cfg)  # every __post_init__ check runs here, before any work
    validate_train(c, cuda_available=torch.cuda.is_available())
    torch.set_flush_denormal(True)  # denormal attention probabilities slow CPU GEMMs up to ~40x
    c.resolved = resolved
    run_dir = Path(c.run_dir or ".").resolve()
    ckpt_dir = Path(c.checkpoint.dirpath or run_dir / "checkpoints")
    check_writable(run_dir, ckpt_dir)
    if is_launch_rank_zero():  # one live run per directory; then no writer of ours is active there
        lock_run_dir(run_dir)
        if not ckpt_dir.resolve().is_relative_to(run_dir):
            lock_run_dir(ckpt_dir, "checkpoint.dirpath")
        for d in (run_dir, ckpt_dir):
            remove_orphan_temps(d)
    pl.seed_everything(c.seed, workers=True, verbose=False)

    dm = TXLDataModule(c.data.corpus_config(), batch_size=c.data.batch_size, tgt_len=c.seq.tgt_len,
                       ext_len=c.seq.ext_len, eval_tgt_len=c.seq.eval_tgt_len,
                       eval_batch_size=c.data.eval_batch_size)
    tok = dm.load().tokenizer
    from txl.budget import fit_model  # the vocabulary decides: cutoffs, and whether training fits in memory
    model_cfg = fit_model(c, tok.vocab_size, tok.kind)  # re-validated; one line when it does not fit
    if c.ckpt_path:
        check_resume(c.ckpt_path, model_cfg, c)
    meta = {"tokenizer": tok.state_dict(), "data": asdict(c.data), "seq": asdict(c.seq), "config": resolved}
    module = TXLModule(model_cfg, c.optim, c.seq, c.trainer.max_steps, unit=getattr(tok, "unit", None),
                       txl_meta=meta, batch_chunk=c.data.batch_chunk, compile=c.trainer.compile)
    from txl.metrics import build_val_hooks  # long-range metrics at every validation (txl/metrics)
    module.val_hooks = build_val_hooks(c.metrics, c.data, tok)
    ckpt_cb = StepCheckpoint(str(ckpt_dir), c.checkpoint.every_n_steps, c.checkpoint.keep_last_n)
    t = c.trainer
    from txl.training import (BestCheckpoint, ConsoleLog, FinalValidation, lightning_val_check_interval,
                              run_test_at_end)
    best_cb = BestCheckpoint(str(ckpt_dir))
    recipe_cbs = [FinalValidation(t.max_steps), best_cb, ConsoleLog(t.log_every_n_steps, t.enable_progress_bar)]
    strategy = t.strategy
    if strategy in ("ddp", "ddp_spawn") and t.accelerator == "cpu":
        from pytorch_lightning.strategies import DDPStrategy
        strategy = DDPStrategy(process_group_backend="gloo", start_method="spawn" if strategy == "ddp_spawn" else "popen")
    elif strategy == "fsdp":
        from pytorch_lightning.strategies import FSDPStrategy
        from txl.model.block import Block
        strategy = FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy="FULL_SHARD")
    trainer = pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_steps=t.max_steps,
        val_check_interval=lightning_val_check_interval(t.val_check_interval, t.accumulate_grad_batches),
        check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps, gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches, enable_progress_bar=t.enable_progress_bar,
        logger=make_logger(c, run_dir), callbacks=[ckpt_cb, ThroughputMonitor(t.peak_flops), *recipe_cbs,
                                                       *progress_callbacks(t.enable_progress_bar)], plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=str(run_dir),
        enable_model_summary=False,
    )
    from txl.lit import NonFiniteLossError
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=c.ckpt_path, weights_only=False)
    except SignalStop:  # the checkpoint is written; no validation, no more steps
        pass
    except NonFiniteLossError as e:
        raise NonFiniteLossError(nonfinite_message(e, ckpt_cb, ckpt_dir)) from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    step = trainer.global_step
    test = {}
    if t.test_at_end and ckpt_cb.signal is None:
        test = run_test_at_end(trainer, module, dm, best_cb,
                               lambda m: print(f"txl-train: note: {m}", file=sys.stderr, flush=True))
    if c.logger.name == "wandb" and trainer.is_global_zero:  # flush now, so the summary stays the last line
        import wandb
        wandb.finish()
    sweep = None
    if ckpt_cb.signal is None and trainer.is_global_zero:  # metrics.final_sweep: ppl per eval_mem_len on test
        from txl.metrics.final_sweep import after_training
        sweep = after_training(c, module.model, dm.load(), run_dir)
    last = ckpt_dir / "last.ckpt"
    summary = {"step": step, "run_dir": str(run_dir), "last_ckpt": str(last) if last.is_file() else None,
               "val_step": module.last_eval_step.get("val"),  # every figure names its step
               **{k: round(v, 6) for k, v in metrics.items()
                  if k.split("/")[0] in ("val_loss", "val_ppl", "val_bpb", "val_bpc", "val_fraction")}}
    if best_cb.best_step is not None:
        summary.update(best_ckpt=str(best_cb.path), best_step=best_cb.best_step, best_val_loss=round(best_cb.best, 6))
    summary.update(test)
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
    import signal

    from txl.lit import NonFiniteLossError
    from txl.runtime import cpu_procs, quiet_third_party, setup_threads
    try:
        quiet_third_party()
        setup_threads(cfg.threads, procs=cpu_procs(cfg.trainer))
        run(cfg)
    except NonFiniteLossError as e:
        fail(error_line(e), code=EXIT_NONFINITE)
    except KeyboardInterrupt:  # before training started (afterwards SIGINT saves a checkpoint)
        fail("interrupted before training started; nothing was saved", code=128 + signal.SIGINT)
    except (ValueError, OSError) as e:  # bad input / config (2), a failed write (74): one line
        fail(error_line(e), code=exit_code(e))


def main() -> None:
    from txl.cli import precheck_run_dir, register_resolvers, set_tool
    set_tool("txl-train")
    register()
    register_resolvers()
    precheck_run_dir(sys.argv[1:], lock=True)
    hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
