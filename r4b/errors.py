"""The one base class of r4b's input errors: a bad config, data file or checkpoint.

The CLI prints these as one line naming the file, line and field, without a traceback.
"""


class InputError(ValueError):
    """Bad user input; the message says where (file, line, field) and what was expected."""


class RunInterrupted(Exception):
    """The run stopped at a step boundary on SIGINT/SIGTERM, its checkpoint written (the CLI prints one line)."""


def output_dir(path, flag: str = "--out", *, create: bool = True):
    """``path`` as a writable directory (created with its parents when ``create``), or an :class:`InputError`
    naming ``flag``: a file, under a file, or not writable."""
    import os
    from pathlib import Path

    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == path else f"is under a file, {parent}"
                raise InputError(f"{flag} {path} {where}: give a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InputError(f"{flag} {path}: {parent} is not writable")
            break
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(f"{flag} {path}: cannot create it ({error.strerror})") from None
    return path
