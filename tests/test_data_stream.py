"""Streaming / parallel corpus building: ids equal to the pre-streaming implementation (kept here
as reference functions), documents from directories and globs, local HF datasets, bad input,
faults while building, cache verification, bounded-memory text reading for txl-eval."""
import errno
import json
import logging
import os
from collections import Counter

import numpy as np
import pytest

import txl.data.build as build_mod
import txl.data.cache as cache_mod
import txl.data.reader as reader
from txl.data import CorpusConfig, DataError, build_tokenizer, load_corpus, read_text_tokens

UNK, EOS = "<unk>", "<eos>"


# ----------------------------------------------------------------------------- reference (old code)
def ref_word_itos(text, min_freq=0, max_size=None, lower=False):
    """WordTokenizer.from_text before streaming: one Counter over the whole train text."""
    if lower:
        text = text.lower()
    counts = Counter(text.split())
    counts.pop(UNK, None), counts.pop(EOS, None)
    words = [w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_freq]
    if max_size is not None:
        words = words[:max(0, max_size - 2)]
    return [UNK, EOS] + words


def ref_word_encode(itos, text, lower=False):
    """WordTokenizer.encode before streaming: per line, words then <eos>."""
    stoi = {w: i for i, w in enumerate(itos)}
    if lower:
        text = text.lower()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out = []
    for line in lines:
        out += [stoi.get(w, stoi[UNK]) for w in line.split()] + [stoi[EOS]]
    return np.array(out, dtype=np.int64)


def ref_char(train, text):
    itos = [UNK] + sorted(set(train))
    stoi = {c: i for i, c in enumerate(itos)}
    return itos, np.array([stoi.get(c, 0) for c in text], dtype=np.int64)


def ref_hf_encode(backend, text, chunk_chars=1 << 20):
    """HFTokenizer.encode before streaming: ~1 MB chunks of whole lines, one encode_batch."""
    chunks, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        size += len(line)
        if size >= chunk_chars:
            chunks.append("".join(cur))
            cur, size = [], 0
    if cur:
        chunks.append("".join(cur))
    return np.concatenate([np.asarray(e.ids) for e in backend.encode_batch(chunks, add_special_tokens=False)])


@pytest.fixture
def small_jobs(monkeypatch):
    """Many jobs from small files: the multi-process path and every cut position get exercised."""
    monkeypatch.setattr(reader, "BLOCK", 20_000)
    monkeypatch.setattr(reader, "CHUNK", 50_000)


def shared_files(shared_data):
    return {"train": str(shared_data / "wikitext-2" / "valid.txt"), "valid": str(shared_data / "wikitext-2" / "test.txt"),
            "test": str(shared_data / "tinyshakespeare" / "input.txt")}


def read(p):
    with open(p, encoding="utf-8") as f:
        return f.read()


# ----------------------------------------------------------------------------- equality with today's ids
@pytest.mark.parametrize("num_proc", [1, 2])
def test_ids_equal_reference_on_shared_texts(shared_data, tmp_path, small_jobs, num_proc):
    files = shared_files(shared_data)
    texts = {s: read(p) for s, p in files.items()}
    for opts in ({}, {"lower": True, "min_freq": 2}, {"max_size": 5000}):
        c = load_corpus(CorpusConfig(source="text_files", tokenizer="word", num_proc=num_proc,
                                     cache_dir=str(tmp_path / "c"), **files, **opts))
        itos = ref_word_itos(texts["train"], **opts)
        assert c.tokenizer.itos == itos
        for s in (("train", "valid", "test") if not opts else ("valid",)):
            np.testing.assert_array_equal(np.asarray(c.split(s)), ref_word_encode(itos, texts[s], opts.get("lower", False)))
    c = load_corpus(CorpusConfig(source="text_files", tokenizer="char", num_proc=num_proc,
                                 cache_dir=str(tmp_path / "c"), **files))
    for s in ("train", "valid", "test"):
        itos, ids = ref_char(texts["train"], texts[s])
        assert c.tokenizer.itos == itos
        np.testing.assert_array_equal(np.asarray(c.split(s)), ids)
    c = load_corpus(CorpusConfig(source="text_files", tokenizer="byte", num_proc=num_proc,
                                 cache_dir=str(tmp_path / "c"), **files))
    for s, p in files.items():
        assert bytes(np.asarray(c.split(s))) == open(p, "rb").read()


