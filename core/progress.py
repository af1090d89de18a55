"""Progress of a long step on stderr: a tqdm bar on a terminal, otherwise (a log, CI, a pipe) one
line every `interval_s` seconds and one at the end, so a job is never silent for minutes.

Library functions take a plain callback (`update(n)` or `stage(name)`); the CLI makes this.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

DEFAULT_INTERVAL_S = 10.0


class Progress:
    """Counts `update(n)` towards `total` (None: unknown) and names `stage(name)`s."""

    def __init__(self, description: str, total: int | None = None, unit: str = 'img',
                 stream: TextIO | None = None, interval_s: float = DEFAULT_INTERVAL_S,
                 terminal: bool | None = None, final_line: bool = True):
        self.description, self.total, self.unit = description, total, unit
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self.final_line = final_line          # off a terminal: a `done` line at the end
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.done = 0
        self.current_stage = ''
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if self.terminal:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=description, unit=unit, file=self.stream,
                            leave=False)

    def update(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif time.monotonic() - self.last_line >= self.interval_s:
            self._line()

    def stage(self, name: str) -> None:
        """A new stage of a step without a count (export: tracing, simplifying, ...)."""
        self.current_stage = name
        if self.bar is not None:
            self.bar.set_description(f'{self.description}: {name}')
        else:
            self._line()

    def close(self, failed: bool = False) -> None:
        """The bar goes; without a terminal, a last line, unless the step failed (its error
        is then the last word)."""
        if self.bar is not None:
            self.bar.close()
        elif (self.done or self.current_stage) and self.final_line and not failed:
            self.current_stage = 'done'
            self._line()

    def __enter__(self) -> 'Progress':
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(failed=exc_type is not None)

    def _line(self) -> None:
        now = time.monotonic()
        elapsed = now - self.started
        parts = [f'{self.description}:']
        if self.current_stage:
            parts.append(self.current_stage)
        if self.done or self.total:
            count = f'{self.done}/{self.total}' if self.total else f'{self.done}'
            parts.append(f'{count} {self.unit}')
            if self.total and 0 < self.done < self.total:
                parts.append(f'~{elapsed * (self.total - self.done) / self.done:.0f} s left')
        parts.append(f'({elapsed:.0f} s)')
        print(' '.join(parts), file=self.stream, flush=True)
        self.last_line = now
