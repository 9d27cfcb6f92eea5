"""Import Transformer-XL checkpoints into txl: Hugging Face TransfoXL, the original PyTorch code and
NVIDIA DeepLearningExamples' port of it.

    from_hf(dir)                    a `TransfoXLLMHeadModel.save_pretrained` directory (config.json +
                                    model.safetensors or pytorch_model.bin, sharded or not)
    from_original(ckpt, config)     kimiyoung/transformer-xl `torch.save(model)` of MemTransformerLM, or
                                    its state_dict; NVIDIA's checkpoint dict (model_config, model_state,
                                    vocab) or its state_dict (names detected, or nvidia=True)
    hf_tokenizer_state(dir)         the TransfoXL word vocabulary (vocab.pkl / vocab.bin), or None
    original_tokenizer_state(f)     the original code's word vocabulary: corpus cache, Vocab, vocab file
    txl-convert --hf DIR | --original CKPT [--config JSON] [--vocab F] [--nvidia] --out FILE.pt [--force]

Never imports transformers. Nothing here executes code from a checkpoint: pickles are read with
an unpickler that builds only tensors and plain containers and replaces every other class by an
inert stand-in (_Opaque) that just keeps its state.

Reference quirks undone here:
- memory at the first segment: HF attends to mem_len zero vectors (mem_init="zeros"), the original
  and NVIDIA code start from no memory (mem_init="empty");
- the original (and NVIDIA) adaptive softmax reads tail cluster i at head column -i, txl (like TF
  and HF) at column cutoffs[0] + i - 1: the cluster rows are stored reversed;
- NVIDIA names the output layers crit.out_layers_weights.i / crit.out_layers_biases.i, leaves tied
  tensors out of its state dict (a missing output table is the input embedding's, a missing output
  projection crit.shared_out_projs, i.e. the embedding's projection) and keeps one u, v for all layers;
- the original's vocabulary has no fixed ids: it is kept as its id -> symbol table.

Not importable (refused with one line): attn_type != 0. attn_type=2 (the "vanilla" absolute model)
differs from txl's kind=absolute in ways no weight mapping can express: it adds sinusoids of
*descending* positions (K-1 ... 0, the segment's at T-1 ... 0) where txl uses ascending window
positions; it adds them once more, in place, to the layer-0 memory, which then carries two
encodings and, when mem_len > tgt_len, keeps accumulating them across segments; and with pre_lnorm
its queries are projected from the un-normalised input.
"""
from __future__ import annotations

import argparse
import builtins
import copyreg
import json
import pickle
import re
import sys
import warnings
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Optional

import torch

from txl.model import TransformerXL, TXLConfig

# ---- names: txl state_dict key -> reference key (HF adds "transformer." to all but crit.*) ----------
_RENAMES = [
    (r"embed\.layers\.(\d+)\.weight", r"word_emb.emb_layers.\1.weight"),
    (r"embed\.projs\.(\d+)", r"word_emb.emb_projs.\1"),
    (r"blocks\.(\d+)\.attn\.qkv\.weight", r"layers.\1.dec_attn.qkv_net.weight"),
    (r"blocks\.(\d+)\.attn\.out\.weight", r"layers.\1.dec_attn.o_net.weight"),
    (r"blocks\.(\d+)\.attn\.r_proj\.weight", r"layers.\1.dec_attn.r_net.weight"),
    (r"blocks\.(\d+)\.attn\.ln\.(weight|bias)", r"layers.\1.dec_attn.layer_norm.\2"),
    (r"blocks\.(\d+)\.attn\.u", r"layers.\1.dec_attn.r_w_bias"),  # content bias u  [n_head, d_head]
    (r"blocks\.(\d+)\.attn\.v", r"layers.\1.dec_attn.r_r_bias"),  # position bias v [n_head, d_head]
    (r"blocks\.(\d+)\.ff\.fc1\.(weight|bias)", r"layers.\1.pos_ff.CoreNet.0.\2"),
    (r"blocks\.(\d+)\.ff\.fc2\.(weight|bias)", r"layers.\1.pos_ff.CoreNet.3.\2"),
    (r"blocks\.(\d+)\.ff\.ln\.(weight|bias)", r"layers.\1.pos_ff.layer_norm.\2"),
    (r"u", "r_w_bias"),  # untie_r=False: one u, v for all layers
    (r"v", "r_r_bias"),
    (r"head\.cluster_(weight|bias)", r"crit.cluster_\1"),
    (r"head\.layers\.(\d+)\.(weight|bias)", r"crit.out_layers.\1.\2"),
    (r"head\.projs\.(\d+)", r"crit.out_projs.\1"),
]


