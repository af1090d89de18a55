"""Draw labelled detection boxes (rotated ones as polygons) on an image with Pillow; nothing
else."""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from detdeploy.core.detections import ImageDetections, rotated_box_corners

LABEL_PADDING_PX = 2


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class (golden-ratio hue steps)."""
    red, green, blue = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 0.95)
    return int(red * 255), int(green * 255), int(blue * 255)


def label_box(box_xyxy: tuple[float, float, float, float], text_wh: tuple[int, int],
              image_wh: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where a box's label goes: above its top-left corner, or just inside the box when there
    is no room above; shifted left and up as needed so the whole label stays in the image."""
    x1, y1 = box_xyxy[0], box_xyxy[1]
    width, height = (side + 2 * LABEL_PADDING_PX for side in text_wh)
    top = y1 - height if y1 - height >= 0 else y1
    left = min(max(x1, 0), image_wh[0] - width)
    top = min(max(top, 0), image_wh[1] - height)
    left, top = max(int(round(left)), 0), max(int(round(top)), 0)
    return left, top, left + width, top + height


def draw_detections(image_rgb: np.ndarray, detections: ImageDetections) -> Image.Image:
    """The image with each detection's box and 'name score' label drawn on it.

    Drawn from the lowest score up, so where labels overlap (one object with several classes
    above the threshold) the best one is on top and readable."""
    canvas = Image.fromarray(image_rgb)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    line_width = max(1, round(max(canvas.size) / 400))
    rotated = detections.rotated_boxes
    # best first with ties in the given order, reversed: the best is drawn last
    for index in np.argsort(-detections.scores, kind='stable')[::-1]:
        box, score, label = (detections.boxes_xyxy_px[index], detections.scores[index],
                             int(detections.labels[index]))
        colour = class_colour(label)
        x1, y1, x2, y2 = (float(v) for v in box)
        if rotated is None:
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=line_width)
        else:
            corners = [tuple(float(v) for v in point)
                       for point in rotated_box_corners(rotated[index])[0]]
            draw.line(corners + corners[:1], fill=colour, width=line_width)
        text = f'{detections.label_name(label)} {score:.2f}'
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        placed = label_box((x1, y1, x2, y2), (right - left, bottom - top), canvas.size)
        draw.rectangle((placed[0], placed[1], placed[2] - 1, placed[3] - 1), fill=colour)
        draw.text((placed[0] + LABEL_PADDING_PX - left, placed[1] + LABEL_PADDING_PX - top),
                  text, fill=(0, 0, 0), font=font)
    return canvas
