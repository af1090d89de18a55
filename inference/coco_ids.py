"""Which `image_id` and `category_id` the rows of `coco_results.json` carry: a COCO annotation
file's ids (so pycocotools scores the file against that dataset), or the run's own numbering.

Matching only; detection and writing are `inference.batch`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from detdeploy.core.errors import DetdeployError

RUN_ORDER_NOTE = ('image_id: position in this run from 0, category_id: class index from 0; '
                  'give --ann COCO.json for a dataset\'s ids')


@dataclass(frozen=True)
class CocoIds:
    """`image_ids[i]` for the i-th image of the run, `category_ids[label]` for a class index."""
    image_ids: tuple[int, ...]
    category_ids: tuple[int, ...] | None      # None: the class index itself
    note: str                                 # how the ids were assigned, one line
    warnings: tuple[str, ...] = ()

    def category_id(self, label: int) -> int:
        if self.category_ids is None or not 0 <= label < len(self.category_ids):
            return label
        return self.category_ids[label]


def run_order_ids(count: int) -> CocoIds:
    """Without an annotation file: the run's order and the model's class indices."""
    return CocoIds(tuple(range(count)), None, RUN_ORDER_NOTE)


def _match_key(image: Path, file_names: dict[str, int]) -> int | None:
    """The id whose `file_name` is the longest trailing part of `image`'s path."""
    parts = image.resolve().parts if not image.is_absolute() else image.parts
    for start in range(len(parts)):
        key = '/'.join(parts[start:])
        if key in file_names:
            return file_names[key]
    return None


def dataset_ids(ann_file: str | Path, images: list[Path], class_names: tuple[str, ...]
                ) -> CocoIds:
    """Ids from a COCO annotation file: an image matches the entry whose `file_name` ends its
    path (`val/000001.png` or `000001.png`); class index k is the k-th category by id, as
    `detdeploy eval` maps them. Images the file does not list, or a class count that differs
    from the file's categories, are one-line errors."""
    from detdeploy.evaluation.coco_eval import load_coco
    coco = load_coco(ann_file)
    file_names = {str(info['file_name']).replace('\\', '/').removeprefix('./'): image_id
                  for image_id, info in coco.imgs.items()}
    image_ids, unlisted = [], []
    for image in images:
        found = _match_key(Path(image), file_names)
        if found is None:
            unlisted.append(image)
        image_ids.append(found)
    if unlisted:
        raise DetdeployError(f'--ann {ann_file}: {len(unlisted)} of {len(images)} images are not '
                             f'listed in it (file_name), e.g. {unlisted[0]}')
    category_ids = tuple(sorted(coco.getCatIds()))
    if len(category_ids) != len(class_names):
        raise DetdeployError(f'--ann {ann_file} has {len(category_ids)} categories but the model '
                             f'has {len(class_names)} classes')
    warnings = []
    names = [coco.cats[i]['name'] for i in category_ids]
    if names != list(class_names):
        warnings.append(f"class names differ from {ann_file}'s ({names[:3]}... vs "
                        f'{list(class_names)[:3]}...); matching class k to the k-th category id')
    return CocoIds(tuple(image_ids), category_ids,
                   f'image_id and category_id from {ann_file}', tuple(warnings))
