"""Tokenizers: byte / char / word (WikiText style) / hf (Hugging Face `tokenizers`).

Every tokenizer has `kind`, `unit`, `vocab_size`, `encode(str) -> int32 array`, `decode(ids) -> str`
and a JSON-serialisable `state_dict()`; `tokenizer_from_state(d)` rebuilds it, so the vocabulary
can travel inside a model checkpoint. char/word vocabularies are built from the TRAIN text only.
"""
from __future__ import annotations

import os
from collections import Counter
from operator import itemgetter
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from txl.data.config import TOKENIZER_KINDS as KINDS
from txl.data.errors import DataError

UNK, EOS = "<unk>", "<eos>"
HF_CHUNK_CHARS = 1 << 20  # hf: characters per encode_batch item (whole lines); part of its ids


def decode_utf8(raw: bytes, where: str) -> str:
    """Strict UTF-8 decode; a bad byte becomes a one-line DataError naming `where` and the offset."""
    try:
        return raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 at byte offset {e.start} ({e.reason}); "
                        f"use data.tokenizer=byte for non-UTF-8 text") from None


def _ids_list(ids) -> List[int]:
    if hasattr(ids, "tolist"):  # torch tensor or numpy array, any shape -> flat list
        ids = ids.reshape(-1).tolist()
    return [int(i) for i in ids]


