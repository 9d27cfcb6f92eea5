"""Long-range dependency metrics: what the memory buys, measured during training and in eval.

  base.py             the Metric protocol (update per batch, sum-reducible state, summary)
  position.py         loss by position in the segment and by available context (log2 buckets)
  attention_stats.py  per layer / head: mean attended distance, attention mass on the memory
  attention_maps.py   heat maps of one segment's attention over [memory | segment], distance profile
  synthetic.py        recall accuracy vs distance on the synthetic_recall corpus
  context.py          context sweep (several eval_mem_len on the same text), per-token losses
  recl.py             ECL of a model, RECL of a model group (Dai et al. 2019 appendix C)
  plots.py            PNGs; hooks.py: the validation hook, JSON / PNG / wandb output

Validation: `TXLModule.val_hooks = build_val_hooks(cfg.metrics, cfg.data, tokenizer)`.
"""
from txl.metrics.hooks import ValMetrics, build_metrics, build_val_hooks, summarize  # noqa: F401
