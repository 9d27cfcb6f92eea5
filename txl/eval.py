"""txl-eval: perplexity of a checkpoint on a long text, with the paper's evaluation lengths.

    txl-eval ckpt_path=run/checkpoints/last.ckpt                       # the checkpoint's test split
    txl-eval ckpt_path=wt103.pt eval.text_file=book.txt seq.eval_mem_len=1600 seq.eval_clamp_len=1000
    txl-eval ckpt_path=pg19.ckpt 'eval.text_file=books/*.txt' eval.reset_mems_at_doc=true   # per book

Prints one JSON line {"tokens","loss","ppl","bpc","tgt_len","mem_len",...,"metrics"} and writes eval.json
(metrics: loss by position / available context and attention statistics, txl/metrics).

    txl-eval ckpt_path=... metrics.context_sweep=auto       # or [0,64,128,256]: ppl per eval_mem_len,
                                                            # effective context; table on stderr,
                                                            # context_sweep.json / .png next to eval.json
    txl-eval ckpt_path=... eval.cmem_len=16 metrics.cmem_sweep=auto   # memory=compressive: slots kept;
                                                            # ppl per cmem_len -> cmem_sweep.json / .png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from txl.cli import CONF_DIR, error_line, exit_code, fail
from txl.config import register, to_objects
from txl.evaluate import LN2, evaluate_tokens  # noqa: F401  (the loop lives in the library)
from txl.files import atomic_write_text


def sweep_contexts(mcfg, tgt_len: int, mem_len: int) -> Optional[list]:
    """metrics.context_sweep -> the eval_mem_len values to score (None: no sweep)."""
    if not mcfg.enabled or mcfg.context_sweep is None:
        return None
    from txl.metrics.recl import parse_contexts
    return parse_contexts(mcfg.context_sweep, tgt_len, mem_len, mcfg.sweep_max, where="metrics.context_sweep")


def sweep_cmem(mcfg, cmem_len: Optional[int]) -> Optional[list]:
    """metrics.cmem_sweep -> the cmem_len values to score (None: no sweep); cmem_len: the evaluation's
    slot count (None: the model is not compressive)."""
    if not mcfg.enabled or mcfg.cmem_sweep is None:
        return None
    if cmem_len is None:
        raise ValueError("metrics.cmem_sweep: this checkpoint's memory is not compressive (no compressed slots "
                         "to sweep); sweep its memory with metrics.context_sweep")
    if mcfg.cmem_sweep == "auto":
        if cmem_len < 1:
            raise ValueError("metrics.cmem_sweep=auto: needs eval.cmem_len >= 1 (it sweeps 0, C/2, C, 2C); "
                             "give the values, e.g. metrics.cmem_sweep=[0,16,32]")
        from txl.metrics.recl import auto_cmem_lens
        return auto_cmem_lens(cmem_len)
    return list(mcfg.cmem_sweep)  # checked when the config was built (MetricsNode)


# what each sweep varies -> (file stem, table column, plot's x label, what its ECL is called)
SWEEP_NAMES = {"mem_len": ("context_sweep", "eval_mem_len", "evaluation memory length (eval_mem_len)",
                           "effective context"),
               "cmem_len": ("cmem_sweep", "cmem_len", "compressed slots at evaluation (cmem_len)",
                            "effective compressed memory")}


def run_sweep(c, model, tokens, tgt_len: int, same: bool, values: list, reuse, unit, out_dir: Path,
              over: str = "mem_len", progress: bool = False, doc_starts=None) -> dict:
    """Score the text at every memory length (over='mem_len') or compressed slot count
    ('cmem_len'); the table goes to stderr (stdout keeps one JSON line), <stem>.json / .png next to
    eval.json; returns the compact result for that line. reuse: {value: per-token losses}."""
    from txl.metrics.context import summarize_sweep, sweep
    from txl.metrics.plots import plot_sweep
    from txl.metrics.recl import sweep_table
    stem, col, xlabel, ecl_name = SWEEP_NAMES[over]
    res = sweep(model, tokens, tgt_len, values, c.eval.batch_size, c.eval.warmup_tokens, c.eval.precision,
                same_length=same, reuse=reuse, progress=progress, over=over, doc_starts=doc_starts)
    full = summarize_sweep(res, c.metrics.threshold)
    full.update(over=over, tgt_len=tgt_len, same_length=same, ckpt=str(c.ckpt_path))
    if over == "cmem_len":
        full.update(mem_len=model.seq.mem_len, compression_rate=model.compressor.rate)
    e = full["ecl"]
    print(sweep_table(full["contexts"], full["loss"], unit, name=col), file=sys.stderr)
    print(f"{ecl_name} (relative ppl gain < {e['threshold']:g} per step): "
          f"{e['ecl']}{'+' if e['saturated'] else ''}", file=sys.stderr, flush=True)
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(full, indent=2) + "\n")
    if c.metrics.plots:
        title = f"{stem.replace('_', ' ')} (tgt_len {tgt_len}" + (f", mem_len {model.seq.mem_len})"
                                                                  if over == "cmem_len" else ")")
        plot_sweep({"model": (full["contexts"], full["loss"])}, out_dir / f"{stem}.png", {"model": e["ecl"]},
                   title=title, xlabel=xlabel)
    return {over: full["contexts"], "loss": full["loss"], "ppl": full["ppl"], "ecl": e["ecl"],
            "ecl_saturated": e["saturated"], "file": str(out_dir / f"{stem}.json")}


def load_text_tokens(path: str, tok, max_tokens=None, with_docs: bool = False):
    """ids of a text file, a directory or a glob (one document per file); with_docs: (ids, document
    starts or None)."""
    from txl.data import DataError
    from txl.data.reader import read_text_docs
    p = Path(path)
    ids, docs = read_text_docs(p, tok, max_tokens, where="eval.text_file")  # streamed: stops at max_tokens
    special = [i for i in (getattr(tok, "unk_id", None), getattr(tok, "eos_id", None)) if i is not None]
    if special and not bool(np.isin(ids, special, invert=True).any()):
        raise DataError(f"eval.text_file: {p} has no token known to the checkpoint's vocabulary")
    unk = getattr(tok, "unk_id", None)
    if unk is not None and ids.size and float(np.mean(ids == unk)) > 0.5:
        print(f"txl-eval: warning: {float(np.mean(ids == unk)):.0%} of {p}'s tokens are unknown to the vocabulary",
              file=sys.stderr)
    return (ids, docs) if with_docs else ids


def run(cfg: DictConfig) -> dict:
    from txl.checkpoint import load_model
    from txl.data import CorpusConfig, load_corpus, tokenizer_from_state
    from txl.metrics import build_metrics, summarize
    from txl.metrics.context import TokenLosses
    from txl.metrics.hooks import draw, draw_metrics

    from txl.cli import check_writable
    from txl.config import validate_eval
    from txl.data import DataError

    c = to_objects(cfg)
    validate_eval(c)
    path = Path(c.eval.output or Path(c.run_dir or ".") / "eval.json")
    try:  # before any work: an unwritable eval.output must not cost a whole evaluation
        check_writable(path.parent)
    except ValueError as e:
        raise ValueError(f"eval.output: {e}") from None
    torch.set_flush_denormal(True)  # denormal attention probabilities slow CPU GEMMs up to ~40x
    model, tok_state, ck = load_model(c.ckpt_path, map_location=c.eval.device)
    saved = ck.get("txl", {}).get("seq") or {}
    ms = model.cfg.seq
    tgt = c.seq.eval_tgt_len or saved.get("eval_tgt_len") or ms.tgt_len
    if c.seq.eval_mem_len is not None:
        mem = c.seq.eval_mem_len
    elif "eval_mem_len" in saved and tgt == saved.get("eval_tgt_len"):
        mem = saved["eval_mem_len"]
    else:  # the original's rule from the training lengths (txl.config.default_eval_mem_len)
        from txl.config import default_eval_mem_len
        mem = default_eval_mem_len(saved.get("tgt_len", ms.tgt_len), saved.get("mem_len", ms.mem_len), tgt)
    # the run's evaluation settings (seq.eval_*); a checkpoint from before them: the model's own
    clamp = c.seq.eval_clamp_len if c.seq.eval_clamp_len is not None else saved.get("eval_clamp_len", ms.clamp_len)
    same = c.seq.eval_same_length if c.seq.eval_same_length is not None else saved.get("eval_same_length", ms.same_length)
    model.set_lengths(tgt_len=tgt, mem_len=mem, clamp_len=clamp, same_length=same, ext_len=0)
    if c.eval.cmem_len is not None:  # memory=compressive only (refused in one line otherwise)
        model.set_cmem_len(c.eval.cmem_len, where="eval.cmem_len")
    cmem = model.cmem_len  # None: not a compressive model
    sweep_c = sweep_cmem(c.metrics, cmem)  # before any work: a wrong sweep must not cost an evaluation
    if tok_state is None:  # e.g. txl-convert --original without --vocab
        raise ValueError(f"ckpt_path: {c.ckpt_path} carries no vocabulary, so no text can be tokenized for it "
                         f"(txl-convert --vocab adds the original's)")
    tok = tokenizer_from_state(tok_state) if tok_state is not None else None
    doc_starts = None
    if c.eval.text_file:
        try:
            tokens, doc_starts = load_text_tokens(c.eval.text_file, tok, c.eval.max_tokens, with_docs=True)
            source = c.eval.text_file
        except DataError as e:  # the data layer's advice names training settings: say what eval can do
            msg = str(e).split("; use data.tokenizer=")[0]
            if msg == str(e):
                raise
            raise DataError(f"{msg}; this checkpoint's {tok.kind} tokenizer reads UTF-8 text only "
                            "(a model trained with data.tokenizer=byte reads any file)") from None
    else:
        data = ck.get("txl", {}).get("data")
        if not data:
            raise ValueError("eval.text_file: this checkpoint has no data config of its own; pass eval.text_file=PATH")
        corpus = load_corpus(CorpusConfig.from_dict(data, strict=False))
        tokens, source = corpus.split(c.eval.split), f"{corpus.name}:{c.eval.split}"
        doc_starts = corpus.doc_starts(c.eval.split)
    if doc_starts is None and c.eval.reset_mems_at_doc:
        raise DataError("eval.reset_mems_at_doc: no document starts for a tokenizer=hf model (its encode_batch "
                        "items span documents); set eval.reset_mems_at_doc=false")
    if c.eval.max_tokens:
        tokens = tokens[: c.eval.max_tokens]
    n_docs = int(np.count_nonzero(np.asarray(doc_starts) < len(tokens))) if doc_starts is not None else None
    progress = sys.stderr.isatty() if c.eval.progress is None else c.eval.progress
    dcfg = ck.get("txl", {}).get("data") or {}
    metrics = build_metrics(c.metrics, dcfg.get("source"), dcfg.get("options"), tok)
    sweep_ctx = sweep_contexts(c.metrics, tgt, mem)
    # the main pass's per-token losses stand for the sweeps' entry at its own setting
    tok_losses = TokenLosses() if (sweep_ctx and mem in sweep_ctx) or (sweep_c and cmem in sweep_c) else None
    unit = getattr(tok, "unit", None) if tok is not None else None
    docs = doc_starts if c.eval.reset_mems_at_doc else None  # the main pass and the sweeps alike
    res = evaluate_tokens(model, tokens, tgt, mem, c.eval.batch_size, c.eval.warmup_tokens, c.eval.precision,
                          progress=progress, hooks=metrics + ([tok_losses] if tok_losses else []),
                          projected_mems=c.eval.mems == "projected", mem_dtype=c.eval.mem_dtype,
                          doc_starts=docs, unit=unit)
    bits = round(res["loss"] / LN2, 6) if unit else None  # bits per byte (bpb) or per char (bpc)
    out = {"tokens": res["tokens"], "loss": round(res["loss"], 6), "ppl": round(res["ppl"], 4),
           **({"bpb": bits} if unit == "byte" else {}),
           "bpc": bits, "unit": unit,  # byte corpora: "bpc" = bpb, an alias kept for one release
           "tgt_len": res["tgt_len"], "mem_len": mem, **({"cmem_len": cmem} if cmem is not None else {}),
           "clamp_len": clamp, "same_length": same,
           "batch_size": c.eval.batch_size, "warmup_tokens": c.eval.warmup_tokens,
           "reset_mems_at_doc": c.eval.reset_mems_at_doc, "documents": n_docs,
           "tokens_per_s": res["tokens_per_s"], "seconds": res["seconds"],
           "ckpt": str(c.ckpt_path), "text": source}
    if metrics:
        out["metrics"] = summarize(metrics, model, next(model.parameters()).device)
        if c.metrics.plots:
            draw([{"step": "eval", **out["metrics"]}], path.parent, "eval")
        draw_metrics(metrics, path.parent, "eval")  # metrics.attention_maps: eval_attention_*.png
    own = tok_losses.values() if tok_losses is not None else None
    if sweep_ctx:  # the same text once per memory length: ppl table, effective context length
        out["context_sweep"] = run_sweep(c, model, tokens, res["tgt_len"], same, sweep_ctx,
                                         {mem: own} if own is not None else None, unit, path.parent,
                                         progress=progress, doc_starts=docs)
    if sweep_c:  # ... once per number of compressed slots, at this mem_len
        out["cmem_sweep"] = run_sweep(c, model, tokens, res["tgt_len"], same, sweep_c,
                                      {cmem: own} if own is not None else None, unit, path.parent, over="cmem_len",
                                      progress=progress, doc_starts=docs)
    atomic_write_text(path, json.dumps(out, indent=2) + "\n")
    print(json.dumps(out), flush=True)
    return out


def _task(cfg: DictConfig) -> None:
    from txl.cli import require_ckpt_path
    from txl.runtime import quiet_third_party, setup_threads
    require_ckpt_path(cfg)
    try:
        quiet_third_party()
        setup_threads(cfg.threads)
        run(cfg)
    except KeyboardInterrupt:
        fail("interrupted; nothing written", code=130)
    except (ValueError, OSError) as e:  # CheckpointError, DataError are ValueErrors
        fail(error_line(e), code=exit_code(e))


def main() -> None:
    from txl.cli import precheck_run_dir, register_resolvers, set_tool
    set_tool("txl-eval")
    register()
    register_resolvers()
    precheck_run_dir(sys.argv[1:])
    hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