class Tokenizer:
    kind: str = "?"
    unit: Optional[str] = None  # 'byte' | 'char' when bits-per-unit = loss/ln2 is meaningful

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_bytes(self, raw: bytes, where: str = "text") -> np.ndarray:
        """Encode raw file content. Text tokenizers demand UTF-8; ByteTokenizer takes any bytes."""
        return self.encode(decode_utf8(raw, where))

    def encode_chunk(self, text: str, final: bool = True) -> np.ndarray:
        """Encode one piece of a longer text cut after a newline (streaming): the concatenation of
        the pieces' ids equals encode(whole text). final: this piece ends the text."""
        return self.encode(text)

    def decode(self, ids) -> str:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes, vocab 256: loss/ln2 is bits-per-byte."""
    kind, unit = "byte", "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_bytes(self, raw: bytes, where: str = "text") -> np.ndarray:
        return np.frombuffer(raw, dtype=np.uint8).copy()  # uint8: 1 byte/token, no decode needed

    def decode(self, ids) -> str:
        ids = _ids_list(ids)
        if ids and not 0 <= min(ids) <= max(ids) <= 255:
            raise DataError(f"byte tokenizer: ids must be in [0, 255], got {min(ids)}..{max(ids)}")
        return bytes(ids).decode("utf-8", errors="replace")

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind}


class CharTokenizer(Tokenizer):
    """Unicode code points seen in the train text (sorted) plus <unk> at id 0."""
    kind, unit = "char", "char"

    def __init__(self, chars: Sequence[str]):
        chars = sorted(set(chars))
        if any(len(c) != 1 for c in chars):
            raise DataError("char tokenizer: every vocabulary entry must be a single character")
        self.itos: List[str] = [UNK] + chars
        self.unk_id = 0
        # code point -> id lookup table, so encode is one vectorised gather instead of a Python loop
        cps = np.array([ord(c) for c in chars], dtype=np.int64)
        self._table = np.zeros(int(cps.max()) + 1 if len(cps) else 1, dtype=np.int32)
        self._table[cps] = np.arange(1, len(chars) + 1, dtype=np.int32)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(list(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> np.ndarray:
        cp = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")  # [N]
        inside = cp < len(self._table)
        ids = self._table[np.where(inside, cp, 0)]
        ids[~inside] = self.unk_id  # code points beyond the table are unknown; zeros inside are too
        return ids

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in _ids_list(ids))

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "chars": self.itos[1:]}


class _WithDefault(dict):
    default = 0

    def __missing__(self, key):
        return self.default


class WordTokenizer(Tokenizer):
    """WikiText style: whitespace split per line, <eos> appended to every line (empty lines too).

    ids: <unk>=0, <eos>=1, then train tokens by frequency desc, ties by token (deterministic).
    `rank_words` is the ordering; txl.data.build counts a corpus in parallel and uses the same.
    A literal '<unk>' in the text (WikiText has them) maps to the unk id.
    """
    kind, unit = "word", None

    def __init__(self, words: Sequence[str], lower: bool = False, itos: Optional[Sequence[str]] = None):
        # itos: a complete id -> symbol table kept as is (imported vocabularies, e.g. the released
        # WT103 one, put <eos> and <unk> elsewhere); otherwise <unk>=0, <eos>=1, then `words`.
        self.itos: List[str] = list(itos) if itos is not None else \
            [UNK, EOS] + [w for w in words if w not in (UNK, EOS)]
        self._standard = itos is None
        self.lower = bool(lower)
        self._stoi: Optional[Dict[str, int]] = None
        if self._standard:  # <unk>=0, <eos>=1 by construction; the word -> id map waits for encode
            self.unk_id, self.eos_id = 0, 1
        else:
            self.unk_id, self.eos_id = self.stoi[UNK], self.stoi[EOS]

    @property
    def stoi(self) -> Dict[str, int]:
        """word -> id, built on first use (an 800k-word map costs ~0.5 s: a training run reopening
        its cached ids never encodes); a missing word looks up as unk_id (__missing__), so encode
        maps in C."""
        if self._stoi is None:
            stoi = _WithDefault(zip(self.itos, range(len(self.itos))))
            if len(stoi) != len(self.itos):
                raise DataError("word tokenizer: duplicate tokens in vocabulary")
            if UNK not in stoi or EOS not in stoi:  # (`in` does not call __missing__)
                raise DataError(f"word tokenizer: the vocabulary needs both {UNK} and {EOS}")
            stoi.default = stoi[UNK]
            self._stoi = stoi
        return self._stoi

    @classmethod
    def from_text(cls, text: str, min_freq: int = 0, max_size: Optional[int] = None,
                  lower: bool = False) -> "WordTokenizer":
        if lower:
            text = text.lower()
        counts = Counter(text.split())  # whole-text split == per-line split for counting words
        return cls(rank_words(counts, min_freq, max_size), lower=lower)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> np.ndarray:
        return self.encode_chunk(text, final=True)

    def encode_chunk(self, text: str, final: bool = True) -> np.ndarray:
        # Per line: its words, then <eos>; a trailing newline ends the last line. Each newline
        # becomes a literal <eos> word, so one split + one C-level map does a whole chunk (same
        # ids as splitting per line: "\n" is whitespace to str.split, and a literal "<eos>" in the
        # text already meant <eos>). A chunk cut mid-line (final=False) gets no closing <eos>.
        if self.lower:
            text = text.lower()
        words = text.replace("\n", f" {EOS} ").split() if "\n" in text else text.split()
        close = final and bool(text) and not text.endswith("\n")
        ids = np.empty(len(words) + close, dtype=np.int32)
        ids[:len(words)] = np.fromiter(map(self.stoi.__getitem__, words), dtype=np.int32, count=len(words))
        if close:
            ids[-1] = self.eos_id
        return ids

    def decode(self, ids) -> str:
        out, line = [], []
        for i in _ids_list(ids):
            if i == self.eos_id:
                out.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self.itos[i])
        return "".join(out) + " ".join(line)

    def state_dict(self) -> Dict[str, Any]:
        if self._standard:
            return {"kind": self.kind, "words": self.itos[2:], "lower": self.lower}
        return {"kind": self.kind, "idx2sym": list(self.itos), "lower": self.lower}


def rank_words(counts: Dict[str, int], min_freq: int = 0, max_size: Optional[int] = None) -> List[str]:
    """Vocabulary order: frequency descending, ties by the token itself; specials excluded."""
    ranked = sorted(kv for kv in counts.items() if kv[0] not in (UNK, EOS))  # by token (keys are unique)
    ranked.sort(key=itemgetter(1), reverse=True)  # then by count, descending; stable: ties keep token order
    words = [w for w, c in ranked if c >= min_freq]
    if max_size is not None:  # like transformer-xl's Vocab, max_size counts the specials too
        words = words[:max(0, max_size - 2)]
    return words


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer; its full tokenizer.json travels in `state_dict()`."""
    kind, unit = "hf", None

    def __init__(self, backend, name: str):
        self.backend, self.name = backend, name  # backend: tokenizers.Tokenizer

    @classmethod
    def from_name(cls, name: str) -> "HFTokenizer":
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError:
            raise DataError("data.hf_tokenizer: the 'tokenizers' package is not installed") from None
        path = os.path.expanduser(name)
        if os.path.isfile(path):  # a local tokenizer.json
            return cls(Backend.from_file(path), name)
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return cls(Backend.from_file(os.path.join(path, "tokenizer.json")), name)
        from txl.data.hub import hub_offline_reason, in_local_hf_cache
        reason = hub_offline_reason()  # fail fast, before the slow transformers import
        if reason and not in_local_hf_cache(name, "models"):
            raise DataError(f"data.hf_tokenizer: cannot fetch '{name}' from the Hugging Face hub "
                            f"({reason}) and it is not cached; pass a local tokenizer.json path instead")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise DataError(f"data.hf_tokenizer: '{name}' is not a local tokenizer.json and "
                            f"'transformers' is not installed") from None
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=bool(reason))
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(f"data.hf_tokenizer: cannot load '{name}': {type(e).__name__}: {msg}") from None
        if not getattr(tok, "is_fast", False):
            raise DataError(f"data.hf_tokenizer: '{name}' has no fast (Rust) tokenizer")
        return cls(tok.backend_tokenizer, name)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, chunk_chars: Optional[int] = None) -> np.ndarray:
        ids = list(self.encode_stream([text], chunk_chars))
        return np.concatenate(ids) if ids else np.zeros(0, np.int32)

    def encode_stream(self, texts: Iterable[str], chunk_chars: Optional[int] = None,
                      batch: int = 8) -> Iterator[np.ndarray]:
        """ids of the concatenated `texts` (each cut after a newline), chunk by chunk.

        Encodes ~1 MB chunks cut at line ends (bounded memory, parallel encode_batch); merges can
        only differ from a single-shot encode at those (rare) chunk boundaries, which depend on the
        text alone, never on how it was read."""
        chunk_chars = chunk_chars or HF_CHUNK_CHARS
        chunks: List[str] = []
        cur, size = [], 0
        for text in texts:
            for line in text.splitlines(keepends=True):
                cur.append(line)
                size += len(line)
                if size >= chunk_chars:
                    chunks.append("".join(cur))
                    cur, size = [], 0
                    if len(chunks) >= batch:
                        yield from self._encode_batch(chunks)
                        chunks = []
        if cur:
            chunks.append("".join(cur))
        yield from self._encode_batch(chunks)

    def _encode_batch(self, chunks: List[str]) -> Iterator[np.ndarray]:
        for e in (self.backend.encode_batch(chunks, add_special_tokens=False) if chunks else []):
            yield np.asarray(e.ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self.backend.decode(_ids_list(ids), skip_special_tokens=False)

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "tokenizer_json": self.backend.to_str()}


