"""txl/budget.py: the vocabulary decides cutoffs; parameters and memory are known before the model exists."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import error_lines
from txl.budget import (AUTO_MIN_VOCAB, GiB, auto_cutoffs, count_params, estimate_memory, fit_model, memory_limit,
                        parse_size, resolve_model, vocab_params)
from txl.model import TransformerXL, TXLConfig

V = 300
CONFIGS = [
    dict(), dict(cutoffs=[50, 150]), dict(cutoffs=[50, 150], div_val=2), dict(cutoffs=[50, 150], d_embed=16),
    dict(cutoffs=[50, 150], d_embed=48, div_val=1, tie_projs=[True, False, True]),
    dict(cutoffs=[50, 150], div_val=2, tie_weight=False, tie_projs=[False, False, False]),
    dict(cutoffs=[50], div_val=4, d_embed=64, tie_projs=[True, True]), dict(d_embed=24), dict(d_embed=24, tie_weight=False),
    dict(untie_r=False), dict(kind="absolute"), dict(kind="rotary"), dict(kind="alibi", cutoffs=[100]),
    dict(attn=dict(score="additive")), dict(n_layer=3, d_inner=48, pre_lnorm=True),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=[str(k) for k in CONFIGS])
def test_param_count_equals_the_real_models(kw):
    cfg = TXLConfig(vocab_size=V, **kw)
    model = TransformerXL(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())  # shared tensors once
    own = {id(p): p for n, p in model.named_parameters() if n.startswith(("embed.", "head."))}
    assert vocab_params(cfg) == sum(p.numel() for p in own.values())


def test_auto_cutoffs_are_the_papers_scaled():
    assert auto_cutoffs(267_735) == [20000, 40000, 200000]
    c = auto_cutoffs(33_278)  # WikiText-2's full vocabulary: the same shares of it
    assert c == [round(a * 33_278 / 267_735) for a in (20000, 40000, 200000)] and c[-1] < 33_278


def _unresolved(**kw):
    return TXLConfig(vocab_size=None, cutoffs=None, **kw)


def test_resolve_model_chooses_and_checks_cutoffs():
    big = AUTO_MIN_VOCAB + 5000
    cfg, note = resolve_model(_unresolved(div_val=2), big, "word")  # word-level, none given: scaled
    assert cfg.vocab_size == big and cfg.cutoffs == auto_cutoffs(big) and cfg.tie_projs == [False, True, True, True]
    assert "model.cutoffs=" in note and "267,735" in note
    TransformerXL(cfg)
    for v, kind in ((AUTO_MIN_VOCAB, "word"), (big, "char"), (256, "byte"), (50_257, "hf")):  # small or not ranked
        assert resolve_model(_unresolved(), v, kind) == (replace(TXLConfig(), vocab_size=v, cutoffs=[]), None)
    given = replace(_unresolved(), cutoffs=[2000, 6000])
    assert resolve_model(given, big, "word")[0].cutoffs == [2000, 6000]  # given ones are kept ...
    assert resolve_model(replace(_unresolved(), cutoffs=[]), big, "word")[0].cutoffs == []  # ... [] too
    with pytest.raises(ValueError) as e:  # ... and checked against the data's vocabulary: both numbers
        resolve_model(given, 256, "byte")
    msg = str(e.value)
    assert "\n" not in msg and "[2000, 6000]" in msg and "256" in msg and "byte" in msg


def test_cutoffs_compose_for_every_size_before_the_vocabulary_is_known():
    # issue 13.1: the preset's byte vocabulary (256) no longer rejects word-level cutoffs at compose time
    from test_configs import _compose

    from txl.config import to_objects
    for size in ("tiny", "small", "base", "large"):
        c = to_objects(_compose(overrides=[f"model={size}", "model.cutoffs=[2000,6000]"]))
        assert c.model.cutoffs == [2000, 6000] and c.model.vocab_size is None
    c = to_objects(_compose(overrides=["model=small"]))
    assert c.model.cutoffs is None  # not given: chosen from the vocabulary at run time


def test_size_presets_carry_their_learning_rates():
    from test_configs import _compose

    from txl.config import to_objects
    small = to_objects(_compose(overrides=["model=small"])).optim  # train.yaml's numbers (tuned for small)
    lrs = {s: to_objects(_compose(overrides=[f"model={s}"])).optim for s in ("tiny", "base", "large")}
    assert lrs["tiny"].lr > small.lr and lrs["tiny"].warmup_steps > 0
    assert lrs["large"].warmup_steps > 0
    o = to_objects(_compose(overrides=["model=tiny", "optim.lr=0.0123"])).optim  # the user's value wins
    assert o.lr == 0.0123 and o.warmup_steps == lrs["tiny"].warmup_steps
    o = to_objects(_compose(overrides=["experiment=wt103_large"])).optim  # so do the released settings
    assert (o.lr, o.warmup_steps) == (2.5e-4, 16000)


def _saved_bytes(model, ids, labels) -> int:
    """Bytes of the tensors autograd keeps for backward (each storage once)."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=labels).loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


@pytest.mark.parametrize("kw", [dict(vocab_size=20_000), dict(vocab_size=20_000, cutoffs=[1500, 3000, 15000]),
                                dict(vocab_size=256, n_layer=3, d_model=64, n_head=4, d_inner=128)])
