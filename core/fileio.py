"""Atomic file writing (a temp file in the target's directory, fsync, then rename) and the early
checks commands run on their output paths before doing any work.

Readers see the old file or the new one, never a half-written one; the temp file
(`.NAME.XXXX.tmp`) is removed if writing fails or is interrupted. Imports only
`detdeploy.core.errors`, so every subpackage may use it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator

from .errors import OutputError

# mkstemp creates files readable by the owner only; a finished file gets the permissions an
# ordinary open() would have given it. Read once: os.umask can only be read by setting it.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _exists_message(path: Path) -> str:
    return f'{path} exists and --no-overwrite was given: remove it or choose another path'


def check_output_file(path: str | os.PathLike, overwrite: bool = True,
                      flag: str | None = None) -> Path:
    """Fail early, in one line, if `path` cannot be written as a file: a directory in its
    place, a missing or read-only parent directory, or (without `overwrite`) an existing file.
    `flag` names the option the path came from, for the message."""
    target = Path(path)
    named = f'{flag} {target}' if flag else str(target)
    if target.is_dir():
        raise OutputError(f'{named} is a directory; give a file path')
    parent = target.parent
    if not parent.exists():
        raise OutputError(f'output directory does not exist: {parent} (create it first)')
    if not parent.is_dir():
        raise OutputError(f'{named}: {parent} is not a directory')
    problem = _write_probe(parent)
    if problem:
        raise OutputError(f'cannot write {named}: directory {parent} is not writable ({problem})')
    if not overwrite and target.exists():
        raise OutputError(_exists_message(target))
    return target


def check_output_dir(path: str | os.PathLike, flag: str = '--out') -> Path:
    """Fail early, in one line, if `path` cannot be used (or created) as an output directory."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputError(f'{flag} {target} is a file, not a directory')
    existing = target
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f'{flag} {target}: {existing} is a file, not a directory')
    problem = _write_probe(existing)
    if problem:
        raise OutputError(f'cannot write to {flag} {target}: {existing} is not writable '
                          f'({problem})')
    return target


def _write_probe(directory: Path) -> str | None:
    """Why a file cannot be created in `directory`, or None. A real attempt: permission bits
    say nothing for root, read-only mounts or special file systems."""
    try:
        fd, name = tempfile.mkstemp(prefix='.detdeploy-probe.', suffix='.tmp', dir=directory)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return None


def make_output_dir(path: str | os.PathLike, flag: str = '--out') -> Path:
    """`check_output_dir`, then create it (with its parents)."""
    target = check_output_dir(path, flag)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f'cannot create {flag} {target}: {exc.strerror}') from None
    return target


def refuse_existing(paths: Iterable[str | os.PathLike]) -> None:
    """The --no-overwrite check for a command that writes several files."""
    existing = [Path(p) for p in paths if Path(p).exists()]
    if existing:
        more = f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''
        raise OutputError(f'{existing[0]}{more} exists and --no-overwrite was given: remove '
                          'it or choose another output directory')


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = 'wb', overwrite: bool = True
                 ) -> Iterator[IO]:
    """Open a temp file for writing; on success it replaces `path` in one rename. Without
    `overwrite`, an existing `path` is left alone and the write fails (checked atomically, at
    the end: the file is hard-linked into place, which fails if the name exists)."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(f'cannot write {target}: it is a directory')
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f'.{target.name}.', suffix='.tmp',
                                        dir=target.parent)
    except OSError as exc:
        if not target.parent.is_dir():
            raise OutputError(f'cannot write {target}: directory {target.parent} does not '
                              'exist') from None
        raise OutputError(f'cannot write {target}: {exc.strerror}') from None
    try:
        with os.fdopen(fd, mode) as handle:
            try:
                previous_mode = os.stat(target).st_mode & 0o7777
            except OSError:
                previous_mode = 0o666 & ~_UMASK
            if hasattr(os, 'fchmod'):
                os.fchmod(handle.fileno(), previous_mode)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp_name, target)
        else:
            _link_new(tmp_name, target)
        _fsync_directory(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _link_new(tmp_name: str, target: Path) -> None:
    """Move the temp file to `target` only if that name is free."""
    try:
        os.link(tmp_name, target)
    except FileExistsError:
        raise OutputError(_exists_message(target)) from None
    except OSError:
        # a file system without hard links: check, then rename (not atomic, but close)
        if target.exists():
            raise OutputError(_exists_message(target)) from None
        os.replace(tmp_name, target)
        return
    os.unlink(tmp_name)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); best effort where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()
