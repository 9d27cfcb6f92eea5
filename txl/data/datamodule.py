"""Lightning DataModule: one corpus, an infinite ordered train stream, single-pass eval streams.

Batch sizes are GLOBAL; each rank gets batch_size // world_size rows of the same global layout
(see stream.py), so a run's data order does not depend on the number of GPUs.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from txl.data.config import CorpusConfig
from txl.data.corpus import Corpus, load_corpus
from txl.data.errors import DataError
from txl.data.stream import OrderedStream
from txl.data.tokenizers import Tokenizer


class TXLDataModule(pl.LightningDataModule):
    def __init__(self, corpus: Union[CorpusConfig, Mapping[str, Any]], batch_size: int, tgt_len: int,
                 ext_len: int = 0, eval_tgt_len: Optional[int] = None,
                 eval_batch_size: Optional[int] = None, eval_ext_len: Optional[int] = None):
        super().__init__()
        self.cfg = corpus if isinstance(corpus, CorpusConfig) else CorpusConfig.from_dict(corpus)  # the one builder
        self.batch_size, self.tgt_len, self.ext_len = int(batch_size), int(tgt_len), int(ext_len)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.eval_tgt_len = int(eval_tgt_len or tgt_len)
        self.eval_ext_len = int(ext_len if eval_ext_len is None else eval_ext_len)
        self.corpus: Optional[Corpus] = None
        self.train_stream: Optional[OrderedStream] = None
        self._pending: Optional[Dict[str, int]] = None   # position to apply to the next train stream
        self._authoritative = False                      # set_train_position beats load_state_dict

    # ------------------------------------------------------------------ corpus
    def load(self) -> Corpus:
        """Load (or fetch from cache) the corpus now, e.g. to size the model's vocabulary."""
        if self.corpus is None:
            self.corpus = load_corpus(self.cfg)
        return self.corpus

    @property
    def tokenizer(self) -> Tokenizer:
        return self.load().tokenizer

    @property
    def vocab_size(self) -> int:
        return self.load().tokenizer.vocab_size

    def prepare_data(self) -> None:
        self.load()  # Lightning runs this on local rank 0 first: tokenize + cache once per node

    def _world(self):
        t = getattr(self, "trainer", None)
        return (int(t.global_rank), int(t.world_size)) if t is not None else (0, 1)

    def _stream(self, split: str, batch_size: int, tgt_len: int, ext_len: int, infinite: bool):
        rank, world = self._world()
        if batch_size % world:
            raise DataError(f"data.{split}: global batch size {batch_size} is not divisible by "
                            f"world_size {world}")
        tokens = self.load().split(split)
        if len(tokens) == 0:
            raise DataError(f"data.{split}: the corpus has no {split} split")
        return OrderedStream(tokens, batch_size // world, tgt_len, ext_len, rank=rank,
                             world_size=world, infinite=infinite, name=f"data.{split}")

    def setup(self, stage: Optional[str] = None) -> None:
        self.load()
        if stage in (None, "fit"):  # build now: a too-short corpus fails before training starts
            self._train()
        if stage in (None, "fit", "validate"):
            self._eval("valid")

    def _train(self) -> OrderedStream:
        if self.train_stream is None:
            self.train_stream = self._stream("train", self.batch_size, self.tgt_len, self.ext_len, True)
        if self._pending is not None:
            self.train_stream.set_position(self._pending["epoch"], self._pending["pos"])
            self._pending = None
        return self.train_stream

    def _eval(self, split: str) -> OrderedStream:
        return self._stream(split, self.eval_batch_size, self.eval_tgt_len, self.eval_ext_len, False)

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        # batch_size=None: the stream yields ready batches; num_workers=0 keeps its state in-process
        return DataLoader(self._train(), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._eval("valid"), batch_size=None, num_workers=0)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._eval("test"), batch_size=None, num_workers=0)

    # ------------------------------------------------------------------ position / resume
    def set_train_position(self, epoch: int, pos: int) -> None:
        """Authoritative resume point: (epoch, pos) is the next train segment to produce.

        The module passes the last CONSUMED batch's (epoch, pos + 1); it wins over the
        (possibly prefetched-ahead) position restored by `load_state_dict`.
        """
        self._pending, self._authoritative = {"epoch": int(epoch), "pos": int(pos)}, True
        if self.train_stream is not None:
            self._train()

    def state_dict(self) -> Dict[str, Any]:
        if self.train_stream is not None:
            return {"train": self.train_stream.state_dict()}
        return {"train": dict(self._pending or {"epoch": 0, "pos": 0})}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if self._authoritative or "train" not in state_dict:
            return
        self._pending = {"epoch": int(state_dict["train"]["epoch"]), "pos": int(state_dict["train"]["pos"])}
        if self.train_stream is not None:
            self._train()
