"""What `detdeploy train` does differently for instance models (RTMDet-Ins): their loss, and
validation that reports COCO segm AP next to bbox AP (pycocotools).

Validation runs the EMA model in PyTorch through the inference preprocessing and the model's own
post-processing (NMS, then the masks of the kept detections, probabilities at the prototype's
stride over the padded input); masks go to each original image by the host code every backend
uses (`core.masks.paste_masks`: MMDetection's procedure, which resamples logits, not
probabilities), the same pixels `detdeploy eval` scores for the same detections. It does not
replace `detdeploy eval`.
"""
from __future__ import annotations

import numpy as np
import torch

from detdeploy.core.masks import MaskConfig, paste_masks

METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')


def is_instance_model(model: torch.nn.Module) -> bool:
    return getattr(model, 'task', None) == 'instance'


def make_instance_loss(model: torch.nn.Module):
    from detdeploy.models.rtmdet_ins.loss import RTMDetInsLoss
    return RTMDetInsLoss(model.strides)


def selection_metric(metrics: dict[str, float]) -> float:
    """The figure `best.pth` follows: segm AP for instance models, box AP otherwise."""
    return metrics.get('segm_AP', metrics['AP'])


def masks_at_image(probabilities: np.ndarray, mask_config: MaskConfig,
                   boxes_original_px: np.ndarray, meta) -> np.ndarray:
    """One image's [K, h, w] mask probabilities (the model's `masks` rows) -> [K, H, W] bool at
    the original image size, as `detdeploy eval` pastes them (`core.masks.paste_masks`)."""
    return paste_masks(np.asarray(probabilities, np.float32), mask_config, boxes_original_px,
                       meta.original_hw, meta.scale_wh)


def _summary(evaluator) -> dict[str, float]:
    return {name: max(float(value), 0.0) for name, value in zip(METRIC_NAMES, evaluator.stats)}


@torch.no_grad()
def evaluate_instance(model: torch.nn.Module, spec, ann_file: str, image_dir: str,
                      device: torch.device | str = 'cpu', batch_size: int = 8
                      ) -> dict[str, float]:
    """bbox metrics (AP, AP50, ..., as `evaluation.coco_eval`) and segm metrics (segm_AP, ...)
    of `model` (eval mode) on a COCO file, with the spec's eval NMS preset."""
    import contextlib
    import io

    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    from detdeploy.core.coco import image_path
    from detdeploy.evaluation.coco_eval import load_coco
    from detdeploy.runtimes.pipeline import prepare_batch
    from detdeploy.runtimes.preprocess import read_image, rescale_boxes

    coco = load_coco(ann_file)
    category_ids = sorted(coco.getCatIds())
    image_ids = sorted(coco.getImgIds())
    config = spec.preprocessing
    nms = spec.nms('eval')
    mask_config = model.mask_config
    results_box, results_segm = [], []
    model.eval()
    for start in range(0, len(image_ids), batch_size):
        ids = image_ids[start:start + batch_size]
        images = [read_image(image_path(image_dir, coco.imgs[i]['file_name'])) for i in ids]
        batch, metas = prepare_batch(images, config)
        inputs = torch.from_numpy(batch).to(device)
        raw = model(inputs)
        num_dets, boxes, scores, labels, masks = model.postprocess(
            raw, tuple(inputs.shape[-2:]), nms, 'onnx')
        for index, (image_id, meta) in enumerate(zip(ids, metas)):
            count = int(num_dets[index, 0])
            image_boxes = rescale_boxes(boxes[index, :count].cpu().numpy(), meta)
            image_masks = masks_at_image(masks[index, :count].float().cpu().numpy(),
                                         mask_config, image_boxes, meta)
            image_scores = scores[index, :count].cpu().numpy()
            image_labels = labels[index, :count].cpu().numpy()
            rles = mask_utils.encode(np.asfortranarray(image_masks.transpose(1, 2, 0)
                                                       .astype(np.uint8))) if count else []
            for box, score, label, rle in zip(image_boxes, image_scores, image_labels, rles):
                common = {'image_id': int(image_id), 'category_id': category_ids[int(label)],
                          'score': float(score)}
                x1, y1, x2, y2 = (float(v) for v in box)
                results_box.append({**common, 'bbox': [x1, y1, x2 - x1, y2 - y1]})
                results_segm.append({**common, 'segmentation': {
                    'size': rle['size'], 'counts': rle['counts'].decode('ascii')}})
    metrics: dict[str, float] = {}
    for kind, results, prefix in (('bbox', results_box, ''), ('segm', results_segm, 'segm_')):
        if not results:
            metrics.update({prefix + name: 0.0 for name in METRIC_NAMES})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(coco, coco.loadRes(results), kind)
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics.update({prefix + name: value for name, value in _summary(evaluator).items()})
    return metrics
