"""ONNX translations of detdeploy's NMS custom ops, written with onnxscript.

`batched_nms_to_onnx` builds the standard-op graph (ONNX `NonMaxSuppression`) for
`detdeploy::batched_nms` (`batched_nms_index_to_onnx`: the same graph, which also outputs the
kept candidates' indices, for `detdeploy::batched_nms_index`); `efficient_nms_to_trt` emits
TensorRT's `EfficientNMS_TRT` plugin node for `detdeploy::efficient_nms`. Eager semantics of the
ops live in `detdeploy.models.nms`.
"""
from __future__ import annotations

import onnx
from onnxscript import FLOAT, INT64
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

TRT_PLUGIN_DOMAINS = ('TRT', 'trt.plugins')
"""`TRT`: TensorRT's own ONNX parser (trtexec, `detdeploy build-engine`).
`trt.plugins`: ONNX Runtime's TensorRT execution provider, which registers plugins there."""
MINUS_ONE_INT32 = onnx.helper.make_tensor('minus_one', onnx.TensorProto.INT32, [], [-1])


def batched_nms_to_onnx(boxes: FLOAT, scores: FLOAT, labels: INT64, score_thr: float,
                        iou_thr: float, max_det: int, class_agnostic: bool = False):
    """`detdeploy::batched_nms`: the four padded outputs of `_nms_graph`."""
    return _nms_graph(boxes, scores, labels, score_thr, iou_thr, max_det, class_agnostic)[:4]


def batched_nms_index_to_onnx(boxes: FLOAT, scores: FLOAT, labels: INT64, score_thr: float,
                              iou_thr: float, max_det: int, class_agnostic: bool = False):
    """`detdeploy::batched_nms_index`: the four padded outputs and each row's candidate index
    [B, K] (padding rows: some valid candidate index)."""
    *outputs, candidate = _nms_graph(boxes, scores, labels, score_thr, iou_thr, max_det,
                                     class_agnostic)
    return (*outputs, op.Squeeze(candidate, [2]))


def _nms_graph(boxes, scores, labels, score_thr: float, iou_thr: float, max_det: int,
               class_agnostic: bool):
    """Per-class NMS over candidates [B, M], then the best `max_det` per image, padded
    (`class_agnostic`: the same without the class offsets).

    Classes are separated as the eager op does it (mmcv's trick): boxes are offset by
    `label * (max_coordinate + 1)`, with the maximum over each image's valid candidates, and one
    single-class `NonMaxSuppression` runs on them. It keeps scores strictly above `score_thr`
    and stops after `max_det` boxes. The selected scores are scattered into a dense
    [B, M + max_det] matrix of -1 (the extra columns keep TopK valid when M < max_det) and the
    best `max_det` per row taken; ties go to the lower candidate index, as in the eager op.
    Returns the four outputs and each row's candidate index [B, K, 1].
    """
    score_threshold = op.Constant(value_floats=[score_thr])
    if class_agnostic:
        nms_boxes = boxes
    else:
        valid = op.Greater(scores, score_threshold)
        masked_boxes = op.Where(op.Unsqueeze(valid, [2]), boxes, op.Constant(value_float=0.0))
        max_coordinate = op.ReduceMax(masked_boxes, op.Constant(value_ints=[1, 2]), keepdims=1)
        offsets = op.Mul(op.Unsqueeze(op.Cast(labels, to=onnx.TensorProto.FLOAT), [2]),
                         op.Add(max_coordinate, op.Constant(value_float=1.0)))
        nms_boxes = op.Add(boxes, offsets)
    selected = op.NonMaxSuppression(nms_boxes, op.Unsqueeze(scores, [1]),
                                    op.Constant(value_ints=[max_det]),
                                    op.Constant(value_floats=[iou_thr]), score_threshold)
    batch_and_box = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)   # [S, 2]
    selected_scores = op.GatherND(scores, batch_and_box)

    batch = op.Shape(scores, start=0, end=1)
    num_candidates = op.Shape(scores, start=1, end=2)
    dense_shape = op.Concat(batch, op.Add(num_candidates, op.Constant(value_ints=[max_det])),
                            axis=0)
    dense = op.Expand(op.Constant(value_float=-1.0), dense_shape)
    dense = op.ScatterND(dense, batch_and_box, selected_scores)
    top_scores, top_index = op.TopK(dense, op.Constant(value_ints=[max_det]), axis=-1)

    is_detection = op.Greater(top_scores, op.Constant(value_float=-0.5))
    num_dets = op.ReduceSum(op.Cast(is_detection, to=onnx.TensorProto.INT32),
                            op.Constant(value_ints=[1]), keepdims=1)
    candidate = op.Unsqueeze(op.Min(top_index, op.Sub(num_candidates, op.Constant(value_ints=[1]))),
                             [2])
    out_boxes = op.Where(op.Unsqueeze(is_detection, [2]),
                         op.GatherND(boxes, candidate, batch_dims=1), op.Constant(value_float=0.0))
    out_scores = op.Where(is_detection, top_scores, op.Constant(value_float=0.0))
    out_labels = op.Where(is_detection,
                          op.Cast(op.GatherND(labels, candidate, batch_dims=1),
                                  to=onnx.TensorProto.INT32),
                          op.Constant(value=MINUS_ONE_INT32))
    return num_dets, out_boxes, out_scores, out_labels, candidate


