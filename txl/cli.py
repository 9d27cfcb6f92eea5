"""What the command-line tools share: the config directory, exit codes, one-line errors, run-dir checks.

Exit codes (README, "Resume, signals, exit codes"):
    0  success                      2  bad input or config (one line on stderr)
    1  non-finite training loss     74 I/O error while writing (disk full, quota, read-only; EX_IOERR)
    128 + N  stopped by signal N (130 SIGINT, 143 SIGTERM), after saving a checkpoint (txl-train)

A run directory is held by one live run: `RunLock` takes an flock on <dir>/.txl.lock for the run's
lifetime (the holder's pid is written inside). The kernel drops the lock when the process dies, so the
file a killed run leaves behind blocks nothing.
"""
from __future__ import annotations

import errno
import fcntl
import os
import secrets
import sys
from pathlib import Path
from typing import Dict, NoReturn, Optional

_HERE = Path(__file__).resolve().parent  # a wheel ships conf/ as txl/conf (pyproject.toml); a checkout has ../conf
CONF_DIR = os.environ.get("TXL_CONF_DIR") or str(_HERE / "conf" if (_HERE / "conf").is_dir() else _HERE.parent / "conf")
EXIT_OK, EXIT_NONFINITE, EXIT_BAD_INPUT, EXIT_IO = 0, 1, 2, 74
LOCK_NAME = ".txl.lock"
# errnos of a failing device or file system, not of a bad path given by the user
IO_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}

_tool = "txl"


def set_tool(name: str) -> None:
    """The program name that prefixes every error line ('txl-train: error: ...')."""
    global _tool
    _tool = name


def fail(msg: str, code: int = EXIT_BAD_INPUT, tool: Optional[str] = None) -> NoReturn:
    print(f"{tool or _tool}: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def error_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def exit_code(e: BaseException) -> int:
    """The documented exit code for an exception that ends a tool."""
    from txl.files import WriteError
    if isinstance(e, WriteError) or (isinstance(e, OSError) and e.errno in IO_ERRNOS):
        return EXIT_IO
    return EXIT_BAD_INPUT


def is_launch_rank_zero() -> bool:
    """False in the processes a launcher started for ranks > 0 (Lightning's DDP children, torchrun,
    SLURM): only rank 0 locks the run dir and cleans it; the others share it."""
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def register_resolvers() -> None:
    """${txl_unique:}: a short random tag, fixed for the process, so two runs started in the same
    second get different default run dirs."""
    from omegaconf import OmegaConf
    if not OmegaConf.has_resolver("txl_unique"):
        tag = secrets.token_hex(3)
        OmegaConf.register_new_resolver("txl_unique", lambda: tag)


def require_ckpt_path(cfg) -> None:
    """txl-eval / txl-generate read a checkpoint: say so (not a TypeError about None)."""
    from omegaconf import OmegaConf
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        fail("ckpt_path is required (ckpt_path=PATH: a txl-train checkpoint or a txl-convert model file)")


def check_writable(*dirs: Path) -> None:
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".txl-write-probe-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"cannot write to {d} ({e.strerror or e})") from None


class RunDirLocked(ValueError):
    pass


_held: Dict[Path, int] = {}


def lock_run_dir(d: Path, what: str = "run dir") -> None:
    """Hold <d>/.txl.lock until this process ends; a directory a live run holds fails at once."""
    d = Path(d).resolve()
    if d in _held:
        return
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunDirLocked(f"{what} {d} is in use by a live run (pid {holder}); give each run its own "
                           "hydra.run.dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[d] = fd  # never closed: the lock lives as long as the process


def release_run_dirs() -> None:
    """For tests running several tools in one process; a CLI just exits."""
    for fd in _held.values():
        os.close(fd)
    _held.clear()


def precheck_run_dir(argv: list, lock: bool = False) -> None:
    """Before Hydra creates hydra.run.dir (and writes .hydra/ into it): refuse an unwritable one, or
    (lock: txl-train) one a live run holds, in one line."""
    for a in argv:
        if a.startswith("hydra.run.dir="):
            p = Path(a.split("=", 1)[1].strip("\"'")).expanduser().absolute()
            q = p
            while not q.exists():
                q = q.parent
            if not q.is_dir() or not os.access(q, os.W_OK):
                fail(f"hydra.run.dir: cannot create {p} ({q} is not a writable directory)")
            if lock and (p / LOCK_NAME).is_file() and is_launch_rank_zero():
                try:
                    lock_run_dir(p, "hydra.run.dir:")
                except RunDirLocked as e:
                    fail(str(e))