def _rename(key: str, prefix: str) -> str:
    for pat, rep in _RENAMES:
        if re.fullmatch(pat, key):
            name = re.sub(pat, rep, key)
            return name if name.startswith("crit.") else prefix + name
    raise ValueError(f"no reference name for txl parameter {key!r} (only kind='relative' models convert)")


def _assemble(model: TransformerXL, sd: dict, prefix: str, where: str) -> dict:
    """Reference state dict -> txl state dict. Tensors txl shares (tied embeddings / projections,
    found by storage) may come from any of their reference names; copies present must agree."""
    own = model.state_dict()
    groups = defaultdict(list)  # one group per distinct txl tensor
    for k, t in own.items():
        groups[t.data_ptr()].append(k)
    shared_r = {"u": "r_w_bias", "v": "r_r_bias"}  # untie_r=False: layers may carry copies
    out, used = {}, set()
    for keys in groups.values():
        names = [_rename(k, prefix) for k in keys]
        for k in keys:
            if k in shared_r:
                names += [f"{prefix}layers.{i}.dec_attn.{shared_r[k]}" for i in range(model.cfg.n_layer)]
        present = [n for n in dict.fromkeys(names) if n in sd]
        if not present:
            raise ValueError(f"{where}: missing tensor {names[0]!r} (txl {keys[0]})")
        ref = sd[present[0]]
        if tuple(ref.shape) != tuple(own[keys[0]].shape):
            raise ValueError(f"{where}: tensor {present[0]!r} has shape {list(ref.shape)}, "
                             f"the config needs {list(own[keys[0]].shape)}")
        for n in present[1:]:
            if sd[n].shape != ref.shape or not torch.equal(sd[n].to(ref.dtype), ref):
                raise ValueError(f"{where}: tensor {n!r} differs from {present[0]!r} but the config ties "
                                 f"them (tie_weight / tie_projs / untie_r)")
        used.update(present)
        out.update({k: ref for k in keys})
    extra = sorted(set(sd) - used - {prefix + "pos_emb.inv_freq"})
    if extra:
        raise ValueError(f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} in all): "
                         f"the checkpoint does not match its config")
    return out


def _build(cfg: TXLConfig, sd: dict, prefix: str, where: str, reverse_clusters: bool = False) -> TransformerXL:
    model = TransformerXL(cfg)
    state = _assemble(model, sd, prefix, where)
    if reverse_clusters and "head.cluster_weight" in state:  # original: cluster i at head column -i
        state["head.cluster_weight"] = state["head.cluster_weight"].flip(0)
        state["head.cluster_bias"] = state["head.cluster_bias"].flip(0)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


# ---- configs ------------------------------------------------------------------------------------
# TransfoXLConfig's defaults (transformers 4.37): a key missing from config.json means this value
_HF_DEFAULTS = dict(vocab_size=267735, cutoffs=[20000, 40000, 200000], d_model=1024, d_embed=1024, n_head=16,
                    d_head=64, d_inner=4096, div_val=4, pre_lnorm=False, n_layer=18, mem_len=1600, clamp_len=1000,
                    same_length=True, untie_r=True, dropout=0.1, dropatt=0.0, init_std=0.02, proj_init_std=0.01,
                    attn_type=0, sample_softmax=-1, layer_norm_epsilon=1e-5, tgt_len=128, ext_len=0)