def _efficient_nms_op(domain: str) -> Op:
    """The plugin as an onnxscript op: a schema made here, not registered globally."""
    schema = onnx.defs.OpSchema(
        'EfficientNMS_TRT', domain, 1,
        inputs=[onnx.defs.OpSchema.FormalParameter('boxes', 'T'),
                onnx.defs.OpSchema.FormalParameter('scores', 'T')],
        outputs=[onnx.defs.OpSchema.FormalParameter('num_detections', 'tensor(int32)'),
                 onnx.defs.OpSchema.FormalParameter('detection_boxes', 'T'),
                 onnx.defs.OpSchema.FormalParameter('detection_scores', 'T'),
                 onnx.defs.OpSchema.FormalParameter('detection_classes', 'tensor(int32)')],
        type_constraints=[('T', ['tensor(float)', 'tensor(float16)'], 'boxes and scores')],
        attributes=[
            onnx.defs.OpSchema.Attribute('score_threshold', onnx.defs.OpSchema.AttrType.FLOAT),
            onnx.defs.OpSchema.Attribute('iou_threshold', onnx.defs.OpSchema.AttrType.FLOAT),
            onnx.defs.OpSchema.Attribute('max_output_boxes', onnx.defs.OpSchema.AttrType.INT),
            onnx.defs.OpSchema.Attribute('background_class', onnx.defs.OpSchema.AttrType.INT),
            onnx.defs.OpSchema.Attribute('score_activation', onnx.defs.OpSchema.AttrType.INT),
            onnx.defs.OpSchema.Attribute('box_coding', onnx.defs.OpSchema.AttrType.INT),
            onnx.defs.OpSchema.Attribute('class_agnostic', onnx.defs.OpSchema.AttrType.INT),
            onnx.defs.OpSchema.Attribute('plugin_version', onnx.defs.OpSchema.AttrType.STRING),
        ])
    return Op(Opset(domain, 1), 'EfficientNMS_TRT', schema)


def efficient_nms_translation(domain: str = 'TRT'):
    """A translation of `detdeploy::efficient_nms` to an `EfficientNMS_TRT` node in `domain`;
    padding labels are set to -1 after the plugin, as in the `onnx` layout."""
    if domain not in TRT_PLUGIN_DOMAINS:
        raise ValueError(f'TensorRT plugin domain must be one of {TRT_PLUGIN_DOMAINS}')
    efficient_nms = _efficient_nms_op(domain)

    def efficient_nms_to_trt(boxes: FLOAT, scores: FLOAT, score_thr: float, iou_thr: float,
                             max_det: int, class_agnostic: bool = False):
        # the attribute only when set: graphs without it are those TensorRT has always parsed
        agnostic = {'class_agnostic': 1} if class_agnostic else {}
        num_dets, out_boxes, out_scores, out_labels = efficient_nms(
            boxes, scores, score_threshold=score_thr, iou_threshold=iou_thr,
            max_output_boxes=max_det, background_class=-1, score_activation=0, box_coding=0,
            plugin_version='1', _num_outputs=4, **agnostic)
        rows = op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Constant(value_int=max_det),
                                     op.Constant(value_int=1)), [0])
        is_detection = op.Less(rows, op.Cast(num_dets, to=onnx.TensorProto.INT64))
        return num_dets, out_boxes, out_scores, op.Where(is_detection, out_labels,
                                                         op.Constant(value=MINUS_ONE_INT32))
    return efficient_nms_to_trt

