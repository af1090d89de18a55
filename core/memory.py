"""Memory estimates checked before allocating: a size a user or a file declares (an input size,
a batch, an image header, a dataset's image side) is refused with the figure when even its
lower bound cannot fit in this machine's memory, instead of ending in MemoryError.

Estimates are lower bounds (the arrays detdeploy itself allocates), so a refusal is certain;
what passes may still be too much for the network's activations. Standard library only.
"""
from __future__ import annotations

import os

from .errors import DetdeployError

FLOAT32_BYTES = 4


def memory_limit_bytes() -> int | None:
    """This machine's physical memory, or the container's limit if lower; None if unknown."""
    limits = []
    try:
        limits.append(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))
    except (ValueError, OSError, AttributeError):
        pass
    for path in ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes'):
        try:
            with open(path) as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return min(limits) if limits else None


def format_bytes(count: int | float) -> str:
    for unit, size in (('TB', 1e12), ('GB', 1e9), ('MB', 1e6)):
        if count >= size:
            return f'{count / size:.1f} {unit}'
    return f'{count:.0f} bytes'


def memory_problem(needed_bytes: int, what: str) -> str | None:
    """Why `what` cannot run here, when `needed_bytes` (a lower bound) exceeds this machine's
    memory; None if it may fit."""
    limit = memory_limit_bytes()
    if limit is not None and needed_bytes > limit:
        return (f'{what} needs at least {format_bytes(needed_bytes)} of memory, more than this '
                f'machine has ({format_bytes(limit)})')
    return None


def check_memory(needed_bytes: int, what: str) -> None:
    """`memory_problem` as a one-line `DetdeployError`."""
    problem = memory_problem(needed_bytes, what)
    if problem:
        raise DetdeployError(problem)


def image_batch_bytes(batch: int, height: int, width: int) -> int:
    """Bytes of a preprocessed float32 [batch, 3, height, width] network input."""
    return batch * 3 * height * width * FLOAT32_BYTES
