"""PyTorch eager vs ONNX Runtime (CPU) for RTMDet sizes: end to end with NMS and inference only.

Run by hand:  .venv/bin/python bench/runtime_bench.py [--archs tiny,s] [--batches 1,8]
              [--rounds 10] [--warmup 2] [--threads N] [--json-dir DIR]

Per size: synthetic weights (`randomize_detector`: spread scores, so NMS has real candidates),
exported with `--nms onnx` at the deploy preset and a dynamic batch; the same weights and NMS
settings run in PyTorch. All (backend, batch) configurations of a size are timed by
`detdeploy.benchmark.timing.run_benchmark` in alternating rounds on generated images held in
memory; the summary gives ONNX Runtime / PyTorch ratios paired round by round (median over rounds).
Target (issue 6): end to end at most 0.5 for rtmdet-tiny at batch 1.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from detdeploy.benchmark.report import format_report, write_json
from detdeploy.benchmark.stats import paired_ratios
from detdeploy.benchmark.timing import Entry, load_images, parse_int_list, run_benchmark
from detdeploy.export.exporter import ExportOptions, export_onnx
from detdeploy.models import load_detector
from detdeploy.models.synthetic_weights import randomize_detector
from detdeploy.runtimes.open import open_model_file
from detdeploy.runtimes.torch_backend import TorchBackend


def ort_over_torch(result, batch: int, stage: str) -> tuple[float, float, float]:
    """(median paired ratio, torch median ms, ort median ms) for one batch size and stage."""
    by_backend = {config.entry.backend.name: config for config in result.configs
                  if config.batch == batch}
    torch_config, ort_config = by_backend['torch'], by_backend['ort']
    ratios = paired_ratios(ort_config.samples_ms[stage], batch, torch_config.samples_ms[stage],
                           batch)
    return (float(np.median(ratios)), float(np.median(torch_config.samples_ms[stage])),
            float(np.median(ort_config.samples_ms[stage])))


def bench_arch(arch: str, batches: tuple[int, ...], args, folder: Path) -> list[str]:
    torch.manual_seed(0)
    detector = load_detector(f'rtmdet-{arch}')
    randomize_detector(detector.model)
    detector.source = 'synthetic weights (randomize_detector)'
    nms = detector.spec.nms('deploy')
    path = folder / f'rtmdet-{arch}.onnx'
    export_onnx(detector, path, ExportOptions(nms_mode='onnx', nms=nms, dynamic_batch=True))
    if args.threads:
        torch.set_num_threads(args.threads)
    entries = [Entry(f'rtmdet-{arch}', TorchBackend(detector, nms=nms)),
               Entry(f'rtmdet-{arch}', open_model_file(path, 'ort', threads=args.threads))]
    images, names, description = load_images(None, max(batches))
    result = run_benchmark(entries, batches, images, names, description, warmup=args.warmup,
                           iters=args.rounds)
    print(format_report(result), flush=True)
    if args.json_dir:
        write_json(result, Path(args.json_dir) / f'runtime_bench_{arch}.json')
    lines = []
    for batch in batches:
        for stage, what in (('end_to_end', 'end to end'), ('inference', 'inference only')):
            ratio, torch_ms, ort_ms = ort_over_torch(result, batch, stage)
            lines.append(f'rtmdet-{arch:<4} b{batch:<2} {what:<15} PyTorch {torch_ms:8.1f} ms  '
                         f'ORT {ort_ms:8.1f} ms  ORT/PyTorch {ratio:.3f}')
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--archs', default='tiny,s')
    parser.add_argument('--batches', default='1,8')
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, help='intra-op threads for both [default: theirs]')
    parser.add_argument('--json-dir', help='write runtime_bench_<arch>.json here')
    args = parser.parse_args()
    batches = parse_int_list(args.batches, '--batches')
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in (a.strip() for a in args.archs.split(',') if a.strip()):
            summary += bench_arch(arch, batches, args, Path(tmp))
    print('\nsummary (medians per batch; ratio paired round by round, median):')
    print('\n'.join(summary))


if __name__ == '__main__':
    main()
