"""trainer.compile: a torch.compile'd model trains like the eager one; the CUDA path skip-marked."""
import copy
import time

import pytest
import torch

from txl.lit import TXLModule
from txl.model import TXLConfig, TransformerXL

V = 64


def _cfg():
    return TXLConfig(vocab_size=V, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, init_std=0.2,
                     mem_init="zeros", seq=dict(tgt_len=8, mem_len=8))


def _train(fwd, model, data, steps=2):
    """steps of Adam with the memory carried; -> losses."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mems, losses = None, []
    for x, y in data[:steps]:
        out = fwd(x, mems=mems, labels=y)
        mems = out.mems
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return losses


def _data(device="cpu", n=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, V, (2, 8), generator=g).to(device), torch.randint(0, V, (2, 8), generator=g).to(device))
            for _ in range(n)]


def _compare(device):
    torch.manual_seed(0)
    eager = TransformerXL(_cfg()).to(device)
    comp = copy.deepcopy(eager)
    data = _data(device)
    ref = _train(eager, eager, data)
    t0 = time.perf_counter()
    got = _train(torch.compile(comp), comp, data)
    assert ref[0] != ref[1]  # the second step saw an updated model
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-4)
    # (parameters are not compared: Adam's first steps divide near-zero gradients by their own
    # magnitude, so kernel-order rounding moves those weights by up to lr; the losses carry the updates)
    return time.perf_counter() - t0


@pytest.mark.slow
def test_compiled_model_trains_two_steps_like_eager():
    _compare("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_model_trains_like_eager_cuda():
    _compare("cuda")


def test_trainer_compile_keeps_module_tree_and_config():
    from txl.config import TrainerNode
    assert TrainerNode().compile is False and TrainerNode(compile=True).compile is True
    m = TXLModule(_cfg(), optim=None, seq=None, max_steps=1, compile=True)
    plain = TXLModule(_cfg(), optim=None, seq=None, max_steps=1)
    assert list(m.state_dict()) == list(plain.state_dict())  # checkpoints keep their names
    assert m._fwd is not m.model and m._fwd._orig_mod is m.model  # shares the parameters
    assert plain._fwd is plain.model
