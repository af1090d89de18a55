"""Where the time goes in one end-to-end detection: ONNX Runtime's and PyTorch's profilers per
operator, and the host stages (preprocess, postprocess) per function.

Run by hand:  .venv/bin/python bench/profile_bench.py [--arch tiny] [--batch 1] [--runs 10]
              [--threads N]

rtmdet-<arch> with synthetic weights, exported with `--nms onnx` (deploy preset, dynamic batch),
on generated images held in memory. Prints the operators taking most time in ONNX Runtime
(`SessionOptions.enable_profiling`, node events summed per op type) and in PyTorch
(`torch.profiler`, self CPU time), and the median of each host stage. Profilers add overhead:
read the shares, not the absolute times.
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from detdeploy.benchmark.timing import load_images
from detdeploy.core.preprocessing import PreprocessConfig
from detdeploy.export.exporter import ExportOptions, export_onnx
from detdeploy.models import load_detector
from detdeploy.models.synthetic_weights import randomize_detector
from detdeploy.runtimes.pipeline import prepare_batch, to_detections
from detdeploy.runtimes.torch_backend import TorchBackend

NMS_OPS = {'NonMaxSuppression', 'TopK', 'GatherND', 'ScatterND', 'ScatterElements', 'ReduceMax'}


def ort_profile(path: Path, batch: np.ndarray, runs: int, threads: int | None, top: int) -> None:
    options = onnxruntime.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(''))
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=['CPUExecutionProvider'])
    for _ in range(runs):
        session.run(None, {'images': batch})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter = collections.Counter()
    runs_us = []
    for event in events:
        if event.get('cat') == 'Node' and event['name'].endswith('_kernel_time'):
            per_op[event['args']['op_name']] += event['dur']
        elif event.get('cat') == 'Session' and event['name'] == 'model_run':
            runs_us.append(event['dur'])
    total = sum(per_op.values())
    print(f'ONNX Runtime, {runs} runs of {list(batch.shape)}: model_run median '
          f'{np.median(runs_us) / 1e3:.1f} ms; kernel time by op type:')
    for op, micros in per_op.most_common(top):
        print(f'  {op:<24} {micros / runs / 1e3:8.2f} ms/run  {100 * micros / total:5.1f} %')
    nms_share = sum(v for k, v in per_op.items() if k in NMS_OPS)
    print(f'  NMS-related ops ({", ".join(sorted(NMS_OPS))}): {100 * nms_share / total:.1f} % '
          'of kernel time (TopK/GatherND also appear in the pre-top-k selection)')


def torch_profile(detector, batch: np.ndarray, runs: int, threads: int | None, top: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    backend = TorchBackend(detector, nms=detector.spec.nms('deploy'))
    backend.run(batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(runs):
            backend.run(batch)
    print(f'PyTorch eager, {runs} runs, {torch.get_num_threads()} threads: self CPU time by op')
    print(profiler.key_averages().table(sort_by='self_cpu_time_total', row_limit=top))


def host_stages(images: list[np.ndarray], config: PreprocessConfig, outputs, runs: int) -> None:
    times = collections.defaultdict(list)
    for _ in range(runs):
        started = time.perf_counter()
        _, metas = prepare_batch(images, config)
        prepared = time.perf_counter()
        to_detections(outputs, ['<generated>'] * len(images), metas, ('a',) * 80)
        times['preprocess'].append((prepared - started) * 1e3)
        times['postprocess'].append((time.perf_counter() - prepared) * 1e3)
    sizes = ', '.join(f'{image.shape[1]}x{image.shape[0]}' for image in images)
    print(f'host stages for {len(images)} image(s) ({sizes}), median of {runs}: ' + ', '.join(
        f'{stage} {np.median(values):.1f} ms' for stage, values in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--runs', type=int, default=10)
    parser.add_argument('--threads', type=int)
    parser.add_argument('--top', type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    detector = load_detector(f'rtmdet-{args.arch}')
    randomize_detector(detector.model)
    images = load_images(None, args.batch)[0][:args.batch]
    config = detector.spec.preprocessing
    batch = prepare_batch(images, config)[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f'rtmdet-{args.arch}.onnx'
        export_onnx(detector, path, ExportOptions(nms_mode='onnx',
                                                  nms=detector.spec.nms('deploy'),
                                                  dynamic_batch=True))
        ort_profile(path, batch, args.runs, args.threads, args.top)
        outputs = onnxruntime.InferenceSession(
            str(path), providers=['CPUExecutionProvider']).run(None, {'images': batch})
    host_stages(images, config, outputs, args.runs)
    torch_profile(detector, batch, args.runs, args.threads, args.top)


if __name__ == '__main__':
    main()
