"""txl-generate: sample text from a checkpoint, carrying memory so the past is never recomputed.

    txl-generate ckpt_path=run/checkpoints/last.ckpt prompt="def main(" max_new_tokens=400 temperature=0.8 top_k=40

The prompt is read in segments of tgt_len (filling the memory); then each new token is one
forward step of length 1 against the cached memory (mem_len keys), O(mem_len) per token. Text is
printed as it is sampled (flushed per token); SIGINT / SIGTERM stop it cleanly (exit 128 + signal).
"""
from __future__ import annotations

import math
import signal
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from txl.cli import CONF_DIR, error_line, exit_code, fail

MIN_TEMPERATURE = 1e-3  # below: greedy in effect (use top_k=1), and 1e-45 makes every logit -inf


@dataclass
class GenerateSchema:
    ckpt_path: Optional[str] = None
    prompt: str = ""
    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int = 0  # 0: the whole vocabulary
    mem_len: Optional[int] = None  # None: the checkpoint's eval memory
    seed: int = 1234
    device: str = "cpu"
    threads: Optional[int] = None  # CPU threads (txl/runtime.py); None: OMP_NUM_THREADS or the usable cores

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= MIN_TEMPERATURE):
            raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE} (for greedy decoding "
                             f"use top_k=1), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.mem_len is not None and self.mem_len < 0:
            raise ValueError(f"mem_len must be >= 0, got {self.mem_len}")


@torch.inference_mode()
def sample_tokens(model, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                  generator: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
    """prompt_ids (B, P) -> yields each new token (B, 1) as it is sampled; holds only the memory."""
    model.eval()
    tgt = model.seq.tgt_len
    mems = model.init_mems(prompt_ids.size(0), projected=True)  # keys / values: a step projects 1 row, not M + 1
    ctx = prompt_ids[:, :-1]
    for s in range(0, ctx.size(1), tgt):  # fill the memory with the prompt, a segment at a time
        mems = model(ctx[:, s:s + tgt], mems=mems).mems
    last = prompt_ids[:, -1:]
    for _ in range(max_new_tokens):
        o = model(last, mems=mems, return_log_probs=True)
        mems = o.mems
        lp = o.log_probs[:, -1].float()  # (B, V)
        # shift the best to 0 before dividing: softmax is unchanged, and no temperature can turn every
        # logit into -inf (a NaN distribution)
        logits = (lp - lp.max(dim=-1, keepdim=True).values) / temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        last = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        yield last


def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """prompt_ids (1, P) -> (1, P + max_new_tokens). Memory carries everything before the last token."""
    return torch.cat([prompt_ids, *sample_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, generator)],
                     dim=1)


class TextStream:
    """Text of a growing token sequence, piece by piece, for any tokenizer: a piece is
    decode(window + new) minus decode(window), emitted once it does not end inside a UTF-8
    character (byte / BPE tokens); the window is the last emitted piece's tokens, so memory stays
    bounded and word tokenizers get their separators."""

    MAX_PENDING = 8  # tokens held back waiting for a complete character, at most

    def __init__(self, tok, context=()):
        self.tok = tok
        self.ids = [int(i) for i in context][-1:]
        self.read = len(self.ids)  # ids[:read] are decoded and printed already

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self.tok.decode(self.ids[:self.read])
        text = self.tok.decode(self.ids)
        if len(text) > len(before) and (not text.endswith("\ufffd") or len(self.ids) - self.read > self.MAX_PENDING):
            self.ids, self.read = self.ids[self.read:], len(self.ids) - self.read
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character at the very end)."""
        before = self.tok.decode(self.ids[:self.read])
        text = self.tok.decode(self.ids)
        self.ids, self.read = self.ids[self.read:], len(self.ids) - self.read
        return text[len(before):]


def _write(s: str) -> None:
    if s:
        sys.stdout.write(s)
        sys.stdout.flush()


def _task(cfg: DictConfig) -> None:
    from txl.checkpoint import load_model
    from txl.cli import require_ckpt_path
    from txl.data import tokenizer_from_state
    from txl.runtime import quiet_third_party, setup_threads
    require_ckpt_path(cfg)
    try:
        quiet_third_party()
        setup_threads(cfg.threads)
        c = OmegaConf.to_object(cfg)
        model, tok_state, ck = load_model(c.ckpt_path, map_location=c.device)
        if tok_state is None:
            raise ValueError("ckpt_path: this checkpoint carries no vocabulary to decode with")
        tok = tokenizer_from_state(tok_state)
        saved = ck.get("txl", {}).get("seq") or {}
        model.set_lengths(mem_len=c.mem_len if c.mem_len is not None else saved.get("eval_mem_len", model.seq.mem_len),
                          ext_len=0)
        ids = tok.encode(c.prompt or "\n")
        if len(ids) == 0:
            raise ValueError("prompt: encodes to no tokens")
    except (ValueError, OSError) as e:
        fail(error_line(e), code=exit_code(e))
    stop = []
    for s in (signal.SIGINT, signal.SIGTERM):  # stop at the next token, cleanly
        signal.signal(s, lambda signum, frame: stop.append(signum))
    g = torch.Generator(device=c.device).manual_seed(c.seed)
    prompt = torch.as_tensor(ids, dtype=torch.long)[None].to(c.device)
    stream = TextStream(tok, ids)
    n = 0
    try:
        _write(tok.decode(ids))
        for t in sample_tokens(model, prompt, c.max_new_tokens, c.temperature, c.top_k, g):
            _write(stream.push(int(t)))
            n += 1
            if stop:
                break
        _write(stream.flush() + "\n")
    except BrokenPipeError:  # e.g. | head: the reader has what it wanted
        sys.stderr.close()
        sys.exit(0)
    if stop:
        print(f"txl-generate: stopped by signal {stop[0]} after {n} new tokens", file=sys.stderr, flush=True)
        sys.exit(128 + stop[0])


def main() -> None:
    from txl.cli import register_resolvers, set_tool
    set_tool("txl-generate")
    register_resolvers()
    ConfigStore.instance().store(name="txl_generate_schema", node=GenerateSchema)
    hydra.main(config_path=CONF_DIR, config_name="generate", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