def test_hf_tokenizer_stream_equals_reference(shared_data, tmp_path, small_jobs, monkeypatch):
    tokenizers = pytest.importorskip("tokenizers")
    import txl.data.tokenizers as toks
    monkeypatch.setattr(toks, "HF_CHUNK_CHARS", 100_000)  # several encode_batch items per file
    from tokenizers import models, pre_tokenizers, trainers
    full = shared_files(shared_data)
    files = {"train": write(tmp_path / "tr.txt", read(full["test"])[:300_000]),
             "valid": write(tmp_path / "va.txt", read(full["valid"])[:300_000])}
    backend = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train([files["train"]], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False))
    backend.save(str(tmp_path / "tokenizer.json"))
    c = load_corpus(CorpusConfig(source="text_files", tokenizer="hf", hf_tokenizer=str(tmp_path / "tokenizer.json"),
                                 cache_dir=str(tmp_path / "c"), **files))
    for s, p in files.items():
        np.testing.assert_array_equal(np.asarray(c.split(s)), ref_hf_encode(backend, read(p), 100_000))
    assert c.doc_starts("train") is None and c.meta["doc_starts"] is False  # items span documents


def test_pystdlib_ids_equal_joined_files(tmp_path):
    """pystdlib joins its files with a blank line exactly as before (empty files included)."""
    root = tmp_path / "lib"
    for i in range(40):
        (root / f"m{i}.py").parent.mkdir(parents=True, exist_ok=True)
        (root / f"m{i}.py").write_text("" if i % 7 == 0 else f"x = {i}\n" * (i + 1))
    from txl.data.sources import stdlib_files, stdlib_split
    c = load_corpus(CorpusConfig(source="pystdlib", stdlib_root=str(root), cache_dir=str(tmp_path / "c")))
    for s in ("train", "valid", "test"):
        want = b"\n\n".join(open(p, "rb").read() for rel, p in stdlib_files(str(root)) if stdlib_split(rel) == s)
        assert bytes(np.asarray(c.split(s))) == want


# ----------------------------------------------------------------------------- documents
def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


def test_directory_and_glob_are_documents(tmp_path, small_jobs):
    books = ["the cat sat\non the mat\n", "", "a dog\nran", "the end\n" * 5000]
    for i, b in enumerate(books):
        write(tmp_path / "books" / f"b{i}.txt", b)
    write(tmp_path / "books" / ".hidden", "never read\n")
    joined = "\n\n".join(b for b in books if b)  # empty files are skipped
    via_file = write(tmp_path / "joined.txt", joined)
    for spec in (str(tmp_path / "books"), str(tmp_path / "books" / "*.txt")):
        c = load_corpus(CorpusConfig(source="text_files", tokenizer="word", train=spec, valid=spec, num_proc=2,
                                     cache_dir=str(tmp_path / "c")))
        ref = load_corpus(CorpusConfig(source="text_files", tokenizer="word", train=via_file, valid=via_file,
                                       cache_dir=str(tmp_path / "c")))
        assert c.tokenizer.itos == ref.tokenizer.itos and c.meta["documents"]["train"] == 3
        np.testing.assert_array_equal(np.asarray(c.train), np.asarray(ref.train))


