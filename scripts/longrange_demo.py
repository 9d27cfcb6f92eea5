#!/usr/bin/env python3
"""The paper's RECL comparison (Dai et al. 2019, Table 8) at small scale, on the embedded corpus.

    python scripts/longrange_demo.py [--steps N] [--out DIR] [--tokens N] [--contexts 0,64,...]  # or: make longrange

Trains three models of the same size on the same data with the same recipe (the default txl-train
config: data=pystdlib, model=small), differing only in what the issue compares:

    xl        relative positions + recurrence  (attention=rel_ref, seq.mem_len as configured)
    nomem     relative positions, no recurrence in training (seq.mem_len=0)
    vanilla   absolute positions, no memory    (attention=absolute, seq.mem_len=0)

then runs scripts/recl.py on them over the first --tokens bytes of the corpus's test split (text
none of them trained on). Every model is evaluated the same way: each context c is an evaluation
memory of c tokens, same_length on, relative distances clamped at the training attention length.
Writes DIR/<model>/ (runs), DIR/recl.json, DIR/recl.png, DIR/recl_losses.npz (per-token losses) and
prints recl.py's Markdown tables.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {  # name -> txl-train overrides (on top of the common ones)
    "xl": [],
    "nomem": ["seq.mem_len=0"],
    "vanilla": ["attention=absolute", "seq.mem_len=0"],
}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="training steps per model (default: the config's)")
    ap.add_argument("--out", default="outputs/longrange", help="output directory (default outputs/longrange)")
    ap.add_argument("--tokens", type=int, default=65536, help="held-out bytes scored by recl.py (default 65536)")
    ap.add_argument("--contexts", default="auto", help="eval_mem_len values for recl.py (default auto)")
    ap.add_argument("--r", default="0.1,0.5,1.0")
    ap.add_argument("--batch-size", type=int, default=8, help="parallel streams in the RECL evaluation")
    ap.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    ap.add_argument("--reuse", action="store_true", help="skip training a model whose last.ckpt exists")
    ap.add_argument("overrides", nargs="*", help="extra txl-train overrides for all three, e.g. optim.lr=1e-3")
    return ap.parse_args(argv)


def train(name: str, out: Path, steps, extra: list, reuse: bool) -> Path:
    ckpt = out / name / "checkpoints" / "last.ckpt"
    if reuse and ckpt.is_file():
        print(f"longrange: {name}: reusing {ckpt}", file=sys.stderr, flush=True)
        return ckpt
    args = ["logger=csv", "metrics.final_sweep=null", "trainer.enable_progress_bar=false",
            f"hydra.run.dir={out / name}", *MODELS[name], *extra]
    if steps:
        args.append(f"trainer.max_steps={steps}")
    print(f"longrange: training {name}: txl-train {' '.join(args)}", file=sys.stderr, flush=True)
    r = subprocess.run([sys.executable, "-m", "txl.train", *args], cwd=str(ROOT), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{name}: txl-train failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    print(f"longrange: {name}: {r.stdout.strip().splitlines()[-1]}", file=sys.stderr, flush=True)
    return ckpt


def held_out_text(ckpt: Path, out: Path, n: int) -> tuple:
    """The first n tokens of the checkpoint corpus's test split as a file recl.py can read;
    -> (path, clamp_len = the training attention length tgt_len + mem_len of that run)."""
    from txl.checkpoint import read_checkpoint
    from txl.data import CorpusConfig, load_corpus
    meta = read_checkpoint(str(ckpt))["txl"]
    fields = CorpusConfig.__dataclass_fields__
    corpus = load_corpus(CorpusConfig(**{k: v for k, v in meta["data"].items() if k in fields}))
    if getattr(corpus.tokenizer, "kind", None) != "byte":
        raise ValueError("the demo writes the test split as raw bytes: it needs data.tokenizer=byte")
    path = out / "heldout.txt"
    path.write_bytes(corpus.test[:n].astype("uint8").tobytes())
    return path, meta["seq"]["tgt_len"] + meta["seq"]["mem_len"]


def main(argv=None) -> int:
    a = parse(argv)
    out = Path(a.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in a.models.split(",") if n]
    bad = [n for n in names if n not in MODELS]
    if bad:
        print(f"longrange: error: --models: unknown {bad}; valid: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    try:
        ckpts = {n: train(n, out, a.steps, a.overrides, a.reuse) for n in names}
        text, clamp = held_out_text(ckpts[names[0]], out, a.tokens)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"longrange: error: {e}", file=sys.stderr)
        return 1
    sys.path.insert(0, str(ROOT / "scripts"))
    import recl
    args = [*[str(p) for p in ckpts.values()], "--text", str(text), "--contexts", a.contexts, "--r", a.r,
            "--names", ",".join(names), "--same-length", "--clamp-len", str(clamp),
            "--batch-size", str(a.batch_size), "--json-out", str(out / "recl.json"), "--png", str(out / "recl.png"),
            "--losses-out", str(out / "recl_losses.npz")]
    print(f"longrange: python scripts/recl.py {' '.join(args)}", file=sys.stderr, flush=True)
    return recl.main(args)


if __name__ == "__main__":
    sys.exit(main())
