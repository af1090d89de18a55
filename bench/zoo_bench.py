"""PyTorch eager vs ONNX Runtime (CPU) for every family of the zoo at its standard input size.

Run by hand:  .venv/bin/python bench/zoo_bench.py [--models retinanet-r50,yolov3-mobilenetv2-320]
              [--iters 5] [--warmup 1] [--threads 1] [--json-dir DIR]

Per registry name, one `detdeploy bench NAME --backend torch,ort` run: the model's own
preprocessing and deploy NMS preset, random weights (MMDetection's initialisation), the export
made by `bench` itself (dynamic shape for divisor-padded families), and both configurations timed
in alternating rounds on the same generated images of typical COCO sizes (480x640, 640x480,
427x640, ...), so the ratio (ONNX Runtime time per image / PyTorch's, paired round by round,
median) holds on a busy machine where the milliseconds do not. The same --threads for both
backends (1 by default: the machine is shared). `input` is the network input actually fed: for
the divisor-padded families each image's own padded canvas (rounds per shape in brackets).
`export s` is the time of `bench`'s own ONNX export. The table at the end is what the README's
zoo table quotes; each model's full report is kept in --json-dir as NAME.txt beside NAME.json.

Rotated RTMDet is not here: `bench` has no rotated host code yet (issue 16).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

STANDARD = ['rtmdet-tiny', 'retinanet-r50', 'faster-rcnn-r50', 'faster-rcnn-r101',
            'yolov3-mobilenetv2-320', 'yolov3-mobilenetv2-416']
EXPORT_NOTE = re.compile(r'exported on the fly .* in ([0-9.]+) s')


def bench_one(name: str, iters: int, warmup: int, threads: int, out_dir: Path) -> dict | None:
    json_path = out_dir / f'{name}.json'
    command = [sys.executable, '-m', 'detdeploy', 'bench', name, '--backend', 'torch,ort',
               '--iters', str(iters), '--warmup', str(warmup), '--threads', str(threads),
               '--json', str(json_path)]
    print('$', 'detdeploy', ' '.join(command[3:]), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    (out_dir / f'{name}.txt').write_text(done.stderr + done.stdout)
    if done.returncode != 0:
        print(f'{name}: detdeploy bench exited {done.returncode}: '
              f'{" ".join(done.stderr.strip().splitlines()[-1:])}', flush=True)
        return None
    return json.loads(json_path.read_text())


def shapes_text(config: dict) -> str:
    shapes = config['input_shapes']
    if len(shapes) == 1:
        return 'x'.join(map(str, shapes[0]['shape'][-2:]))
    return ', '.join(f"{'x'.join(map(str, item['shape'][-2:]))} ({item['rounds']})"
                     for item in shapes)


def summary_row(name: str, result: dict | None) -> list[str]:
    if result is None:
        return [name, 'failed (see NAME.txt)', '', '', '', '', '', '']
    torch_config, ort_config = result['configs'][:2]
    assert (torch_config['backend'], ort_config['backend']) == ('torch', 'ort')
    assert torch_config['input_shapes'] == ort_config['input_shapes']   # same images each round
    torch_ms = torch_config['stats_ms']['end_to_end']['p50']
    ort_ms = ort_config['stats_ms']['end_to_end']['p50']
    ratios = ort_config['ratio_to_baseline']
    exported = [float(m.group(1)) for note in ort_config['notes']
                for m in [EXPORT_NOTE.search(note)] if m]
    spread = ratios['end_to_end']
    return [name, shapes_text(ort_config), f'{torch_ms:.0f}', f'{ort_ms:.0f}',
            f"{spread['median']:.3f} [{spread['p25']:.3f}-{spread['p75']:.3f}]",
            f"{ratios['inference_only']['median']:.3f}",
            f'{exported[0]:.0f}' if exported else '?',
            f"{result['system']['load_average_1_5_15min'][0]}-{result['load_average_end'][0]}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', default=','.join(STANDARD))
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--json-dir', type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        out_dir = args.json_dir or Path(temp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(','):
            rows.append(summary_row(name, bench_one(name, args.iters, args.warmup, args.threads,
                                                    out_dir)))
            print('  '.join(rows[-1]), flush=True)
    headers = ['model', 'input fed (rounds)', 'torch p50 ms', 'ort p50 ms',
               'ort/torch end to end [p25-p75]', 'ort/torch inference', 'export s',
               'load 1 min start-end']
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print('  '.join(str(cell).ljust(width) for cell, width in zip(row, widths)))


if __name__ == '__main__':
    main()