def test_activation_estimate_covers_what_backward_keeps(kw):
    torch.manual_seed(0)
    B, T = 4, 32
    cfg = TXLConfig(seq=dict(tgt_len=T, mem_len=0), **kw)
    zipf = 1.0 / torch.arange(1, cfg.vocab_size + 1, dtype=torch.float64)
    ids = torch.multinomial(zipf, B * (T + 1), replacement=True).view(B, T + 1)
    saved = _saved_bytes(TransformerXL(cfg), ids[:, :-1], ids[:, 1:])
    e = estimate_memory(cfg, B, T, 0)
    # never below what backward keeps; above it by the backward transients (logit gradients, the
    # dense embedding gradient), not wildly: measured 4.2x full softmax, 7.2x adaptive, 2.7x layers
    assert saved <= e.softmax + e.layers <= 8 * saved, (saved, e)
    assert e.state == 16 * count_params(cfg)


def test_memory_grows_with_the_vocabulary_and_cutoffs_cut_it():
    full = estimate_memory(TXLConfig(vocab_size=2_216_522), 16, 64, 64)
    adaptive = estimate_memory(TXLConfig(vocab_size=2_216_522, cutoffs=auto_cutoffs(2_216_522)), 16, 64, 64)
    assert full.softmax > 16 * GiB and adaptive.softmax < full.softmax / 3  # issue 16's corpus, model=tiny


def test_parse_size_and_limit():
    assert parse_size(None) is None and parse_size("off") == 0 and parse_size(1234) == 1234
    assert parse_size("16GB") == 16 * 10 ** 9 and parse_size("1.5GiB") == 3 << 29 and parse_size("512 MiB") == 512 << 20
    for bad in ("lots", "-1GB", "0", "12XB"):
        with pytest.raises(ValueError, match="trainer.memory_limit"):
            parse_size(bad)
    assert memory_limit("2GiB", "cpu") == (2 << 30, "trainer.memory_limit")
    ram = Path("/proc/meminfo")
    limit, where = memory_limit(None, "cpu")
    assert limit > 0 and where in ("cgroup memory limit", "physical RAM")
    if ram.exists():
        total_kb = int(ram.read_text().split("MemTotal:")[1].split()[0])
        assert limit <= total_kb * 1024


def _c(model, limit, batch=16, devices=1):
    return SimpleNamespace(model=model, data=SimpleNamespace(batch_size=batch), seq=SimpleNamespace(tgt_len=64, mem_len=64),
                           trainer=SimpleNamespace(devices=devices, num_nodes=1, accelerator="cpu", memory_limit=limit))


def test_fit_model_refuses_in_one_line_with_remedies():
    m = replace(_unresolved(), cutoffs=[])
    with pytest.raises(ValueError) as e:
        fit_model(_c(m, "1GB"), 200_000, "word")
    msg = str(e.value)
    assert "\n" not in msg and "200,000 types" in msg and "0.93 GiB (trainer.memory_limit)" in msg
    for fix in ("data.max_size=", "data.min_freq", "model.cutoffs="):
        assert fix in msg
    n = int(msg.split("data.max_size=")[1].split(",")[0])  # the suggested size fits, one more type does not
    assert fit_model(_c(m, "1GB"), n, "word").vocab_size == n
    with pytest.raises(ValueError):
        fit_model(_c(m, "1GB"), n + 1, "word")
    assert fit_model(_c(m, "off"), 200_000, "word").vocab_size == 200_000  # 'off': no check
    with pytest.raises(ValueError, match="2 processes|the limit"):  # two CPU processes share one machine's RAM
        fit_model(_c(m, estimate_memory(replace(m, vocab_size=n, cutoffs=[]), 8, 64, 64).total * 1.5, devices=2),
                  n, "word")


@pytest.mark.slow
def test_a_vocabulary_too_big_for_the_memory_is_refused(tmp_path, run_cli):
    # 60k distinct words: over the auto-cutoff threshold, refused under a 64 MB limit before any model exists
    words = [f"w{i}" for i in range(60_000)]
    train = tmp_path / "train.txt"
    train.write_text("\n".join(" ".join(words[i:i + 20]) for i in range(0, len(words), 20)) + "\n")
    valid = tmp_path / "valid.txt"
    valid.write_text(" ".join(words[:400]) + "\n")
    run = tmp_path / "run"
    r = run_cli("train", "model=tiny", "logger=none", "data=text_files", f"data.train={train}", f"data.valid={valid}",
                f"data.test={valid}", "data.tokenizer=word", "data.use_cache=false", "trainer.memory_limit=64MB",
                f"hydra.run.dir={run}")
    assert r.returncode != 0
    err, log = error_lines(r.stderr), r.stdout + r.stderr  # our log lines go to stderr
    assert len(err) == 1 and err[0].startswith("txl-train: error: the model does not fit in memory"), r.stderr[-2000:]
    assert "60,002 types" in err[0] and "(trainer.memory_limit)" in err[0] and "data.max_size=" in err[0]
    assert "vocabulary 60,002 types (word tokenizer)" in log  # logged at start, one line each
    assert f"model.cutoffs={auto_cutoffs(60_002)}" in log and " parameters " in log
    assert not any((run / "checkpoints").rglob("*")) and not list(run.rglob("*.ckpt"))  # nothing written


def test_on_gpu_the_limit_is_the_gpus_memory_per_process(monkeypatch):
    m = replace(_unresolved(), cutoffs=[])
    one = estimate_memory(replace(m, vocab_size=100_000), 8, 64, 64).total  # global batch 16 over 2 processes
    gpu = int(1.5 * one)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (1 << 20, gpu))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    assert memory_limit(None, "gpu") == memory_limit(None, "auto") == (gpu, "memory of Fake GPU")
    c = _c(m, None, devices=2)
    c.trainer.accelerator = "gpu"
    assert fit_model(c, 100_000, "word").vocab_size == 100_000  # each process on its own GPU: one share each
    c.data.batch_size = 64  # 32 streams per process: the logits alone outgrow it
    with pytest.raises(ValueError, match=r"\(memory of Fake GPU\)"):
        fit_model(c, 100_000, "word")
