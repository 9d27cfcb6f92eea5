"""Wiring: the validation hook TXLModule calls, and the metric lists txl-train / txl-eval build.

At every validation end `ValMetrics.finish` sums each metric's state over DDP ranks, logs the
scalars through Lightning (CSV columns / wandb charts), and on rank 0 appends one JSON record to
<run dir>/metrics/<prefix>.jsonl, redraws the PNGs there from that history and, with a
WandbLogger, logs tables, line plots and the images.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from txl.metrics import plots
from txl.metrics.attention_maps import AttentionMaps
from txl.metrics.attention_stats import AttentionStats
from txl.metrics.base import Metric
from txl.metrics.position import LossByContext, LossByPosition
from txl.metrics.synthetic import RecallAccuracy, marker_ids

PNGS = {"position": "loss_by_position", "context": "loss_by_context", "attention": "attention",
        "recall": "recall"}


def build_metrics(cfg: Any, source: Optional[str] = None, options: Optional[dict] = None,
                  tokenizer=None) -> List[Metric]:
    """The metrics a MetricsNode asks for; recall only on the synthetic_recall corpus."""
    if cfg is None or not cfg.enabled:
        return []
    out: List[Metric] = []
    if cfg.position_buckets:
        out.append(LossByPosition(cfg.position_buckets, cfg.nomem_batches))
    if cfg.context_buckets:
        out.append(LossByContext())
    if cfg.attention_stats and cfg.attention_batches:
        out.append(AttentionStats(cfg.attention_batches, cfg.attention_rows))
    if cfg.recall and source == "synthetic_recall" and tokenizer is not None:
        out.append(RecallAccuracy(marker_ids(tokenizer, options or {})))
    if getattr(cfg, "attention_maps", False):
        out.append(AttentionMaps(tokenizer, cfg.attention_maps_segment))
    return out


def draw_metrics(metrics: List[Metric], out_dir: Path, prefix: str) -> Dict[str, str]:
    """PNGs the metrics draw themselves from what they captured (attention maps) -> {name: path}."""
    paths: Dict[str, str] = {}
    for m in metrics:
        if hasattr(m, "draw"):
            paths.update(m.draw(out_dir, prefix))
    return paths


def build_val_hooks(cfg: Any, data: Any = None, tokenizer=None) -> list:
    """For TXLModule.val_hooks: [] when metrics are off, else one ValMetrics."""
    ms = build_metrics(cfg, getattr(data, "source", None), getattr(data, "options", None), tokenizer)
    chance = None
    if any(isinstance(m, RecallAccuracy) for m in ms):
        from txl.data.sources import recall_options
        chance = 1.0 / recall_options(data.options)["values"]
    return [ValMetrics(ms, plots=cfg.plots, chance=chance)] if ms else []


def summarize(metrics: List[Metric], model, device) -> Dict[str, dict]:
    """Single-process summaries (txl-eval): {metric name: summary}."""
    return {m.name: m.summary(m.state(model, device)) for m in metrics}


def draw(records: List[dict], out_dir: Path, prefix: str, chance: Optional[float] = None) -> Dict[str, str]:
    """PNGs from a history of records (oldest first) -> {metric name: path}."""
    out_dir, paths = Path(out_dir), {}
    for name, fn in (("position", plots.plot_position), ("context", plots.plot_context)):
        p = fn(records, out_dir / f"{prefix}_{PNGS[name]}.png")
        if p:
            paths[name] = p
    if records and records[-1].get("attention"):
        p = plots.plot_attention(records[-1]["attention"], out_dir / f"{prefix}_{PNGS['attention']}.png")
        if p:
            paths["attention"] = p
    p = plots.plot_recall(records, out_dir / f"{prefix}_{PNGS['recall']}.png", chance)
    if p:
        paths["recall"] = p
    return paths


def read_jsonl(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wandb_payload(record: dict, prefix: str, images: Dict[str, str]) -> dict:
    """Tables, line plots and images of one record, keyed '<prefix>_metrics/...'."""
    import wandb
    out: Dict[str, Any] = {}
    key = f"{prefix}_metrics"
    pos = record.get("position")
    if pos and pos.get("edges"):
        rows = [[lo, hi, v] for (lo, hi), v in zip(pos["edges"], pos["loss"]) if v is not None]
        t = wandb.Table(columns=["first_position", "last_position", "loss"], data=rows)
        out[f"{key}/loss_by_position"] = wandb.plot.line(t, "first_position", "loss", title=f"{prefix} loss by position")
    ctx = record.get("context")
    if ctx and ctx.get("buckets"):
        rows = [[b["lo"], b["hi"], b["loss"], b["tokens"]] for b in ctx["buckets"]]
        t = wandb.Table(columns=["context_lo", "context_hi", "loss", "tokens"], data=rows)
        out[f"{key}/loss_by_context"] = wandb.plot.line(t, "context_lo", "loss", title=f"{prefix} loss by context")
    att = record.get("attention")
    if att and att.get("distance"):
        rows = [[l, h, d, m] for l, (dl, ml) in enumerate(zip(att["distance"], att["memory_mass"]))
                for h, (d, m) in enumerate(zip(dl, ml))]
        out[f"{key}/attention"] = wandb.Table(columns=["layer", "head", "mean_distance", "memory_mass"], data=rows)
    rec = record.get("recall")
    if rec and rec.get("by_distance"):
        rows = [[r["distance"], r["accuracy"], r["n"]] for r in rec["by_distance"] if r["accuracy"] is not None]
        t = wandb.Table(columns=["distance", "accuracy", "n"], data=rows)
        out[f"{key}/recall"] = wandb.plot.line(t, "distance", "accuracy", title=f"{prefix} recall accuracy vs D")
    for name, path in images.items():
        out[f"{key}/{name}_png"] = wandb.Image(path)
    return out


class ValMetrics:
    """The one object in TXLModule.val_hooks: fans the calls out to the metrics."""

    def __init__(self, metrics: List[Metric], plots: bool = True, chance: Optional[float] = None):
        self.metrics, self.plots, self.chance = list(metrics), plots, chance

    def reset(self):
        for m in self.metrics:
            m.reset()

    def update(self, model, batch, out, mems_in):
        for m in self.metrics:
            m.update(model, batch, out, mems_in)

    def finish(self, module, prefix: str) -> dict:
        trainer = module.trainer
        record: Dict[str, Any] = {"step": int(module.global_step), "prefix": prefix}
        for m in self.metrics:  # every rank reduces, in the same order
            st = {k: trainer.strategy.reduce(v, reduce_op="sum") for k, v in m.state(module.model, module.device).items()}
            s = record[m.name] = m.summary(st)
            for k, v in m.scalars(s, prefix).items():
                module.log(k, float(v), sync_dist=False)
        if trainer.is_global_zero:
            self.write(record, Path(trainer.default_root_dir) / "metrics", prefix, module.logger)
        return record

    def write(self, record: dict, out_dir: Path, prefix: str, logger=None) -> Dict[str, str]:
        out_dir.mkdir(parents=True, exist_ok=True)
        hist = out_dir / f"{prefix}.jsonl"
        with open(hist, "a") as f:
            f.write(json.dumps(record) + "\n")
        images = draw(read_jsonl(hist), out_dir, prefix, self.chance) if self.plots else {}
        images.update(draw_metrics(self.metrics, out_dir, prefix))  # attention maps: -> wandb images too
        from pytorch_lightning.loggers import WandbLogger
        if isinstance(logger, WandbLogger):
            payload = wandb_payload(record, prefix, images)
            if payload:
                logger.experiment.log({**payload, "trainer/global_step": record["step"]})
        return images
