"""Checkpoints by name (`--checkpoint mmdet:rtmdet-tiny-coco`): where each one is published,
and a download into the user's cache that resumes, shows progress and checks the sha256.

Only the standard library (urllib, hashlib): no torch here; loading is `models.checkpoint`'s.
"""
from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from detdeploy.core.errors import CheckpointError
from detdeploy.core.fileio import file_sha256

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 30


@dataclass(frozen=True)
class NamedCheckpoint:
    """A published checkpoint. `sha256` is the full hex digest or, where the publisher gives
    only that, a prefix of it: OpenMMLab names its files `<config>_<date>-<first 8 hex of the
    sha256>.pth`, so the prefix checked is the one in the URL."""
    name: str
    arch: str                           # registry name it loads into (strictly)
    url: str
    sha256: str
    source: str = ''                    # where the entry comes from

    @property
    def file_name(self) -> str:
        return self.url.rsplit('/', 1)[-1]


_MMDET = 'https://download.openmmlab.com/mmdetection/v3.0/rtmdet'
_METAFILE = 'MMDetection 3.3.0 configs/rtmdet/metafile.yml'
NAMED_CHECKPOINTS = {entry.name: entry for entry in (
    NamedCheckpoint('mmdet:rtmdet-tiny-coco', 'rtmdet-tiny',
                    f'{_MMDET}/rtmdet_tiny_8xb32-300e_coco/'
                    'rtmdet_tiny_8xb32-300e_coco_20220902_112414-78e30dcc.pth', '78e30dcc',
                    _METAFILE),
    NamedCheckpoint('mmdet:rtmdet-s-coco', 'rtmdet-s', f'{_MMDET}/rtmdet_s_8xb32-300e_coco/'
                    'rtmdet_s_8xb32-300e_coco_20220905_161602-387a891e.pth', '387a891e',
                    _METAFILE),
    NamedCheckpoint('mmdet:rtmdet-m-coco', 'rtmdet-m', f'{_MMDET}/rtmdet_m_8xb32-300e_coco/'
                    'rtmdet_m_8xb32-300e_coco_20220719_112220-229f527c.pth', '229f527c',
                    _METAFILE),
    NamedCheckpoint('mmdet:rtmdet-l-coco', 'rtmdet-l', f'{_MMDET}/rtmdet_l_8xb32-300e_coco/'
                    'rtmdet_l_8xb32-300e_coco_20220719_112030-5a0be7c4.pth', '5a0be7c4',
                    _METAFILE),
    NamedCheckpoint('mmdet:rtmdet-x-coco', 'rtmdet-x', f'{_MMDET}/rtmdet_x_8xb32-300e_coco/'
                    'rtmdet_x_8xb32-300e_coco_20220715_230555-cc79b9ae.pth', 'cc79b9ae',
                    _METAFILE),
)}


def is_checkpoint_name(text: str | None) -> bool:
    """`source:name` that is not an existing file (a file always wins)."""
    return bool(text) and ':' in text and not Path(text).exists() and \
        text.split(':', 1)[0] in {name.split(':', 1)[0] for name in NAMED_CHECKPOINTS}


def lookup(name: str) -> NamedCheckpoint:
    if name not in NAMED_CHECKPOINTS:
        raise CheckpointError(f"unknown checkpoint name '{name}': known: "
                              f"{', '.join(NAMED_CHECKPOINTS)} (or give a .pth path)")
    return NAMED_CHECKPOINTS[name]


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/detdeploy/checkpoints, by default ~/.cache/detdeploy/checkpoints."""
    base = os.environ.get('XDG_CACHE_HOME') or str(Path.home() / '.cache')
    return Path(base) / 'detdeploy' / 'checkpoints'


def fetch(entry: NamedCheckpoint, folder: Path | None = None,
          progress: Callable[[int, int | None], None] | None = None) -> Path:
    """The checkpoint's file in the cache, downloaded first if needed.

    Bytes go to `<file>.part`, which a later call resumes with an HTTP Range request (a server
    that ignores it sends the whole file again); the finished file is checked against
    `entry.sha256` and only then renamed to its final name, so a file in the cache under its
    name has been checked. `progress(bytes_so_far, total_or_None)` after each chunk."""
    folder = Path(folder) if folder is not None else cache_dir()
    target = folder / entry.file_name
    if target.is_file():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f'cannot create the checkpoint cache {folder}: '
                              f'{exc.strerror}') from None
    partial = folder / f'{entry.file_name}.part'
    done = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(entry.url, headers={'Range': f'bytes={done}-'} if done
                                     else {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            if response.status != 206:          # the whole file: start again
                done = 0
            length = response.headers.get('Content-Length')
            total = done + int(length) if length is not None else None
            with open(partial, 'ab' if done else 'wb') as handle:
                while True:
                    block = response.read(CHUNK_BYTES)
                    if not block:
                        break
                    handle.write(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
            if total is not None and done < total:
                raise http.client.IncompleteRead(b'', total - done)
    except urllib.error.HTTPError as exc:
        if exc.code != 416:          # 416: the range starts at the end, the .part is whole
            raise CheckpointError(f'cannot download {entry.name} from {entry.url}: HTTP '
                                  f'{exc.code} {exc.reason}') from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, 'reason', None) or type(exc).__name__
        kept = (f'; {partial.stat().st_size} bytes kept in {partial}, the next run resumes'
                if partial.is_file() and partial.stat().st_size else '')
        raise CheckpointError(
            f'cannot download {entry.name} from {entry.url} ({reason}): offline? download it '
            f'by hand and pass --checkpoint PATH.pth{kept}') from None
    digest = file_sha256(partial)
    if not digest.startswith(entry.sha256.lower()):
        partial.unlink()
        raise CheckpointError(
            f'{entry.name}: the downloaded file has sha256 {digest[:16]}..., expected '
            f'{entry.sha256}...: corrupt or changed upstream; deleted, run again to retry')
    os.replace(partial, target)
    return target
