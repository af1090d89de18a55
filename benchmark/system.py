"""What a reader needs to trust benchmark numbers: CPU, cores, load, GPU, library versions.

Reads the system without importing torch (its thread settings are reported only if it is
already loaded); backends report their own providers and threads.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time

LIBRARIES = ('detdeploy', 'torch', 'onnxruntime-gpu', 'onnxruntime', 'numpy', 'tensorrt')
THREAD_VARIABLES = ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS')


def cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as handle:
            for line in handle:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    """Physical cores this process may use: distinct (package, core) pairs in /proc/cpuinfo
    among the CPUs in its affinity mask; the usable logical count where that is unreadable."""
    usable = (os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity')
              else set(range(os.cpu_count() or 1)))
    cores, processor, package = set(), None, '0'
    try:
        with open('/proc/cpuinfo') as handle:
            for line in handle:
                key, _, value = (part.strip() for part in line.partition(':'))
                if key == 'processor':
                    processor, package = int(value), '0'
                elif key == 'physical id':
                    package = value
                elif key == 'core id' and processor in usable:
                    cores.add((package, value))
    except (OSError, ValueError):
        cores = set()
    return max(1, min(len(cores), len(usable)) if cores else len(usable))


def load_warning(load_1min: float | None, cores: int) -> str | None:
    """One line when other processes compete for the cores: a load average above the count."""
    if load_1min is None or load_1min <= cores:
        return None
    return (f'load average {load_1min:.1f} is above the {cores} cores: other processes compete '
            'with the benchmark, so absolute times are inflated and PyTorch (OpenMP threads '
            'waiting on a descheduled peer) suffers more than ONNX Runtime; trust the paired '
            'ratios and their spread, and compare runs at --threads 1')


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def gpu_name() -> str | None:
    torch = sys.modules.get('torch')
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if shutil.which('nvidia-smi'):
        try:
            listing = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True,
                                     timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return listing.splitlines()[0] if listing else None
    return None


def torch_threads() -> dict | None:
    torch = sys.modules.get('torch')
    if torch is None:
        return None
    return {'intra_op': torch.get_num_threads(), 'inter_op': torch.get_num_interop_threads()}


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def system_info() -> dict:
    """A JSON-ready description of the machine and software, taken now."""
    return {
        'date': time.strftime('%Y-%m-%d %H:%M:%S %z'),
        'hostname': platform.node(),
        'platform': platform.platform(),
        'python': sys.version.split()[0],
        'cpu_model': cpu_model(),
        'logical_cores': os.cpu_count(),
        'usable_cores': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
        else os.cpu_count(),
        'physical_cores': physical_cores(),
        'load_average_1_5_15min': load_average(),
        'gpu': gpu_name(),
        'torch_threads': torch_threads(),
        'thread_environment': {name: os.environ[name] for name in THREAD_VARIABLES
                               if name in os.environ},
        'versions': library_versions(),
    }
