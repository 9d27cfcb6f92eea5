"""Recall accuracy on the synthetic_recall probe (data=synthetic_recall, txl/data/sources.py).

After the marker of distance D the next token is a copy of the payload seen exactly D tokens
before it. Scored at the marker positions: the model's argmax for the next token against the
true payload, per D. A model whose reach (memory + segment, through its layers) is shorter than
D can only guess (chance = 1 / options.values); with enough memory it recalls beyond tgt_len.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

from txl.metrics.base import IGNORE, Metric


def marker_ids(tokenizer, options: Mapping) -> Dict[int, int]:
    """{distance: token id of its marker} for the corpus' tokenizer."""
    from txl.data.sources import RECALL_MARKERS, recall_options
    o = recall_options(dict(options))
    out = {}
    for k, d in enumerate(o["distances"]):
        ids = tokenizer.encode(RECALL_MARKERS[k])
        if len(ids) != 1 or int(ids[0]) == getattr(tokenizer, "unk_id", None):
            raise ValueError(f"data.options: marker {RECALL_MARKERS[k]!r} is not one token of the vocabulary")
        out[d] = int(ids[0])
    return out


def recall_counts(pred: torch.Tensor, labels: torch.Tensor, input_ids: torch.Tensor, markers: Dict[int, int]):
    """pred, labels, input_ids (B, T) -> (n_D, 2) float64 [correct, total] per marker, in the
    order of `markers`; only scored positions (labels != -100) count."""
    rows = []
    for mid in markers.values():
        at = (input_ids == mid) & (labels != IGNORE)
        rows.append(torch.stack([(pred[at] == labels[at]).sum(), at.sum()]).double())
    return torch.stack(rows)


class RecallAccuracy(Metric):
    name = "recall"

    def __init__(self, markers: Dict[int, int]):
        self.markers = dict(markers)
        self.reset()

    def reset(self):
        self.s = None

    @torch.no_grad()
    def update(self, model, batch, out, mems_in):
        dev = out.hidden.device
        ids, labels = batch["input_ids"].to(dev), batch["labels"].to(dev)
        at = torch.zeros_like(ids, dtype=torch.bool)
        for mid in self.markers.values():
            at |= ids == mid
        pred = torch.full_like(ids, -1)
        if at.any():  # full-vocabulary log-probs only where a payload is due
            w = next(model.head.parameters())
            pred[at] = model.head.log_prob(out.hidden[at].to(w.dtype)).argmax(-1)
        add = recall_counts(pred, labels, ids, self.markers)
        self.s = add if self.s is None else self.s + add

    def state(self, model, device):
        return {"counts": self.s if self.s is not None else
                torch.zeros(len(self.markers), 2, dtype=torch.float64, device=device)}

    def summary(self, st):
        rows = []
        for d, (c, n) in zip(self.markers, st["counts"].tolist()):
            rows.append({"distance": d, "accuracy": c / n if n else None, "n": int(n)})
        return {"by_distance": rows}

    def scalars(self, s, prefix):
        return {f"{prefix}_recall_acc/d{r['distance']:05d}": r["accuracy"] for r in s["by_distance"]
                if r["accuracy"] is not None}
