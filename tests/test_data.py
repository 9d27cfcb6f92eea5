"""txl.data: tokenizers, sources, corpus cache, hf loading (offline), with known answers."""
import json
import os
import time

import numpy as np
import pytest

import txl.data.build as build_mod
import txl.data.hub as hub
from txl.data import (ByteTokenizer, CharTokenizer, CorpusConfig, DataError, WordTokenizer,
                      build_tokenizer, load_corpus, tokenizer_from_state)
from txl.data.sources import cap_bytes, carve, stdlib_files, stdlib_split


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


def roundtrip(tok):  # through JSON, as inside a checkpoint
    return tokenizer_from_state(json.loads(json.dumps(tok.state_dict())))


@pytest.fixture
def no_network(monkeypatch):
    """Make 'offline' deterministic on any machine: connects fail, no cached probe result."""
    def refuse(*a, **k):
        raise OSError("network is unreachable (test)")
    monkeypatch.setattr(hub.socket, "create_connection", refuse)
    monkeypatch.setattr(hub, "_probe_cache", {})


# ----------------------------------------------------------------------------- tokenizers
def test_byte_tokenizer():
    tok = build_tokenizer("byte")
    assert (tok.kind, tok.unit, tok.vocab_size) == ("byte", "byte", 256)
    assert tok.encode("aé").tolist() == [97, 195, 169]
    assert tok.decode(tok.encode("héllo ∑")) == "héllo ∑"
    assert tok.encode_bytes(b"\xff\x00").tolist() == [255, 0]  # any bytes, no UTF-8 needed
    assert isinstance(roundtrip(tok), ByteTokenizer)


def test_char_tokenizer_known_answer():
    tok = build_tokenizer("char", "bcab\n")
    assert tok.itos == ["<unk>", "\n", "a", "b", "c"] and tok.unit == "char"
    assert tok.encode("abcz\n😀").tolist() == [2, 3, 4, 0, 1, 0]  # unseen -> <unk> (id 0)
    assert tok.decode([2, 3, 0]) == "ab<unk>"
    tok2 = roundtrip(tok)
    assert isinstance(tok2, CharTokenizer) and tok2.itos == tok.itos
    assert np.array_equal(tok2.encode("zcba"), tok.encode("zcba"))


def test_word_tokenizer_known_answer():
    train = "a b b\n\nc <unk> b\n"  # b:3 a:1 c:1; literal <unk> is not a vocabulary word
    tok = build_tokenizer("word", train)
    assert tok.itos == ["<unk>", "<eos>", "b", "a", "c"] and tok.unit is None
    # per line: words + <eos>; the empty line is just <eos>; unknown and literal <unk> -> 0
    assert tok.encode("a b\n\nz <unk>\n").tolist() == [3, 2, 1, 1, 0, 0, 1]
    assert tok.encode("a b").tolist() == [3, 2, 1]  # last line without newline still gets <eos>
    assert tok.decode([3, 2, 1, 1, 0, 1]) == "a b\n\n<unk>\n"
    assert build_tokenizer("word", train, min_freq=2).itos == ["<unk>", "<eos>", "b"]
    assert build_tokenizer("word", train, max_size=4).itos == ["<unk>", "<eos>", "b", "a"]
    tok2 = roundtrip(tok)
    assert isinstance(tok2, WordTokenizer) and tok2.itos == tok.itos


def test_hf_tokenizer_local_json_and_offline(tmp_path, monkeypatch, no_network):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers
    backend = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = build_tokenizer("hf", name=str(tmp_path / "tokenizer.json"))
    assert tok.vocab_size == 3 and tok.encode("hello world\nmoon hello\n").tolist() == [1, 2, 0, 1]
    assert roundtrip(tok).encode("world hello").tolist() == [2, 1]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached there
    t0 = time.time()
    with pytest.raises(DataError, match="tokenizer.json"):
        build_tokenizer("hf", name="gpt2")
    assert time.time() - t0 < 5


