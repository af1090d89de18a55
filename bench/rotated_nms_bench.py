"""Cost of the in-graph rotated NMS (models/rotated_nms.py) by candidate count, and its share of
rotated-rtmdet-tiny end to end.

Run by hand:  .venv/bin/python bench/rotated_nms_bench.py [--counts 250,500,1000,2000] [--rounds 5]

1. Exports the rotated NMS alone (dynamic batch and candidate count) and times it in ONNX
   Runtime (CPU, 2 threads) and eager PyTorch on DOTA-like candidates: `count` boxes jittered
   around count/10 objects on a 1024x1024 image (so every box overlaps its cluster, as a dense
   head's candidates do), 15 labels, scores uniform in (0, 1) (all above the threshold: the worst
   case for the pair screen). Prints the median ms, the screened pairs and the greedy rounds.
2. With --end-to-end, exports rotated-rtmdet-tiny (synthetic weights) at 1024x1024 with
   `--nms onnx` (--preset eval: score 0.05, pre-top-k 2000 per level, IoU 0.1, max 2000;
   deploy: score 0.1, pre-top-k 1000, max 300) and
   `--nms none`, times both in ONNX Runtime in alternating rounds, and prints the difference (the
   NMS and candidate selection) and its share of the `onnx` run.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from detdeploy.models.rotated_nms import candidate_pairs, rotated_nms

SCORE_THR, IOU_THR, MAX_DET = 0.05, 0.1, 2000


class NMSGraph(torch.nn.Module):
    def forward(self, boxes, scores, labels):
        return tuple(rotated_nms(boxes, scores, labels, SCORE_THR, IOU_THR, MAX_DET))


def dota_like_candidates(count: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    objects = max(1, count // 10)
    centres = torch.rand(objects, 2, generator=generator) * 1000 + 12
    sizes = torch.rand(objects, 2, generator=generator) * 60 + 8
    angles = (torch.rand(objects, 1, generator=generator) - 0.5) * math.pi
    labels = torch.randint(0, 15, (objects,), generator=generator)
    owner = torch.randint(0, objects, (count,), generator=generator)
    jitter = torch.randn(count, 5, generator=generator) * torch.tensor([3, 3, 2, 2, 0.1])
    boxes = torch.cat([centres[owner], sizes[owner], angles[owner]], 1) + jitter
    boxes[:, 2:4] = boxes[:, 2:4].clamp(min=2)
    return boxes[None], torch.rand(1, count, generator=generator), labels[owner][None]


def median_ms(run, rounds: int) -> float:
    run()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def nms_alone(counts: list[int], rounds: int) -> None:
    example = dota_like_candidates(64)
    batch, count = torch.export.Dim('batch', min=1, max=64), torch.export.Dim('count', min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter('ignore')
        model = torch.onnx.export(
            NMSGraph(), example, dynamo=True, input_names=['boxes', 'scores', 'labels'],
            dynamic_shapes={n: {0: batch, 1: count} for n in ('boxes', 'scores', 'labels')}
        ).model_proto
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=['CPUExecutionProvider'])
    print(f'rotated NMS alone (score > {SCORE_THR}, IoU {IOU_THR}, max {MAX_DET}), median of '
          f'{rounds}; ONNX Runtime CPU 2 threads, PyTorch eager {torch.get_num_threads()} threads')
    print(f'{"boxes":>6} {"pairs screened in":>18} {"ort ms":>8} {"torch ms":>9}')
    for count in counts:
        boxes, scores, labels = dota_like_candidates(count)
        feeds = {'boxes': boxes.numpy(), 'scores': scores.numpy(), 'labels': labels.numpy()}
        order = scores.argsort(1, descending=True)
        pairs = candidate_pairs(boxes.gather(1, order[..., None].expand(-1, -1, 5)),
                                labels.gather(1, order), torch.ones_like(scores, dtype=torch.bool),
                                IOU_THR)
        ort_ms = median_ms(lambda: session.run(None, feeds), rounds)
        with torch.no_grad():
            torch_ms = median_ms(lambda: NMSGraph()(boxes, scores, labels), rounds)
        print(f'{count:>6} {len(pairs):>18} {ort_ms:>8.1f} {torch_ms:>9.1f}')


def end_to_end(rounds: int, preset: str) -> None:
    from detdeploy.export.exporter import ExportOptions, export_onnx
    from detdeploy.models import load_detector
    from detdeploy.models.synthetic_weights import make_image, randomize_detector
    from detdeploy.runtimes.open import open_model_file
    from detdeploy.runtimes.pipeline import prepare_batch

    torch.manual_seed(0)
    detector = load_detector('rotated-rtmdet-tiny')
    randomize_detector(detector.model)
    folder = Path(tempfile.mkdtemp())
    backends = {}
    for mode in ('onnx', 'none'):
        path = folder / f'{mode}.onnx'
        export_onnx(detector, path, ExportOptions(nms_mode=mode, nms=detector.spec.nms(preset)))
        backends[mode] = open_model_file(path)
    batch, _ = prepare_batch([make_image(1024, 1024, 3)], backends['onnx'].preprocess_config)
    times = {'onnx': [], 'none': []}
    for _ in range(rounds):
        for mode, backend in backends.items():
            started = time.perf_counter()
            backend.run(batch)
            times[mode].append((time.perf_counter() - started) * 1000)
    with_nms, without = statistics.median(times['onnx']), statistics.median(times['none'])
    print(f'rotated-rtmdet-tiny 1024x1024, {preset} preset, ONNX Runtime, median of {rounds} '
          'alternating rounds: '
          f'--nms onnx {with_nms:.0f} ms, --nms none {without:.0f} ms; NMS and candidate '
          f'selection {with_nms - without:.0f} ms = {(with_nms - without) / with_nms:.0%} of end '
          f'to end')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--counts', default='250,500,1000,2000')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--end-to-end', action='store_true')
    parser.add_argument('--preset', default='eval', choices=('eval', 'deploy'))
    parser.add_argument('--skip-alone', action='store_true')
    args = parser.parse_args()
    if not args.skip_alone:
        nms_alone([int(c) for c in args.counts.split(',')], args.rounds)
    if args.end_to_end:
        end_to_end(args.rounds, args.preset)


if __name__ == '__main__':
    main()
