"""PyTorch eager vs ONNX Runtime (CPU) for every family of the zoo at its standard input size.

Run by hand:  .venv/bin/python bench/zoo_bench.py [--models retinanet-r50,yolov3-mobilenetv2-320]
              [--iters 5] [--warmup 1] [--json-dir DIR]

Per registry name, one `detdeploy bench NAME --backend torch,ort` run: the model's own
preprocessing and deploy NMS preset, random weights (MMDetection's initialisation), the export
made by `bench` itself (dynamic shape for divisor-padded families), and both configurations timed
in alternating rounds on the same generated 640x480 images, so the ratio (ONNX Runtime time per
image / PyTorch's, paired round by round, median) holds on a busy machine where the milliseconds
do not. The table at the end is what the README's zoo table quotes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

STANDARD = ['rtmdet-tiny', 'retinanet-r50', 'faster-rcnn-r50', 'faster-rcnn-r101',
            'yolov3-mobilenetv2-320', 'yolov3-mobilenetv2-416', 'rotated-rtmdet-tiny']


def bench_one(name: str, iters: int, warmup: int, json_path: Path) -> dict:
    command = [sys.executable, '-m', 'detdeploy', 'bench', name, '--backend', 'torch,ort',
               '--iters', str(iters), '--warmup', str(warmup), '--json', str(json_path)]
    print('$', ' '.join(command[2:]), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f'{name}: detdeploy bench exited {done.returncode}: '
                         f'{done.stderr.strip().splitlines()[-1:]}')
    return json.loads(json_path.read_text())


def summary_row(name: str, result: dict) -> list[str]:
    torch_config, ort_config = result['configs'][:2]
    torch_ms = torch_config['stats_ms']['end_to_end']['p50']
    ort_ms = ort_config['stats_ms']['end_to_end']['p50']
    ratios = ort_config['ratio_to_baseline']
    return [name, 'x'.join(str(v) for v in ort_config['input_shape'][-2:]),
            f'{torch_ms:.0f}', f'{ort_ms:.0f}', f"{ratios['end_to_end']['median']:.3f}",
            f"{ratios['inference_only']['median']:.3f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', default=','.join(STANDARD))
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--json-dir', type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        out_dir = args.json_dir or Path(temp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(','):
            rows.append(summary_row(name, bench_one(name, args.iters, args.warmup,
                                                    out_dir / f'{name}.json')))
    headers = ['model', 'input', 'torch p50 ms', 'ort p50 ms', 'ort/torch end to end',
               'ort/torch inference']
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print('  '.join(str(cell).ljust(width) for cell, width in zip(row, widths)))


if __name__ == '__main__':
    main()
