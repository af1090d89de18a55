"""How far a quantized candidate is from the float model: raw head output error (noise to
signal, per tensor) and detection AP, on a few probe images, for the sensitivity search.

AP is COCO box AP: against real annotations when given, otherwise against the float model's
own confident detections (pseudo ground truth: the float model scores AP 1.0 on it, so the
drop is 1 - AP of the candidate, a stricter measure than a drop in real AP).
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from detdeploy.runtimes.onnxruntime_backend import graph_with_outputs

PSEUDO_LABEL_SCORE = 0.3        # float detections above this are the pseudo ground truth


def noise_to_signal(got: np.ndarray, want: np.ndarray) -> float:
    """||got - want|| / ||want - mean(want)||: 0 is exact, 1 is noise as large as the signal."""
    want = np.asarray(want, np.float64)
    signal = np.sqrt(np.sum((want - want.mean()) ** 2))
    noise = np.sqrt(np.sum((np.asarray(got, np.float64) - want) ** 2))
    return float(noise / signal) if signal > 0 else float(noise > 0)


def _session(model: onnx.ModelProto | bytes, threads: int | None):
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    payload = model if isinstance(model, bytes) else model.SerializeToString()
    return onnxruntime.InferenceSession(payload, options, providers=['CPUExecutionProvider'])


class RawOutputProbe:
    """The float model's raw head outputs on a few preprocessed batches, and a candidate's
    error against them (mean noise-to-signal ratio over the raw outputs)."""

    def __init__(self, float_model: onnx.ModelProto, raw_outputs: list[str],
                 batches: list[np.ndarray], threads: int | None = None):
        self.raw_outputs, self.batches, self.threads = list(raw_outputs), batches, threads
        self.input_name = next(i.name for i in float_model.graph.input)
        self.reference = self._run(float_model)

    def _run(self, model: onnx.ModelProto) -> list[np.ndarray]:
        session = _session(graph_with_outputs(model, self.raw_outputs), self.threads)
        runs = [session.run(self.raw_outputs, {self.input_name: batch}) for batch in self.batches]
        return [np.concatenate(parts) for parts in zip(*runs)]

    def error(self, candidate: onnx.ModelProto) -> float:
        got = self._run(candidate)
        return float(np.mean([noise_to_signal(g, w) for g, w in zip(got, self.reference)]))


@dataclass
class _Coco:
    coco: object
    image_ids: list[int]
    files: list[Path]


class DetectionProbe:
    """COCO AP of candidates on probe images through the shared host pipeline (`detect`)."""

    def __init__(self, float_path: Path, image_paths: list[Path], threads: int | None = None,
                 ann_file: str | Path | None = None, ann_images: str | Path | None = None):
        from detdeploy.evaluation.coco_eval import load_coco
        from detdeploy.runtimes.open import open_model_file
        self.threads = threads
        self.real_labels = ann_file is not None
        if ann_file is not None:
            coco = load_coco(ann_file)
            ids = sorted(coco.getImgIds())
            self.data = _Coco(coco, ids, [Path(ann_images) / coco.imgs[i]['file_name']
                                          for i in ids])
        else:
            backend = open_model_file(float_path, 'ort', threads=threads)
            self.data = self._pseudo_labels(backend, image_paths)
        self.float_ap = self.ap(float_path)

    def _pseudo_labels(self, backend, image_paths: list[Path]) -> _Coco:
        from pycocotools.coco import COCO

        from detdeploy.runtimes.pipeline import detect
        images, annotations = [], []
        for image_id, (found, _) in enumerate(detect(backend, image_paths), start=1):
            height, width = found.image_hw
            images.append({'id': image_id, 'height': height, 'width': width})
            for box, score, label in zip(found.boxes_xyxy_px, found.scores, found.labels):
                if score > PSEUDO_LABEL_SCORE:
                    x1, y1, x2, y2 = (float(v) for v in box)
                    annotations.append({'id': len(annotations) + 1, 'image_id': image_id,
                                        'category_id': int(label) + 1, 'iscrowd': 0,
                                        'bbox': [x1, y1, x2 - x1, y2 - y1],
                                        'area': (x2 - x1) * (y2 - y1)})
        coco = COCO()
        coco.dataset = {'images': images, 'annotations': annotations, 'categories': [
            {'id': i + 1, 'name': name} for i, name in enumerate(backend.class_names)]}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return _Coco(coco, [image['id'] for image in images], list(image_paths))

    def ap(self, model_path: Path) -> float:
        from detdeploy.evaluation.coco_eval import coco_metrics
        from detdeploy.runtimes.open import open_model_file
        from detdeploy.runtimes.pipeline import detect
        backend = open_model_file(model_path, 'ort', threads=self.threads)
        category_ids = sorted(self.data.coco.getCatIds())
        results = []
        for image_id, (found, _) in zip(self.data.image_ids, detect(backend, self.data.files)):
            for box, score, label in zip(found.boxes_xyxy_px, found.scores, found.labels):
                x1, y1, x2, y2 = (float(v) for v in box)
                results.append({'image_id': image_id, 'category_id': category_ids[int(label)],
                                'bbox': [x1, y1, x2 - x1, y2 - y1], 'score': float(score)})
        return coco_metrics(self.data.coco, results)['AP']
