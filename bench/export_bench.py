"""Export wall time per RTMDet size, and the cost of NMS inside the ONNX graph.

Run by hand:  .venv/bin/python bench/export_bench.py [--archs tiny,s] [--rounds 20]

1. Exports each size (`--nms onnx`, 640x640, onnxsim on) and prints the wall time.
2. Exports rtmdet-tiny with `--nms onnx` and `--nms none` at 640x640 and times both in ONNX
   Runtime (CPU) with `detdeploy.benchmark.timing` in alternating rounds (A B A B ...), so
   machine drift hits both alike; prints the median per-round difference of the inference
   stage (the in-graph NMS cost) and its share of the end-to-end time (issue 6 target: at most
   5 % at the deploy preset). Weights are synthetic (`randomize_detector`), with spread scores,
   so NMS has real candidates to work on.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from detdeploy.benchmark.timing import Entry, load_images, run_benchmark
from detdeploy.export.exporter import ExportOptions, export_onnx
from detdeploy.models import load_detector
from detdeploy.models.synthetic_weights import randomize_detector
from detdeploy.runtimes.open import open_model_file
from detdeploy.runtimes.pipeline import prepare_batch


def export_times(archs: list[str], folder: Path) -> None:
    print('export wall time (nms onnx, 640x640, simplified):')
    for arch in archs:
        detector = load_detector(f'rtmdet-{arch}')
        started = time.perf_counter()
        report = export_onnx(detector, folder / f'{arch}.onnx', ExportOptions())
        print(f'  rtmdet-{arch:<5} {time.perf_counter() - started:6.1f} s   '
              f'{report.size_bytes / 1e6:6.1f} MB   {report.nodes_final} nodes')


def nms_cost(folder: Path, rounds: int, threads: int, preset_name: str, batch: int = 1) -> None:
    """In-graph NMS cost: the same weights exported with `--nms onnx` and `--nms none`, both run
    through `detdeploy.benchmark.timing` (ONNX Runtime CPU, generated images in memory) in
    alternating rounds; NMS = paired per-round difference of the inference stage, also as a
    share of the `--nms onnx` file's end-to-end time (image in, rescaled detections out)."""
    torch.manual_seed(0)
    detector = load_detector('rtmdet-tiny')
    randomize_detector(detector.model)
    preset = detector.spec.nms(preset_name)
    entries = []
    for mode in ('onnx', 'none'):
        path = folder / f'tiny_{mode}.onnx'
        export_onnx(detector, path, ExportOptions(nms_mode=mode, nms=preset, dynamic_batch=True))
        entries.append(Entry(path.name, open_model_file(path, 'ort', threads=threads)))
    images, names, description = load_images(None, batch)
    result = run_benchmark(entries, (batch,), images, names, description, warmup=3,
                           iters=rounds)
    with_nms, raw = result.configs
    inference = np.asarray(with_nms.samples_ms['inference'])
    differences = inference - np.asarray(raw.samples_ms['inference'])
    end_to_end = np.asarray(with_nms.samples_ms['end_to_end'])
    nms_ms = float(np.median(differences))
    with_nms_backend = entries[0].backend
    first_batch = prepare_batch(images[:batch], with_nms_backend.preprocess_config)[0]
    detections = int(with_nms_backend.run(first_batch)[0][:, 0].sum())
    print(f'in-graph NMS cost, rtmdet-tiny 640x640 batch {batch}, ONNX Runtime CPU, '
          f'{threads} threads, {rounds} alternating rounds, {preset_name} preset '
          f'{preset.to_dict()}, {len(images)} generated images:')
    print(f'  --nms onnx  inference median {np.median(inference):7.1f} ms, end to end '
          f'{np.median(end_to_end):7.1f} ms   ({detections} detections in one batch)')
    print(f'  --nms none  inference median {np.median(raw.samples_ms["inference"]):7.1f} ms')
    print(f'  NMS: median paired difference {nms_ms:.2f} ms = '
          f'{100 * nms_ms / np.median(inference):.1f} % of the with-NMS inference time, '
          f'{100 * nms_ms / np.median(end_to_end):.1f} % of end to end (per-round share, median: '
          f'{100 * np.median(differences / end_to_end):.1f} %)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--archs', default='tiny,s,m,l,x')
    parser.add_argument('--rounds', type=int, default=20)
    parser.add_argument('--threads', type=int, default=os.cpu_count() or 1)
    parser.add_argument('--preset', choices=['deploy', 'eval'], default='deploy')
    parser.add_argument('--batch', type=int, default=1, help='batch size of the NMS timing')
    parser.add_argument('--skip-export-times', action='store_true')
    args = parser.parse_args()
    print(f'{time.strftime("%Y-%m-%d")}  {platform.processor() or platform.machine()}  '
          f'{os.cpu_count()} cores  torch {torch.__version__}  onnxruntime '
          f'{onnxruntime.__version__}  python {sys.version.split()[0]}')
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.skip_export_times:
            export_times([a.strip() for a in args.archs.split(',') if a.strip()], folder)
        nms_cost(folder, args.rounds, args.threads, args.preset, args.batch)


if __name__ == '__main__':
    main()
