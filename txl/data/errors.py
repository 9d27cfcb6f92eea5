"""The data layer's one user-facing error type (imports only txl.files: every data module may use it)."""


class DataError(ValueError):
    """A user-facing data problem (bad path, bad encoding, corpus too short, hub offline, ...).

    The message is one line naming the cause, e.g. "data.train: file not found: /x/y.txt".
    """



from txl.files import first_line  # noqa: E402,F401  (the one helper; txl.files is stdlib only)
