"""Export wall time per RTMDet size, and the cost of NMS inside the ONNX graph.

Run by hand:  .venv/bin/python bench/export_bench.py [--archs tiny,s] [--rounds 20]

1. Exports each size (`--nms onnx`, 640x640, onnxsim on) and prints the wall time.
2. Exports rtmdet-tiny with `--nms onnx` and `--nms none` at 640x640 and times both in ONNX
   Runtime (CPU) in alternating rounds (A B A B ...), so machine drift hits both alike; prints
   the median per-round difference: the in-graph NMS cost. Weights are synthetic
   (`randomize_detector`), with spread scores, so NMS has real candidates to work on.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from detdeploy.export.exporter import ExportOptions, export_onnx
from detdeploy.models import DEPLOY_NMS, EVAL_NMS, load_detector
from detdeploy.models.synthetic_weights import make_image, randomize_detector
from detdeploy.runtimes.preprocess import PreprocessConfig, preprocess


def export_times(archs: list[str], folder: Path) -> None:
    print('export wall time (nms onnx, 640x640, simplified):')
    for arch in archs:
        detector = load_detector(f'rtmdet-{arch}')
        started = time.perf_counter()
        report = export_onnx(detector, folder / f'{arch}.onnx', ExportOptions())
        print(f'  rtmdet-{arch:<5} {time.perf_counter() - started:6.1f} s   '
              f'{report.size_bytes / 1e6:6.1f} MB   {report.nodes_final} nodes')


def nms_cost(folder: Path, rounds: int, threads: int, preset_name: str) -> None:
    preset = EVAL_NMS if preset_name == 'eval' else DEPLOY_NMS
    torch.manual_seed(0)
    detector = load_detector('rtmdet-tiny')
    randomize_detector(detector.model)
    sessions = {}
    for mode in ('onnx', 'none'):
        path = folder / f'tiny_{mode}.onnx'
        export_onnx(detector, path, ExportOptions(nms_mode=mode, nms=preset))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        sessions[mode] = onnxruntime.InferenceSession(str(path), options,
                                                      providers=['CPUExecutionProvider'])
    image = preprocess(make_image(480, 640, 1), PreprocessConfig())[0][None]
    for session in sessions.values():              # warm-up
        for _ in range(3):
            session.run(None, {'images': image})
    times = {mode: [] for mode in sessions}
    for _ in range(rounds):
        for mode, session in sessions.items():
            started = time.perf_counter()
            outputs = session.run(None, {'images': image})
            times[mode].append((time.perf_counter() - started) * 1e3)
    detections = int(sessions['onnx'].run(None, {'images': image})[0][0, 0])
    differences = [a - b for a, b in zip(times['onnx'], times['none'])]
    with_nms, without = statistics.median(times['onnx']), statistics.median(times['none'])
    nms_ms = statistics.median(differences)
    print(f'in-graph NMS cost, rtmdet-tiny 640x640 batch 1, ONNX Runtime CPU, {threads} threads, '
          f'{rounds} alternating rounds, {preset_name} preset {preset.to_dict()}:')
    print(f'  --nms onnx  median {with_nms:7.1f} ms   ({detections} detections)')
    print(f'  --nms none  median {without:7.1f} ms')
    print(f'  NMS: median paired difference {nms_ms:.2f} ms = {100 * nms_ms / with_nms:.1f} % '
          f'of the with-NMS time; ratio onnx/none {with_nms / without:.3f}')
    del outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--archs', default='tiny,s,m,l,x')
    parser.add_argument('--rounds', type=int, default=20)
    parser.add_argument('--threads', type=int, default=os.cpu_count() or 1)
    parser.add_argument('--preset', choices=['deploy', 'eval'], default='deploy')
    parser.add_argument('--skip-export-times', action='store_true')
    args = parser.parse_args()
    print(f'{time.strftime("%Y-%m-%d")}  {platform.processor() or platform.machine()}  '
          f'{os.cpu_count()} cores  torch {torch.__version__}  onnxruntime '
          f'{onnxruntime.__version__}  python {sys.version.split()[0]}')
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.skip_export_times:
            export_times([a.strip() for a in args.archs.split(',') if a.strip()], folder)
        nms_cost(folder, args.rounds, args.threads, args.preset)


if __name__ == '__main__':
    main()