@pytest.mark.parametrize("kind", ["byte", "char", "word"])
def test_doc_starts_of_a_glob(tmp_path, small_jobs, kind):
    """<split>_docs.npy: where each file's tokens begin in the joined split. Reference: the token
    count of the joined text before the document (its separators included), with 1 and 2 workers
    and documents cut across jobs (small_jobs)."""
    books = ["the cat sat\non the mat\n", "", "a dög\nran", "the end\n" * 5000, "x\n", "last one"]
    for i, b in enumerate(books):
        write(tmp_path / "books" / f"b{i}.txt", b)
    docs = [b for b in books if b]  # empty files are skipped
    ref = load_corpus(CorpusConfig(source="text_files", tokenizer=kind, train=write(tmp_path / "all.txt", "\n\n".join(docs)),
                                   valid=write(tmp_path / "v.txt", "the\n"), cache_dir=str(tmp_path / "c")))
    want = [len(ref.tokenizer.encode_chunk("\n\n".join(docs[:i]) + "\n\n" * (i > 0), final=False))
            for i in range(len(docs))]
    for num_proc in (1, 2):
        c = load_corpus(CorpusConfig(source="text_files", tokenizer=kind, train=str(tmp_path / "books" / "b*.txt"),
                                     valid=str(tmp_path / "books"), num_proc=num_proc, cache_dir=str(tmp_path / f"c{num_proc}")))
        np.testing.assert_array_equal(np.asarray(c.train), np.asarray(ref.train))  # markers change no id
        for s in ("train", "valid"):
            got = c.doc_starts(s)
            assert got.dtype == np.int64 and got.tolist() == want, (s, num_proc)
        assert c.doc_starts("test").tolist() == [] and c.meta["documents"]["train"] == len(docs)
        assert ref.doc_starts("train").tolist() == [0]  # one file: one document
        for i, d in enumerate(docs):  # each start decodes to its document's beginning
            head = ref.tokenizer.encode(d)[:3]
            np.testing.assert_array_equal(np.asarray(c.train[got[i]:got[i] + len(head)]), head)
        again = load_corpus(CorpusConfig(source="text_files", tokenizer=kind, train=str(tmp_path / "books" / "b*.txt"),
                                         valid=str(tmp_path / "books"), cache_dir=str(tmp_path / f"c{num_proc}")))
        assert isinstance(again.doc_starts("train"), np.memmap) and again.doc_starts("train").tolist() == want


def test_pystdlib_and_pg19_record_documents(tmp_path):
    """Empty stdlib files are documents too (as pystdlib always joined them); pg19: one per book."""
    root = tmp_path / "lib"
    for i in range(40):
        write(root / f"m{i}.py", "" if i % 5 == 0 else f"x = {i}\n" * (i + 1))
    from txl.data.sources import stdlib_files, stdlib_split
    c = load_corpus(CorpusConfig(source="pystdlib", stdlib_root=str(root), cache_dir=str(tmp_path / "c")))
    for s in ("train", "valid", "test"):
        sizes = [os.path.getsize(p) for rel, p in stdlib_files(str(root)) if stdlib_split(rel) == s]
        want = np.cumsum([0] + [n + 2 for n in sizes[:-1]]).tolist() if sum(sizes) else []  # no token: none
        assert c.doc_starts(s).tolist() == want and c.meta["documents"][s] == len(want)


def test_old_cache_format_is_rebuilt(tmp_path, caplog):
    """An entry of format 2 (no <split>_docs.npy) at the entry's path is rebuilt once, with them."""
    cfg = _cfg(tmp_path)
    c = load_corpus(cfg)
    ref, path = np.array(c.train), c.cache_path
    del c
    meta_path = os.path.join(path, "meta.json")
    meta = json.load(open(meta_path))
    for s in ("train", "valid", "test"):
        os.remove(os.path.join(path, f"{s}_docs.npy"))
        del meta["files"][f"{s}_docs.npy"]
    meta["format_version"] = 2
    meta.pop("doc_starts")
    json.dump(meta, open(meta_path, "w"))
    with caplog.at_level(logging.INFO, logger="txl.data"):
        again = load_corpus(cfg)
    assert any("has format 2 (now 3); rebuilding it" in r.getMessage() for r in caplog.records)
    assert again.cache_path == path and again.doc_starts("train").tolist() == [0]
    np.testing.assert_array_equal(np.asarray(again.train), ref)
    assert json.load(open(meta_path))["format_version"] == cache_mod.FORMAT_VERSION == 3
    np.save(os.path.join(path, "valid_docs.npy"), np.array([0, 5, 3]))  # damaged: checksum, then rebuilt
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="txl.data"):
        third = load_corpus(cfg)
    assert ["valid_docs.npy" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [True]
    assert third.doc_starts("valid").tolist() == [0]


def test_bad_document_input(tmp_path):
    cfg = dict(source="text_files", tokenizer="char", cache_dir=str(tmp_path / "c"))
    ok = write(tmp_path / "ok.txt", "fine text\n")
    with pytest.raises(DataError, match=r"^data.train: no file matches the pattern .*nothing-\*\.txt$"):
        load_corpus(CorpusConfig(**cfg, train=str(tmp_path / "nothing-*.txt"), valid=ok))
    (tmp_path / "emptydir").mkdir()
    write(tmp_path / "emptydir" / ".only_hidden", "x")
    with pytest.raises(DataError, match=r"^data.valid: directory .*emptydir has no text files$"):
        load_corpus(CorpusConfig(**cfg, train=ok, valid=str(tmp_path / "emptydir")))
    write(tmp_path / "docs" / "a.txt", "good\n")
    bad = write(tmp_path / "docs" / "b.txt", "ok\nab\xff".encode("latin-1"))
    with pytest.raises(DataError, match=f"^data.train: {bad}: not valid UTF-8 at byte offset 5"):
        load_corpus(CorpusConfig(**cfg, train=str(tmp_path / "docs"), valid=ok))
    assert not os.path.exists(cfg["cache_dir"]) or os.listdir(cfg["cache_dir"]) == []


# ----------------------------------------------------------------------------- local HF datasets
WT = {"train": [" = Title = \n", "", " some text here \n", "more text\n"] * 50,
      "validation": [" text <unk> \n", ""], "test": ["the text\n"]}
PG = {"train": ["Book one.\nIt was a dark night.\n", "Book two\nends here"], "validation": ["It was a dark night.\n"],
      "test": ["The test book.\n"]}


def _parquet(path, rows, extra=None):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    cols = {"text": rows, **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), str(path))