def test_build_tokenizer_errors():
    with pytest.raises(DataError, match="unknown kind 'bpe'"):
        build_tokenizer("bpe", "x")
    with pytest.raises(DataError, match="byte offset 1"):
        build_tokenizer("char", b"a\xffb")


# ----------------------------------------------------------------------------- sources
def test_cap_and_carve():
    assert cap_bytes(b"ab\ncd\nef", 7) == b"ab\ncd\n"          # cut at the last newline
    assert cap_bytes("aé".encode(), 2) == b"a"                   # never inside a UTF-8 char
    parts = carve(bytes(range(100)) * 10)
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [900, 50, 50]
    assert b"".join(parts.values()) == bytes(range(100)) * 10


def test_pystdlib_split_is_deterministic_by_file(tmp_path):
    # known answers: sha256(relpath) % 100 -> <90 train, 90-94 valid, >=95 test (any machine)
    assert [stdlib_split(p) for p in ("b.py", "os.py", "a.py", "f18.py", "f21.py", "json/__init__.py")] == \
        ["train", "valid", "test", "valid", "test", "train"]
    root = tmp_path / "lib"
    for rel in ("b.py", "c.py", "os.py", "f18.py", "a.py", "f21.py", "pkg/__init__.py",
                "site-packages/x.py", "dist-packages/y.py", "test/t.py", "tests/u.py",
                "idlelib/idle_test/v.py", "test_foo.py", "testing/w.py", "__pycache__/z.py"):
        write(root / rel, f"# {rel}\n")
    write(root / "notes.txt", "not python")
    rels = [r for r, _ in stdlib_files(str(root))]
    assert rels == ["a.py", "b.py", "c.py", "f18.py", "f21.py", "os.py", "pkg/__init__.py"]
    c = load_corpus(CorpusConfig(source="pystdlib", stdlib_root=str(root), cache_dir=str(tmp_path / "c")))
    dec = {s: c.tokenizer.decode(c.split(s)) for s in ("train", "valid", "test")}
    assert dec["train"] == "# b.py\n\n\n# c.py\n\n\n# pkg/__init__.py\n"  # sorted, joined by "\n\n"
    assert dec["valid"] == "# f18.py\n\n\n# os.py\n" and dec["test"] == "# a.py\n\n\n# f21.py\n"
    # max_bytes: whole files in sorted order, each split capped at its 90/5/5 share
    c = load_corpus(CorpusConfig(source="pystdlib", stdlib_root=str(root), max_bytes=20,
                                 cache_dir=str(tmp_path / "c")))
    assert c.tokenizer.decode(c.train) == "# b.py\n\n\n# c.py\n"
    assert c.tokenizer.decode(c.valid) == "# f18.py\n"  # at least one file per split


def test_pystdlib_real_stdlib(tmp_path):
    files = [r for r, _ in stdlib_files()]
    assert "os.py" in files and "json/__init__.py" in files
    assert not any(p.startswith("test") or p in ("site-packages", "dist-packages")
                   for f in files for p in f.split("/"))
    c = load_corpus(CorpusConfig(max_bytes=400_000, cache_dir=str(tmp_path)))
    assert c.tokenizer.kind == "byte" and c.train.dtype == np.uint8
    assert 0 < len(c.train) <= 360_000 and 0 < len(c.valid) <= 20_000 and 0 < len(c.test) <= 20_000
    assert b"import" in bytes(np.asarray(c.train))


# ----------------------------------------------------------------------------- text_files + cache
@pytest.fixture
def files(tmp_path):
    return {s: write(tmp_path / f"{s}.txt", t) for s, t in
            (("train", "hello world\nhello there\n"), ("valid", "hello wörld\n"), ("test", "the end\n"))}


def test_text_files_char_known_answer(files, tmp_path):
    c = load_corpus(CorpusConfig(source="text_files", tokenizer="char", cache_dir=str(tmp_path / "c"), **files))
    tok = c.tokenizer
    assert tok.itos == ["<unk>", "\n", " ", "d", "e", "h", "l", "o", "r", "t", "w"]
    assert np.array_equal(c.train, tok.encode("hello world\nhello there\n"))
    assert "".join(tok.itos[i] for i in c.valid) == "hello w<unk>rld\n"  # ö not in train
    assert c.name == "text:train.txt" and len(c.test) == 8


