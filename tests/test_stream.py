"""txl.data.stream / datamodule: ordered segments, DDP sharding, exact resume, Lightning loop."""
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from txl.data import CorpusConfig, DataError
from txl.data.datamodule import TXLDataModule
from txl.data.stream import OrderedStream


def take(stream, n):
    return list(itertools.islice(iter(stream), n))


def same(a, b):
    return (torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
            and (a["pos"], a["epoch"], a["reset"]) == (b["pos"], b["epoch"], b["reset"]))


def test_layout_known_answer():
    s = OrderedStream(np.arange(103), batch_size=2, tgt_len=10)  # n_step = 102 // 2 = 51
    assert (s.n_step, len(s)) == (51, 6)
    b = list(s)
    assert [x["input_ids"].shape[1] for x in b] == [10, 10, 10, 10, 10, 1]  # last one is short
    assert b[0]["input_ids"].tolist() == [list(range(0, 10)), list(range(51, 61))]
    assert b[0]["labels"].tolist() == [list(range(1, 11)), list(range(52, 62))]
    assert b[5]["input_ids"].tolist() == [[50], [101]] and b[5]["labels"].tolist() == [[51], [102]]
    assert [x["reset"] for x in b] == [True] + [False] * 5 and [x["pos"] for x in b] == list(range(6))
    assert b[0]["input_ids"].dtype == torch.long and b[0]["labels"].dtype == torch.long


def test_rows_are_contiguous_text():
    tokens = np.random.default_rng(0).permutation(1000).astype(np.uint16)  # distinct values
    s = OrderedStream(tokens, batch_size=4, tgt_len=7)
    b = list(s)
    x = torch.cat([t["input_ids"] for t in b], 1)  # [B, n_step]
    y = torch.cat([t["labels"] for t in b], 1)
    assert torch.equal(y[:, :-1], x[:, 1:])  # labels are next tokens
    for t, u in zip(b, b[1:]):  # segment i+1 continues segment i in every row
        assert torch.equal(t["labels"][:, -1], u["input_ids"][:, 0])
    n = s.n_step
    for g in range(4):  # row g = tokens g*n ... (g+1)*n - 1, its last target = next row's first input
        assert x[g].tolist() == tokens[g * n:(g + 1) * n].tolist()
        assert y[g, -1].item() == tokens[(g + 1) * n]


@pytest.mark.parametrize("ext_len", [0, 3])
def test_ddp_ranks_concatenate_to_single_process(ext_len):
    tokens = np.arange(2000)
    single = list(OrderedStream(tokens, 6, 9, ext_len))
    ranks = [list(OrderedStream(tokens, 3, 9, ext_len, rank=r, world_size=2)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1])
    for i, whole in enumerate(single):
        for k in ("input_ids", "labels"):
            assert torch.equal(torch.cat([ranks[0][i][k], ranks[1][i][k]], 0), whole[k])


def test_ext_len_windows():
    tokens = np.arange(500)
    plain, ext = list(OrderedStream(tokens, 2, 8)), list(OrderedStream(tokens, 2, 8, ext_len=5))
    assert ext[0]["input_ids"].shape[1] == 8 and torch.equal(ext[0]["labels"], plain[0]["labels"])
    assert ext[1]["input_ids"].shape[1] == 13  # 5 context + 8
    for i in range(1, len(plain)):
        e, p = ext[i], plain[i]
        assert (e["labels"][:, :5] == -100).all()  # context only, never a target
        assert torch.equal(e["labels"][:, 5:], p["labels"]) and torch.equal(e["input_ids"][:, 5:], p["input_ids"])
        assert torch.equal(e["input_ids"][:, :5], plain[i - 1]["input_ids"][:, -5:])  # overlap = previous tail


def test_resume_is_exact_across_epochs():
    tokens = np.arange(300)
    ref = take(OrderedStream(tokens, 2, 16, infinite=True), 30)  # 10 segments/epoch -> 3 epochs
    assert [(b["epoch"], b["pos"]) for b in ref[8:12]] == [(0, 8), (0, 9), (1, 0), (1, 1)]
    assert ref[10]["reset"] and not ref[11]["reset"]
    for k in (0, 7, 10, 13):
        s = OrderedStream(tokens, 2, 16, infinite=True)
        it = iter(s)
        for _ in range(k):
            next(it)
        state = s.state_dict()  # = the next segment to produce
        fresh = OrderedStream(tokens, 2, 16, infinite=True)
        fresh.load_state_dict(state)
        assert all(same(a, b) for a, b in zip(take(fresh, 30 - k), ref[k:]))
    # resume from the last CONSUMED batch (a prefetching loader ran ahead): (epoch, pos + 1)
    last = ref[9]
    s = OrderedStream(tokens, 2, 16, infinite=True)
    s.set_position(last["epoch"], last["pos"] + 1)  # pos == len(s) wraps to the next epoch
    assert all(same(a, b) for a, b in zip(take(s, 5), ref[10:15]))
    with pytest.raises(DataError, match="cannot resume at epoch 0 segment 11"):
        s.set_position(0, 11)


def test_eval_stream_single_full_pass():
    s = OrderedStream(np.arange(100), 3, 5)
    a, b = list(s), list(s)
    assert len(a) == len(s) == 7 and all(same(x, y) for x, y in zip(a, b))
    assert {x["epoch"] for x in a} == {0}


def test_short_corpus_error():
    with pytest.raises(DataError, match=r"^data.valid: 40 tokens is fewer than batch_size\*tgt_len\+1 = 4\*10\+1 = 41$"):
        OrderedStream(np.arange(40), 4, 10, name="data.valid")
    assert len(OrderedStream(np.arange(41), 4, 10)) == 1
    with pytest.raises(DataError, match=r"= 8\*10\+1 = 81 \(batch_size 4 per rank x 2 ranks\)"):
        OrderedStream(np.arange(80), 4, 10, rank=1, world_size=2, name="data.train")