def test_local_hf_layouts_use_the_preset_path(tmp_path):
    datasets = pytest.importorskip("datasets")
    # WikiText-103 as on the hub: <config>/<split>-00000-of-00001.parquet
    wt = tmp_path / "wt103"
    for split, rows in WT.items():
        _parquet(wt / "wikitext-103-raw-v1" / f"{split}-00000-of-00001.parquet", rows)
    saved = tmp_path / "wt_saved"
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in WT.items()}).save_to_disk(str(saved))
    files = {s: write(tmp_path / "plain" / f"{s}.txt", "".join(r if r.endswith("\n") else r + "\n" for r in rows))
             for s, rows in zip(("train", "valid", "test"), WT.values())}
    ref = load_corpus(CorpusConfig(source="text_files", tokenizer="word", cache_dir=str(tmp_path / "c"), **files))
    for d in (wt, saved):
        c = load_corpus(CorpusConfig(source="hf", hf_name="wikitext103", hf_dir=str(d), tokenizer="word",
                                     cache_dir=str(tmp_path / "c")))
        assert c.tokenizer.itos == ref.tokenizer.itos
        for s in ("train", "valid", "test"):
            np.testing.assert_array_equal(np.asarray(c.split(s)), np.asarray(ref.split(s)))
    # PG-19 as in the hub's parquet export: one book per row, extra columns, default/<split>/0000.parquet
    pg = tmp_path / "pg19"
    for split, rows in PG.items():
        _parquet(pg / "default" / split / "0000.parquet", rows,
                 {"short_book_title": [f"t{i}" for i in range(len(rows))], "publication_date": [1900] * len(rows),
                  "url": ["u"] * len(rows)})
    books = tmp_path / "books"
    for i, b in enumerate(PG["train"]):
        write(books / f"{i}.txt", b)
    c = load_corpus(CorpusConfig(source="hf", hf_name="pg19", hf_dir=str(pg), tokenizer="word", cache_dir=str(tmp_path / "c")))
    d = load_corpus(CorpusConfig(source="text_files", tokenizer="word", train=str(books),
                                 valid=write(tmp_path / "v.txt", PG["validation"][0]), cache_dir=str(tmp_path / "c")))
    np.testing.assert_array_equal(np.asarray(c.train), np.asarray(d.train))  # books joined like files
    assert c.doc_starts("train").tolist() == d.doc_starts("train").tolist() == [0, 11]
    assert c.tokenizer.decode(c.valid) == "It was a dark night.\n"
    with pytest.raises(DataError, match="column 'body' not in dataset columns"):
        load_corpus(CorpusConfig(source="hf", hf_name="pg19", hf_dir=str(pg), hf_text_column="body",
                                 cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match="neither a save_to_disk directory nor holds"):
        load_corpus(CorpusConfig(source="hf", hf_name="pg19", hf_dir=str(books), cache_dir=str(tmp_path / "c")))


# ----------------------------------------------------------------------------- faults while building
def _crash(job):
    raise RuntimeError("boom in worker")


def _die(job):
    os._exit(7)


@pytest.mark.parametrize("fn, msg", [(_crash, "a tokenizer worker failed: RuntimeError: boom in worker"),
                                     (_die, r"a tokenizer worker process died \(exit code 7\)")])
def test_worker_failure_leaves_no_cache(shared_data, tmp_path, small_jobs, monkeypatch, fn, msg):
    monkeypatch.setattr(build_mod, "encode_ids", fn)
    cache = tmp_path / "c"
    with pytest.raises(DataError, match=msg) as e:
        load_corpus(CorpusConfig(source="text_files", tokenizer="word", num_proc=2, cache_dir=str(cache),
                                 **shared_files(shared_data)))
    assert "\n" not in str(e.value) and os.listdir(cache) == []


def test_disk_full_leaves_no_cache(tmp_path, monkeypatch):
    real = cache_mod.NpyWriter.write
    calls = []

    def full(self, ids):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, ids)
    monkeypatch.setattr(cache_mod.NpyWriter, "write", full)
    tr = write(tmp_path / "tr.txt", "some words here\n" * 100)
    cache = tmp_path / "c"
    with pytest.raises(DataError, match=r"^data.cache_dir: cannot write the token cache under .*: No space left on "
                                        r"device \(errno 28\).*no partial cache was left$"):
        load_corpus(CorpusConfig(source="text_files", tokenizer="word", train=tr, valid=tr, cache_dir=str(cache)))
    assert os.listdir(cache) == []


