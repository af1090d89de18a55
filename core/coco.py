"""The schema of a COCO instances file, checked at the boundary: every field evaluation and
training read, with one-line errors naming the file, the field and the problem.

Pure JSON checking (no pycocotools, no images read); `evaluation.coco_eval` and
`training.data` build on the checked dict. Missing `area` and `iscrowd` take COCO's meaning
(the box's area, not a crowd); everything else that is missing or wrong is refused.
"""
from __future__ import annotations

import json
import math
import os
import posixpath
from pathlib import Path, PureWindowsPath

from .errors import DetdeployError
from .fileio import check_input_file


class CocoError(DetdeployError):
    """An annotation file that is not a usable COCO instances file."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_coco_file(path: str | os.PathLike) -> dict:
    """The checked contents of a COCO instances file (`check_coco`)."""
    path = check_input_file(path, 'annotation file')
    try:
        text = path.read_text(encoding='utf-8')
    except UnicodeDecodeError:
        raise CocoError(f'{path} is not a COCO instances file (not UTF-8 text)') from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise CocoError(f'{path} is not a COCO instances file (JSON nested too deeply)') from None
    except ValueError as exc:
        raise CocoError(f'{path} is not a COCO instances file (invalid JSON: {exc})') from None
    return check_coco(data, str(path))


def check_coco(data, source: str) -> dict:
    """`data` (a parsed COCO instances file) checked field by field; returns a copy whose
    annotations all have `area` and `iscrowd`. Image ids and category ids are integers and
    unique; every annotation refers to a listed image and category and has a box of four finite
    numbers with non-negative width and height."""
    def fail(field: str, problem: str) -> CocoError:
        return CocoError(f'{source}: {field}: {problem}')

    if not isinstance(data, dict):
        raise CocoError(f'{source} is not a COCO instances file (a JSON {type(data).__name__}, '
                        'not an object with images, annotations and categories)')
    for key in ('images', 'categories'):
        if key not in data:
            raise CocoError(f'{source} is not a COCO instances file (no "{key}" list)')
    sections = {}
    for key in ('images', 'annotations', 'categories'):
        value = data.get(key, [])
        if not isinstance(value, list):
            raise fail(key, f'must be a list, got {type(value).__name__}')
        sections[key] = value
    if not sections['categories']:
        raise fail('categories', 'is empty: the file names no classes')

    category_ids = set()
    for index, category in enumerate(sections['categories']):
        where = f'categories[{index}]'
        if not isinstance(category, dict):
            raise fail(where, f'must be an object, got {type(category).__name__}')
        if not _is_int(category.get('id')):
            raise fail(f'{where}.id', f'must be an integer, got {category.get("id")!r}')
        if not isinstance(category.get('name'), str) or not category['name']:
            raise fail(f'{where}.name', f'must be a non-empty string, got '
                                        f'{category.get("name")!r}')
        if category['id'] in category_ids:
            raise fail(f'{where}.id', f'{category["id"]} appears twice')
        category_ids.add(category['id'])

    image_ids = set()
    for index, image in enumerate(sections['images']):
        where = f'images[{index}]'
        if not isinstance(image, dict):
            raise fail(where, f'must be an object, got {type(image).__name__}')
        if not _is_int(image.get('id')):
            raise fail(f'{where}.id', f'must be an integer, got {image.get("id")!r}')
        if image['id'] in image_ids:
            raise fail(f'{where}.id', f'{image["id"]} appears twice')
        image_ids.add(image['id'])
        name = image.get('file_name')
        if not isinstance(name, str) or not name:
            raise fail(f'{where}.file_name', f'must be a non-empty string, got {name!r}')
        problem = file_name_problem(name)
        if problem:
            raise fail(f'{where}.file_name', problem)
        for side in ('height', 'width'):
            if side in image and not (_is_int(image[side]) and image[side] > 0):
                raise fail(f'{where}.{side}', f'must be a positive integer, got {image[side]!r}')

    annotations = []
    annotation_ids = set()
    for index, annotation in enumerate(sections['annotations']):
        where = f'annotations[{index}]'
        if not isinstance(annotation, dict):
            raise fail(where, f'must be an object, got {type(annotation).__name__}')
        for key, known, what in (('id', None, ''), ('image_id', image_ids, 'image'),
                                 ('category_id', category_ids, 'category')):
            value = annotation.get(key)
            if not _is_int(value):
                raise fail(f'{where}.{key}', f'must be an integer, got {value!r}')
            if known is not None and value not in known:
                raise fail(f'{where}.{key}', f'{value} is not the id of any {what} in the file')
        if annotation['id'] in annotation_ids:
            raise fail(f'{where}.id', f'{annotation["id"]} appears twice')
        annotation_ids.add(annotation['id'])
        box = annotation.get('bbox')
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise fail(f'{where}.bbox', f'must be four finite numbers [x, y, width, height], '
                                        f'got {_short(box)}')
        if box[2] < 0 or box[3] < 0:
            raise fail(f'{where}.bbox', f'width and height must not be negative, got {box}')
        area = annotation.get('area', box[2] * box[3])
        if not (_is_number(area) and area >= 0):
            raise fail(f'{where}.area', f'must be a non-negative number, got {_short(area)}')
        crowd = annotation.get('iscrowd', 0)
        if crowd not in (0, 1):
            raise fail(f'{where}.iscrowd', f'must be 0 or 1, got {_short(crowd)}')
        annotations.append({**annotation, 'area': area, 'iscrowd': int(crowd)})
    return {**data, 'images': sections['images'], 'annotations': annotations,
            'categories': sections['categories']}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + '...'


def file_name_problem(name: str) -> str | None:
    """Why an image `file_name` may not be read relative to the image folder: absolute, or
    climbing out of it with `..`; None if it stays inside."""
    if (os.path.isabs(name) or PureWindowsPath(name).is_absolute()
            or PureWindowsPath(name).drive or name.startswith(('/', '\\'))):
        return f'{name!r} is absolute; file names are relative to the image folder'
    normalized = posixpath.normpath(name.replace('\\', '/'))
    if normalized == '..' or normalized.startswith('../'):
        return f"{name!r} climbs out of the image folder with '..'"
    if '\x00' in name:
        return f'{name!r} contains a NUL byte'
    return None


def image_path(image_dir: str | os.PathLike, file_name: str) -> Path:
    """Where an image of the file lies: `file_name` inside `image_dir` (checked by
    `check_coco`)."""
    return Path(image_dir) / file_name
