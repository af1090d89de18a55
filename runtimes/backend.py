"""The one interface every runtime implements: a model opened on a device, described by its
metadata, running preprocessed batches; optional capabilities are declared, not probed.

A new runtime (OpenVINO, a serving client) is one module with one `Backend` subclass, plus its
suffix in `open.py`. Numpy and `core` only.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import numpy as np

from detdeploy.core.errors import DetdeployError
from detdeploy.core.metadata import ModelMetadata
from detdeploy.core.preprocessing import PreprocessConfig

IO_BINDING = 'io_binding'
"""`io_binding()` gives a reusable binding (set_input, run, outputs) keeping data on the device."""
INTERMEDIATE_TENSORS = 'intermediate_tensors'
"""`run_tensors(names, batch)` returns any named tensor of the graph (raw outputs, layers)."""


class Backend:
    """A model on one runtime. Subclasses set `name`, `metadata` (what the file says of itself:
    task, classes, preprocessing, NMS settings) and implement `_run` and `describe`."""

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset()
    metadata: ModelMetadata
    fallback: str | None = None     # why the device asked for is not the one used, if so

    @property
    def source(self) -> str:
        """What was opened, for messages: the model file, or the registry name."""
        return self.metadata.arch

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return self.metadata.preprocess

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.metadata.class_names

    def has(self, capability: str) -> bool:
        return capability in self.capabilities

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        """The model's outputs for a preprocessed [B, 3, H, W] float32 batch, in the order of
        its task's schema for its NMS mode (`core.tasks`); boxes in network-input pixels."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise DetdeployError(f'{self.name}: a batch is [B, 3, H, W], got {list(batch.shape)}')
        divisor = self.preprocess_config.size_divisor
        height, width = batch.shape[2:]
        if height % divisor or width % divisor:
            raise DetdeployError(f'input {height}x{width}: sides must be multiples of {divisor}')
        return tuple(self._run(batch))

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def describe(self) -> dict:
        """What runs where: backend, device and providers actually used, threads, weights."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for queued device work (timing); nothing to wait for on the host."""

    def io_binding(self):
        raise DetdeployError(f'the {self.name} backend has no I/O binding')

    def run_tensors(self, names: list[str], batch: np.ndarray) -> dict[str, np.ndarray]:
        raise DetdeployError(f'the {self.name} backend cannot return intermediate tensors')


def run_in_chunks(batch: np.ndarray, max_batch: int | None, static_batch: int | None,
                  run_chunk: Callable[[np.ndarray], list[np.ndarray]]) -> list[np.ndarray]:
    """Run `batch` in pieces of at most `max_batch` images (None: no limit); a model with a
    static batch gets every piece zero-padded to that size (outputs of the padding are
    dropped). The one place a batch is split or padded to fit a model."""
    limit = static_batch or max_batch
    if static_batch is None and (max_batch is None or len(batch) <= max_batch):
        return run_chunk(batch)
    pieces = []
    for start in range(0, len(batch), limit):
        chunk = batch[start:start + limit]
        used = len(chunk)
        if static_batch is not None and used < static_batch:
            chunk = np.concatenate([chunk, np.zeros((static_batch - used, *chunk.shape[1:]),
                                                    chunk.dtype)])
        pieces.append([out[:used] for out in run_chunk(chunk)])
    return [np.concatenate(parts) for parts in zip(*pieces)]
