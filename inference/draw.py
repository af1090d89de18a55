"""Draw labelled detection boxes (rotated ones as polygons) on an image with Pillow; nothing
else."""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from detdeploy.core.detections import ImageDetections, rotated_box_corners


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class (golden-ratio hue steps)."""
    red, green, blue = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 0.95)
    return int(red * 255), int(green * 255), int(blue * 255)


def draw_detections(image_rgb: np.ndarray, detections: ImageDetections) -> Image.Image:
    """The image with each detection's box and 'name score' label drawn on it."""
    canvas = Image.fromarray(image_rgb)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    line_width = max(1, round(max(canvas.size) / 400))
    rotated = detections.rotated_boxes
    for index, (box, score, label) in enumerate(zip(detections.boxes_xyxy_px, detections.scores,
                                                     detections.labels)):
        colour = class_colour(int(label))
        x1, y1, x2, y2 = (float(v) for v in box)
        if rotated is None:
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=line_width)
        else:
            corners = [tuple(float(v) for v in point)
                       for point in rotated_box_corners(rotated[index])[0]]
            draw.line(corners + corners[:1], fill=colour, width=line_width)
        text = f'{detections.label_name(int(label))} {score:.2f}'
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        text_top = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1
        draw.rectangle((x1, text_top, x1 + (right - left) + 4, text_top + (bottom - top) + 2),
                       fill=colour)
        draw.text((x1 + 2, text_top), text, fill=(0, 0, 0), font=font)
    return canvas