# MemTransformerLM's defaults; the sizes have none and must be given (or read off a pickled model)
_ORIG_DEFAULTS = dict(cutoffs=[], d_embed=None, div_val=1, pre_lnorm=False, clamp_len=-1, same_length=False,
                      untie_r=False, dropout=0.0, dropatt=0.0, init_std=0.02, proj_init_std=0.01, attn_type=0,
                      sample_softmax=-1, layer_norm_epsilon=1e-5, ext_len=0)
_REQUIRED = ("vocab_size", "n_layer", "n_head", "d_model", "d_head", "d_inner", "tgt_len", "mem_len")


def _txl_config(d: dict, defaults: dict, where: str, mem_init: str) -> TXLConfig:
    d = dict(d)
    if "vocab_size" not in d and "n_token" in d:
        d["vocab_size"] = d["n_token"]
    g = {**defaults, **d}
    missing = [k for k in _REQUIRED if g.get(k) is None]
    if missing and defaults is _ORIG_DEFAULTS:  # a bare state dict: the sizes must come from --config
        names = ["n_token" if k == "vocab_size" else k for k in _REQUIRED]
        raise ValueError(f"{where}: missing config value {names[_REQUIRED.index(missing[0])]!r}: the checkpoint does "
                         f"not carry it; give the hyper-parameters with --config JSON (MemTransformerLM "
                         f"argument names; needed: {', '.join(names)})")
    if missing:
        raise ValueError(f"{where}: missing config value {missing[0]!r} (needed: {list(_REQUIRED)})")
    if g["attn_type"] != 0:  # why attn_type=2 cannot map onto kind=absolute: see the module docstring
        raise ValueError(f"{where}: attn_type={g['attn_type']!r} is not supported; txl imports only "
                         f"attn_type=0 (the paper's relative attention)")
    if g["sample_softmax"] is not None and g["sample_softmax"] > 0:
        raise ValueError(f"{where}: sample_softmax={g['sample_softmax']} is not supported; need <= 0 (full softmax)")
    if abs(float(g["layer_norm_epsilon"]) - 1e-5) > 1e-12:
        raise ValueError(f"{where}: layer_norm_epsilon={g['layer_norm_epsilon']} is not supported; txl uses 1e-5")
    cutoffs = [int(c) for c in g["cutoffs"]]
    d_embed = g["d_embed"] if g["d_embed"] is not None and g["d_embed"] > 0 else g["d_model"]
    tie_weight = d.get("tie_word_embeddings", d.get("tie_weight", defaults.get("tie_weight", True)))
    tie_projs = g.get("tie_projs")
    if tie_projs is None:  # HF: proj_share_all_but_first (default True); original: [False]
        share = d.get("proj_share_all_but_first", defaults is _HF_DEFAULTS)
        tie_projs = [False] + [bool(share)] * len(cutoffs)
    tie_projs = [bool(t) for t in tie_projs]
    if len(tie_projs) > len(cutoffs) + 1:
        raise ValueError(f"{where}: tie_projs has {len(tie_projs)} flags for {len(cutoffs) + 1} clusters")
    tie_projs += [False] * (len(cutoffs) + 1 - len(tie_projs))  # references tie only the flags given
    try:
        return TXLConfig(
            vocab_size=g["vocab_size"], n_layer=g["n_layer"], d_model=g["d_model"], n_head=g["n_head"],
            d_head=g["d_head"], d_inner=g["d_inner"], d_embed=d_embed, dropout=float(g["dropout"]),
            dropatt=float(g["dropatt"]), pre_lnorm=bool(g["pre_lnorm"]), untie_r=bool(g["untie_r"]),
            kind="relative", mem_init=mem_init, cutoffs=cutoffs, div_val=g["div_val"], tie_weight=bool(tie_weight),
            tie_projs=tie_projs, init_std=float(g["init_std"]), proj_init_std=float(g["proj_init_std"]),
            seq=dict(tgt_len=g["tgt_len"], mem_len=g["mem_len"], ext_len=g["ext_len"] or 0,
                     clamp_len=g["clamp_len"] if g["clamp_len"] is not None else -1,
                     same_length=bool(g["same_length"])))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


