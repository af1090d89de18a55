"""Atomic file writing: a temp file in the target's directory, fsync, then rename.

Readers see the old file or the new one, never a half-written one; the temp file is removed
if writing fails. Imports only `detdeploy.errors`, so every subpackage may use it.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from detdeploy.errors import DetdeployError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = 'wb') -> Iterator[IO]:
    """Open a temp file for writing; on success it replaces `path` in one rename."""
    target = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f'.{target.name}.', suffix='.tmp',
                                        dir=target.parent)
    except OSError as exc:
        raise DetdeployError(f'cannot write {target}: {exc.strerror}') from None
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
