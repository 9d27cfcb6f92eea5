"""Ordered segment streams (Transformer-XL's LMOrderedIterator), DDP-aware and resumable.

Layout, with G = batch_size * world_size global rows and n_step = (N - 1) // G:

    x = tokens[0 : G*n_step].reshape(G, n_step)      # row g = tokens g*n_step ... (g+1)*n_step-1
    y = tokens[1 : G*n_step+1].reshape(G, n_step)    # y[g, t] = the token after x[g, t]

so every row is one contiguous stretch of text and its last target is the first input of the next
row (one extra token, no token wasted at row ends). Rank r owns rows [r*B, (r+1)*B); concatenating
all ranks' batches along dim 0 gives exactly the single-process batch of size G.

Segment i covers columns [i*tgt_len, min((i+1)*tgt_len, n_step)); the LAST segment is shorter when
tgt_len does not divide n_step (kept, as in the original). With ext_len > 0 each segment also
feeds up to ext_len preceding columns as extra context; their labels are -100 (ignored), and the
first segment has none. Segments are never shuffled.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import IterableDataset

from txl.data.errors import DataError
from txl.model import IGNORE as IGNORE_INDEX


class OrderedStream(IterableDataset):
    """Yields {'input_ids': Long[B, T], 'labels': Long[B, T], 'pos', 'epoch', 'reset'}.

    T = ext + seg_len (seg_len = tgt_len except maybe for the last segment of an epoch).
    pos: segment index within the epoch; reset: pos == 0, i.e. the model must clear its memory.

    infinite=True (training): iteration resumes from the stream's state and loops over epochs
    forever; `state_dict()` = {'epoch', 'pos'} of the NEXT segment to produce (it advances when a
    batch is handed out, so a prefetching consumer runs ahead of what was trained on: resume with
    `set_position(epoch, last_consumed_pos + 1)`; pos == len(self) wraps to the next epoch).
    infinite=False (eval): every iter() is one full pass over the epoch from segment 0.
    """

    def __init__(self, tokens, batch_size: int, tgt_len: int, ext_len: int = 0, rank: int = 0,
                 world_size: int = 1, infinite: bool = False, name: str = "data"):
        super().__init__()
        if batch_size < 1 or tgt_len < 1 or ext_len < 0 or world_size < 1:
            raise DataError(f"{name}: need batch_size >= 1, tgt_len >= 1, ext_len >= 0, world_size >= 1 "
                            f"(got {batch_size}, {tgt_len}, {ext_len}, {world_size})")
        if not 0 <= rank < world_size:
            raise DataError(f"{name}: rank {rank} is outside world_size {world_size}")
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.numpy()
        tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
        if tokens.ndim != 1:
            raise DataError(f"{name}: tokens must be a 1-D array, got shape {tuple(tokens.shape)}")
        G, N = batch_size * world_size, len(tokens)
        if N < G * tgt_len + 1:
            what = f"batch_size*tgt_len+1 = {G}*{tgt_len}+1 = {G * tgt_len + 1}"
            if world_size > 1:
                what += f" (batch_size {batch_size} per rank x {world_size} ranks)"
            raise DataError(f"{name}: {N} tokens is fewer than {what}")
        self.name, self.batch_size, self.tgt_len, self.ext_len = name, batch_size, tgt_len, ext_len
        self.rank, self.world_size, self.infinite = rank, world_size, infinite
        self.n_step = (N - 1) // G                           # columns per row, >= tgt_len
        self.n_seg = math.ceil(self.n_step / tgt_len)        # segments per epoch
        rows = slice(rank * batch_size, (rank + 1) * batch_size)
        # views, no copy (memmaps stay on disk): [B, n_step] each
        self._x = tokens[: G * self.n_step].reshape(G, self.n_step)[rows]
        self._y = tokens[1: G * self.n_step + 1].reshape(G, self.n_step)[rows]
        self.epoch, self.pos = 0, 0

    def __len__(self) -> int:
        return self.n_seg

    def segment(self, pos: int, epoch: int = 0) -> Dict[str, Any]:
        if not 0 <= pos < self.n_seg:
            raise IndexError(f"{self.name}: segment {pos} out of range [0, {self.n_seg})")
        start = pos * self.tgt_len
        end = min(start + self.tgt_len, self.n_step)
        ext = min(self.ext_len, start)                       # no extra context before column 0
        x = torch.from_numpy(self._x[:, start - ext: end].astype(np.int64))  # [B, ext+seg_len]
        y = torch.from_numpy(self._y[:, start - ext: end].astype(np.int64))  # astype copies
        y[:, :ext] = IGNORE_INDEX                            # ext positions are context only
        return {"input_ids": x, "labels": y, "pos": pos, "epoch": epoch, "reset": pos == 0}

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        if not self.infinite:
            for pos in range(self.n_seg):
                yield self.segment(pos, 0)
            return
        while True:
            if self.pos >= self.n_seg:
                self.epoch, self.pos = self.epoch + 1, 0
            epoch, pos = self.epoch, self.pos
            self.pos += 1                                    # state = next segment, before yielding
            yield self.segment(pos, epoch)

    def set_position(self, epoch: int, pos: int) -> None:
        """Make (epoch, pos) the next segment produced; pos == len(self) means (epoch + 1, 0)."""
        epoch, pos = int(epoch), int(pos)
        if epoch < 0 or not 0 <= pos <= self.n_seg:
            raise DataError(f"{self.name}: cannot resume at epoch {epoch} segment {pos}: the stream has "
                            f"{self.n_seg} segments per epoch (did batch_size, tgt_len or the corpus "
                            f"change?)")
        self.epoch, self.pos = epoch, pos

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, d: Mapping[str, int]) -> None:
        self.set_position(d["epoch"], d["pos"])

    def __repr__(self) -> str:
        return (f"OrderedStream({self.name}, rank {self.rank}/{self.world_size}, B={self.batch_size}, "
                f"tgt_len={self.tgt_len}, ext_len={self.ext_len}, segments={self.n_seg}, "
                f"at epoch {self.epoch} pos {self.pos})")