def txl_config_from_hf(hf: dict, where: str = "config.json") -> TXLConfig:
    """HF TransfoXLConfig dict -> TXLConfig (mem_init='zeros': HF attends to mem_len zeros at first)."""
    if hf.get("ext_len"):  # HF keeps the newest mem_len states; txl would drop the last ext_len of them
        raise ValueError(f"{where}: ext_len={hf['ext_len']} is not supported: the Hugging Face model ignores "
                         f"ext_len, set it to 0")
    return _txl_config(hf, _HF_DEFAULTS, where, "zeros")


# ---- reading files safely -----------------------------------------------------------------------
class _Opaque:
    """Stands in for every class a pickle names (model classes, numpy, regexes...): runs no code."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args

    def __setstate__(self, state):
        self.__dict__["_state"] = state


_SAFE = {("collections", "OrderedDict"): OrderedDict, ("torch", "Size"): torch.Size,
         ("copyreg", "_reconstructor"): copyreg._reconstructor,  # old protocols; only ever gets these classes
         **{("builtins", n): getattr(builtins, n)
            for n in ("set", "frozenset", "list", "dict", "tuple", "int", "float", "bool", "str", "bytes", "complex")},
         **{("torch._utils", n): getattr(torch._utils, n) for n in
            ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")
            if hasattr(torch._utils, n)}}


class _SafeUnpickler(pickle.Unpickler):
    _stubs: dict = {}

    def find_class(self, module, name):
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        key = (module, name)  # anything else: an inert stand-in named after it
        if key not in self._stubs:
            self._stubs[key] = type(str(name), (_Opaque,), {"__module__": "txl.convert.opaque." + str(module)})
        return self._stubs[key]


class _SafePickle:  # what torch.load wants as `pickle_module`
    Unpickler = _SafeUnpickler

    @staticmethod
    def load(f, **kwargs):
        return _SafeUnpickler(f, **kwargs).load()


from txl.files import first_line as _first_line  # noqa: E402


def _safe_torch_load(path: Path) -> Any:
    """torch.load of any torch.save file (new zip or legacy format) without running its code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy files compare saved class sources to ours
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_SafePickle)
    except Exception as e:
        raise ValueError(f"{path}: cannot read ({_first_line(e)})") from None


def _read_weights(path: Path) -> dict:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"{path}: reading .safetensors needs the 'safetensors' package "
                             f"(pip install safetensors)") from None
        try:
            return load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: cannot read ({_first_line(e)})") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read ({_first_line(e)})") from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return sd


def _hf_weights(d: Path) -> tuple[dict, str]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (d / single).is_file():
            return _read_weights(d / single), single
        if (d / index).is_file():  # sharded: {"weight_map": {name: shard file}}
            try:
                shards = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise ValueError(f"{d / index}: not a weight index ({_first_line(e)})") from None
            sd = {}
            for s in shards:
                sd.update(_read_weights(d / s))
            return sd, index
    raise ValueError(f"{d}: no model.safetensors or pytorch_model.bin (or their .index.json) found")


def _read_json(path: Path, what: str) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file: {path}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: cannot read {path} ({_first_line(e)})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object")
    return d


# ---- Hugging Face -------------------------------------------------------------------------------
def from_hf(path) -> TransformerXL:
    """Read a TransfoXLLMHeadModel.save_pretrained directory -> TransformerXL in eval mode (fp32)."""
    d = Path(path)
    if not d.is_dir():
        raise ValueError(f"hf path: not a directory: {d}")
    cfg = txl_config_from_hf(_read_json(d / "config.json", "hf config"), where=str(d / "config.json"))
    sd, name = _hf_weights(d)
    return _build(cfg, sd, "transformer.", str(d / name))


