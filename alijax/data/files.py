"""Files: the error the format readers raise, and the atomic write that every writer shares
(vector files, indexes, metrics and summaries)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import IO


class FormatError(ValueError):
    """A data file's bytes do not match its format; the message names the file and what was expected."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, text: bool = False) -> Iterator[IO]:
    """Opens a temporary file beside `path` for writing and moves it onto `path` only on success.

    A crash or an exception inside the block leaves `path` as it was (absent or the old file) and
    removes the temporary file. The temporary lives in the same folder so that `os.replace` is a
    rename on one file system, hence atomic.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):  # (else the error would name the hidden temporary file)
        raise FileNotFoundError(f"{path}: its folder {folder} does not exist")
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # Opened by name (not mkstemp) so the final file gets the usual umask permissions, not 0600.
    f = open(tmp, "x", encoding="utf-8", newline="\n") if text else open(tmp, "xb")
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
