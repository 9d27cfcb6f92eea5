"""Compressive memory (Rae et al. 2019): txl/model/compressive.py, memory.CompressiveMemory."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from txl.model import CompressiveMemory, Memory, TransformerXL, TXLConfig
from txl.model.attention import RelativeTerm
from txl.model.compressive import CompressedRelativeTerm, mean_pool, slot_distances
from txl.model.positions import sinusoid

T, M, C = 4, 6, 5


def _cfg(mem_len, rate=3, fn="mean", cmem=C, **kw):
    memory = dict(kind="compressive", cmem_len=cmem, compression_rate=rate, compression_fn=fn)
    return TXLConfig(seq=dict(tgt_len=T, mem_len=mem_len), memory=memory, **kw)


def _segments(model, x, mems=None, hook=None):
    outs = []
    for s in range(0, x.size(1), T):
        o = model(x[:, s:s + T], mems=mems, labels=x[:, s:s + T])
        mems = o.mems
        outs.append(o)
    return outs


@pytest.mark.parametrize("fn,backend", [("mean", "rel_ref"), ("max", "rel_fused"), ("conv", "rel_ref")])
def test_rate_one_identity_equals_txl_with_longer_memory(fn, backend):
    # c = 1: mean / max pool and the conv (initialised to the mean-pool) are the identity, so
    # [compressed; memory] is the last cmem_len + mem_len rows: a plain memory of that length.
    torch.manual_seed(0)
    attn = dict(backend=backend)
    ref = TransformerXL(TXLConfig(seq=dict(tgt_len=T, mem_len=M + C), attn=attn))
    cm = TransformerXL(_cfg(M, rate=1, fn=fn, attn=attn))
    missing = cm.load_state_dict(ref.state_dict(), strict=False).missing_keys
    assert all(k.startswith("compressor.") for k in missing)
    x = torch.randint(0, 256, (2, 11 * T))
    for a, b in zip(_segments(ref, x), _segments(cm, x)):
        torch.testing.assert_close(b.nll, a.nll)
        for ma, mb in zip(a.mems, b.mems):
            torch.testing.assert_close(mb, ma)
    assert b.mems.n_cmem == C


def _layer_inputs(model):
    """Forward pre-hooks recording every block's input per call: rec[layer] = [(B, T, D), ...]."""
    rec = [[] for _ in model.blocks]
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda mod, args, i=i: rec[i].append(args[0].detach().clone()))
    return rec


