"""txl.convert: Hugging Face TransfoXL and original kimiyoung checkpoints -> txl.

Parity: a random TransfoXLLMHeadModel (transformers 4.37.2, the `peer` extra) saved with
save_pretrained must give the same per-token NLL, full-vocabulary log-probs and memories as the
converted txl model over consecutive segments. The rest runs without transformers: HF-layout and
original-layout checkpoints are written here from txl models by an explicit name table.
"""
from __future__ import annotations

import builtins
import json
import os
import pickle
import re
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import error_lines
from txl.checkpoint import load_model
from txl.eval import evaluate_tokens
from txl.convert import from_hf, from_original, hf_tokenizer_state, main, original_tokenizer_state
from txl.model import TransformerXL, TXLConfig

V, CUT = 300, [50, 150]


def _hf():
    """transformers, or a skip; under CI (CI=true, as CI runners set it) a missing install fails,
    so the parity tests cannot silently not run there."""
    why = "HF parity needs transformers: install the peer extra: pip install -e .[peer]"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        try:
            import transformers
        except ImportError:
            pytest.fail(f"CI: {why}")
        return transformers
    return pytest.importorskip("transformers", reason=why)


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
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # measured: ~2e-6

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
                               atol=1e-5, rtol=0)


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
    assert st["idx2sym"][0] == "<eos>" and len(st["idx2sym"]) == V and set(st) == {"kind", "idx2sym", "lower"}
    tok = tokenizer_from_state(st)
    assert (tok.unk_id, tok.eos_id) == (V - 1, 0) and tok.encode("w0 zz\n").tolist() == [1, V - 1, 0]
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
    (["--hf", "{tmp}/m", "--vocab", "{tmp}/x.txt"], "--vocab goes with --original"),
    (["--original", "{tmp}/m/config.json", "--vocab", "{tmp}/x.txt"], "cannot read"),
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