def build_tokenizer(kind: str, train_text: Union[str, bytes, None] = None, **opts) -> Tokenizer:
    """Build a tokenizer; char/word learn their vocabulary from `train_text` only.

    opts: word -> min_freq, max_size, lower; hf -> name (hub id, local dir or tokenizer.json).
    """
    if kind not in KINDS:
        raise DataError(f"data.tokenizer: unknown kind '{kind}' (expected one of {'|'.join(KINDS)})")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        if not opts.get("name"):
            raise DataError("data.hf_tokenizer: tokenizer=hf needs a tokenizer name or path")
        return HFTokenizer.from_name(opts["name"])
    if train_text is None:
        raise DataError(f"data.tokenizer: '{kind}' tokenizer needs the train text")
    if isinstance(train_text, (bytes, bytearray)):
        train_text = decode_utf8(bytes(train_text), "data.train")
    if kind == "char":
        return CharTokenizer.from_text(train_text)
    return WordTokenizer.from_text(train_text, min_freq=int(opts.get("min_freq") or 0),
                                   max_size=opts.get("max_size"), lower=bool(opts.get("lower", False)))


def tokenizer_from_state(d: Dict[str, Any]) -> Tokenizer:
    kind = d.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind == "word":
        if "idx2sym" in d:
            return WordTokenizer((), lower=d.get("lower", False), itos=d["idx2sym"])
        return WordTokenizer(d["words"], lower=d.get("lower", False))
    if kind == "hf":
        from tokenizers import Tokenizer as Backend
        return HFTokenizer(Backend.from_str(d["tokenizer_json"]), d.get("name", "?"))
    raise DataError(f"tokenizer state: unknown kind {kind!r}")