@pytest.mark.parametrize("rate", [2, 3])
def test_compressed_state_matches_hand_built(rate):
    # After each segment: memory rows = the last mem_len (+ the < c evicted rows not yet filling a
    # span) of every layer input so far; slots = the mean of each evicted span, the last cmem_len.
    torch.manual_seed(1)
    model = TransformerXL(_cfg(M, rate=rate, fn="mean", cmem=3))
    rec = _layer_inputs(model)
    x = torch.randint(0, 256, (2, 9 * T))
    for n, o in enumerate(_segments(model, x), start=1):
        for i in range(len(model.blocks)):
            hist = torch.cat(rec[i][:n], dim=1)  # (B, n*T, D): every input this layer has seen
            n_out = max(0, hist.size(1) - M) // rate * rate
            slots = mean_pool(hist[:, :n_out], rate)[:, -3:]
            cm, mem = o.mems.split(i)
            torch.testing.assert_close(mem, hist[:, n_out:])
            torch.testing.assert_close(cm, slots)
        assert o.mems.n_cmem == min(3, n_out // rate)


@pytest.mark.parametrize("rate", [2, 3])
def test_slot_positions_are_span_centres(rate):
    # The term's slot columns equal (q + v) . W_R R(d) at the explicit distance of the slot's centre.
    torch.manual_seed(2)
    B, N, H, D, Mp, Cs = 2, 2, 8, 16, 5, 4
    q_pos = torch.randn(B, N, T, H)
    w_r = torch.randn(N * H, D)
    r_main = (sinusoid(torch.arange(Mp + T - 1, -1, -1.0), D) @ w_r.t()).view(-1, N, H).transpose(0, 1)
    base, E, index = slot_distances(T, Mp, Cs, rate)
    rc = (sinusoid(base + torch.arange(E, dtype=torch.float64), D) @ w_r.t()).view(-1, N, H).transpose(0, 1)
    term = CompressedRelativeTerm(RelativeTerm(q_pos, r_main), q_pos, rc, index)
    dense = term.dense()
    assert dense.shape == (B, N, T, Cs + Mp + T)
    for i in range(T):
        for s in range(Cs):
            # slot s spans window positions -(Cs - s) * c .. -(Cs - s) * c + c - 1 before memory row 0
            span = torch.arange(-(Cs - s) * rate, -(Cs - s) * rate + rate, dtype=torch.float64)
            d = (Mp + i) - span.mean()
            want = q_pos[:, :, i] @ (sinusoid(d.view(1), D) @ w_r.t()).view(N, H).t().unsqueeze(0)
            torch.testing.assert_close(dense[:, :, i, s], want.diagonal(dim1=-2, dim2=-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dense[..., Cs:], RelativeTerm(q_pos, r_main).dense())
    torch.testing.assert_close(term.scaled_dense(0.5), dense * 0.5)


def test_gradients_never_reach_either_memory():
    torch.manual_seed(3)
    model = TransformerXL(_cfg(M, rate=2, fn="conv", cmem=3))
    x = torch.randint(0, 256, (2, 6 * T))
    mems = _segments(model, x[:, :-T])[-1].mems
    assert mems.n_cmem == 3
    leaves = [m.clone().requires_grad_(True) for m in mems]
    out = model(x[:, -T:], mems=CompressiveMemory(leaves, mems.n_cmem), labels=x[:, -T:])
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    assert all(not m.requires_grad and m.grad_fn is None for m in out.mems)
    out.loss.backward(retain_graph=True)
    assert all(leaf.grad is None for leaf in leaves)
    assert model.compressor.conv_w.grad is None  # the language-model loss never reaches the compression
    model.zero_grad(set_to_none=True)
    out.aux_loss.backward()  # the reconstruction loss reaches only the compression
    assert all(leaf.grad is None for leaf in leaves)
    assert model.compressor.conv_w.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("compressor."))
    # before the first eviction: a zero loss that still reaches every compression weight (DDP)
    model.zero_grad(set_to_none=True)
    first = model(x[:, :T], labels=x[:, :T])
    assert first.mems.n_cmem == 0 and first.aux_loss.item() == 0.0
    first.aux_loss.backward()
    assert model.compressor.conv_w.grad is not None and model.compressor.conv_w.grad.abs().sum() == 0


def test_reconstruction_loss_decreases_on_a_toy():
    torch.manual_seed(4)
    model = TransformerXL(_cfg(M, rate=3, fn="conv", cmem=4, init_std=0.3))
    x = torch.randint(0, 256, (2, 5 * T))
    mems = _segments(model, x[:, :-T])[-1].mems
    opt = torch.optim.Adam(model.compressor.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        out = model(x[:, -T:], mems=mems, labels=x[:, -T:])
        opt.zero_grad()
        out.aux_loss.backward()
        opt.step()
        losses.append(out.recon_loss.item())
    # starts at the mean-pool (the conv's initialisation); 3 rows -> 1 slot cannot reach 0
    assert losses[-1] < 0.9 * losses[0] and losses[-1] < min(losses[:10]), losses[::10]


def test_memory_state_dict_round_trip_and_checkpoint_keeps_slots():
    from txl.lit import TXLModule
    torch.manual_seed(5)
    cfg = _cfg(M, rate=2, fn="mean", cmem=3)
    model = TransformerXL(cfg)
    mems = _segments(model, torch.randint(0, 256, (2, 6 * T)))[-1].mems
    back = Memory.from_state_dict(mems.state_dict())
    assert isinstance(back, CompressiveMemory) and back.n_cmem == mems.n_cmem == 3
    # the Lightning module's checkpoint carries the slot count: a resumed run places them again
    seq = SimpleNamespace(eval_tgt_len=T, eval_mem_len=M)
    a, b = TXLModule(cfg, None, seq, 10), TXLModule(cfg, None, seq, 10)
    stub = SimpleNamespace(world_size=1, global_rank=0, datamodule=None)
    a._trainer = b._trainer = stub
    a.train_mems = mems
    ck = {}
    a.on_save_checkpoint(ck)
    b.on_load_checkpoint(ck)
    assert isinstance(b.train_mems, CompressiveMemory) and b.train_mems.n_cmem == 3
    y = torch.randint(0, 256, (2, T))
    torch.testing.assert_close(model(y, mems=b.train_mems).hidden, model(y, mems=mems).hidden)


def test_config_refusals():
    with pytest.raises(ValueError, match="cmem_len >= 1"):
        TXLConfig(memory="compressive")
    with pytest.raises(ValueError, match="compression_fn must be one of"):
        TXLConfig(memory=dict(kind="compressive", cmem_len=4, compression_fn="avg"))
    with pytest.raises(ValueError, match="needs kind='relative'"):
        TXLConfig(kind="rotary", memory=dict(kind="compressive", cmem_len=4))
    model = TransformerXL(_cfg(M))
    assert isinstance(model.init_mems(2, projected=True), CompressiveMemory)  # no key / value form
    with pytest.raises(ValueError, match="eval.mems=hidden"):
        model.project_mems(model.init_mems(2))
    with pytest.raises(ValueError, match="eval.mems=hidden"):
        model.project_mems([torch.zeros(2, 3, 32)] * 2)
    kv = TransformerXL(TXLConfig(seq=dict(tgt_len=T, mem_len=M))).init_mems(2, projected=True)
    with torch.no_grad(), pytest.raises(ValueError, match="eval.mems=hidden"):
        model(torch.zeros(2, T, dtype=torch.long), mems=kv)


@pytest.mark.slow
def test_train_end_to_end_with_compressive_memory_and_exact_resume(tmp_path, corpus_files, run_cli):
    from conftest import read_losses, tiny_train_args
    args = ("memory=compressive", "model.memory.cmem_len=8", "seq.mem_len=8", "model.dropout=0.1",
            "trainer.max_steps=12", "trainer.val_check_interval=12", "checkpoint.every_n_steps=6")
    d, e = tmp_path / "run", tmp_path / "resumed"
    r = run_cli("train", *tiny_train_args(corpus_files, d, *args))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["step"] == 12 and summary["val_loss"] > 0
    import csv
    with open(d / "metrics.csv") as f:
        recon = [float(row["train_recon"]) for row in csv.DictReader(f) if row.get("train_recon")]
    assert recon and all(v >= 0 for v in recon) and max(recon) > 0
    att = [json.loads(line) for line in (d / "metrics" / "val.jsonl").read_text().splitlines()][-1]["attention"]
    assert len(att["layer_compressed_mass"]) == 2 and all(0 < m < 1 for m in att["layer_compressed_mass"])
    ck = torch.load(d / "checkpoints" / "step-000006.ckpt", map_location="cpu", weights_only=False)
    assert ck["txl"]["mems_n_cmem"] > 0 and ck["txl"]["model_config"]["memory"]["kind"] == "compressive"
    # resumed from step 6 (compressed slots in the checkpoint): the same losses, bit for bit
    r2 = run_cli("train", *tiny_train_args(corpus_files, e, *args, f"ckpt_path={d / 'checkpoints' / 'step-000006.ckpt'}"))
    assert r2.returncode == 0, r2.stderr[-3000:]
    full, resumed = read_losses(d), read_losses(e)
    assert sorted(resumed) == list(range(6, 12)) and all(resumed[k] == full[k] for k in resumed)
