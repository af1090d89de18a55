"""`make demo`: the main job end to end on the bundled model, printing where everything went.

Steps, each a real `detdeploy` command: generate shapes images (held-out val images of the
bundled model's dataset, and a few samples), export the bundled model to ONNX, run the ONNX file
with ONNX Runtime writing labelled PNGs, check parity against PyTorch, a short benchmark, and
COCO mAP on PyTorch and ONNX Runtime; then the bundled instance model (`rtmdet-ins`) exported
with its masks in the graph, its masks drawn by ONNX Runtime, and its box and mask mAP; then the
bundled rotated model (`rotated-rtmdet`) exported with rotated NMS in the graph, its oriented
boxes drawn by ONNX Runtime, and its DOTA-style mAP on ONNX Runtime and PyTorch (the val images
carry oriented boxes: `--rotated` adds them to the annotations, the images are the same). Any
failing step stops the demo with its exit code.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from detdeploy.cli import main as cli_main

DEMO_DIR = Path('demo_out')
VAL_IMAGES = 100            # the first 100 of the bundled model's held-out val set (seed 0)
SAMPLE_IMAGES = 6
SHAPES, SAMPLES = DEMO_DIR / 'shapes', DEMO_DIR / 'samples'
ONNX_FILE, INFER_DIR = DEMO_DIR / 'rtmdet.onnx', DEMO_DIR / 'infer'
PARITY_JSON, EVAL_JSON = DEMO_DIR / 'parity.json', DEMO_DIR / 'eval.json'
BENCH_JSON, BENCH_PNG = DEMO_DIR / 'bench.json', DEMO_DIR / 'bench.png'
INS_ONNX_FILE, INS_INFER_DIR = DEMO_DIR / 'rtmdet-ins.onnx', DEMO_DIR / 'infer-ins'
INS_EVAL_JSON = DEMO_DIR / 'eval-ins.json'
ROT_ONNX_FILE, ROT_INFER_DIR = DEMO_DIR / 'rotated-rtmdet.onnx', DEMO_DIR / 'infer-rot'
ROT_EVAL_JSON = DEMO_DIR / 'eval-rot.json'
WRITTEN = (SHAPES, SAMPLES, ONNX_FILE, INFER_DIR, PARITY_JSON, BENCH_JSON, BENCH_PNG, EVAL_JSON,
           INS_ONNX_FILE, INS_INFER_DIR, INS_EVAL_JSON, ROT_ONNX_FILE, ROT_INFER_DIR,
           ROT_EVAL_JSON)
"""Everything the demo writes (folders with their contents); the README's examples use these."""


def run_step(args: list[str]) -> None:
    """One detdeploy command; stop the demo with its exit code if it fails."""
    print(f'\ndemo: detdeploy {" ".join(args)}', flush=True)
    try:
        cli_main(args)
    except SystemExit as exit_:
        if exit_.code:
            print(f'demo: step failed with exit code {exit_.code}', file=sys.stderr)
            sys.exit(exit_.code)


def main() -> None:
    start = time.perf_counter()
    shapes, samples, onnx_file, results = SHAPES, SAMPLES, ONNX_FILE, INFER_DIR
    parity_json, bench_json, bench_png, eval_json = PARITY_JSON, BENCH_JSON, BENCH_PNG, EVAL_JSON
    ann = shapes / 'annotations' / 'instances_val.json'
    run_step(['make-dataset', 'shapes', '--out', str(shapes), '--train', '0', '--val',
              str(VAL_IMAGES), '--size', '256', '--seed', '0', '--rotated'])
    run_step(['make-dataset', 'shapes', '--out', str(samples), '--train', '0', '--val',
              str(SAMPLE_IMAGES), '--size', '256', '--seed', '1'])
    run_step(['export', '--model', 'rtmdet', '-o', str(onnx_file)])
    run_step(['infer', str(onnx_file), str(samples / 'val'), '--out', str(results)])
    run_step(['parity', str(onnx_file), '--model', 'rtmdet', '--images', str(samples / 'val'),
              '--json', str(parity_json)])
    run_step(['bench', 'rtmdet', str(onnx_file), '--batch', '1', '--warmup', '3', '--iters',
              '20', '--images', str(samples / 'val'), '--json', str(bench_json), '--plot',
              str(bench_png)])
    run_step(['eval', 'rtmdet', '--backend', 'torch,ort', '--ann', str(ann), '--images',
              str(shapes / 'val'), '--json', str(eval_json)])
    run_step(['export', '--model', 'rtmdet-ins', '-o', str(INS_ONNX_FILE)])
    run_step(['infer', str(INS_ONNX_FILE), str(samples / 'val'), '--out', str(INS_INFER_DIR)])
    run_step(['eval', str(INS_ONNX_FILE), '--ann', str(ann), '--images', str(shapes / 'val'),
              '--json', str(INS_EVAL_JSON)])
    # One export at the eval preset serves the drawings (above --show-thr) and the mAP, which
    # PyTorch then scores with the same preset.
    run_step(['export', '--model', 'rotated-rtmdet', '--nms-preset', 'eval', '-o',
              str(ROT_ONNX_FILE)])
    run_step(['infer', str(ROT_ONNX_FILE), str(samples / 'val'), '--out', str(ROT_INFER_DIR)])
    run_step(['eval', str(ROT_ONNX_FILE), '--ann', str(ann), '--images', str(shapes / 'val'),
              '--json', str(ROT_EVAL_JSON)])
    run_step(['eval', 'rotated-rtmdet', '--ann', str(ann), '--images', str(shapes / 'val')])
    print(f'\ndemo: done in {time.perf_counter() - start:.0f} s. Everything is in {DEMO_DIR}/:\n'
          f'  {onnx_file}  the bundled model as ONNX (NMS in the graph)\n'
          f'  {results}/  detections per image (JSON), drawn boxes (PNG), coco_results.json\n'
          f'  {parity_json}  PyTorch vs ONNX Runtime parity report\n'
          f'  {bench_json}, {bench_png}  latency samples and plot\n'
          f'  {eval_json}  COCO mAP on {VAL_IMAGES} held-out images, PyTorch and ONNX Runtime\n'
          f'  {INS_ONNX_FILE}  the bundled instance model as ONNX (NMS and masks in the graph)\n'
          f'  {INS_INFER_DIR}/  its detections with masks (RLE in JSON, overlays in PNG)\n'
          f'  {INS_EVAL_JSON}  its box and mask mAP (ONNX Runtime)\n'
          f'  {ROT_ONNX_FILE}  the bundled rotated model as ONNX (rotated NMS in the graph)\n'
          f'  {ROT_INFER_DIR}/  its oriented boxes (5 parameters and corners in JSON, PNG)\n'
          f'  {ROT_EVAL_JSON}  its DOTA-style mAP (ONNX Runtime; PyTorch printed above)\n'
          f'  {shapes}/, {samples}/  the generated images and annotations')


if __name__ == '__main__':
    main()