def test_text_files_errors(files, tmp_path):
    cfg = dict(source="text_files", cache_dir=str(tmp_path / "c"))
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(DataError, match=f"^data.valid: file not found: {missing}$"):
        load_corpus(CorpusConfig(**cfg, train=files["train"], valid=missing))
    empty = write(tmp_path / "empty.txt", b"")
    with pytest.raises(DataError, match=f"data.test: file is empty: {empty}"):
        load_corpus(CorpusConfig(**cfg, train=files["train"], valid=files["valid"], test=empty))
    bad = write(tmp_path / "latin1.txt", "caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"data.valid: {bad}: not valid UTF-8 at byte offset 3"):
        load_corpus(CorpusConfig(**cfg, tokenizer="char", train=files["train"], valid=bad))
    c = load_corpus(CorpusConfig(**cfg, tokenizer="byte", train=files["train"], valid=bad))
    assert c.valid.tolist() == list(b"caf\xe9\n")  # bytes need no decoding
    with pytest.raises(DataError, match="data.valid: source=text_files needs a path"):
        CorpusConfig(source="text_files", train=files["train"])
    with pytest.raises(DataError, match="unknown source 'ftp'"):
        CorpusConfig(source="ftp")
    with pytest.raises(DataError, match=r"unknown corpus option\(s\) \['batch_size'\]"):
        CorpusConfig.from_dict({"source": "pystdlib", "batch_size": 3})


def test_max_bytes_text_files(tmp_path):
    tr = write(tmp_path / "tr.txt", "line one\n" * 20)  # 180 bytes; train share of 100 = 90
    c = load_corpus(CorpusConfig(source="text_files", train=tr, valid=tr, max_bytes=100,
                                 cache_dir=str(tmp_path / "c")))
    assert bytes(np.asarray(c.train)) == b"line one\n" * 10  # 90-byte share, cut after a newline
    assert bytes(np.asarray(c.valid)) == b"line "  # 5-byte share has no newline: char boundary


def test_cache_hit_and_key(files, tmp_path, monkeypatch):
    cfg = CorpusConfig(source="text_files", tokenizer="word", cache_dir=str(tmp_path / "c"), **files)
    c1 = load_corpus(cfg)
    assert isinstance(c1.train, np.memmap) and c1.train.dtype == np.uint8
    names = sorted(os.listdir(c1.cache_path))
    assert names == ["meta.json", "test.npy", "test_docs.npy", "tokenizer.json", "train.npy", "train_docs.npy",
                     "valid.npy", "valid_docs.npy"]  # no tmp left
    assert sorted(os.listdir(cfg.cache_dir)) == [os.path.basename(c1.cache_path)]

    def boom(*a, **k):
        raise AssertionError("tokenizer rebuilt on a cache hit")
    monkeypatch.setattr(build_mod, "train_tokenizer", boom)
    c2 = load_corpus(cfg)  # second load: from the cache, no tokenization
    assert c2.cache_path == c1.cache_path and c2.tokenizer.itos == c1.tokenizer.itos
    assert all(np.array_equal(c1.split(s), c2.split(s)) for s in ("train", "valid", "test"))
    write(tmp_path / "valid.txt", "hello world\n")  # changed content -> new key -> re-tokenize
    with pytest.raises(AssertionError, match="rebuilt"):
        load_corpus(cfg)
    monkeypatch.undo()
    c3 = load_corpus(cfg)
    assert c3.cache_path != c1.cache_path and c3.valid.tolist() == [2, 4, 1]
    cfg_min = CorpusConfig(source="text_files", tokenizer="word", min_freq=2, cache_dir=cfg.cache_dir, **files)
    assert load_corpus(cfg_min).cache_path not in (c1.cache_path, c3.cache_path)  # options in key


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TXL_CACHE", str(tmp_path / "env"))
    assert CorpusConfig().cache_dir == str(tmp_path / "env")
    assert CorpusConfig(cache_dir="/x/y").cache_dir == "/x/y"


# ----------------------------------------------------------------------------- hf
def test_hub_probe_is_bounded(monkeypatch):
    def hang(*a, **k):
        time.sleep(2)
        raise OSError("too late")
    monkeypatch.setattr(hub.socket, "create_connection", hang)
    monkeypatch.setattr(hub, "_probe_cache", {})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    t0 = time.time()
    assert hub.hub_offline_reason(timeout=0.2) == "no answer within 0.2s"  # a hanging connect/DNS is cut off
    assert time.time() - t0 < 1


def test_hf_offline_fails_fast(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty HF cache
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
                "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    t0 = time.time()
    with pytest.raises(DataError) as e:
        load_corpus(CorpusConfig(source="hf", hf_name="wikitext2", cache_dir=str(tmp_path)))
    assert time.time() - t0 < 5  # the probe is bounded at 1.5 s
    msg = str(e.value)
    assert "\n" not in msg and "'wikitext'" in msg and "text_files" in msg
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="HF_DATASETS_OFFLINE=1 is set"):
        load_corpus(CorpusConfig(source="hf", hf_name="enwik8", cache_dir=str(tmp_path)))


WIKI = {"train": [" = Title = \n", "", " some text here \n", "more text\n"],
        "validation": [" text <unk> \n", ""], "test": ["the text\n"]}


def test_hf_local_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "wiki"
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in WIKI.items()}).save_to_disk(str(d))
    c = load_corpus(CorpusConfig(source="hf", hf_name=str(d), tokenizer="word", cache_dir=str(tmp_path / "c")))
    tok = c.tokenizer
    # rows are lines; WikiText's empty rows are empty lines (just <eos>)
    assert np.array_equal(c.train, tok.encode(" = Title = \n\n some text here \nmore text\n"))
    assert tok.decode(c.valid) == "text <unk>\n\n" and tok.decode(c.test) == "<unk> text\n"
    assert tok.itos[:4] == ["<unk>", "<eos>", "=", "text"]  # freq 2 each, ties by token
    # a single Dataset (enwik8-like, one split) is carved 90/5/5
    one = tmp_path / "one"
    datasets.Dataset.from_dict({"text": ["x" * 1000]}).save_to_disk(str(one))
    c = load_corpus(CorpusConfig(source="hf", hf_name=str(one), cache_dir=str(tmp_path / "c")))
    assert (len(c.train), len(c.valid), len(c.test)) == (900, 50, 51)  # 1001 bytes: "lines" mode adds "\n"


