"""File writes that never leave half a file, and one-line error text. Standard library only.

Every txl write that a reader may see (checkpoints, last.ckpt, eval.json, token caches, plots) goes
through `atomic_write`: a temp file beside the target (same file system, so the rename is atomic),
fsync, os.replace. On any failure the temp file is removed and the target is untouched; a failed
write raises `WriteError` (an OSError naming the path and errno). A temp file left by `kill -9` ends
in TMP_SUFFIX and is removed by `remove_orphan_temps` at the next start in that directory.
"""
from __future__ import annotations

import errno as _errno
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, List

TMP_SUFFIX = ".txl-tmp"
# temp names of earlier versions (mkstemp '.NAME.XXXX.tmp', '.last.ckpt.tmp'), also orphans
_LEGACY_TMP = (".*.ckpt.*.tmp", ".last.ckpt.tmp")


class WriteError(OSError):
    """A write failed (disk full, quota, read-only, I/O error): the path and errno, in one line."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """'TypeName: first line of the message' (cut at `limit` characters): for one-line errors."""
    s = str(e).strip()
    return f"{type(e).__name__}: {(s.splitlines() or [''])[0][:limit]}"


def _write_error(path: Path, e: BaseException) -> WriteError:
    if isinstance(e, WriteError):
        return e
    code = getattr(e, "errno", None)
    if code is None:  # torch.save wraps the file's OSError in a RuntimeError; find the errno in the chain
        c = e.__cause__ or e.__context__
        while c is not None and code is None:
            code = getattr(c, "errno", None)
            c = c.__cause__ or c.__context__
    what = f"[Errno {code}] {os.strerror(code)}" if code else first_line(e)
    err = WriteError(f"cannot write {path}: {what}")
    err.errno = code or _errno.EIO
    return err


def atomic_write(path, write: Callable[[BinaryIO], None], fsync: bool = True) -> Path:
    """write(f) into a temp file beside `path`, fsync, rename onto `path`. The file gets mode
    0666 & ~umask, like any file the user creates (mkstemp's 0600 would differ per file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, (FileNotFoundError, NotImplementedError)):
            raise _write_error(path, e) from None
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), fsync=False)


def atomic_copy(src, dst) -> Path:
    with open(src, "rb") as s:
        return atomic_write(dst, lambda f: shutil.copyfileobj(s, f, 1 << 20))


def remove_orphan_temps(directory) -> List[Path]:
    """Delete temp files a killed writer left in `directory` (call only while holding its run lock)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [p for pat in (f".*{TMP_SUFFIX}", *_LEGACY_TMP) for p in d.glob(pat) if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found
