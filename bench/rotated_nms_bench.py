"""Cost of the in-graph rotated NMS (models/rotated_nms.py) by candidate count, and its share of
rotated-rtmdet-tiny end to end.

Run by hand:  OMP_NUM_THREADS=1 .venv/bin/python bench/rotated_nms_bench.py
    [--counts 250,500,1000,2000] [--rounds 5] [--threads 1] [--compare-dense] [--end-to-end]

1. Exports the rotated NMS alone (dynamic batch and candidate count) and times it in ONNX
   Runtime (CPU, --threads) and eager PyTorch (--threads) on DOTA-like candidates: `count` boxes
   jittered around count/10 objects on a 1024x1024 image (so every box overlaps its cluster, as a
   dense head's candidates do), 15 labels, scores uniform in (0, 1) (all above the threshold: the
   worst case for the pair screen). Prints the median ms, the pairs that pass the screen, and the
   eager time of the screen alone (`candidate_pairs`). With --compare-dense, the same for the
   previous screen (every N x N pair, `dense_candidate_pairs` below), timed in alternating
   rounds in the same run.
2. With --end-to-end, exports rotated-rtmdet-tiny (synthetic weights) at 1024x1024 with
   `--nms onnx` (--preset eval: score 0.05, pre-top-k 2000 per level, IoU 0.1, max 2000;
   deploy: score 0.1, pre-top-k 1000, max 300) and
   `--nms none` (with --compare-dense, also `--nms onnx` with the dense screen), times them in
   ONNX Runtime in alternating rounds, and prints the difference (the NMS and candidate
   selection) and its share of the `onnx` run.
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
from unittest import mock

import numpy as np
import onnxruntime
import torch

from detdeploy.models import rotated_nms as rotated_nms_module
from detdeploy.models.rotated_nms import _enclosing_half_extents, candidate_pairs, rotated_nms

SCORE_THR, IOU_THR, MAX_DET = 0.05, 0.1, 2000
SCREENS = ('sweep', 'dense')


def dense_candidate_pairs(boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                          iou_thr: float) -> torch.Tensor:
    """The screen before issue 16's sweep, kept here for comparison: the same bound evaluated on
    every [B, N, N] pair (same pairs as `candidate_pairs`, sorted by (image, i, j))."""
    count = boxes.shape[1]
    half = _enclosing_half_extents(boxes) * (1 + rotated_nms_module.SCREEN_MARGIN)

    def overlap(axis: int) -> torch.Tensor:
        centre, extent = boxes[..., axis], half[..., axis]
        return (extent[:, :, None] + extent[:, None, :]
                - (centre[:, :, None] - centre[:, None, :]).abs()).clamp(min=0)
    area = boxes[..., 2] * boxes[..., 3]
    smaller = torch.minimum(area[:, :, None], area[:, None, :])
    bound = torch.minimum(overlap(0) * overlap(1), smaller)
    union = area[:, :, None] + area[:, None, :] - bound
    may_suppress = bound > union * (iou_thr * (1 - rotated_nms_module.SCREEN_MARGIN))
    later = torch.ones(count, count, dtype=torch.bool, device=boxes.device).triu(1)
    same_label = labels[:, :, None] == labels[:, None, :]
    both_valid = valid[:, :, None] & valid[:, None, :]
    return (may_suppress & same_label & both_valid & later).nonzero()


def using_screen(screen: str):
    """A context in which rotated_nms uses the named pair screen (export and eager)."""
    if screen == 'sweep':
        return contextlib.nullcontext()
    return mock.patch.object(rotated_nms_module, 'candidate_pairs', dense_candidate_pairs)


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


def export_nms(screen: str) -> onnxruntime.InferenceSession:
    example = dota_like_candidates(64)
    batch, count = torch.export.Dim('batch', min=1, max=64), torch.export.Dim('count', min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            using_screen(screen):
        warnings.simplefilter('ignore')
        return torch.onnx.export(
            NMSGraph(), example, dynamo=True, input_names=['boxes', 'scores', 'labels'],
            dynamic_shapes={n: {0: batch, 1: count} for n in ('boxes', 'scores', 'labels')}
        ).model_proto


def nms_alone(counts: list[int], rounds: int, threads: int, screens: tuple[str, ...]) -> None:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {screen: onnxruntime.InferenceSession(export_nms(screen).SerializeToString(),
                                                     options, providers=['CPUExecutionProvider'])
                for screen in screens}
    print(f'rotated NMS alone (score > {SCORE_THR}, IoU {IOU_THR}, max {MAX_DET}), median of '
          f'{rounds} alternating rounds; ONNX Runtime CPU {threads} thread(s), PyTorch eager '
          f'{torch.get_num_threads()} thread(s)')
    print(f'{"boxes":>6} {"screen":>6} {"pairs screened in":>18} {"ort ms":>8} {"torch ms":>9} '
          f'{"torch screen ms":>16}')
    for count in counts:
        boxes, scores, labels = dota_like_candidates(count)
        feeds = {'boxes': boxes.numpy(), 'scores': scores.numpy(), 'labels': labels.numpy()}
        order = scores.argsort(1, descending=True)
        screen_inputs = (boxes.gather(1, order[..., None].expand(-1, -1, 5)),
                         labels.gather(1, order), torch.ones_like(scores, dtype=torch.bool),
                         IOU_THR)
        screen_functions = {'sweep': candidate_pairs, 'dense': dense_candidate_pairs}
        pairs = {screen: len(screen_functions[screen](*screen_inputs)) for screen in screens}
        times = {(screen, what): [] for screen in screens for what in ('ort', 'torch', 'screen')}

        def run_eager(screen):
            with torch.no_grad(), using_screen(screen):
                NMSGraph()(boxes, scores, labels)
        for round_ in range(rounds + 1):          # round 0 warms up
            for screen in screens:
                for what, run in (('ort', lambda: sessions[screen].run(None, feeds)),
                                  ('torch', lambda: run_eager(screen)),
                                  ('screen', lambda: screen_functions[screen](*screen_inputs))):
                    started = time.perf_counter()
                    run()
                    if round_:
                        times[screen, what].append((time.perf_counter() - started) * 1000)
        for screen in screens:
            ort_ms, torch_ms, screen_ms = (statistics.median(times[screen, what])
                                           for what in ('ort', 'torch', 'screen'))
            print(f'{count:>6} {screen:>6} {pairs[screen]:>18} {ort_ms:>8.1f} {torch_ms:>9.1f} '
                  f'{screen_ms:>16.1f}')


def end_to_end(rounds: int, preset: str, threads: int, screens: tuple[str, ...]) -> None:
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
    for mode in [f'onnx-{screen}' for screen in screens] + ['none']:
        path = folder / f'{mode}.onnx'
        with using_screen(mode.removeprefix('onnx-')):
            export_onnx(detector, path, ExportOptions(nms_mode=mode.split('-')[0],
                                                      nms=detector.spec.nms(preset)))
        backends[mode] = open_model_file(path, threads=threads)
    batch, _ = prepare_batch([make_image(1024, 1024, 3)], backends['none'].preprocess_config)
    outputs = {mode: backend.run(batch) for mode, backend in backends.items()}
    num_dets = int(outputs[f'onnx-{screens[0]}'][0][0, 0])
    for screen in screens[1:]:
        for got, want in zip(outputs[f'onnx-{screen}'], outputs[f'onnx-{screens[0]}']):
            np.testing.assert_array_equal(got, want)
    times = {mode: [] for mode in backends}
    for _ in range(rounds):
        for mode, backend in backends.items():
            started = time.perf_counter()
            backend.run(batch)
            times[mode].append((time.perf_counter() - started) * 1000)
    without = statistics.median(times['none'])
    print(f'rotated-rtmdet-tiny 1024x1024, synthetic weights, {preset} preset, ONNX Runtime '
          f'{threads} thread(s), median of {rounds} alternating rounds, {num_dets} detections '
          f'(equal for every screen): --nms none {without:.0f} ms')
    for screen in screens:
        with_nms = statistics.median(times[f'onnx-{screen}'])
        print(f'  --nms onnx, {screen} screen: {with_nms:.0f} ms; NMS and candidate selection '
              f'{with_nms - without:.0f} ms = {(with_nms - without) / with_nms:.0%} of end to end')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--counts', default='250,500,1000,2000')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--end-to-end', action='store_true')
    parser.add_argument('--preset', default='eval', choices=('eval', 'deploy'))
    parser.add_argument('--skip-alone', action='store_true')
    parser.add_argument('--threads', type=int, default=1,
                        help='ONNX Runtime and PyTorch threads')
    parser.add_argument('--compare-dense', action='store_true',
                        help='also time the previous dense N x N screen, in the same run')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    screens = SCREENS if args.compare_dense else SCREENS[:1]
    if not args.skip_alone:
        nms_alone([int(c) for c in args.counts.split(',')], args.rounds, args.threads, screens)
    if args.end_to_end:
        end_to_end(args.rounds, args.preset, args.threads, screens)


if __name__ == '__main__':
    main()