# ----------------------------------------------------------------------------- cache verification (issue 9.4)
def _cfg(tmp_path):
    tr = write(tmp_path / "tr.txt", "".join(f"w{i % 70} w{i % 13} w{i % 5}\n" for i in range(2000)))
    va = write(tmp_path / "va.txt", "w1 w2 w3\n" * 100)
    return CorpusConfig(source="text_files", tokenizer="word", train=tr, valid=va, cache_dir=str(tmp_path / "c"))


def test_damaged_cache_is_detected_and_rebuilt(tmp_path, caplog):
    cfg = _cfg(tmp_path)
    good = load_corpus(cfg)
    ref = {s: np.array(good.split(s)) for s in ("train", "valid", "test")}
    itos = list(good.tokenizer.itos)
    path = good.cache_path
    del good
    train = os.path.join(path, "train.npy")
    with open(train, "r+b") as f:  # garble ids in place: same size, values out of the vocabulary
        f.seek(cache_mod.HEADER + 100)
        f.write(b"\xff" * 64)
    with caplog.at_level(logging.WARNING, logger="txl.data"):
        again = load_corpus(cfg)
    warns = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and "train.npy checksum mismatch" in warns[0].getMessage()
    assert again.cache_path == path and again.tokenizer.itos == itos
    for s in ref:
        np.testing.assert_array_equal(np.asarray(again.split(s)), ref[s])
    caplog.clear()
    tj = os.path.join(path, "tokenizer.json")  # an edited vocabulary: swap two words
    d = json.load(open(tj))
    d["words"][0], d["words"][1] = d["words"][1], d["words"][0]
    open(tj, "w").write(json.dumps(d))
    with caplog.at_level(logging.WARNING, logger="txl.data"):
        third = load_corpus(cfg)
    assert ["tokenizer.json" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [True]
    assert third.tokenizer.itos == itos
    # ... and it trains: the stream's batches hold ids of that vocabulary
    from txl.data import TXLDataModule
    dm = TXLDataModule(cfg, batch_size=4, tgt_len=16)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert int(b["input_ids"].max()) < third.vocab_size
    np.testing.assert_array_equal(b["input_ids"][0].numpy(), ref["train"][:16])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="txl.data"):  # an intact entry: no warning, no rebuild
        load_corpus(cfg)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_reopen_builds_no_word_map_until_it_encodes(tmp_path):
    """Reopening a word cache (what training does) skips the word -> id map (~0.5 s for 800k
    words); the first encode builds it, with the same ids."""
    cfg = _cfg(tmp_path)
    built = load_corpus(cfg)
    again = load_corpus(cfg)
    assert again.cache_path == built.cache_path and again.tokenizer._stoi is None
    text = "w1 w12 nope w69\n w3"
    np.testing.assert_array_equal(again.tokenizer.encode(text), built.tokenizer.encode(text))
    assert again.tokenizer._stoi is not None and again.tokenizer.encode("nope")[0] == again.tokenizer.unk_id == 0
    from txl.data import WordTokenizer
    with pytest.raises(DataError, match="duplicate tokens"):
        WordTokenizer(["a", "b", "a"]).encode("a")


