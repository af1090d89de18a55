"""Oriented boxes in a COCO instances file: each annotation's `rbox` = [cx, cy, w, h, angle]
(pixels, radians, le90), as `make-dataset shapes --rotated` writes them.

Pure JSON checking on top of `core.coco.check_coco`, with one-line errors naming the file and
field; rotated evaluation and rotated training read boxes through here.
"""
from __future__ import annotations

from .coco import CocoError, _is_number, _short


def rotated_boxes(data: dict, source: str) -> dict[int, list[float]]:
    """Annotation id -> its checked `rbox` for every annotation of a checked COCO dict. Every
    annotation must have one (a file without any is not a rotated dataset)."""
    found = {}
    annotations = data.get('annotations', [])
    if annotations and not any('rbox' in ann for ann in annotations):
        raise CocoError(f'{source}: annotations carry no oriented boxes (`rbox`: [cx, cy, w, h, '
                        'angle]); rotated models need them (make one with make-dataset shapes '
                        '--rotated)')
    for index, ann in enumerate(annotations):
        box = ann.get('rbox')
        where = f'{source}: annotations[{index}].rbox'
        if not (isinstance(box, list) and len(box) == 5 and all(_is_number(v) for v in box)):
            raise CocoError(f'{where}: must be five finite numbers [cx, cy, w, h, angle], got '
                            f'{_short(box)}')
        if box[2] < 0 or box[3] < 0:
            raise CocoError(f'{where}: width and height must not be negative, got {box}')
        found[ann['id']] = [float(v) for v in box]
    return found
