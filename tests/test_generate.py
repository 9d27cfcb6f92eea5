"""Generation carries memory: each new token costs one step against the cache, and gives the same
distribution as re-reading the whole context from scratch."""
from __future__ import annotations

import torch

from txl.generate import generate
from txl.model import TransformerXL, TXLConfig


def _model(kind="relative"):
    torch.manual_seed(0)
    cfg = TXLConfig(vocab_size=40, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, kind=kind,
                    seq=dict(tgt_len=4, mem_len=64))
    return TransformerXL(cfg).eval()


def test_cached_generation_equals_full_recompute():
    for kind in ("relative", "rotary", "alibi"):
        m = _model(kind)
        prompt = torch.randint(0, 40, (1, 9))
        g = torch.Generator().manual_seed(3)
        out = generate(m, prompt, max_new_tokens=12, temperature=1.0, top_k=0, generator=g)
        assert out.shape == (1, 21) and torch.equal(out[:, :9], prompt)
        # replay: the next-token distribution at each step from one pass over everything so far
        g2 = torch.Generator().manual_seed(3)
        seq = prompt
        for _ in range(12):
            with torch.no_grad():
                lp = m(seq, return_log_probs=True).log_probs[:, -1]
            nxt = torch.multinomial(torch.softmax(lp.float(), -1), 1, generator=g2)
            seq = torch.cat([seq, nxt], 1)
        assert torch.equal(seq, out), kind


def test_top_k_restricts_the_support():
    m = _model()
    prompt = torch.randint(0, 40, (1, 5))
    with torch.no_grad():
        lp = m(prompt, return_log_probs=True).log_probs[0, -1]
    top2 = set(lp.topk(2).indices.tolist())
    for s in range(20):
        out = generate(m, prompt, 1, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(s))
        assert int(out[0, -1]) in top2