def _word_state(vocab: dict, where: str) -> dict:
    """A Vocab's attributes (idx2sym, lower_case, delimiter) -> txl word tokenizer state.

    txl's word tokenizer fixes <unk>=0, <eos>=1; a vocabulary ordered otherwise (WT103 puts <eos>
    at 0) is kept as {'kind': 'word', 'idx2sym': [...]} so no id changes meaning. Its encoding is
    the original's: each line split on whitespace, lower-cased when lower_case, then <eos>."""
    idx2sym = vocab.get("idx2sym")
    if not isinstance(idx2sym, list) or not idx2sym or not all(isinstance(s, str) for s in idx2sym):
        raise ValueError(f"{where}: no 'idx2sym' list of strings (not a Transformer-XL word vocabulary)")
    if vocab.get("delimiter") is not None:  # '' = characters; txl's word tokenizer splits on whitespace
        raise ValueError(f"{where}: the vocabulary splits lines on {vocab['delimiter']!r}; txl's word "
                         f"tokenizer splits on whitespace only")
    if len(set(idx2sym)) != len(idx2sym):
        raise ValueError(f"{where}: the vocabulary lists a symbol twice")
    for s in ("<unk>", "<eos>"):
        if s not in idx2sym:
            raise ValueError(f"{where}: the vocabulary has no {s!r}; txl's word tokenizer needs '<unk>' (unknown "
                             f"words) and '<eos>' (end of every line)")
    lower = bool(vocab.get("lower_case", False))
    if idx2sym[:2] == ["<unk>", "<eos>"]:
        return {"kind": "word", "words": idx2sym[2:], "lower": lower}
    return {"kind": "word", "idx2sym": idx2sym, "lower": lower}


def hf_tokenizer_state(path) -> Optional[dict]:
    """The TransfoXL vocabulary of an HF directory (vocab.pkl or vocab.bin) as a txl tokenizer state."""
    d = Path(path)
    for name in ("vocab.pkl", "vocab.bin"):
        f = d / name
        if not f.is_file():
            continue
        if name == "vocab.pkl":
            try:
                with open(f, "rb") as fh:
                    vocab = _SafeUnpickler(fh).load()
            except Exception as e:
                raise ValueError(f"{f}: cannot read ({_first_line(e)})") from None
        else:
            vocab = _safe_torch_load(f)
        return _word_state(vocab if isinstance(vocab, dict) else {}, str(f))
    return None


# ---- original kimiyoung/transformer-xl PyTorch ---------------------------------------------------
def _state_of(obj) -> dict:
    st = obj.__dict__.get("_state", {}) if isinstance(obj, _Opaque) else {}
    if isinstance(st, tuple):  # (dict state, slot state)
        st = st[0] or {}
    return st if isinstance(st, dict) else {}


def _flatten(obj, prefix: str, out: dict) -> None:
    """A pickled nn.Module (as _Opaque) -> flat {name: tensor} like state_dict()."""
    st = _state_of(obj)
    for group in ("_parameters", "_buffers"):
        for k, t in (st.get(group) or {}).items():
            if torch.is_tensor(t):
                out[prefix + k] = t.detach()
    for k, m in (st.get("_modules") or {}).items():
        if m is not None:
            _flatten(m, f"{prefix}{k}.", out)


def _child(obj, *path) -> dict:
    for p in path:
        obj = (_state_of(obj).get("_modules") or {}).get(p)
    return _state_of(obj)