# ----------------------------------------------------------------------------- datamodule
@pytest.fixture
def cfg(tmp_path):
    paths = {}
    for s, n in (("train", 4000), ("valid", 700), ("test", 300)):
        paths[s] = str(tmp_path / f"{s}.txt")
        with open(paths[s], "w") as f:
            f.write("".join(chr(97 + (i * 7 + len(s)) % 26) for i in range(n)))
    return CorpusConfig(source="text_files", tokenizer="char", cache_dir=str(tmp_path / "cache"), **paths)


def test_datamodule_streams_and_position(cfg):
    dm = TXLDataModule(cfg, batch_size=4, tgt_len=16, eval_tgt_len=32, eval_batch_size=2)
    assert dm.vocab_size == 27 and dm.tokenizer.kind == "char"  # load() on demand, before setup
    dm.setup("fit")
    ref = OrderedStream(dm.corpus.train, 4, 16, infinite=True)
    assert all(same(a, b) for a, b in zip(take(dm.train_dataloader(), 5), take(ref, 5)))
    v = list(dm.val_dataloader())
    assert v[0]["input_ids"].shape == (2, 32) and len(v) == len(OrderedStream(dm.corpus.valid, 2, 32))
    assert dm.state_dict() == {"train": {"epoch": 0, "pos": 5}}
    # resume: the module's position wins over the restored datamodule state, whatever the order
    dm2 = TXLDataModule(cfg, batch_size=4, tgt_len=16)
    dm2.set_train_position(0, 3)
    dm2.load_state_dict({"train": {"epoch": 0, "pos": 5}})
    dm2.setup("fit")
    assert same(next(iter(dm2.train_dataloader())), ref.segment(3))
    dm3 = TXLDataModule(cfg, batch_size=4, tgt_len=16)
    dm3.load_state_dict({"train": {"epoch": 0, "pos": 5}})
    assert same(next(iter(dm3.train_dataloader())), ref.segment(5))


def test_datamodule_from_mapping(cfg):
    """A plain mapping goes through CorpusConfig.from_dict, the one builder: unknown keys fail."""
    d = {k: getattr(cfg, k) for k in ("source", "train", "valid", "test", "tokenizer", "cache_dir")}
    dm = TXLDataModule(d, batch_size=4, tgt_len=16, eval_batch_size=2)
    assert (dm.batch_size, dm.eval_batch_size, dm.eval_tgt_len, dm.cfg.tokenizer) == (4, 2, 16, "char")
    with pytest.raises(DataError, match="unknown corpus option"):
        TXLDataModule({**d, "bogus": 1}, batch_size=4, tgt_len=16)
    wide = {**d, "batch_size": 4, "eval_batch_size": 2}  # e.g. a checkpoint's data node
    assert CorpusConfig.from_dict(wide, strict=False) == CorpusConfig.from_dict(d)


def test_datamodule_ddp_rank_rows(cfg):
    whole = TXLDataModule(cfg, batch_size=4, tgt_len=16)
    full = next(iter(whole.train_dataloader()))
    dm = TXLDataModule(cfg, batch_size=4, tgt_len=16)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)  # what Lightning attaches under DDP
    part = next(iter(dm.train_dataloader()))
    assert torch.equal(part["input_ids"], full["input_ids"][2:])  # rank 1 = rows 2..3
    dm = TXLDataModule(cfg, batch_size=3, tgt_len=16)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0)
    with pytest.raises(DataError, match="global batch size 3 is not divisible by world_size 2"):
        dm.train_dataloader()
    with pytest.raises(DataError, match=r"^data.valid: 700 tokens is fewer than"):
        TXLDataModule(cfg, batch_size=4, tgt_len=16, eval_tgt_len=200).setup("fit")


def test_lightning_fit_and_exact_resume(cfg, tmp_path):
    pl = pytest.importorskip("pytorch_lightning")

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(27, 27)
            self.seen, self.last = [], None

        def training_step(self, batch, _):
            self.seen.append((batch["epoch"], batch["pos"], batch["input_ids"].clone()))
            self.last = (batch["epoch"], batch["pos"])
            logits = self.emb(batch["input_ids"])
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def on_save_checkpoint(self, ckpt):
            ckpt["data_last"] = self.last

        def on_load_checkpoint(self, ckpt):
            e, p = ckpt["data_last"]
            self.trainer.datamodule.set_train_position(e, p + 1)

    def trainer(steps):
        return pl.Trainer(max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                          limit_val_batches=0, default_root_dir=str(tmp_path))
    n_seg = len(OrderedStream(np.zeros(4000), 4, 16))  # segments per epoch
    ref = Tiny()
    trainer(n_seg + 4).fit(ref, datamodule=TXLDataModule(cfg, batch_size=4, tgt_len=16))
    assert [s[:2] for s in ref.seen] == [(0, p) for p in range(n_seg)] + [(1, p) for p in range(4)]
    first = Tiny()
    t = trainer(n_seg - 2)
    t.fit(first, datamodule=TXLDataModule(cfg, batch_size=4, tgt_len=16))
    t.save_checkpoint(str(tmp_path / "mid.ckpt"))
    second = Tiny()
    trainer(n_seg + 4).fit(second, datamodule=TXLDataModule(cfg, batch_size=4, tgt_len=16),
                           ckpt_path=str(tmp_path / "mid.ckpt"))
    got = first.seen + second.seen
    assert [s[:2] for s in got] == [s[:2] for s in ref.seen]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(got, ref.seen))
