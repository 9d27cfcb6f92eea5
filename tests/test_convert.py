"""txl.convert: Hugging Face TransfoXL and original kimiyoung checkpoints -> txl.

Parity: a random TransfoXLLMHeadModel (transformers 4.37.2, the `peer` extra) saved with
save_pretrained must give the same per-token NLL, full-vocabulary log-probs and memories as the
converted txl model over consecutive segments. The rest runs without transformers: HF-layout and
original-layout checkpoints are written here from txl models by an explicit name table.
"""
from __future__ import annotations

import builtins
import json
import pickle
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from txl.checkpoint import load_model
from txl.convert import from_hf, from_original, hf_tokenizer_state, main
from txl.model import TransformerXL, TXLConfig

V, CUT = 300, [50, 150]


def _hf():
    return pytest.importorskip("transformers", reason="HF parity needs transformers: install the peer extra: "
                                                      "pip install -e .[peer]")


# ---- HF models and a hand-written HF-layout writer ------------------------------------------------
def _hf_model(seed=0, **kw):
    tr = _hf()
    base = dict(vocab_size=V, cutoffs=CUT, div_val=2, d_model=32, d_embed=32, n_head=2, d_head=16, d_inner=64,
                n_layer=2, mem_len=12, tgt_len=8, clamp_len=6, same_length=True, untie_r=True, dropout=0.0)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tr.TransfoXLLMHeadModel(tr.TransfoXLConfig(**{**base, **kw})).eval()
    with torch.no_grad():  # well away from HF's init (zero biases, unit LN) so any mix-up shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _txl_model(seed=0, **kw):
    base = dict(vocab_size=V, cutoffs=CUT, div_val=2, d_model=32, d_embed=32, n_head=2, d_head=16, d_inner=64,
                n_layer=2, mem_init="zeros", init_std=0.1, seq=dict(tgt_len=8, mem_len=12, clamp_len=6, same_length=True))
    torch.manual_seed(seed)
    model = TransformerXL(TXLConfig(**{**base, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _ref_names(model: TransformerXL, prefix: str) -> dict:
    """Reference name -> txl tensor, spelled out per module (independent of convert.py's regexes)."""
    cfg, out, t = model.cfg, {}, prefix
    for i, layer in enumerate(model.embed.layers):
        out[f"{t}word_emb.emb_layers.{i}.weight"] = layer.weight
    for i, p in enumerate(model.embed.projs):
        out[f"{t}word_emb.emb_projs.{i}"] = p
    for i, b in enumerate(model.blocks):
        a, f = f"{t}layers.{i}.dec_attn.", f"{t}layers.{i}.pos_ff."
        out.update({a + "qkv_net.weight": b.attn.qkv.weight, a + "o_net.weight": b.attn.out.weight,
                    a + "r_net.weight": b.attn.r_proj.weight, a + "layer_norm.weight": b.attn.ln.weight,
                    a + "layer_norm.bias": b.attn.ln.bias, f + "CoreNet.0.weight": b.ff.fc1.weight,
                    f + "CoreNet.0.bias": b.ff.fc1.bias, f + "CoreNet.3.weight": b.ff.fc2.weight,
                    f + "CoreNet.3.bias": b.ff.fc2.bias, f + "layer_norm.weight": b.ff.ln.weight,
                    f + "layer_norm.bias": b.ff.ln.bias})
        u, v = (b.attn.u, b.attn.v) if cfg.untie_r else (model.u, model.v)
        out[a + "r_w_bias"], out[a + "r_r_bias"] = u, v  # shared ones appear per layer too (torch.save)
    if not cfg.untie_r:
        out[f"{t}r_w_bias"], out[f"{t}r_r_bias"] = model.u, model.v
    out[f"{t}pos_emb.inv_freq"] = 1 / (10000 ** (torch.arange(0.0, cfg.d_model, 2.0) / cfg.d_model))
    if cfg.cutoffs:
        out["crit.cluster_weight"], out["crit.cluster_bias"] = model.head.cluster_weight, model.head.cluster_bias
    for i, layer in enumerate(model.head.layers):
        out[f"crit.out_layers.{i}.weight"], out[f"crit.out_layers.{i}.bias"] = layer.weight, layer.bias
    for i, p in enumerate(model.head.projs):
        out[f"crit.out_projs.{i}"] = p
    return {k: v.detach().clone() for k, v in out.items()}


def _write_hf_dir(model: TransformerXL, d, fmt="safetensors", **cfg_over):
    """What save_pretrained writes: config.json + weights (safetensors drops tied / shared copies)."""
    cfg = model.cfg
    sd = _ref_names(model, "transformer.")
    if fmt == "safetensors":
        drop = [k for k in sd if k.startswith("crit.out_layers") and k.endswith("weight") and cfg.tie_weight]
        drop += [f"crit.out_projs.{i}" for i, tie in enumerate(cfg.tie_projs) if tie and len(model.head.projs)]
        drop += [k for k in sd if k.endswith(("dec_attn.r_w_bias", "dec_attn.r_r_bias")) and not cfg.untie_r]
        for k in drop:
            sd.pop(k, None)
    d.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(sd, d / "pytorch_model.bin")
    hf_cfg = dict(vocab_size=cfg.vocab_size, cutoffs=cfg.cutoffs, d_model=cfg.d_model, d_embed=cfg.d_embed,
                  n_head=cfg.n_head, d_head=cfg.d_head, d_inner=cfg.d_inner, div_val=cfg.div_val,
                  pre_lnorm=cfg.pre_lnorm, n_layer=cfg.n_layer, mem_len=cfg.seq.mem_len, clamp_len=cfg.seq.clamp_len,
                  same_length=cfg.seq.same_length, attn_type=0, sample_softmax=-1, dropout=0.0, dropatt=0.0,
                  untie_r=cfg.untie_r, tie_projs=cfg.tie_projs, tie_word_embeddings=cfg.tie_weight, tgt_len=8,
                  init_std=cfg.init_std, proj_init_std=cfg.proj_init_std,
                  layer_norm_epsilon=1e-5, model_type="transfo-xl", architectures=["TransfoXLLMHeadModel"])
    (d / "config.json").write_text(json.dumps({**hf_cfg, **cfg_over}))
    return d


def _stream(B, n_seg, T, seed=0):
    """Token stream whose every segment hits every cluster at least twice (HF's squeeze() of a
    single index turns it into a scalar)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        s = torch.randint(0, V, (B, n_seg * T + 1), generator=g)
        ok = all(((seg >= lo) & (seg < hi)).sum() >= 2 for i in range(n_seg)
                 for seg in (s[:, i * T:(i + 1) * T], s[:, i * T + 1:(i + 1) * T + 1])
                 for lo, hi in zip([0] + CUT, CUT + [V]))
        if ok:
            return s


def _assert_same_outputs(a: TransformerXL, b: TransformerXL, n_seg=3, T=8):
    s = _stream(3, n_seg, T, seed=5)
    ma = mb = None
    for i in range(n_seg):
        x, y = s[:, i * T:(i + 1) * T], s[:, i * T + 1:(i + 1) * T + 1]
        oa, ob = a(x, mems=ma, labels=y, return_log_probs=True), b(x, mems=mb, labels=y, return_log_probs=True)
        assert torch.equal(oa.nll, ob.nll) and torch.equal(oa.log_probs, ob.log_probs)
        ma, mb = oa.mems, ob.mems


# ---- HF parity ------------------------------------------------------------------------------------
# pairwise cover of untie_r x embedding layout x pre_lnorm x same_length x clamp_len, plus untied output
CASES = {
    "div2": dict(div_val=2, untie_r=True, pre_lnorm=False, same_length=True, clamp_len=6),
    "div2-shared_r-bin": dict(div_val=2, untie_r=False, pre_lnorm=True, same_length=False, clamp_len=-1),
    "div1_proj": dict(div_val=1, d_embed=24, untie_r=True, pre_lnorm=True, same_length=False, clamp_len=6),
    "div1_proj-shared_r": dict(div_val=1, d_embed=24, untie_r=False, pre_lnorm=False, same_length=True, clamp_len=-1),
    "div1_plain": dict(div_val=1, cutoffs=[], untie_r=True, pre_lnorm=False, same_length=False, clamp_len=-1),
    "div1_plain-shared_r": dict(div_val=1, cutoffs=[], untie_r=False, pre_lnorm=True, same_length=True, clamp_len=6),
    "div2-untied_out": dict(div_val=2, d_embed=24, tie_word_embeddings=False, proj_share_all_but_first=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_parity(case, tmp_path):
    kw = dict(CASES[case])
    hf = _hf_model(**kw)
    hf.save_pretrained(tmp_path, safe_serialization="bin" not in case)
    model = from_hf(tmp_path)
    assert model.cfg.mem_init == "zeros" and model.cfg.untie_r == kw.get("untie_r", True)
    cutoffs = kw.get("cutoffs", CUT)
    B, T, n_seg = 3, 8, 4
    s = _stream(B, n_seg, T)
    worst, hm, tm = 0.0, None, None

    def close(a, b):
        nonlocal worst
        worst = max(worst, (a - b).abs().max().item())
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)

    for i in range(n_seg):
        x, y = s[:, i * T:(i + 1) * T], s[:, i * T + 1:(i + 1) * T + 1]
        with torch.no_grad():
            h_lab = hf(input_ids=x, mems=hm, labels=x.clone())  # HF shifts: losses of positions 0..T-2
            h = hf(input_ids=x, mems=hm)  # prediction_scores: log-probs (B, T, V)
            o = model(x, mems=tm, labels=y, return_log_probs=True)
        close(o.log_probs, h.prediction_scores)
        close(o.nll, -h.prediction_scores.gather(2, y[..., None]).squeeze(2))  # incl. the last position
        # HF returns `losses` in cluster order (crit without keep_order): rows whose label is in
        # cluster 0, then cluster 1, ..., each in (b, t) order. Undo it to compare by position.
        lab = x[:, 1:].reshape(-1)
        cluster = torch.bucketize(lab, torch.tensor(cutoffs), right=True)
        order = torch.sort(cluster, stable=True).indices
        hf_pos = torch.empty(B * (T - 1))
        hf_pos[order] = h_lab.losses.reshape(-1)
        close(o.nll[:, :-1].reshape(-1), hf_pos)
        for hm_l, tm_l in zip(h.mems, o.mems):
            close(tm_l, hm_l.transpose(0, 1))  # HF mems are (M, B, D)
        hm, tm = h.mems, o.mems
    print(f"\n[hf parity {case}] max |txl - HF| over {n_seg} segments (nll, log-probs, mems): {worst:.2e}")


def test_hand_written_hf_layout_loads_into_transformers(tmp_path):
    """The writer used by the tests below produces exactly what TransfoXLLMHeadModel loads."""
    tr = _hf()
    model = _txl_model(untie_r=False)
    _write_hf_dir(model, tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf, info = tr.TransfoXLLMHeadModel.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = _stream(2, 1, 8)[:, :8]
    torch.testing.assert_close(model(x, return_log_probs=True).log_probs, hf.eval()(x).prediction_scores,
                               atol=1e-4, rtol=0)


# ---- from_hf without transformers ---------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("kw", [dict(), dict(untie_r=False, div_val=1, d_embed=24),
                                dict(tie_weight=False, tie_projs=[False, False, True], div_val=1, d_embed=24)],
                         ids=["div2", "div1_proj-shared_r", "untied"])
def test_from_hf_round_trip(tmp_path, fmt, kw):
    model = _txl_model(**kw)
    got = from_hf(_write_hf_dir(model, tmp_path / "m", fmt))
    assert got.cfg.to_dict() == model.cfg.to_dict()
    want = model.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in got.state_dict().items()) and got.state_dict().keys() == want.keys()
    tied = lambda m: sorted(k for k, t in m.state_dict().items() if sum(t.data_ptr() == o.data_ptr() for o in m.state_dict().values()) > 1)
    assert tied(got) == tied(model)  # ties are shared tensors again, not copies
    _assert_same_outputs(got, model)


@pytest.mark.parametrize("over, match", [
    (dict(attn_type=1), "attn_type=1"), (dict(sample_softmax=100), "sample_softmax"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"), (dict(ext_len=4), "ext_len"),
    (dict(d_inner=48), r"'transformer\.layers\.0\.pos_ff\.CoreNet\.0\.weight' has shape \[64, 32\]"),
    (dict(untie_r=False), r"'transformer\.layers\.1\.dec_attn\.r_w_bias' differs from 'transformer\.layers\.0"),
    (dict(untie_r=True, model=dict(untie_r=False)), r"missing tensor 'transformer\.layers\.0\.dec_attn\.r_w_bias'"),
    (dict(cutoffs=[50, 400]), "cutoffs"),
])
def test_from_hf_config_errors(tmp_path, over, match):
    over = dict(over)
    model = _txl_model(**over.pop("model", {}))
    with pytest.raises(ValueError, match=match):
        from_hf(_write_hf_dir(model, tmp_path / "m", **over))


def test_from_hf_tensor_errors(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file
    d = _write_hf_dir(_txl_model(), tmp_path / "m")
    full = load_file(str(d / "model.safetensors"))
    sd = {k: v for k, v in full.items() if k != "transformer.layers.1.pos_ff.CoreNet.3.weight"}
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor 'transformer\.layers\.1\.pos_ff\.CoreNet\.3\.weight'"):
        from_hf(d)
    save_file({**full, "transformer.layers.2.dec_attn.o_net.weight": torch.zeros(32, 32)}, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensor 'transformer\.layers\.2\.dec_attn\.o_net\.weight'"):
        from_hf(d)
    save_file({**full, "crit.out_layers.1.weight": torch.zeros(100, 16)}, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'crit\.out_layers\.1\.weight' differs from .* ties"):
        from_hf(d)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import now fails
    with pytest.raises(ValueError, match="needs the 'safetensors' package"):
        from_hf(d)
    with pytest.raises(ValueError, match="not a directory"):
        from_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(ValueError, match="no model.safetensors or pytorch_model.bin"):
        from_hf(tmp_path / "empty")


# ---- original kimiyoung checkpoints --------------------------------------------------------------
def _orig_cfg(model: TransformerXL) -> dict:
    c = model.cfg
    return dict(n_token=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, d_model=c.d_model, d_head=c.d_head,
                d_inner=c.d_inner, d_embed=c.d_embed, div_val=c.div_val, cutoffs=c.cutoffs, pre_lnorm=c.pre_lnorm,
                tgt_len=c.seq.tgt_len, mem_len=c.seq.mem_len, ext_len=0, same_length=c.seq.same_length,
                clamp_len=c.seq.clamp_len, attn_type=0, dropout=0.0, dropatt=0.0, init_std=c.init_std)


def _orig_state(model: TransformerXL) -> dict:
    """MemTransformerLM.state_dict(): no prefix, one shared u/v, tail cluster i at head column -i."""
    sd = {k: v for k, v in _ref_names(model, "").items() if not k.endswith(("dec_attn.r_w_bias", "dec_attn.r_r_bias"))}
    if "crit.cluster_weight" in sd:
        sd["crit.cluster_weight"], sd["crit.cluster_bias"] = sd["crit.cluster_weight"].flip(0), sd["crit.cluster_bias"].flip(0)
    return sd


def _orig_log_prob(sd: dict, cutoffs: list, div_val: int, h: torch.Tensor) -> torch.Tensor:
    """The original ProjectedAdaptiveLogSoftmax.log_prob rule, written from its tensors."""
    ends = [0] + cutoffs + [sd["crit.out_layers.0.bias"].numel() if div_val == 1 else None]
    if div_val == 1:
        W, b = sd["crit.out_layers.0.weight"], sd["crit.out_layers.0.bias"]
        ends[-1] = W.size(0)
        ws = [(W[lo:hi], b[lo:hi]) for lo, hi in zip(ends[:-1], ends[1:])]
    else:
        ws = [(sd[f"crit.out_layers.{i}.weight"], sd[f"crit.out_layers.{i}.bias"]) for i in range(len(cutoffs) + 1)]
    logit = lambda i, w, b: F.linear(F.linear(h, sd[f"crit.out_projs.{i}"].t()), w, b)
    head = logit(0, torch.cat([ws[0][0], sd["crit.cluster_weight"]]), torch.cat([ws[0][1], sd["crit.cluster_bias"]]))
    head = head.log_softmax(-1)
    parts = [head[:, :cutoffs[0]]]
    for i in range(1, len(cutoffs) + 1):
        parts.append(head[:, -i, None] + logit(i, *ws[i]).log_softmax(-1))  # column -i
    return torch.cat(parts, -1)


@pytest.mark.parametrize("kw", [dict(cutoffs=[50, 100, 200]), dict(div_val=1, d_embed=24, tie_projs=[False, True, True])],
                         ids=["div2-3clusters", "div1_proj"])
def test_from_original_state_dict(kw):
    model = _txl_model(untie_r=False, mem_init="empty", **kw)
    sd = _orig_state(model)
    got = from_original(sd, _orig_cfg(model))  # ties are inferred from identical copies
    assert got.cfg.mem_init == "empty" and got.cfg.tie_projs == model.cfg.tie_projs and got.cfg.tie_weight
    want = model.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in got.state_dict().items())
    _assert_same_outputs(got, model)
    # independent of the row reversal above: the original's own rule (column -i) gives txl's log-probs
    h = torch.randn(7, 32)
    torch.testing.assert_close(got.head.log_prob(h), _orig_log_prob(sd, model.cfg.cutoffs, model.cfg.div_val, h),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_from_original_pickled_module_runs_no_code(tmp_path, monkeypatch, legacy):
    """torch.save(model) of a MemTransformerLM: read without importing its classes; its hyper-
    parameters come off the pickled attributes."""
    (tmp_path / "mem_transformer.py").write_text(
        "import builtins, torch.nn as nn\n"
        "builtins._txl_convert_imported = True\n"  # must never run while converting
        "class MemTransformerLM(nn.Module):\n    pass\n"
        "class Part(nn.Module):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # stays importable while converting
    sys.modules.pop("mem_transformer", None)
    import mem_transformer as mt
    model = _txl_model(untie_r=False, mem_init="empty", cutoffs=[50, 100, 200])
    root = mt.MemTransformerLM()
    for name, t in _orig_state(model).items():  # nested modules by dotted name, tied ones shared
        *path, leaf = name.split(".")
        m = root
        for p in path:
            if p not in m._modules:
                m.add_module(p, mt.Part())
            m = m._modules[p]
        m.register_buffer(leaf, t) if leaf == "inv_freq" else m.register_parameter(leaf, torch.nn.Parameter(t))
    root.crit.out_layers._modules["0"].weight = root.word_emb.emb_layers._modules["0"].weight
    c = _orig_cfg(model)
    root.__dict__.update({k: c[k] for k in ("n_token", "d_model", "n_head", "d_head", "n_layer", "tgt_len", "mem_len",
                                            "same_length", "clamp_len", "d_embed")})
    root.word_emb.__dict__.update(div_val=2, cutoffs=c["cutoffs"] + [V])
    root.layers._modules["0"].pos_ff.__dict__["d_inner"] = 64
    torch.save(root, tmp_path / "model.pt", _use_new_zipfile_serialization=not legacy)
    del root.layers._modules["0"].pos_ff.__dict__["d_inner"]
    torch.save(root, tmp_path / "bare.pt", _use_new_zipfile_serialization=not legacy)
    del sys.modules["mem_transformer"], builtins._txl_convert_imported
    got = from_original(tmp_path / "model.pt")  # no config: everything read off the pickle
    assert not hasattr(builtins, "_txl_convert_imported") and "mem_transformer" not in sys.modules
    assert got.cfg.to_dict() == {**model.cfg.to_dict(), "init_std": 0.02}  # not pickled
    _assert_same_outputs(got, model)
    with pytest.raises(ValueError, match="missing config value 'd_inner'"):
        from_original(tmp_path / "bare.pt")
    _assert_same_outputs(from_original(tmp_path / "bare.pt", {"d_inner": 64}), model)  # config fills the gap


# ---- vocabulary and CLI ---------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):  # unpickling this would create a file
        import os
        return (os.system, (f"touch {self.flag}",))


def _write_vocab(d, idx2sym, evil_flag=None):
    from collections import Counter
    vocab = {"idx2sym": idx2sym, "sym2idx": {s: i for i, s in enumerate(idx2sym)}, "lower_case": False,
             "counter": Counter(idx2sym), "special": ["<eos>"]}
    if evil_flag:
        e = _Evil()
        e.flag = evil_flag
        vocab["hook"] = e
    (d / "vocab.pkl").write_bytes(pickle.dumps(vocab))


def test_hf_vocab(tmp_path):
    words = [f"w{i}" for i in range(V - 2)]
    _write_vocab(tmp_path, ["<unk>", "<eos>"] + words, evil_flag=tmp_path / "pwned")
    st = hf_tokenizer_state(tmp_path)
    assert not (tmp_path / "pwned").exists()
    from txl.data.tokenizers import tokenizer_from_state
    tok = tokenizer_from_state(st)
    assert tok.vocab_size == V and tok.encode("w0 w5 zz\n").tolist() == [2, 7, 0, 1]
    _write_vocab(tmp_path, ["<eos>"] + words + ["<unk>"])  # WT103 order: kept verbatim, ids unchanged
    st = hf_tokenizer_state(tmp_path)
    assert st["idx2sym"][0] == "<eos>" and len(st["idx2sym"]) == V and (st["unk_id"], st["eos_id"]) == (V - 1, 0)
    assert hf_tokenizer_state(tmp_path / "nothing") is None


def test_cli_hf(tmp_path, capsys):
    model = _txl_model()
    d = _write_hf_dir(model, tmp_path / "m")
    _write_vocab(d, ["<unk>", "<eos>"] + [f"w{i}" for i in range(V - 2)])
    assert main(["--hf", str(d), "--out", str(tmp_path / "out.pt")]) == 0
    got, tok, ck = load_model(tmp_path / "out.pt")
    assert ck["meta"]["source"].startswith("hf:") and tok["kind"] == "word" and len(tok["words"]) == V - 2
    _assert_same_outputs(got.eval(), model)


def test_cli_original(tmp_path):
    model = _txl_model(untie_r=False, mem_init="empty")
    torch.save(_orig_state(model), tmp_path / "sd.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(_orig_cfg(model)))
    assert main(["--original", str(tmp_path / "sd.pt"), "--config", str(tmp_path / "cfg.json"),
                 "--out", str(tmp_path / "out.pt")]) == 0
    got, tok, ck = load_model(tmp_path / "out.pt")
    assert tok is None and ck["meta"]["source"].startswith("original:")
    _assert_same_outputs(got.eval(), model)


@pytest.mark.parametrize("args, match", [
    (["--hf", "{tmp}/nope"], "not a directory"),
    (["--hf", "{tmp}/bad"], "attn_type=1"),
    (["--hf", "{tmp}/m", "--config", "{tmp}/x.json"], "--config goes with --original"),
    (["--original", "{tmp}/nope.pt"], "no such file"),
    (["--original", "{tmp}/m/config.json"], "cannot read"),
    (["--hf", "{tmp}/m", "--original", "{tmp}/x.pt"], "not allowed with argument"),
    ([], "one of the arguments --hf --original is required"),
])
def test_cli_errors_one_line_exit_2_nothing_written(tmp_path, capsys, args, match):
    _write_hf_dir(_txl_model(), tmp_path / "m")
    _write_hf_dir(_txl_model(), tmp_path / "bad", attn_type=1)
    out = tmp_path / "out.pt"
    try:  # argparse errors exit inside main, the others return 2
        rc = main([a.format(tmp=tmp_path) for a in args] + ["--out", str(out)])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("txl-convert: error: ") and match in err, err
    assert list(tmp_path.glob("out.pt*")) == [] and list(tmp_path.glob(".out.pt*")) == []


@pytest.mark.slow
def test_python_m_txl_convert(tmp_path, run_cli):
    r = run_cli("convert", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o.pt"), timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not a directory" in r.stderr
    _write_hf_dir(_txl_model(), tmp_path / "m")
    r = run_cli("convert", "--hf", str(tmp_path / "m"), "--out", str(tmp_path / "o.pt"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert load_model(tmp_path / "o.pt")[0].cfg.vocab_size == V
