"""txl-eval: perplexity of a checkpoint on a long text, with the paper's evaluation lengths.

    txl-eval ckpt_path=run/checkpoints/last.ckpt                       # the checkpoint's test split
    txl-eval ckpt_path=wt103.pt eval.text_file=book.txt seq.eval_mem_len=1600 seq.clamp_len=1000

Prints one JSON line {"tokens","loss","ppl","bpc","tgt_len","mem_len",...,"metrics"} and writes eval.json
(metrics: loss by position / available context and attention statistics, txl/metrics).

    txl-eval ckpt_path=... metrics.context_sweep=auto       # or [0,64,128,256]: ppl per eval_mem_len,
                                                            # effective context; table on stderr,
                                                            # context_sweep.json / .png next to eval.json
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from txl.config import register, to_objects
from txl.train import CONF_DIR, precheck_run_dir

LN2 = math.log(2.0)


def fail(msg: str, code: int = 2) -> None:
    print(f"txl-eval: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


@torch.inference_mode()
def evaluate_tokens(model, tokens: np.ndarray, tgt_len: int, mem_len: int, batch_size: int = 1,
                    warmup_tokens: int = 0, precision: str = "32", progress: bool = False,
                    hooks: Optional[list] = None, projected_mems: bool = True) -> dict:
    """Score `tokens` as batch_size ordered streams, tgt_len at a time, memory carried.

    The first `warmup_tokens` of every stream only fill the memory (not scored). The model's
    other lengths (clamp_len, same_length) are left as set. projected_mems: memories as keys / values
    (txl.model.ProjectedMems; same result, faster). Returns loss (nats/token) and counts.
    """
    from txl.data.stream import OrderedStream
    model.eval()
    if len(tokens) < 2:
        raise ValueError(f"eval text: {len(tokens)} token(s); at least 2 are needed to score one")
    tgt_len = max(1, min(tgt_len, (len(tokens) - 1) // batch_size))  # a short text is one short segment
    model.set_lengths(tgt_len=tgt_len, mem_len=mem_len)
    stream = OrderedStream(tokens, batch_size, tgt_len, name="eval text")
    dev = next(model.parameters()).device
    nll_sum, n_tok, mems = 0.0, 0, None
    t0 = time.perf_counter()
    it = stream
    if progress:
        from tqdm import tqdm
        it = tqdm(stream, total=len(stream), desc="eval", unit="seg", file=sys.stderr, leave=False)
    for batch in it:
        ids, labels = batch["input_ids"].to(dev), batch["labels"].to(dev)
        if warmup_tokens:
            col = batch["pos"] * tgt_len + torch.arange(ids.size(1), device=dev)
            labels = labels.masked_fill(col[None, :] < warmup_tokens, -100)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            mems_in = mems if mems is not None else model.init_mems(ids.size(0), projected=projected_mems)
            out = model(ids, mems=mems_in, labels=labels)
        mems = out.mems
        nll_sum += float(out.nll.double().sum())
        n_tok += int((labels != -100).sum())
        for h in hooks or []:
            h.update(model, {**batch, "labels": labels}, out, mems_in)
    dt = time.perf_counter() - t0
    loss = nll_sum / max(n_tok, 1)
    return {"tokens": n_tok, "loss": loss, "tgt_len": tgt_len, "ppl": math.exp(min(loss, 700)), "seconds": round(dt, 3),
            "tokens_per_s": round(stream.batch_size * stream.n_step / max(dt, 1e-9), 1)}


def sweep_contexts(mcfg, tgt_len: int, mem_len: int) -> Optional[list]:
    """metrics.context_sweep -> the eval_mem_len values to score (None: no sweep)."""
    if not mcfg.enabled or mcfg.context_sweep is None:
        return None
    from txl.metrics.recl import parse_contexts
    return parse_contexts(mcfg.context_sweep, tgt_len, mem_len, mcfg.sweep_max, where="metrics.context_sweep")


def run_sweep(c, model, tokens, tgt_len: int, mem_len: int, same: bool, contexts: list, tok_losses, unit,
              out_dir: Path) -> dict:
    """Score the text at every memory length; the table goes to stderr (stdout keeps one JSON line),
    context_sweep.json / .png next to eval.json; returns the compact result for that line."""
    from txl.metrics.context import summarize_sweep, sweep
    from txl.metrics.plots import plot_sweep
    from txl.metrics.recl import sweep_table
    reuse = {mem_len: tok_losses.values()} if tok_losses is not None else None
    res = sweep(model, tokens, tgt_len, contexts, c.eval.batch_size, c.eval.warmup_tokens, c.eval.precision,
                same_length=same, reuse=reuse, progress=sys.stderr.isatty())
    full = summarize_sweep(res, c.metrics.threshold)
    full.update(tgt_len=tgt_len, same_length=same, ckpt=str(c.ckpt_path))
    e = full["ecl"]
    print(sweep_table(full["contexts"], full["loss"], unit), file=sys.stderr)
    print(f"effective context (relative ppl gain < {e['threshold']:g} per step): "
          f"{e['ecl']}{'+' if e['saturated'] else ''}", file=sys.stderr, flush=True)
    (out_dir / "context_sweep.json").write_text(json.dumps(full, indent=2) + "\n")
    if c.metrics.plots:
        plot_sweep({"model": (full["contexts"], full["loss"])}, out_dir / "context_sweep.png", {"model": e["ecl"]},
                   title=f"context sweep (tgt_len {tgt_len})")
    return {"mem_len": full["contexts"], "loss": full["loss"], "ppl": full["ppl"], "ecl": e["ecl"],
            "ecl_saturated": e["saturated"], "file": str(out_dir / "context_sweep.json")}


def load_text_tokens(path: str, tok) -> np.ndarray:
    from txl.data import DataError
    p = Path(path)
    if not p.is_file():
        raise DataError(f"eval.text_file: file not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"eval.text_file: cannot read {p} ({e.strerror})") from None
    if not raw.strip():
        raise DataError(f"eval.text_file: {p} is empty")
    ids = tok.encode_bytes(raw, where=f"eval.text_file {p}")
    special = [i for i in (getattr(tok, "unk_id", None), getattr(tok, "eos_id", None)) if i is not None]
    if special and not bool(np.isin(ids, special, invert=True).any()):
        raise DataError(f"eval.text_file: {p} has no token known to the checkpoint's vocabulary")
    unk = getattr(tok, "unk_id", None)
    if unk is not None and ids.size and float(np.mean(ids == unk)) > 0.5:
        print(f"txl-eval: warning: {float(np.mean(ids == unk)):.0%} of {p}'s tokens are unknown to the vocabulary",
              file=sys.stderr)
    return ids


def run(cfg: DictConfig) -> dict:
    from txl.checkpoint import load_model
    from txl.data import CorpusConfig, load_corpus, tokenizer_from_state
    from txl.metrics import build_metrics, summarize
    from txl.metrics.context import TokenLosses
    from txl.metrics.hooks import draw

    c = to_objects(cfg)
    torch.set_flush_denormal(True)  # denormal attention probabilities slow CPU GEMMs up to ~40x
    model, tok_state, ck = load_model(c.ckpt_path, map_location=c.eval.device)
    saved = ck.get("txl", {}).get("seq") or {}
    ms = model.cfg.seq
    tgt = c.seq.eval_tgt_len or saved.get("eval_tgt_len") or ms.tgt_len
    mem = c.seq.eval_mem_len if c.seq.eval_mem_len is not None else saved.get("eval_mem_len", ms.mem_len)
    clamp = c.seq.clamp_len if c.seq.clamp_len is not None else ms.clamp_len
    same = c.seq.same_length if c.seq.same_length is not None else ms.same_length
    model.set_lengths(tgt_len=tgt, mem_len=mem, clamp_len=clamp, same_length=same, ext_len=0)
    if tok_state is None and not c.eval.text_file:
        raise ValueError("ckpt_path: this checkpoint carries no vocabulary; nothing to tokenize with")
    tok = tokenizer_from_state(tok_state) if tok_state is not None else None
    if c.eval.text_file:
        tokens, source = load_text_tokens(c.eval.text_file, tok), c.eval.text_file
    else:
        data = ck.get("txl", {}).get("data")
        if not data:
            raise ValueError("eval.text_file: this checkpoint has no data config of its own; pass eval.text_file=PATH")
        fields = CorpusConfig.__dataclass_fields__
        corpus = load_corpus(CorpusConfig(**{k: v for k, v in data.items() if k in fields}))
        tokens, source = corpus.split(c.eval.split), f"{corpus.name}:{c.eval.split}"
    if c.eval.max_tokens:
        tokens = tokens[: c.eval.max_tokens]
    dcfg = ck.get("txl", {}).get("data") or {}
    metrics = build_metrics(c.metrics, dcfg.get("source"), dcfg.get("options"), tok)
    sweep_ctx = sweep_contexts(c.metrics, tgt, mem)
    tok_losses = TokenLosses() if sweep_ctx and mem in sweep_ctx else None
    res = evaluate_tokens(model, tokens, tgt, mem, c.eval.batch_size, c.eval.warmup_tokens, c.eval.precision,
                          progress=sys.stderr.isatty(), hooks=metrics + ([tok_losses] if tok_losses else []),
                          projected_mems=c.eval.mems == "projected")
    unit = getattr(tok, "unit", None) if tok is not None else None
    out = {"tokens": res["tokens"], "loss": round(res["loss"], 6), "ppl": round(res["ppl"], 4),
           "bpc": round(res["loss"] / LN2, 6) if unit else None, "unit": unit,
           "tgt_len": res["tgt_len"], "mem_len": mem, "clamp_len": clamp, "same_length": same,
           "batch_size": c.eval.batch_size, "warmup_tokens": c.eval.warmup_tokens,
           "tokens_per_s": res["tokens_per_s"], "seconds": res["seconds"],
           "ckpt": str(c.ckpt_path), "text": source}
    path = Path(c.eval.output or Path(c.run_dir or ".") / "eval.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    if metrics:
        out["metrics"] = summarize(metrics, model, next(model.parameters()).device)
        if c.metrics.plots:
            draw([{"step": "eval", **out["metrics"]}], path.parent, "eval")
    if sweep_ctx:  # the same text once per memory length: ppl table, effective context length
        out["context_sweep"] = run_sweep(c, model, tokens, res["tgt_len"], mem, same, sweep_ctx, tok_losses, unit,
                                         path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, path)
    print(json.dumps(out), flush=True)
    return out


def _task(cfg: DictConfig) -> None:
    from txl.checkpoint import CheckpointError
    from txl.runtime import quiet_third_party, setup_threads
    try:
        quiet_third_party()
        setup_threads(cfg.threads)
        run(cfg)
    except (ValueError, CheckpointError, OSError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def main() -> None:
    register()
    precheck_run_dir(sys.argv[1:], "txl-eval")
    hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