def _module_attrs(root) -> dict:
    """Hyper-parameters a pickled MemTransformerLM carries, under MemTransformerLM's argument names."""
    st, emb, ff = _state_of(root), _child(root, "word_emb"), _child(root, "layers", "0", "pos_ff")
    got = {k: st.get(k) for k in ("n_token", "d_embed", "d_model", "n_head", "d_head", "n_layer", "tgt_len",
                                  "mem_len", "ext_len", "same_length", "clamp_len", "attn_type", "sample_softmax")}
    got.update(div_val=emb.get("div_val"), d_inner=ff.get("d_inner"), pre_lnorm=ff.get("pre_lnorm"),
               cutoffs=emb["cutoffs"][:-1] if isinstance(emb.get("cutoffs"), list) else None,  # stored + [n_token]
               dropout=_child(root, "drop").get("p"), dropatt=_child(root, "layers", "0", "dec_attn", "dropatt").get("p"))
    return {k: v for k, v in got.items() if isinstance(v, (int, float, bool, list))}


def _infer_ties(cfg: dict, sd: dict) -> dict:
    """Original checkpoints do not record ties: a tie is there when both copies are identical."""
    cfg = dict(cfg)
    same = lambda a, b: a not in sd or b not in sd or (sd[a].shape == sd[b].shape and torch.equal(sd[a], sd[b]))
    if "tie_weight" not in cfg and "tie_word_embeddings" not in cfg:
        n = sum(1 for k in sd if re.fullmatch(r"crit\.out_layers\.\d+\.weight", k))
        cfg["tie_weight"] = all(same(f"word_emb.emb_layers.{i}.weight", f"crit.out_layers.{i}.weight") for i in range(n))
    if "tie_projs" not in cfg:
        n = len(cfg.get("cutoffs") or []) + 1
        div1 = (cfg.get("div_val") or 1) == 1
        cfg["tie_projs"] = [f"word_emb.emb_projs.{0 if div1 else i}" in sd and f"crit.out_projs.{i}" in sd
                            and same(f"word_emb.emb_projs.{0 if div1 else i}", f"crit.out_projs.{i}") for i in range(n)]
    return cfg


_NVIDIA_NAME = re.compile(r"crit\.(out_layers_weights|out_layers_biases|shared_out_projs)\.(\d+)")


def _nvidia_to_original(sd: dict, where: str) -> dict:
    """NVIDIA DeepLearningExamples state-dict names -> the original's, tied tensors filled in.

    NVIDIA's ProjectedAdaptiveLogSoftmax keeps its tables in ParameterLists out_layers_weights /
    out_layers_biases; tied tables are a plain list of the embedding's weights (not saved), tied
    projections are None in out_projs and read from shared_out_projs, the embedding's own
    emb_projs registered a second time (saved twice: the copies must agree)."""
    if any(re.fullmatch(r"crit\.out_layers\.\d+\.(weight|bias)", k) for k in sd):
        raise ValueError(f"{where}: read as NVIDIA's layout (--nvidia or detected), but it has the original's "
                         f"names (crit.out_layers.i.*)")
    out, shared = {}, {}
    for k, t in sd.items():
        m = _NVIDIA_NAME.fullmatch(k)
        if m is None:
            out[k] = t
        elif m[1] == "shared_out_projs":
            shared[int(m[2])] = t
        else:
            out[f"crit.out_layers.{m[2]}.{'weight' if m[1] == 'out_layers_weights' else 'bias'}"] = t
    for j, t in shared.items():
        e = out.get(f"word_emb.emb_projs.{j}")
        if e is None or e.shape != t.shape or not torch.equal(e, t):
            raise ValueError(f"{where}: tensor 'crit.shared_out_projs.{j}' is not a copy of 'word_emb.emb_projs.{j}'")
    n_tables = sum(1 for k in out if re.fullmatch(r"crit\.out_layers\.\d+\.bias", k))
    for i in range(n_tables):  # no output table saved: tied to the input embedding's
        w, e = f"crit.out_layers.{i}.weight", f"word_emb.emb_layers.{i}.weight"
        if w not in out and e in out:
            out[w] = out[e]
    n_clusters = out["crit.cluster_weight"].size(0) + 1 if "crit.cluster_weight" in out else 1
    for i in range(n_clusters):  # no output projection saved: tied (NVIDIA's get_out_proj)
        tied = shared.get(0) if len(shared) == 1 else shared.get(i)
        if f"crit.out_projs.{i}" not in out and tied is not None:
            out[f"crit.out_projs.{i}"] = tied
    return out


