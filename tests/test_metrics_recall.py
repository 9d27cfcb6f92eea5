"""The synthetic long-range probe end to end: corpus structure, and a tiny Transformer-XL trained
through the LightningModule that recalls a token 3 x tgt_len back with its memory and cannot
without it (the validation hook measures both)."""
import json

import numpy as np
import pytest

from txl.data import CorpusConfig, DataError, load_corpus
from txl.data.sources import RECALL_MARKERS, recall_options, recall_text


def test_recall_text_structure():
    raw = np.frombuffer(recall_text(5000, [5, 12], alphabet=3, values=4, gap=2, seed=1), np.uint8)
    assert raw.tobytes() == recall_text(5000, [5, 12], 3, 4, 2, 1)  # deterministic
    markers = np.flatnonzero(raw < ord("a"))
    markers = markers[(raw[markers] >= ord("A"))]
    digits = np.flatnonzero((raw >= ord("0")) & (raw <= ord("9")))
    assert len(markers) > 200 and set(raw[digits]) <= set(b"0123")
    assert set(raw[(raw >= ord("a"))]) <= set(b"abc")
    for i in markers:  # the payload comes back exactly D after its source, right after the marker
        D = [5, 12][RECALL_MARKERS.index(chr(raw[i]))]
        assert raw[i + 1] == raw[i + 1 - D] and ord("0") <= raw[i + 1] <= ord("9")
        assert not ((raw[i + 2 - D: i] >= ord("0")) & (raw[i + 2 - D: i] <= ord("9"))).any()  # the only digit
    assert len(digits) == 2 * len(markers)


def test_recall_corpus_and_option_errors(tmp_path):
    opts = {"distances": [16], "alphabet": 4, "values": 4, "train_tokens": 2000, "eval_tokens": 400}
    c = load_corpus(CorpusConfig(source="synthetic_recall", tokenizer="char", options=opts, cache_dir=str(tmp_path)))
    assert c.vocab_size == 1 + 4 + 4 + 1 and len(c.train) == 2000 and len(c.valid) == 400
    assert recall_options({"distances": 24})["distances"] == [24]
    for bad, where in (({"distances": [1]}, "distances"), ({"values": 11}, "values"), ({"nope": 1}, "unknown"),
                       ({"train_tokens": 10}, "train_tokens")):
        with pytest.raises(DataError, match=where):
            CorpusConfig(source="synthetic_recall", tokenizer="char", options=bad)
    with pytest.raises(DataError, match="char or byte"):
        CorpusConfig(source="synthetic_recall", tokenizer="word")


@pytest.mark.slow
def test_memory_recalls_beyond_the_segment_and_no_memory_cannot(tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from txl.config import MetricsNode, OptimNode, SeqNode
    from txl.data import TXLDataModule
    from txl.lit import TXLModule
    from txl.metrics import build_val_hooks
    from txl.model import TXLConfig

    import torch
    pl.seed_everything(0, verbose=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threading costs more than it saves
    T, D = 8, 24  # the payload is three segments back: only the memory (mem_len 24) can reach it
    opts = {"distances": [D], "alphabet": 4, "values": 4, "gap": 4, "train_tokens": 60_000, "eval_tokens": 8_000}
    corpus = CorpusConfig(source="synthetic_recall", tokenizer="char", options=opts, cache_dir=str(tmp_path / "c"))
    # one evaluation stream: each stream starts with an empty memory, so a stream boundary cuts an
    # episode from its source (with 8 streams 3-6 of the ~300 recalls, a 0.98 ceiling). Batch 32: ~9
    # recalls a step (batch 16 learned it in 400 steps for one seed in two)
    dm = TXLDataModule(corpus, batch_size=32, tgt_len=T, eval_batch_size=1)
    tok = dm.load().tokenizer
    seq = SeqNode(tgt_len=T, mem_len=D, eval_tgt_len=T, eval_mem_len=D)
    cfg = TXLConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=2, d_head=32, d_inner=128,
                    seq=dict(tgt_len=T, mem_len=D))
    steps = 400
    module = TXLModule(cfg, OptimNode(lr=3e-3, warmup_steps=40, scheduler="cosine"), seq, max_steps=steps, unit="char")
    module.val_hooks = build_val_hooks(MetricsNode(attention_batches=1), corpus, tok)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, val_check_interval=steps,
                         check_val_every_n_epoch=None, gradient_clip_val=0.25, logger=CSVLogger(str(tmp_path / "logs"), name="", version=""),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    key = f"val_recall_acc/d{D:05d}"
    try:
        trainer.fit(module, datamodule=dm)
        with_mem = float(trainer.callback_metrics[key])
        seq.eval_mem_len = 0  # the same weights, evaluated without memory
        trainer.validate(module, datamodule=dm, verbose=False)
        no_mem = float(trainer.callback_metrics[key])
    finally:
        torch.set_num_threads(threads)
    print(f"recall accuracy at D={D}: with memory {with_mem:.3f}, without {no_mem:.3f}")
    assert with_mem >= 0.99, with_mem
    # chance is 1 / values = 0.25 (~300 recalls: sd 0.025); the argmax is over the whole vocabulary, so
    # a model that cannot see the payload may also answer a letter (below chance), but not above it
    assert no_mem <= 0.25 + 0.1, no_mem
    hist = [json.loads(x) for x in (tmp_path / "metrics" / "val.jsonl").read_text().splitlines()]
    assert [h["recall"]["by_distance"][0]["accuracy"] for h in hist] == pytest.approx([with_mem, no_mem])
    assert hist[1]["attention"]["layer_memory_mass"] == [0.0, 0.0]
    assert (tmp_path / "metrics" / "val_recall.png").is_file()
