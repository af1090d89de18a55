"""What `detdeploy train` does differently for instance models (RTMDet-Ins): their loss, and
validation that reports COCO segm AP next to bbox AP (pycocotools).

Validation runs the EMA model in PyTorch through the inference preprocessing and the model's own
post-processing (NMS, then the masks of the kept detections, probabilities at the prototype's
stride over the padded input); masks are resampled to each original image as the `input` mask
frame says (`core.masks`): upsampled bilinearly to the input, cropped to the resized image,
resized bilinearly to the original size, thresholded. It does not replace `detdeploy eval`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')


def is_instance_model(model: torch.nn.Module) -> bool:
    return getattr(model, 'task', None) == 'instance'


def make_instance_loss(model: torch.nn.Module):
    from detdeploy.models.rtmdet_ins.loss import RTMDetInsLoss
    return RTMDetInsLoss(model.strides)


def selection_metric(metrics: dict[str, float]) -> float:
    """The figure `best.pth` follows: segm AP for instance models, box AP otherwise."""
    return metrics.get('segm_AP', metrics['AP'])


def masks_at_image(probabilities: torch.Tensor, stride: int, resized_hw: tuple[int, int],
                   original_hw: tuple[int, int], threshold: float) -> torch.Tensor:
    """[K, h, w] probabilities over the padded input at `stride` -> [K, H, W] bool at the
    original image size."""
    if probabilities.shape[0] == 0:
        return torch.zeros((0, *original_hw), dtype=torch.bool)
    height, width = probabilities.shape[-2:]
    upsampled = F.interpolate(probabilities[None], size=(height * stride, width * stride),
                              mode='bilinear', align_corners=False)
    cropped = upsampled[:, :, :resized_hw[0], :resized_hw[1]]
    return F.interpolate(cropped, size=original_hw, mode='bilinear',
                         align_corners=False)[0] > threshold


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

    import numpy as np
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
            image_masks = masks_at_image(masks[index, :count].float().cpu(), mask_config.stride,
                                         meta.resized_hw, meta.original_hw,
                                         mask_config.threshold).numpy()
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
