"""txl-generate: sample text from a checkpoint, carrying memory so the past is never recomputed.

    txl-generate ckpt_path=run/checkpoints/last.ckpt prompt="def main(" max_new_tokens=400 temperature=0.8 top_k=40

The prompt is read in segments of tgt_len (filling the memory); then each new token is one
forward step of length 1 against the cached memory (mem_len keys), O(mem_len) per token.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from txl.train import CONF_DIR


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
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@torch.inference_mode()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """prompt_ids (1, P) -> (1, P + max_new_tokens). Memory carries everything before the last token."""
    model.eval()
    tgt = model.seq.tgt_len
    mems = model.init_mems(prompt_ids.size(0), projected=True)  # keys / values: a step projects 1 row, not M + 1
    ctx = prompt_ids[:, :-1]
    for s in range(0, ctx.size(1), tgt):  # fill the memory with the prompt, a segment at a time
        mems = model(ctx[:, s:s + tgt], mems=mems).mems
    last, out = prompt_ids[:, -1:], [prompt_ids]
    for _ in range(max_new_tokens):
        o = model(last, mems=mems, return_log_probs=True)
        mems = o.mems
        logits = o.log_probs[:, -1].float() / temperature  # (1, V)
        if top_k:
            kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        last = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        out.append(last)
    return torch.cat(out, dim=1)


def _task(cfg: DictConfig) -> None:
    from txl.checkpoint import CheckpointError, load_model
    from txl.data import tokenizer_from_state
    from txl.runtime import quiet_third_party, setup_threads
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
        g = torch.Generator().manual_seed(c.seed)
        seq = generate(model, torch.as_tensor(ids, dtype=torch.long)[None].to(c.device), c.max_new_tokens,
                       c.temperature, c.top_k, g)
        print(tok.decode(seq[0].tolist()), flush=True)
    except (ValueError, CheckpointError, OSError) as e:
        print(f"txl-generate: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    ConfigStore.instance().store(name="txl_generate_schema", node=GenerateSchema)
    hydra.main(config_path=CONF_DIR, config_name="generate", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
