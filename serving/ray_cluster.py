"""Joining Ray for `serve` and `batch-infer`: a local cluster bound to loopback (no dashboard, no
usage reporting), or an existing cluster by address; and the model file a worker opens.

Ray is imported here and in the modules beside it only; the plain CLI never loads it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from detdeploy.core.errors import DetdeployError
from detdeploy.core.metadata import ModelOverrides
from detdeploy.runtimes.backend import Backend

LOOPBACK = '127.0.0.1'
INSTALL_HINT = "install the serving extra: pip install 'detdeploy[serve]'"


@dataclass(frozen=True)
class ModelToOpen:
    """What a Ray worker needs to open the model itself (a path and options, not a session:
    sessions do not pickle, and each replica or actor owns its own)."""
    path: str
    backend: str = 'auto'               # auto, ort, trt or openvino[-f32|-bf16] (open.py's rules)
    device: str = 'cpu'
    device_id: int = 0
    threads: int | None = None          # ONNX Runtime intra-op threads per worker
    overrides: ModelOverrides = field(default_factory=ModelOverrides)

    def open(self) -> Backend:
        from detdeploy.runtimes.open import open_model_file
        return open_model_file(self.path, self.backend, device=self.device,
                               device_id=self.device_id, threads=self.threads,
                               overrides=self.overrides)


def import_ray():
    """The `ray` module, usage reporting off, or a one-line error naming the extra."""
    os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')
    try:
        import ray
    except ImportError:
        raise DetdeployError(f'Ray is not installed: {INSTALL_HINT}') from None
    return ray


def check_room(ray, workers: int, cpus_each: float, gpus_each: float, what: str) -> None:
    """A one-line error when `workers` x (CPUs, GPUs) exceed the cluster's totals: Ray would
    otherwise wait for resources that never come. For clusters started here; an autoscaling
    cluster joined by address may grow, so it is not asked."""
    totals = ray.cluster_resources()
    for unit, each in (('CPU', cpus_each), ('GPU', gpus_each)):
        needed, available = workers * each, totals.get(unit, 0)
        if needed > available:
            raise DetdeployError(f'{workers} {what} x {each:g} {unit}s = {needed:g} {unit}s, but '
                                 f'the Ray cluster has {available:g}: use fewer {what} or less '
                                 'per worker')


def connect(address: str | None = None, num_cpus: int | None = None):
    """Ray, initialised: the cluster at `address` ('auto': the one `ray start` runs on this
    machine), or a new local one on loopback with `num_cpus` CPUs (default: all). A process
    already connected (a test session) keeps its cluster."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK,
                 log_to_driver=False)
    return ray
