"""The Triton Python-backend models of an `export-triton` repository: preprocessing (encoded
image -> network input, as `infer` does it) and post-processing (boxes back to image pixels;
instance models' masks pasted into the image as `infer` does, answered as COCO RLE).

Each repository's `model.py` imports its class from here, so Triton runs detdeploy's own numpy
code, not a copy that could drift from it (the resize reproduces OpenCV's fixed-point rounding).
`triton_python_backend_utils` exists only inside Triton's Python stub, so it is imported in
`initialize`. Needs numpy and Pillow; never torch or onnxruntime.
"""
from __future__ import annotations

import json

import numpy as np

from detdeploy.core.errors import ImageError
from detdeploy.core.masks import MaskConfig, encode_rle
from detdeploy.core.preprocessing import PreprocessConfig
from detdeploy.runtimes.pipeline import prepare_batch, to_detections
from detdeploy.runtimes.preprocess import ImageMeta, read_image


def _parameter(config: dict, key: str) -> str:
    return config['parameters'][key]['string_value']


class PreprocessModel:
    """IMAGE [B, 1] encoded bytes -> images [B, 3, H, W] float32, image_hw [B, 2] int32
    (original height, width), scale_wh [B, 2] float32 (resized / original)."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils
        self.pb_utils = pb_utils
        config = json.loads(args['model_config'])
        self.preprocess = PreprocessConfig.from_dict(json.loads(_parameter(config, 'preprocess')))
        self.max_pixels = int(_parameter(config, 'max_pixels')) or None

    def execute(self, requests: list) -> list:
        pb_utils = self.pb_utils
        responses = []
        for request in requests:
            encoded = pb_utils.get_input_tensor_by_name(request, 'IMAGE').as_numpy()
            try:
                images = [read_image(bytes(row.reshape(-1)[0]), max_pixels=self.max_pixels,
                                     name='IMAGE') for row in encoded]
            except ImageError as error:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(error))))
                continue
            batch, metas = prepare_batch(images, self.preprocess)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor('images', batch),
                pb_utils.Tensor('image_hw', np.asarray([m.original_hw for m in metas], np.int32)),
                pb_utils.Tensor('scale_wh', np.asarray([m.scale_wh for m in metas], np.float32)),
            ]))
        return responses

    def finalize(self) -> None:
        pass


class PostprocessModel:
    """The network's padded detections (raw_num_dets, raw_boxes, raw_scores, raw_labels) and
    each image's geometry -> the same padded layout with boxes in original-image pixels; boxes
    lying wholly in the padding are dropped, as `infer` drops them. Instance models (a `mask`
    parameter) also take raw_masks and answer `segmentation` [B, K]: each detection's mask at
    its image's original size as COCO RLE counts (pycocotools' compressed string, with size
    [H, W] of the image sent), b'' on padding rows."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils
        self.pb_utils = pb_utils
        config = json.loads(args['model_config'])
        self.preprocess = PreprocessConfig.from_dict(json.loads(_parameter(config, 'preprocess')))
        self.class_names = tuple(json.loads(_parameter(config, 'class_names')))
        mask = config['parameters'].get('mask')
        self.mask_config = (MaskConfig.from_dict(json.loads(mask['string_value']))
                            if mask else None)
        self.raw_names = ('num_dets', 'boxes', 'scores', 'labels') + (
            ('masks',) if self.mask_config else ())

    def execute(self, requests: list) -> list:
        pb_utils = self.pb_utils
        responses = []
        for request in requests:
            raw = [pb_utils.get_input_tensor_by_name(request, f'raw_{name}').as_numpy()
                   for name in self.raw_names]
            image_hw = pb_utils.get_input_tensor_by_name(request, 'image_hw').as_numpy()
            scale_wh = pb_utils.get_input_tensor_by_name(request, 'scale_wh').as_numpy()
            metas = []
            for hw, scale in zip(image_hw, scale_wh):
                original_hw = (int(hw[0]), int(hw[1]))
                metas.append(ImageMeta(original_hw, self.preprocess.resized_size(original_hw),
                                       (float(scale[0]), float(scale[1]))))
            found = to_detections(tuple(raw), [''] * len(metas), metas, self.class_names,
                                  mask_config=self.mask_config)
            answer = pad_detections(found, raw[1].shape[1])
            names = ('num_dets', 'boxes', 'scores', 'labels')
            if self.mask_config is not None:
                answer, names = (*answer, pad_rle(found, raw[1].shape[1])), (*names,
                                                                             'segmentation')
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, array)
                                for name, array in zip(names, answer)]))
        return responses

    def finalize(self) -> None:
        pass


def pad_detections(found: list, max_det: int) -> tuple[np.ndarray, ...]:
    """Detections per image -> num_dets [B, 1] int32, boxes [B, K, 4], scores [B, K] float32,
    labels [B, K] int32; rows past num_dets are 0 (labels -1), as the network pads them."""
    count = len(found)
    num_dets = np.zeros((count, 1), np.int32)
    boxes = np.zeros((count, max_det, 4), np.float32)
    scores = np.zeros((count, max_det), np.float32)
    labels = np.full((count, max_det), -1, np.int32)
    for index, detections in enumerate(found):
        kept = len(detections)
        num_dets[index, 0] = kept
        boxes[index, :kept] = detections.boxes_xyxy_px
        scores[index, :kept] = detections.scores
        labels[index, :kept] = detections.labels
    return num_dets, boxes, scores, labels


def pad_rle(found: list, max_det: int) -> np.ndarray:
    """Masks per image -> [B, K] object array of COCO RLE counts (bytes) of each detection's
    mask at its image's size, as `infer` writes them under `segmentation`; b'' past num_dets."""
    counts = np.full((len(found), max_det), b'', dtype=object)
    for index, detections in enumerate(found):
        for row, rle in enumerate(encode_rle(detections.masks)):
            counts[index, row] = rle['counts'].encode('ascii')
    return counts