def test_cache_hit_reads_no_text(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    load_corpus(cfg)

    def boom(*a, **k):
        raise AssertionError("text read on a cache hit")
    monkeypatch.setattr(reader, "file_pieces", boom)
    assert len(load_corpus(cfg).train) > 0


# ----------------------------------------------------------------------------- txl-eval text reading
def test_read_text_tokens_streams_and_stops_early(shared_data, monkeypatch):
    path = shared_data / "wikitext-2" / "test.txt"
    text = read(path)
    for kind in ("byte", "char", "word"):
        tok = build_tokenizer(kind, text[:200_000])
        want = tok.encode_bytes(open(path, "rb").read())
        np.testing.assert_array_equal(read_text_tokens(path, tok, chunk=30_000), want)
        np.testing.assert_array_equal(read_text_tokens(path, tok, max_tokens=1234, chunk=30_000), want[:1234])
    seen = []
    real = reader.file_pieces

    def counting(*a, **k):
        for p in real(*a, **k):
            seen.append(len(p.data))
            yield p
    monkeypatch.setattr(reader, "file_pieces", counting)
    read_text_tokens(path, build_tokenizer("byte"), max_tokens=1000, chunk=30_000)
    assert sum(seen) <= 5 * 30_000  # a few chunks; the rest of the 1.2 MB file was never read


def test_read_text_docs_of_a_directory_equals_the_corpus_split(tmp_path, small_jobs):
    """txl-eval's reader on a directory / glob: the ids and document starts a corpus split of the
    same files gets; max_tokens keeps the starts below it."""
    from txl.data.reader import read_text_docs
    books = ["the cat sat\non the mat\n", "a dog\nran", "the end\n" * 3000, "x y\n"]
    for i, b in enumerate(books):
        write(tmp_path / "books" / f"b{i}.txt", b)
    for kind in ("byte", "char", "word"):
        c = load_corpus(CorpusConfig(source="text_files", tokenizer=kind, train=str(tmp_path / "books"),
                                     valid=str(tmp_path / "books" / "*.txt"), cache_dir=str(tmp_path / "c")))
        for spec in (tmp_path / "books", str(tmp_path / "books" / "*.txt")):
            ids, docs = read_text_docs(spec, c.tokenizer, chunk=4096)
            np.testing.assert_array_equal(ids, np.asarray(c.valid))
            assert docs.tolist() == c.doc_starts("valid").tolist() and len(docs) == 4
        cut = int(c.doc_starts("valid")[2]) + 5
        ids, docs = read_text_docs(tmp_path / "books", c.tokenizer, max_tokens=cut, chunk=4096)
        assert len(ids) == cut and docs.tolist() == c.doc_starts("valid")[:3].tolist()
        assert read_text_docs(tmp_path / "books" / "b0.txt", c.tokenizer)[1].tolist() == [0]


def test_read_text_tokens_errors(tmp_path):
    blank = write(tmp_path / "blank.txt", "  \n\n ")
    with pytest.raises(DataError, match="is empty"):
        read_text_tokens(blank, build_tokenizer("byte"), where="eval.text_file")
    bad = write(tmp_path / "bad.txt", b"ok\n\xff")
    with pytest.raises(DataError, match=f"eval.text_file {bad}: not valid UTF-8 at byte offset 3"):
        read_text_tokens(bad, build_tokenizer("char", "ok\n"), where="eval.text_file")


def test_num_proc_default_is_the_usable_cores():
    assert CorpusConfig().workers == len(os.sched_getaffinity(0))
    assert CorpusConfig(num_proc=3).workers == 3
    with pytest.raises(DataError, match="data.num_proc: must be >= 1"):
        CorpusConfig(num_proc=0)
