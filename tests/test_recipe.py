"""The recipe around the model (issue 17, 13.7): schedules, eval-only settings, intervals in optimizer
steps, the final validation, best.ckpt, the end-of-training test, batch_chunk, clip_nonemb, console
lines. In-process Lightning runs of a tiny model on the small char corpus (a few seconds each)."""
from __future__ import annotations

import io
import json
import math
import re

import pytest
import torch

from txl.config import OptimNode, SeqNode
from txl.data import CorpusConfig, TXLDataModule
from txl.lit import TXLModule
from txl.model import TXLConfig
from txl.schedule import lr_multiplier


# ---- 17.4: the original schedule, step by step against the released mechanism ------------------
def _original_lrs(lr, warmup, max_step, eta_min, n_steps):
    """The lr each optimizer step runs with in the released train.py: Adam at lr, a
    CosineAnnealingLR(max_step, eta_min) stepped with the step count, the warm-up written into the
    param group after each step while train_step < warmup_step."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max_step, eta_min=eta_min)
    used, train_step = [], 0
    import warnings
    for _ in range(n_steps):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        train_step += 1
        if train_step < warmup:
            opt.param_groups[0]["lr"] = lr * train_step / warmup
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # step(epoch) is deprecated, still the closed form
                sched.step(train_step)
    return used


def _module_lrs(optim, max_steps, n_steps):
    cfg = TXLConfig(vocab_size=11, n_layer=1, d_model=8, n_head=1, d_head=8, d_inner=8, seq=dict(tgt_len=4, mem_len=4))
    m = TXLModule(cfg, optim, SeqNode(tgt_len=4, mem_len=4), max_steps)
    d = m.configure_optimizers()
    opt, sched = d["optimizer"], d["lr_scheduler"]["scheduler"]
    used = []
    for _ in range(n_steps):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()  # Lightning: interval "step", after every optimizer step
    return used


@pytest.mark.parametrize("warmup,eta_min", [(0, 0.0), (4, 0.0), (5, 1e-5)])
def test_original_schedule_equals_the_released_loop(warmup, eta_min):
    lr, total = 2.5e-4, 20
    want = _original_lrs(lr, warmup, total, eta_min, total)
    got = _module_lrs(OptimNode(lr=lr, warmup_steps=warmup, scheduler="original", eta_min=eta_min), total, total)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    assert got[0] == lr  # step 1 runs at the full lr, warm-up or not
    # the formula: k/W during warm-up, then eta_min + (lr - eta_min)(1 + cos(pi k / total)) / 2 over all steps
    for k in range(1, total):
        f = k / warmup if k < warmup else (eta_min + (lr - eta_min) * 0.5 * (1 + math.cos(math.pi * k / total))) / lr
        assert got[k] == pytest.approx(lr * f, rel=1e-12)


def test_cosine_differs_from_original_as_documented():
    # txl's cosine: step 1 at lr / W, the cosine over the steps after warm-up (reaching min at total)
    assert lr_multiplier(0, "cosine", 4, 20) == 0.25 and lr_multiplier(0, "original", 4, 20) == 1.0
    assert lr_multiplier(4, "cosine", 4, 20) == 1.0 and lr_multiplier(4, "original", 4, 20) < 1.0
    assert lr_multiplier(20, "cosine", 4, 20, min_lr_ratio=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="original"):
        OptimNode(scheduler="nope")


# ---- in-process runs -----------------------------------------------------------------------------
def _setup(corpus_files, tmp_path, seq=None, optim=None, batch=4, eval_batch=2, chunk=1, seed=0):
    import pytorch_lightning as pl
    pl.seed_everything(seed, verbose=False)
    tr, va, te = corpus_files
    corpus = CorpusConfig(source="text_files", train=tr, valid=va, test=te, tokenizer="char",
                          cache_dir=str(tmp_path / "cache"))
    seq = seq or SeqNode(tgt_len=8, mem_len=8)
    dm = TXLDataModule(corpus, batch_size=batch, tgt_len=seq.tgt_len, eval_tgt_len=seq.eval_tgt_len,
                       eval_batch_size=eval_batch)
    tok = dm.load().tokenizer
    cfg = TXLConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64,
                    dropout=0.0, seq=dict(tgt_len=seq.tgt_len, mem_len=seq.mem_len, clamp_len=seq.clamp_len,
                                          same_length=seq.same_length))
    module = TXLModule(cfg, optim or OptimNode(lr=3e-3), seq, max_steps=100, unit="char", batch_chunk=chunk)
    return dm, module


def _trainer(tmp_path, callbacks=(), max_steps=4, val_every=250, acc=1, limit_val=1.0, ckpt_every=0, **kw):
    import pytorch_lightning as pl

    from txl.callbacks import AtomicCheckpointIO, StepCheckpoint
    from txl.training import BestCheckpoint, FinalValidation, lightning_val_check_interval
    step_cb = StepCheckpoint(str(tmp_path / "checkpoints"), ckpt_every)
    best = BestCheckpoint(str(tmp_path / "checkpoints"))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps,
                         val_check_interval=lightning_val_check_interval(val_every, acc), check_val_every_n_epoch=None,
                         limit_val_batches=limit_val, accumulate_grad_batches=acc, gradient_clip_val=0.25,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                         plugins=[AtomicCheckpointIO()],
                         callbacks=[step_cb, FinalValidation(max_steps), best, *callbacks], **kw)
    return trainer, step_cb, best


def _recorder():
    import pytorch_lightning as pl

    class Rec(pl.Callback):
        def __init__(self):
            self.val_steps, self.val_losses, self.train_losses, self.saves = [], [], [], []

        def on_validation_end(self, trainer, pl_module):
            if trainer.state.fn == "fit":
                self.val_steps.append(trainer.global_step)
                self.val_losses.append(float(trainer.callback_metrics["val_loss"]))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.train_losses.append((trainer.global_step, float(trainer.callback_metrics["train_loss"])))

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            self.saves.append(trainer.global_step)
    return Rec()


def test_intervals_count_optimizer_steps_and_training_ends_with_validation(corpus_files, tmp_path):
    """17.5 + 13.7: with accumulate_grad_batches=2, validation every 2 optimizer steps (not 2 batches),
    step checkpoints once per optimizer step, and a last validation at max_steps (5, not a multiple)."""
    dm, module = _setup(corpus_files, tmp_path)
    rec = _recorder()
    trainer, step_cb, best = _trainer(tmp_path, [rec], max_steps=5, val_every=2, acc=2, limit_val=2, ckpt_every=2)
    trainer.fit(module, datamodule=dm)
    assert rec.val_steps == [2, 4, 5]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert {"step-000002.ckpt", "step-000004.ckpt", "step-000005.ckpt", "last.ckpt", "best.ckpt"} == set(names)
    # step 2: the step checkpoint once (not again on the next micro-batch) + best.ckpt (first validation)
    assert rec.saves.count(2) == 2
    # best.ckpt holds the weights of the lowest validation loss, and says which step that was
    i = min(range(3), key=lambda j: rec.val_losses[j])
    assert best.best_step == rec.val_steps[i] and best.best == pytest.approx(rec.val_losses[i])
    ck = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == best.best_step
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers


def test_short_run_validates_once_at_its_last_step(corpus_files, tmp_path):
    dm, module = _setup(corpus_files, tmp_path)
    rec = _recorder()
    trainer, _, _ = _trainer(tmp_path, [rec], max_steps=3, val_every=250, limit_val=1)
    trainer.fit(module, datamodule=dm)
    assert rec.val_steps == [3] and module.last_eval_step["val"] == 3


def test_eval_settings_apply_to_evaluation_only_and_fraction_is_logged(corpus_files, tmp_path):
    """17.1: eval_same_length / eval_clamp_len in validation, the training values in training;
    17.2: a capped validation logs val_fraction = scored / all tokens of the split; the whole split
    (the default) logs none."""
    seq = SeqNode(tgt_len=8, mem_len=8, eval_tgt_len=4, eval_clamp_len=3, eval_same_length=True)
    assert seq.eval_mem_len == 12  # 17.3: mem + tgt - eval_tgt
    dm, module = _setup(corpus_files, tmp_path, seq=seq)
    seen = {"train": set(), "eval": set()}

    class Probe:
        def reset(self):
            pass

        def update(self, model, batch, out, mems_in):
            s = model.seq
            seen["eval"].add((s.tgt_len, s.mem_len, s.clamp_len, s.same_length))

        def finish(self, module, prefix):
            pass
    module.val_hooks = [Probe()]
    orig = module.model.forward

    def fwd(*a, **k):
        if module.model.training:
            s = module.model.seq
            seen["train"].add((s.tgt_len, s.mem_len, s.clamp_len, s.same_length))
        return orig(*a, **k)
    module.model.forward = fwd
    trainer, _, _ = _trainer(tmp_path, max_steps=2, limit_val=3)
    trainer.fit(module, datamodule=dm)
    assert seen["train"] == {(8, 8, -1, False)} and seen["eval"] == {(4, 12, 3, True)}
    n_valid = len(dm.load().split("valid"))
    scored = 3 * 2 * 4  # 3 batches x eval batch 2 x eval_tgt_len 4
    full = 2 * ((n_valid - 1) // 2)
    assert float(trainer.callback_metrics["val_fraction"]) == pytest.approx(scored / full)
    trainer.validate(module, datamodule=dm, verbose=False)  # limit stays 3: still a fraction
    trainer2, _, _ = _trainer(tmp_path / "full", max_steps=1, limit_val=1.0)
    trainer2.fit(module, datamodule=dm)
    assert "val_fraction" not in trainer2.callback_metrics


def test_old_seq_objects_keep_their_training_values_in_eval(corpus_files, tmp_path):
    """A seq object without eval_clamp_len / eval_same_length (an old checkpoint's) still works."""
    from types import SimpleNamespace
    dm, module = _setup(corpus_files, tmp_path)
    module.seq = SimpleNamespace(eval_tgt_len=8, eval_mem_len=8)
    trainer, _, _ = _trainer(tmp_path, max_steps=1, limit_val=1)
    trainer.fit(module, datamodule=dm)
    assert math.isfinite(float(trainer.callback_metrics["val_loss"]))


def test_test_at_end_scores_the_whole_test_split_like_txl_eval(corpus_files, tmp_path):
    """17.6: the end-of-training test scores every token of the test split with the eval settings
    and the best checkpoint's weights; it equals txl-eval's loop on the same tokens."""
    from txl.checkpoint import load_model
    from txl.eval import evaluate_tokens
    from txl.training import run_test_at_end
    seq = SeqNode(tgt_len=8, mem_len=8, eval_tgt_len=4, eval_clamp_len=5, eval_same_length=True)
    dm, module = _setup(corpus_files, tmp_path, seq=seq, eval_batch=2)
    trainer, _, best = _trainer(tmp_path, max_steps=3, limit_val=2)
    trainer.limit_test_batches = 2  # run_test_at_end ignores a cap: the whole split
    trainer.fit(module, datamodule=dm)
    notes = []
    res = run_test_at_end(trainer, module, dm, best, notes.append)
    assert not notes and res["test_weights"] == "best.ckpt" and res["test_weights_step"] == best.best_step
    model, _, _ = load_model(tmp_path / "checkpoints" / "best.ckpt")
    model.set_lengths(clamp_len=5, same_length=True)
    ref = evaluate_tokens(model, dm.load().split("test"), tgt_len=4, mem_len=12, batch_size=2)
    assert res["test_loss"] == pytest.approx(ref["loss"], abs=1e-6)
    assert module.last_eval_step["test"] >= 0


def test_batch_chunk_equals_the_unchunked_step(corpus_files, tmp_path):
    """17.7: data.batch_chunk=2 gives the same parameters after 3 optimizer steps (memories carried,
    grads accumulated, here also over accumulate_grad_batches=2) as the whole batch, within 1e-6."""
    params = []
    for chunk in (1, 2):
        dm, module = _setup(corpus_files, tmp_path / f"c{chunk}", batch=4, chunk=chunk, seed=3)
        trainer, _, _ = _trainer(tmp_path / f"c{chunk}", max_steps=3, limit_val=1, acc=2)
        trainer.fit(module, datamodule=dm)
        params.append({k: v.detach().clone() for k, v in module.model.state_dict().items()})
        if chunk == 2:
            assert module.train_mems[0].shape[0] == 4
    for k in params[0]:
        torch.testing.assert_close(params[1][k], params[0][k], atol=1e-6, rtol=0, msg=k)
    # and the gradient of one step, directly
    dm, module = _setup(corpus_files, tmp_path / "g", batch=4, chunk=2, seed=4)
    b = next(iter(dm._train()))
    module.train_mems = [torch.randn_like(m) for m in module.model.init_mems(4)]
    mems0 = [m.clone() for m in module.train_mems]
    out = module.model(b["input_ids"], mems=mems0, labels=b["labels"])
    out.loss.backward()
    g_full = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    module.model.zero_grad()
    last, mean, mems = module._chunked_loss(b["input_ids"], b["labels"])
    last.backward()
    for n, p in module.model.named_parameters():
        if n in g_full:
            torch.testing.assert_close(p.grad, g_full[n], atol=1e-6, rtol=0, msg=n)
    assert float(mean) == pytest.approx(float(out.loss.detach()), abs=1e-6)
    for a, b_ in zip(mems, out.mems):
        torch.testing.assert_close(a, b_, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="batch_chunk"):
        from txl.config import DataNode
        DataNode(batch_size=4, batch_chunk=3)


def test_clip_nonemb_clips_the_blocks_only(corpus_files, tmp_path):
    dm, module = _setup(corpus_files, tmp_path, optim=OptimNode(lr=1e-3, clip_nonemb=True))
    for p in module.model.parameters():
        p.grad = torch.full_like(p, 10.0)
    module.configure_gradient_clipping(None, gradient_clip_val=0.25)
    norm = torch.norm(torch.stack([p.grad.norm() for p in module.model.blocks.parameters()]))
    assert float(norm) == pytest.approx(0.25, rel=1e-5)
    assert all(torch.all(p.grad == 10.0) for p in module.model.embed.parameters())


def test_console_lines_every_n_steps(corpus_files, tmp_path):
    """17.8: with the progress bar off, one line every log_every_n_steps optimizer steps with the
    interval's mean loss, and #params at start; a line per validation names its step."""
    from txl.training import ConsoleLog
    dm, module = _setup(corpus_files, tmp_path)
    rec, buf = _recorder(), io.StringIO()
    console = ConsoleLog(every=2, progress_bar=False, file=buf)
    trainer, _, _ = _trainer(tmp_path, [rec, console], max_steps=4, acc=2, limit_val=1)
    trainer.fit(module, datamodule=dm)
    lines = buf.getvalue().splitlines()
    n_all, n_nonemb = module.count_params()
    assert lines[0] == f"#params = {n_all:,} (#non-embedding params = {n_nonemb:,})"
    steps = [ln for ln in lines if ln.startswith("| step")]
    assert [int(re.search(r"step\s+(\d+)", ln).group(1)) for ln in steps] == [2, 4]
    # micro-batch losses of optimizer steps 1-2 (4 batches with accumulation 2)
    first = [loss for _, loss in rec.train_losses[:4]]
    got = float(re.search(r"loss\s+([\d.]+)", steps[0]).group(1))
    assert got == pytest.approx(sum(first) / 4, abs=1e-4)
    assert re.search(r"bpc\s+([\d.]+)", steps[0]) and "ms/step" in steps[0] and "lr " in steps[0]
    assert any(ln.startswith("| val at step 4 |") for ln in lines)
    quiet = io.StringIO()
    ConsoleLog(every=2, progress_bar=True, file=quiet)  # with the bar on, no step lines
    dm, module = _setup(corpus_files, tmp_path / "q")
    trainer, _, _ = _trainer(tmp_path / "q", [ConsoleLog(every=1, progress_bar=True, file=quiet)], max_steps=2)
    trainer.fit(module, datamodule=dm)
    assert not [ln for ln in quiet.getvalue().splitlines() if ln.startswith("| step")]


@pytest.mark.slow
def test_cli_summary_names_every_step(corpus_files, tmp_path, run_cli):
    """13.7 + 17.6 + 17.8 through txl-train: max_steps below the interval still ends with a
    validation; the summary names the step of every figure; the console lines are there."""
    from conftest import tiny_train_args
    r = run_cli("train", *tiny_train_args(corpus_files, tmp_path, "trainer.max_steps=6", "trainer.val_check_interval=250",
                                         "trainer.log_every_n_steps=3", "trainer.limit_val_batches=1.0",
                                         "seq.eval_clamp_len=5", "seq.eval_same_length=true"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.strip().splitlines()
    s = json.loads(out[-1])
    assert s["step"] == 6 and s["val_step"] == 6 and math.isfinite(s["val_loss"]) and "val_fraction" not in s
    assert s["best_step"] == 6 and s["test_weights_step"] == 6 and math.isfinite(s["test_loss"])
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
    assert any(ln.startswith("#params = ") for ln in out) and sum(ln.startswith("| step") for ln in out) == 2
    # txl-eval takes the run's eval settings; a checkpoint from before them falls back to the model's
    ck_path = tmp_path / "checkpoints" / "last.ckpt"
    e = run_cli("eval", f"ckpt_path={ck_path}", "eval.batch_size=2", f"hydra.run.dir={tmp_path / 'e1'}")
    assert e.returncode == 0, e.stderr[-3000:]
    res = json.loads(e.stdout.strip().splitlines()[-1])
    assert (res["clamp_len"], res["same_length"], res["mem_len"]) == (5, True, 16)
    assert res["loss"] == pytest.approx(s["test_loss"], abs=1e-5)  # = the end-of-training test (2 streams, same weights)
    ck = torch.load(ck_path, map_location="cpu", weights_only=False)
    for k in ("eval_clamp_len", "eval_same_length"):
        del ck["txl"]["seq"][k]
    old = tmp_path / "old.ckpt"
    torch.save(ck, old)
    e = run_cli("eval", f"ckpt_path={old}", f"hydra.run.dir={tmp_path / 'e2'}")
    assert e.returncode == 0, e.stderr[-3000:]
    res = json.loads(e.stdout.strip().splitlines()[-1])
    assert (res["clamp_len"], res["same_length"]) == (-1, False)