def test_hf_packaged_text_builder_matches_text_files(files, tmp_path):
    pytest.importorskip("datasets")
    via_hf = load_corpus(CorpusConfig(source="hf", hf_name="text", tokenizer="word", cache_dir=str(tmp_path / "c"),
                                      hf_data_files={"train": files["train"], "validation": files["valid"],
                                                     "test": files["test"]}))
    via_files = load_corpus(CorpusConfig(source="text_files", tokenizer="word", cache_dir=str(tmp_path / "c"), **files))
    for s in ("train", "valid", "test"):
        assert np.array_equal(via_hf.split(s), via_files.split(s))


def test_imported_word_vocabulary_keeps_every_id():
    """An imported table (released WT103: <eos> first, <unk> elsewhere) round-trips unchanged."""
    from txl.data import tokenizer_from_state
    itos = ["<eos>", "the", "<unk>", "cat"]
    tok = tokenizer_from_state({"kind": "word", "idx2sym": itos})
    assert (tok.eos_id, tok.unk_id, tok.vocab_size) == (0, 2, 4)
    assert tok.encode("the dog cat\n").tolist() == [1, 2, 3, 0]
    again = tokenizer_from_state(tok.state_dict())
    assert again.itos == itos and again.encode("cat the\n").tolist() == [3, 1, 0]