def from_original(state_dict_or_path, config_dict: Optional[dict] = None, nvidia: Optional[bool] = None,
                  where: Optional[str] = None) -> TransformerXL:
    """kimiyoung/transformer-xl checkpoint (torch.save(model) of MemTransformerLM, or its state_dict)
    or NVIDIA DeepLearningExamples' (its checkpoint dict with model_config / model_state, or the
    state_dict) + its hyper-parameters (MemTransformerLM argument names: n_token, n_layer, n_head,
    d_model, d_head, d_inner, tgt_len, mem_len, cutoffs, div_val, d_embed, ...). Values a pickled
    model or NVIDIA's model_config carry are read off it; config_dict overrides them. Ties not given
    are inferred (identical copies). nvidia: NVIDIA's tensor names (None: detected)."""
    where = where or "original checkpoint"
    obj = state_dict_or_path
    if isinstance(obj, (str, Path)):
        where = str(obj)
        if not Path(obj).is_file():
            raise ValueError(f"original checkpoint: no such file: {obj}")
        obj = _safe_torch_load(Path(obj))
    attrs = {}
    if isinstance(obj, dict) and not all(torch.is_tensor(v) for v in obj.values()):
        if isinstance(obj.get("model_config"), dict):  # NVIDIA's train.py saves the constructor's arguments
            attrs = {k: v for k, v in obj["model_config"].items() if isinstance(v, (int, float, bool, list))}
        for k in ("model", "model_state", "state_dict", "model_state_dict"):  # wrapped checkpoints
            if k in obj:
                obj = obj[k]
                break
    while isinstance(obj, _Opaque) and set(_state_of(obj).get("_modules") or {}) == {"module"}:
        obj = _state_of(obj)["_modules"]["module"]  # saved inside nn.DataParallel
    if isinstance(obj, _Opaque):
        attrs, sd = {**attrs, **_module_attrs(obj)}, {}
        _flatten(obj, "", sd)
    elif isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        sd = dict(obj)
    else:
        raise ValueError(f"{where}: neither a pickled MemTransformerLM nor a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):  # saved from nn.DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if nvidia or (nvidia is None and any(_NVIDIA_NAME.fullmatch(k) for k in sd)):
        sd = _nvidia_to_original(sd, where)
    cfg_d = _infer_ties({**attrs, **(config_dict or {})}, sd)
    cfg = _txl_config(cfg_d, _ORIG_DEFAULTS, f"{where} config", "empty")
    return _build(cfg, sd, "", where, reverse_clusters=True)


def _vocab_attrs(obj) -> Optional[dict]:
    """The Vocab inside what torch.save wrote: a Vocab, a Corpus (its .vocab), a dict with 'vocab'
    (NVIDIA's checkpoint) or a dict of Vocab attributes (HF)."""
    for _ in range(3):
        st = _state_of(obj) if isinstance(obj, _Opaque) else obj if isinstance(obj, dict) else None
        if st is None:
            return None
        if "idx2sym" in st:
            return st
        obj = st.get("vocab")
    return None


def original_tokenizer_state(path) -> dict:
    """The original code's (or NVIDIA's) word vocabulary as a txl tokenizer state, from its corpus
    cache (`cache.pt`: torch.save of the Corpus), a saved Vocab, an NVIDIA checkpoint (its 'vocab'),
    or a vocabulary file: one symbol per line, the first field of each line (Vocab._build_from_file;
    blank lines skipped, repeats keep their first id), read case-sensitively."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--vocab: no such file: {p}")
    with open(p, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save (zip / legacy) or a pickle
        try:
            obj = _safe_torch_load(p)
        except ValueError:
            try:
                with open(p, "rb") as fh:
                    obj = _SafeUnpickler(fh).load()
            except Exception as e:
                raise ValueError(f"--vocab: cannot read {p} ({_first_line(e)})") from None
        vocab = _vocab_attrs(obj)
        if vocab is None:
            raise ValueError(f"--vocab: {p} holds no word vocabulary (no idx2sym; BPE vocabularies do not import)")
        return _word_state(vocab, f"--vocab {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--vocab: cannot read {p} ({_first_line(e)})") from None
    syms = list(dict.fromkeys(line.split()[0] for line in text.splitlines() if line.strip()))
    return _word_state({"idx2sym": syms, "lower_case": False}, f"--vocab {p}")


# ---- CLI ----------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage too)
        print(f"txl-convert: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    p = _Parser(prog="txl-convert", description="Convert a Transformer-XL checkpoint into a txl model file.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="DIR", help="TransfoXLLMHeadModel.save_pretrained directory")
    src.add_argument("--original", metavar="CKPT", help="kimiyoung/transformer-xl torch.save(model) file, its "
                     "state_dict, or an NVIDIA DeepLearningExamples checkpoint")
    p.add_argument("--config", metavar="JSON", help="hyper-parameters of --original (MemTransformerLM names)")
    p.add_argument("--vocab", metavar="FILE", help="vocabulary of --original: its corpus cache (cache.pt) or a "
                   "vocab file (one symbol per line); NVIDIA checkpoints carry theirs")
    p.add_argument("--nvidia", action="store_true", help="--original has NVIDIA DeepLearningExamples tensor names "
                   "(detected without this flag)")
    p.add_argument("--out", metavar="FILE.pt", required=True, help="txl model file to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    a = p.parse_args(argv)
    try:
        from txl.checkpoint import save_model
        if Path(a.out).is_dir():
            raise ValueError(f"--out: {a.out} is a directory")
        if Path(a.out).exists() and not a.force:  # e.g. a training checkpoint: never replaced silently
            raise ValueError(f"--out: {a.out} exists; pass --force to overwrite it")
        if a.hf:
            for flag in ("config", "vocab", "nvidia"):
                if getattr(a, flag):
                    raise ValueError(f"--{flag} goes with --original (an HF directory has its config.json and vocab)")
            model, tok = from_hf(a.hf), hf_tokenizer_state(a.hf)
            meta = {"source": f"hf:{Path(a.hf).resolve()}", "hf_config": _read_json(Path(a.hf) / "config.json", "hf config")}
        else:
            cfg = _read_json(Path(a.config), "--config") if a.config else None
            if not Path(a.original).is_file():
                raise ValueError(f"--original: no such file: {a.original}")
            ck = _safe_torch_load(Path(a.original))  # read once: weights and (NVIDIA) vocabulary
            model = from_original(ck, cfg, nvidia=True if a.nvidia else None, where=a.original)
            vocab = _vocab_attrs(ck) if isinstance(ck, dict) else None
            tok = original_tokenizer_state(a.vocab) if a.vocab else \
                _word_state(vocab, f"{a.original} vocab") if vocab is not None else None
            meta = {"source": f"original:{Path(a.original).resolve()}", "config": cfg}
        if tok is not None:
            n = len(tok.get("idx2sym") or tok["words"]) + (0 if "idx2sym" in tok else 2)
            if n != model.cfg.vocab_size:
                raise ValueError(f"{a.vocab or a.hf or a.original}: the vocabulary has {n} symbols, "
                                 f"the model {model.cfg.vocab_size}")
        save_model(a.out, model, tok, meta=meta)
    except Exception as e:  # every failure: one line, nothing written (save_model is atomic)
        msg = str(e).strip().splitlines()[0] if isinstance(e, ValueError) and str(e).strip() else _first_line(e)
        print(f"txl-convert: error: {msg}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    print(f"txl-convert: wrote {a.out} ({n:,} parameters, vocab {model.cfg.vocab_size}"
          f"{', with tokenizer' if tok else ', no vocabulary: txl-eval cannot score text without --vocab'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
