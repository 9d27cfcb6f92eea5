"""Generation carries memory: each new token costs one step against the cache, and gives the same
distribution as re-reading the whole context from scratch."""
from __future__ import annotations

import os

import pytest
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


def test_text_stream_pieces_join_to_the_full_decode():
    """Streaming prints decode(prompt + new) exactly, for byte (multi-byte UTF-8), char and word tokens."""
    import random

    from txl.data import build_tokenizer
    from txl.generate import TextStream
    text = "naïve café — 東京 ok\nsecond line: déjà vu\n" * 3
    for kind in ("byte", "char", "word"):
        tok = build_tokenizer(kind, text)
        ids = [int(i) for i in tok.encode(text)]
        if kind != "byte":  # any id sequence: random ids, eos included
            ids = [random.Random(s).randrange(tok.vocab_size) for s in range(200)]
        prompt, new = ids[:5], ids[5:]
        st = TextStream(tok, prompt)
        pieces = [st.push(i) for i in new]
        assert tok.decode(prompt) + "".join(pieces) + st.flush() == tok.decode(ids), kind
        assert len(st.ids) <= TextStream.MAX_PENDING + 2  # bounded: nothing accumulates
        if kind == "byte":  # a multi-byte character waits for its last byte, then prints whole
            assert "東" in pieces and "\ufffd" not in "".join(pieces)


@pytest.mark.slow
def test_generate_streams_and_stops_cleanly_on_sigint(tmp_path, cli_env, run_cli):
    """A billion tokens: text arrives while sampling (not at the end), SIGINT stops it without a
    traceback (exit 130); no ckpt_path: one line saying it is required."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT
    from txl.checkpoint import save_model
    from txl.data import build_tokenizer
    tok = build_tokenizer("char", "abcdefghij klmnop\n")
    m = _model()
    m2 = TransformerXL(TXLConfig(**{**m.cfg.to_dict(), "vocab_size": tok.vocab_size})).eval()
    ck = tmp_path / "m.pt"
    save_model(ck, m2, tok.state_dict())
    p = subprocess.Popen([sys.executable, "-m", "txl.generate", f"ckpt_path={ck}", "prompt=abc",
                          "max_new_tokens=1000000000", f"hydra.run.dir={tmp_path / 'g'}"], cwd=str(ROOT), env=cli_env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got, t0 = b"", time.time()
    os.set_blocking(p.stdout.fileno(), False)
    while len(got) < 200 and time.time() - t0 < 120 and p.poll() is None:
        got += p.stdout.read() or b""
        time.sleep(0.05)
    assert len(got) >= 200 and got.startswith(b"abc"), (got, p.poll())
    p.send_signal(signal.SIGINT)
    os.set_blocking(p.stdout.fileno(), True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGINT, err.decode()[-2000:]
    assert b"Traceback" not in err and err.decode().strip().splitlines()[-1].startswith(
        "txl-generate: stopped by signal 2 after")
    r = run_cli("generate", "prompt=x", f"hydra.run.dir={tmp_path / 'g2'}")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "txl-generate: error: ckpt_path is required (ckpt_path=PATH: a txl-train checkpoint or a txl-convert model file)")
