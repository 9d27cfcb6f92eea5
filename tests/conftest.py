"""Shared fixtures: small text corpora made on the fly, and a runner for the CLIs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Under pytest-xdist (make test runs one worker per core) the workers share the cores: give each its
# share, so that neither torch in the worker nor the CLIs it starts oversubscribe them (OpenMP barrier
# waits on an oversubscribed core cost more than the second thread gains). Before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and not os.environ.get("OMP_NUM_THREADS"):
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def _stdlib_text(n_bytes: int) -> str:
    """Deterministic human-written text present on every machine: some stdlib sources."""
    import sysconfig
    lib = Path(sysconfig.get_paths()["stdlib"])
    out, size = [], 0
    for name in ("textwrap.py", "heapq.py", "bisect.py", "fnmatch.py", "glob.py", "shlex.py", "string.py",
                 "colorsys.py", "keyword.py", "calendar.py", "difflib.py", "argparse.py"):
        p = lib / name
        if p.is_file():
            t = p.read_text(encoding="utf-8")
            out.append(t)
            size += len(t)
            if size >= n_bytes:
                break
    return "\n".join(out)[:n_bytes]


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory):
    """(train, valid, test) paths of a ~60 KB char-level corpus split 80/10/10."""
    d = tmp_path_factory.mktemp("corpus")
    text = _stdlib_text(60_000)
    a, b = int(len(text) * 0.8), int(len(text) * 0.9)
    paths = []
    for name, part in (("train", text[:a]), ("valid", text[a:b]), ("test", text[b:])):
        p = d / f"{name}.txt"
        p.write_text(part, encoding="utf-8")
        paths.append(str(p))
    return tuple(paths)


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory):
    env = dict(os.environ)
    env.update(TXL_CACHE=str(tmp_path_factory.mktemp("txl-cache")), WANDB_MODE="offline", HYDRA_FULL_ERROR="0",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


@pytest.fixture(scope="session")
def run_cli(cli_env):
    """run_cli('train', 'model=tiny', ...) -> CompletedProcess (text, captured)."""
    def run(tool: str, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", f"txl.{tool}", *args], capture_output=True, text=True,
                              timeout=timeout, env=env or cli_env, cwd=str(ROOT))
    return run


def tiny_train_args(corpus_files, run_dir, *extra: str) -> list[str]:
    tr, va, te = corpus_files
    return ["model=tiny", "data=text_files", f"data.train={tr}", f"data.valid={va}", f"data.test={te}",
            "data.tokenizer=char", "data.batch_size=4", "data.eval_batch_size=2", "seq.tgt_len=16", "seq.mem_len=16",
            "optim.lr=0.003", "optim.warmup_steps=0", "logger=csv", "trainer.max_steps=30", "trainer.log_every_n_steps=1", "trainer.val_check_interval=15",
            "trainer.limit_val_batches=4", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", *extra]


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"txl_script_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def eval_config(ckpt, text, run_dir, *overrides: str):
    """txl-eval's composed config (conf/eval.yaml) for an in-process `txl.eval.run`."""
    from hydra import compose, initialize_config_dir

    from txl.config import register
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("eval", overrides=[f"ckpt_path={ckpt}", f"eval.text_file={text}", f"run_dir={run_dir}",
                                          *overrides])


def read_losses(run_dir) -> dict[int, str]:
    """step -> the train_loss string exactly as logged (equality, not closeness)."""
    import csv
    out = {}
    with open(Path(run_dir) / "metrics.csv") as f:
        for r in csv.DictReader(f):
            if r.get("train_loss"):
                out[int(r["step"])] = r["train_loss"]
    return out


def _shared_data_dir() -> Path | None:
    """../shared/data beside the checkout (tests and benchmarks only), or $TXL_SHARED_DATA."""
    for cand in (os.environ.get("TXL_SHARED_DATA"), ROOT.parent / "shared" / "data"):
        if cand and (Path(cand) / "wikitext-2" / "valid.txt").is_file():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """WikiText-2 valid/test and Tiny Shakespeare; CI has them, so a missing copy fails under CI=true."""
    d = _shared_data_dir()
    if d is None:
        if os.environ.get("CI"):
            pytest.fail("../shared/data is missing (set TXL_SHARED_DATA)")
        pytest.skip("../shared/data not found (set TXL_SHARED_DATA)")
    return d


def error_lines(stderr: str) -> list[str]:
    """stderr's non-empty lines less our log lines ('[time][logger][LEVEL] - ...', which the CLIs send
    to stderr so that stdout keeps only the JSON summary / generated text)."""
    return [x for x in stderr.splitlines() if x.strip() and not x.startswith("[")]


@pytest.fixture
def one_thread():
    """torch at one thread for the test (small in-process runs: no barrier waits on a loaded machine)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