@pytest.mark.slow
def test_original_with_vocab_evaluates_and_without_is_refused(tmp_path, run_cli):
    """The issue's path: txl-convert --original, then txl-eval eval.text_file=F (AttributeError before)."""
    model = _txl_model(untie_r=False, mem_init="empty")
    torch.save(_orig_state(model), tmp_path / "sd.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(_orig_cfg(model)))
    (tmp_path / "vocab.txt").write_text("\n".join(WT_ORDER) + "\n")
    text = tmp_path / "t.txt"
    text.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 290}" for j in range(12)) for i in range(40)) + "\n")
    base = ["--original", str(tmp_path / "sd.pt"), "--config", str(tmp_path / "cfg.json")]
    r = run_cli("convert", *base, "--vocab", str(tmp_path / "vocab.txt"), "--out", str(tmp_path / "v.pt"), timeout=120)
    assert r.returncode == 0 and "with tokenizer" in r.stdout, r.stderr
    r = run_cli("eval", f"ckpt_path={tmp_path / 'v.pt'}", f"eval.text_file={text}", "seq.eval_tgt_len=8",
                "seq.eval_mem_len=12", f"hydra.run.dir={tmp_path / 'ev'}")
    assert r.returncode == 0, r.stderr[-1500:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    ids = torch.tensor(_original_encode(WT_ORDER, text.read_text()))
    assert res["tokens"] == len(ids) - 1  # the original's ids, scored by the converted model:
    model.set_lengths(tgt_len=8, mem_len=12)
    want = evaluate_tokens(model, ids.numpy(), 8, 12)["loss"]
    assert res["loss"] == pytest.approx(want, abs=1e-5)
    assert main(base + ["--out", str(tmp_path / "nv.pt")]) == 0  # no vocabulary
    r = run_cli("eval", f"ckpt_path={tmp_path / 'nv.pt'}", f"eval.text_file={text}", f"hydra.run.dir={tmp_path / 'e2'}")
    errs = error_lines(r.stderr)
    assert r.returncode == 2 and len(errs) == 1 and "carries no vocabulary" in errs[0], r.stderr


# ---- NVIDIA DeepLearningExamples checkpoints -------------------------------------------------------
def _nvidia_state(model: TransformerXL) -> dict:
    """NVIDIA's MemTransformerLM.state_dict(), renamed from the original layout: output tables as
    crit.out_layers_weights.i / crit.out_layers_biases.i with tied tables left out (a plain list,
    not saved), tied projections left out of crit.out_projs, the embedding's projections saved a
    second time as crit.shared_out_projs.j, one u / v for all layers."""
    cfg, out = model.cfg, {}
    for k, t in _orig_state(model).items():
        m = re.fullmatch(r"crit\.out_layers\.(\d+)\.(weight|bias)", k)
        p = re.fullmatch(r"crit\.out_projs\.(\d+)", k)
        if m:
            if not (m[2] == "weight" and cfg.tie_weight):
                out[f"crit.out_layers_{'weights' if m[2] == 'weight' else 'biases'}.{m[1]}"] = t
        elif p:
            if not cfg.tie_projs[int(p[1])]:
                out[k] = t
        else:
            out[k] = t
            if e := re.fullmatch(r"word_emb\.emb_projs\.(\d+)", k):
                out[f"crit.shared_out_projs.{e[1]}"] = t.clone()
    assert not any(k.startswith("crit.out_layers.") for k in out)
    return out


NV_CASES = {"div2-3clusters": dict(cutoffs=[50, 100, 200]),
            "div1_proj": dict(div_val=1, d_embed=24, tie_projs=[False, True, True]),
            "div2-untied": dict(tie_weight=False, tie_projs=[False, False, True]),
            "div1_plain": dict(div_val=1, cutoffs=[])}


@pytest.mark.parametrize("case", list(NV_CASES))
def test_from_nvidia_state_dict(case):
    model = _txl_model(untie_r=False, mem_init="empty", **NV_CASES[case])
    sd = _nvidia_state(model)
    for nvidia in (None, True):  # detected from the names, or told
        got = from_original(sd, _orig_cfg(model), nvidia=nvidia)
        assert got.cfg.to_dict() == model.cfg.to_dict()
        want = model.state_dict()
        assert all(torch.equal(t, want[k]) for k, t in got.state_dict().items())
        _assert_same_outputs(got, model)
    # the original's own softmax rule (column -i), fed the tensors NVIDIA's get_out_proj would use
    h = torch.randn(7, 32)
    if model.cfg.cutoffs:
        torch.testing.assert_close(got.head.log_prob(h), _orig_log_prob(_orig_state(model), model.cfg.cutoffs,
                                                                         model.cfg.div_val, h), atol=1e-5, rtol=0)
    x, y = _stream(2, 1, 8)[:, :8], _stream(2, 1, 8, seed=1)[:, :8]
    torch.testing.assert_close(got(x, labels=y).nll, model(x, labels=y).nll, atol=0, rtol=0)
    with pytest.raises(ValueError, match="original's names"):
        from_original(_orig_state(model), _orig_cfg(model), nvidia=True)
    bad = {**sd}
    if any(k.startswith("crit.shared_out_projs.") for k in sd):
        bad["crit.shared_out_projs.0"] = bad["crit.shared_out_projs.0"] + 1
        with pytest.raises(ValueError, match=r"'crit\.shared_out_projs\.0' is not a copy"):
            from_original(bad, _orig_cfg(model))


def _fake_classes(tmp_path, monkeypatch, name):
    """A module of stand-ins for the original code's classes, importable while pickling and
    while converting; importing it sets a flag that conversion must never set."""
    (tmp_path / f"{name}.py").write_text(
        "import builtins\n"
        f"builtins._txl_{name}_imported = True\n"
        "class Vocab:\n    pass\n"
        "class Corpus:\n    pass\n"
        "class Namespace:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    import importlib
    return importlib.import_module(name)


def _forget(name):
    del sys.modules[name]
    delattr(builtins, f"_txl_{name}_imported")


def _original_vocab(mod, idx2sym, lower=False):
    from collections import Counter, OrderedDict
    v = mod.Vocab()
    v.__dict__.update(counter=Counter(idx2sym), special=["<eos>"], min_freq=0, max_size=None, lower_case=lower,
                      delimiter=None, vocab_file=None, idx2sym=list(idx2sym),
                      sym2idx=OrderedDict((s, i) for i, s in enumerate(idx2sym)), eos_idx=idx2sym.index("<eos>"))
    return v


def _original_encode(idx2sym, text, lower=False):
    """The original Vocab.encode_file rule: per line strip, (lower), whitespace split, + <eos>."""
    s2i = {s: i for i, s in enumerate(idx2sym)}
    ids = []
    for line in text.splitlines():
        line = line.strip().lower() if lower else line.strip()
        ids += [s2i.get(w, s2i["<unk>"]) for w in line.split()] + [s2i["<eos>"]]
    return ids


WT_ORDER = ["<eos>"] + [f"w{i}" for i in range(V - 3)] + ["<unk>", "The"]  # WT103-like: <eos> first
TEXT = "w0 w5  zz w7\n  The w1\n\nw2 <unk> THE\n"


def test_cli_nvidia_checkpoint_carries_config_and_vocab(tmp_path, monkeypatch):
    """NVIDIA's train.py checkpoint: {'args', 'model_config', 'model_state', 'vocab', ...}: no --config,
    no --vocab needed; nothing of its code runs."""
    mod = _fake_classes(tmp_path, monkeypatch, "nv_utils")
    model = _txl_model(untie_r=False, mem_init="empty", cutoffs=[50, 100, 200])
    c = model.cfg
    args = mod.Namespace()
    args.__dict__.update(n_layer=2, tied=True)
    ck = {"args": args, "model_config": {**_orig_cfg(model), "dtype": None, "tie_weight": c.tie_weight,
                                         "tie_projs": c.tie_projs, "sample_softmax": -1},
          "model_state": {f"module.{k}": v for k, v in _nvidia_state(model).items()},  # saved under DDP
          "optimizer_state": {"state": {}}, "vocab": _original_vocab(mod, WT_ORDER), "epoch": 3}
    torch.save(ck, tmp_path / "checkpoint_best.pt")
    _forget("nv_utils")
    out = tmp_path / "out.pt"
    assert main(["--original", str(tmp_path / "checkpoint_best.pt"), "--out", str(out)]) == 0
    assert not hasattr(builtins, "_txl_nv_utils_imported") and "nv_utils" not in sys.modules
    got, tok, _ = load_model(out)
    _assert_same_outputs(got.eval(), model)
    from txl.data.tokenizers import tokenizer_from_state
    assert tokenizer_from_state(tok).encode(TEXT).tolist() == _original_encode(WT_ORDER, TEXT)


def test_original_vocab_from_corpus_cache_and_vocab_file(tmp_path, monkeypatch, capsys):
    from txl.data.tokenizers import tokenizer_from_state
    mod = _fake_classes(tmp_path, monkeypatch, "data_utils")
    corpus = mod.Corpus()
    corpus.__dict__.update(dataset="wt103", vocab=_original_vocab(mod, WT_ORDER, lower=True),
                           train=torch.arange(50), valid=torch.arange(5), test=torch.arange(5))
    torch.save(corpus, tmp_path / "cache.pt")  # data_utils.get_lm_corpus: torch.save(corpus, fn)
    torch.save(corpus, tmp_path / "cache_legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "vocab.pkl").write_bytes(pickle.dumps(_original_vocab(mod, WT_ORDER)))
    _forget("data_utils")
    for name in ("cache.pt", "cache_legacy.pt"):
        st = original_tokenizer_state(tmp_path / name)
        assert st["lower"] is True and st["idx2sym"] == WT_ORDER
        assert tokenizer_from_state(st).encode(TEXT).tolist() == _original_encode(WT_ORDER, TEXT, lower=True)
    assert original_tokenizer_state(tmp_path / "vocab.pkl")["lower"] is False
    assert not hasattr(builtins, "_txl_data_utils_imported")
    # a vocab file: one symbol per line, the first field (Vocab._build_from_file), blank lines skipped
    (tmp_path / "vocab.txt").write_text("\n".join(f"{s} {i}" for i, s in enumerate(WT_ORDER)) + "\n\n")
    st = original_tokenizer_state(tmp_path / "vocab.txt")
    assert tokenizer_from_state(st).encode(TEXT).tolist() == _original_encode(WT_ORDER, TEXT)
    std = ["<unk>", "<eos>"] + [f"w{i}" for i in range(V - 2)]  # txl's own order: the compact form
    (tmp_path / "std.txt").write_text("\n".join(std) + "\n")
    assert original_tokenizer_state(tmp_path / "std.txt") == {"kind": "word", "words": std[2:], "lower": False}
    # the CLI: --vocab travels with the weights; a size mismatch is refused
    model = _txl_model(untie_r=False, mem_init="empty")
    torch.save(_orig_state(model), tmp_path / "sd.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(_orig_cfg(model)))
    base = ["--original", str(tmp_path / "sd.pt"), "--config", str(tmp_path / "cfg.json")]
    assert main(base + ["--vocab", str(tmp_path / "cache.pt"), "--out", str(tmp_path / "o.pt")]) == 0
    assert load_model(tmp_path / "o.pt")[1] == original_tokenizer_state(tmp_path / "cache.pt")
    (tmp_path / "short.txt").write_text("<unk>\n<eos>\nw0\n")
    capsys.readouterr()
    assert main(base + ["--vocab", str(tmp_path / "short.txt"), "--out", str(tmp_path / "o2.pt")]) == 2
    assert "the vocabulary has 3 symbols, the model 300" in capsys.readouterr().err
    assert not (tmp_path / "o2.pt").exists()


@pytest.mark.parametrize("content, match", [
    ("w0\nw1\n<eos>\n", "has no '<unk>'"),
    ("<UNK>\n<S>\nw0\n", "has no '<unk>'"),  # lm1b's vocabulary: its <S> framing is not txl's
])
def test_original_vocab_errors(tmp_path, content, match):
    (tmp_path / "v.txt").write_text(content)
    with pytest.raises(ValueError, match=match):
        original_tokenizer_state(tmp_path / "v.txt")
    with pytest.raises(ValueError, match="no such file"):
        original_tokenizer_state(tmp_path / "nope.txt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "t.pt")
    with pytest.raises(ValueError, match="no word vocabulary"):
        original_tokenizer_state(tmp_path / "t.pt")
    from collections import OrderedDict
    torch.save({"idx2sym": ["<unk>", "<eos>", "a"], "sym2idx": OrderedDict(), "delimiter": ""}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="splits lines on ''"):
        original_tokenizer_state(tmp_path / "c.pt")


def test_original_without_config_names_config_and_attn_type_2_is_refused(tmp_path, capsys):
    model = _txl_model(untie_r=False, mem_init="empty")
    torch.save(_orig_state(model), tmp_path / "sd.pt")
    assert main(["--original", str(tmp_path / "sd.pt"), "--out", str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--config JSON" in err and "'n_token'" in err and "vocab_size" not in err, err
    with pytest.raises(ValueError, match=r"attn_type=2 is not supported"):  # see convert.py's docstring: why
        from_original(_orig_state(model), {**_orig_cfg(model), "attn_type": 2})


def test_cli_out_exists_is_refused_unless_force(tmp_path, capsys):
    model = _txl_model(untie_r=False, mem_init="empty")
    torch.save(_orig_state(model), tmp_path / "sd.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(_orig_cfg(model)))
    out = tmp_path / "last.ckpt"
    out.write_bytes(b"a training checkpoint")
    args = ["--original", str(tmp_path / "sd.pt"), "--config", str(tmp_path / "cfg.json"), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; pass --force" in err and out.read_bytes() == b"a training checkpoint"
    assert main(args + ["--force"]) == 0
    _assert_same_outputs(load_model(out)[0].eval(), model)


def test_eval_refuses_text_for_a_checkpoint_without_vocabulary(tmp_path):
    from conftest import eval_config
    from txl.eval import run
    model = _txl_model(untie_r=False, mem_init="empty")
    torch.save(_orig_state(model), tmp_path / "sd.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(_orig_cfg(model)))
    assert main(["--original", str(tmp_path / "sd.pt"), "--config", str(tmp_path / "cfg.json"),
                 "--out", str(tmp_path / "m.pt")]) == 0
    (tmp_path / "t.txt").write_text("w1 w2\n" * 20)
    cfg = eval_config(tmp_path / "m.pt", tmp_path / "t.txt", tmp_path)
    with pytest.raises(ValueError, match="carries no vocabulary") as e:
        run(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "eval.json").exists()


def test_safetensors_and_tokenizers_are_core_dependencies():
    """A plain `pip install .` must read model.safetensors and build data.tokenizer=hf."""
    import tomllib

    from conftest import ROOT
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() for d in deps}
    assert {"safetensors", "tokenizers"} <= names
