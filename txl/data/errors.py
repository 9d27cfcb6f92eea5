"""The data layer's one user-facing error type (imports nothing: every data module may use it)."""


class DataError(ValueError):
    """A user-facing data problem (bad path, bad encoding, corpus too short, hub offline, ...).

    The message is one line naming the cause, e.g. "data.train: file not found: /x/y.txt".
    """


def first_line(e: BaseException) -> str:
    """'TypeName: first line of the message', for wrapping a library's exception in one line."""
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0] if s else ''}"
