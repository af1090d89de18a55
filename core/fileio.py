"""Atomic file writing (a temp file in the target's directory, fsync, then rename) and the early
checks commands run on their output paths before doing any work.

Readers see the old file or the new one, never a half-written one; the temp file
(`.NAME.XXXX.tmp`) is removed if writing fails or is interrupted. Imports only
`detdeploy.core.errors`, so every subpackage may use it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator

from .errors import DetdeployError, OutputError

# mkstemp creates files readable by the owner only; a finished file gets the permissions an
# ordinary open() would have given it. Read once: os.umask can only be read by setting it.
_UMASK = os.umask(0)
os.umask(_UMASK)


# Temp files carry the writing process's id, so a later run can tell a leftover of a killed
# process (remove it) from a file another live process is writing (leave it).
_TEMP_PATTERN = re.compile(r'^\..+\.(\d+)\.[A-Za-z0-9_]+\.tmp$')
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)
_cleaned_dirs: set[Path] = set()


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, 'a FIFO (named pipe)'), (stat.S_ISCHR, 'a character device'),
                       (stat.S_ISBLK, 'a block device'), (stat.S_ISSOCK, 'a socket'),
                       (stat.S_ISDIR, 'a directory')):
        if test(mode):
            return name
    return 'not a regular file'


def check_input_file(path: str | os.PathLike, what: str = 'file') -> Path:
    """`path` as a readable regular file (symlinks followed), or a one-line error that says why
    not: missing, a directory, a FIFO or device, a symlink loop or a dangling link. `what`
    names the file for the message (`model file`, `checkpoint`, ...)."""
    target = Path(path)
    try:
        mode = os.stat(target).st_mode
    except ValueError:                      # a NUL byte
        raise DetdeployError(f'{what} {str(target)!r} is not a valid file name') from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DetdeployError(f'{what} {target} is not a regular file (a symlink loop)') \
                from None
        if target.is_symlink():
            raise DetdeployError(f'{what} {target} is not a regular file (a symlink to '
                                 f'{os.readlink(target)}, which does not exist)') from None
        if exc.errno == errno.ENOENT:
            raise DetdeployError(f'{what} not found: {target}') from None
        raise DetdeployError(f'cannot read {what} {target}: {exc.strerror}') from None
    if stat.S_ISDIR(mode):
        raise DetdeployError(f'{target} is a directory, not a {what}')
    if not stat.S_ISREG(mode):
        raise DetdeployError(f'{what} {target} is not a regular file ({_kind(mode)})')
    return target


def _identity(path: Path) -> tuple:
    """What makes two paths the same file: device and inode if it exists (hard links and
    symlinks included), else the resolved path."""
    try:
        info = os.stat(path)
        return ('inode', info.st_dev, info.st_ino)
    except (OSError, ValueError):
        return ('path', os.path.realpath(path))


def refuse_overwriting_inputs(outputs: Iterable[tuple[str, str | os.PathLike]],
                              inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> None:
    """The one rule every writing command applies before any work: no file it writes may be
    one of the files it reads (the same file after symlinks and hard links), and no two
    outputs may be the same file. `outputs` and `inputs` are (flag or description, path)
    pairs; None paths, inputs that do not exist (a registry name, nothing to lose) and
    directories (their files are listed one by one by the caller) are skipped."""
    read: dict[tuple, tuple[str, Path]] = {}
    for label, path in inputs:
        if path is None or not os.path.exists(path) or Path(path).is_dir():
            continue
        read.setdefault(_identity(Path(path)), (label, Path(path)))
    written: dict[tuple, tuple[str, Path]] = {}
    clashes = []
    for flag, path in outputs:
        path = Path(path)
        key = _identity(path)
        if key in read:
            clashes.append((flag, path, *read[key]))
        elif key in written and written[key][0] != flag:
            other_flag, other = written[key]
            raise OutputError(f'{flag} {path} and {other_flag} {other} name the same file')
        written.setdefault(key, (flag, path))
    if clashes:
        flag, path, label, source = clashes[0]
        more = f' (and {len(clashes) - 1} more inputs)' if len(clashes) > 1 else ''
        same = '' if os.path.abspath(path) == os.path.abspath(source) else f' ({source})'
        raise OutputError(f'{flag} {path} would overwrite the input {label}{same}{more}; '
                          'choose another output path')


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
    problem = _not_regular(target)
    if problem:
        raise OutputError(f'{named} is not a regular file ({problem}); give a file path')
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


def _not_regular(target: Path) -> str | None:
    """Why an existing `target` cannot be replaced by a written file (a FIFO, a device, a
    symlink loop), or None (a regular file, a symlink to one, or nothing there yet)."""
    try:
        mode = os.stat(target).st_mode
    except OSError as exc:
        return 'a symlink loop' if exc.errno == errno.ELOOP else None
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else _kind(mode)


def _write_probe(directory: Path) -> str | None:
    """Why a file cannot be created in `directory`, or None. A real attempt: permission bits
    say nothing for root, read-only mounts or special file systems."""
    try:
        fd, name = tempfile.mkstemp(prefix=f'.detdeploy-probe.{os.getpid()}.', suffix='.tmp',
                                    dir=directory)
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
    the end: the file is hard-linked into place, which fails if the name exists).

    A `path` that is a symlink is written through: the file it points to is replaced, the link
    stays. A FIFO, device or symlink loop is refused. An OS error of the disk (full, quota,
    read-only, I/O) names `path`. Leftover temp files of killed runs in the same folder are
    removed on the first write there (`remove_stale_temp_files`)."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(f'cannot write {target}: it is a directory')
    problem = _not_regular(target)
    if problem:
        raise OutputError(f'cannot write {target}: it is not a regular file ({problem})')
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    if target.parent not in _cleaned_dirs and target.parent.is_dir():
        _cleaned_dirs.add(target.parent)
        remove_stale_temp_files(target.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f'.{target.name}.{os.getpid()}.', suffix='.tmp',
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
    except Exception as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        disk = _disk_error(exc)
        if disk is not None:
            raise OutputError(f'cannot write {target}: {disk.strerror}') from None
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _disk_error(exc: BaseException) -> OSError | None:
    """The disk's OSError (full, quota, read-only, I/O) behind `exc`, also when a writer such as
    torch.save wrapped it into an error of its own; None for any other error, and for one that
    already names another file (an input that failed to read)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS and exc.filename is None:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Remove the temp files (`.NAME.PID.XXXX.tmp`) that processes no longer running left in
    `directory` (a SIGKILL or power loss skips our clean-up); files of live processes, and
    every other file, stay. Returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            match = _TEMP_PATTERN.match(entry.name)
            if not match or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
                continue
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True             # another user's process (or an absurd number): leave it
    return True


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
