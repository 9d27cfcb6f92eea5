#!/usr/bin/env python3
"""Synthetic recall beyond the memory: Transformer-XL vs compressive memory at equal attention cost.

    python scripts/cmem_recall.py [--mem 16] [--tgt 8] [--distances 16,28,48] [--steps 2500] [--seeds 0,1]

Trains three tiny models (2 layers, d_model 32) on the synthetic_recall probe (data=synthetic_recall:
a payload digit comes back exactly D tokens later, after the marker of D; txl/data/sources.py) and
measures recall accuracy at D on its held-out split (chance 1 / --values). One model per (kind, D,
seed), trained on episodes of that D alone (--mix: one model per kind and seed on a mix of all the
distances; there a single-D task that TXL learns in a few hundred steps stays at chance for
thousands, the far episodes' unlearnable payloads drowning the signal):

    txl       Transformer-XL, memory M                        keys per query: M + T
    cmem      compressive, memory M/2 + M/2 slots at c = 3    keys per query: M + T (+ 0..c-1 rows)
    txl_half  Transformer-XL, memory M/2                      keys per query: M/2 + T

One layer of `cmem` reaches M/2 + c M/2 = 2M positions past the segment through the M keys that
`txl` spends on M positions, so a D between M + T and 2M + T is where the compression could pay.
Training: TXLModule (Lightning), the recipe of tests/test_metrics_recall.py; evaluation: the one
evaluation loop (txl.evaluate.evaluate_tokens) with the RecallAccuracy metric, memory carried.
Prints a Markdown table (mean over seeds, and each seed) and writes OUT/cmem_recall.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("txl", "cmem", "txl_half")


def _ints(s: str) -> list:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, got {s!r}") from None


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mem", type=int, default=16, help="M: memory of `txl` (even; default 16)")
    ap.add_argument("--tgt", type=int, default=8, help="segment length T (default 8)")
    ap.add_argument("--rate", type=int, default=3, help="compression rate c of `cmem` (default 3)")
    ap.add_argument("--fn", default="conv", choices=("conv", "mean", "max"), help="compression of `cmem`")
    ap.add_argument("--distances", type=_ints, default=[16, 28, 48], help="recall distances D (default 16,28,48)")
    ap.add_argument("--steps", type=int, default=1500, help="training steps per model (default 1500)")
    ap.add_argument("--mix", action="store_true", help="one model on all the distances (default: one per D)")
    ap.add_argument("--seeds", type=_ints, default=[0, 1], help="seeds (default 0,1)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--values", type=int, default=4, help="payload digits (chance 1/values; default 4)")
    ap.add_argument("--train-tokens", type=int, default=200_000)
    ap.add_argument("--eval-tokens", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="outputs/cmem_recall", help="output directory (default outputs/cmem_recall)")
    a = ap.parse_args(argv)
    a.models = [m for m in a.models.split(",") if m]
    bad = [m for m in a.models if m not in MODELS]
    if bad or not a.models:
        ap.error(f"--models: a subset of {','.join(MODELS)}, got {','.join(bad) or 'none'}")
    if a.mem < 2 or a.mem % 2:
        ap.error(f"--mem: an even number >= 2 (cmem uses M/2 rows + M/2 slots), got {a.mem}")
    for k in ("tgt", "rate", "steps", "batch_size", "threads"):
        if getattr(a, k) < 1:
            ap.error(f"--{k.replace('_', '-')}: must be >= 1, got {getattr(a, k)}")
    if not a.seeds or not a.distances:
        ap.error("--seeds and --distances: at least one value each")
    return a


def lengths(name: str, M: int) -> tuple:
    """(mem_len, cmem_len) of a model of the comparison."""
    return {"txl": (M, 0), "cmem": (M // 2, M // 2), "txl_half": (M // 2, 0)}[name]


def run_one(a, name: str, seed: int, corpus) -> dict:
    """Train one model on `corpus`, then recall accuracy per D of its distances on the held-out split."""
    import pytorch_lightning as pl

    from txl.config import OptimNode, SeqNode
    from txl.data import TXLDataModule
    from txl.evaluate import evaluate_tokens
    from txl.lit import TXLModule
    from txl.metrics.synthetic import RecallAccuracy, marker_ids
    from txl.model import TXLConfig

    mem, cmem = lengths(name, a.mem)
    pl.seed_everything(seed, verbose=False)
    dm = TXLDataModule(corpus, batch_size=a.batch_size, tgt_len=a.tgt, eval_batch_size=8)
    data = dm.load()
    memory = dict(kind="compressive", cmem_len=cmem, compression_rate=a.rate, compression_fn=a.fn) if cmem else {}
    cfg = TXLConfig(vocab_size=data.tokenizer.vocab_size, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64,
                    seq=dict(tgt_len=a.tgt, mem_len=mem), memory=memory)
    seq = SeqNode(tgt_len=a.tgt, mem_len=mem, eval_tgt_len=a.tgt, eval_mem_len=mem)
    module = TXLModule(cfg, OptimNode(lr=a.lr, scheduler="constant"), seq, max_steps=a.steps, unit="char")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=a.steps, limit_val_batches=0, logger=False,
                         gradient_clip_val=0.25, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(a.out))
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    train_s = time.perf_counter() - t0
    model = module.model.eval()
    metric = RecallAccuracy(marker_ids(data.tokenizer, corpus.options))
    res = evaluate_tokens(model, data.valid, a.tgt, mem, batch_size=8, hooks=[metric], projected_mems=False)
    rows = metric.summary(metric.state(model, "cpu"))["by_distance"]
    return {"model": name, "seed": seed, "mem_len": mem, "cmem_len": cmem, "keys": mem + cmem + a.tgt,
            "accuracy": {r["distance"]: r["accuracy"] for r in rows}, "n": {r["distance"]: r["n"] for r in rows},
            "val_loss": round(res["loss"], 4), "train_s": round(train_s, 1)}


def table(a, results: list) -> str:
    label = {"txl": f"TXL, mem {a.mem}", "cmem": f"compressive, mem {a.mem // 2} + cmem {a.mem // 2}, c = {a.rate}",
             "txl_half": f"TXL, mem {a.mem // 2}"}
    head = "| model | keys / query | " + " | ".join(f"D = {d}" for d in a.distances) + " | per seed |"
    lines = [head, "|---|---:|" + "---:|" * len(a.distances) + "---|"]
    for name in a.models:
        rs = [r for r in results if r["model"] == name]
        if not rs:
            continue
        mean = [sum(r["accuracy"][d] for r in rs) / len(rs) for d in a.distances]
        seeds = "; ".join("/".join(f"{r['accuracy'][d]:.3f}" for d in a.distances) for r in rs)
        lines.append(f"| {label[name]} | {rs[0]['keys']} | " + " | ".join(f"{x:.3f}" for x in mean) + f" | {seeds} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    a = parse(argv)
    import torch

    from txl.data import CorpusConfig
    from txl.runtime import quiet_third_party
    quiet_third_party()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in a.seeds:
        for name in a.models:
            rs = []
            for ds in ([a.distances] if a.mix else [[d] for d in a.distances]):
                opts = {"distances": ds, "alphabet": 4, "values": a.values, "gap": 4,
                        "train_tokens": a.train_tokens, "eval_tokens": a.eval_tokens}
                corpus = CorpusConfig(source="synthetic_recall", tokenizer="char", options=opts,
                                      cache_dir=str(out / "cache"))
                r = run_one(a, name, seed, corpus)
                print(f"cmem_recall: {name} seed {seed}: " + ", ".join(f"D={d} {x:.3f}" for d, x in
                                                                      r["accuracy"].items())
                      + f" ({r['train_s']} s)", file=sys.stderr, flush=True)
                rs.append(r)
            r = {**rs[0], "accuracy": {}, "n": {}, "val_loss": [x["val_loss"] for x in rs],
                 "train_s": round(sum(x["train_s"] for x in rs), 1)}
            for x in rs:  # one row per kind and seed: the accuracies of its model(s)
                r["accuracy"].update(x["accuracy"])
                r["n"].update(x["n"])
            results.append(r)
    doc = {"args": {k: v for k, v in vars(a).items()}, "chance": 1.0 / a.values, "results": results,
           "table": table(a, results)}
    (out / "cmem_recall.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(doc["table"])
    return doc


if __name__ == "__main__":
    main()
