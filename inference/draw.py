"""Draw labelled detection boxes (rotated ones as polygons) and instance masks (translucent
fills with contours) on an image with Pillow and numpy; nothing else."""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from detdeploy.core.detections import ImageDetections, rotated_box_corners

LABEL_PADDING_PX = 2
MASK_OPACITY = 0.45


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


def mask_contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The pixels of a bool mask with a background (or outside) pixel among their 4
    neighbours, grown inwards to `width` pixels."""
    inner = mask.copy()
    for _ in range(width):
        padded = np.pad(inner, 1, constant_values=False)
        inner = (inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2]
                 & padded[1:-1, 2:])
    return mask & ~inner


def overlay_masks(image_rgb: np.ndarray, detections: ImageDetections, order: np.ndarray,
                  line_width: int = 1) -> np.ndarray:
    """The image with each mask filled translucently in its class colour and outlined, in
    `order` (later ones on top); work per mask is limited to the rows and columns it covers."""
    blended = image_rgb.astype(np.float32)
    masks = detections.masks
    rows_any, cols_any = masks.any(2), masks.any(1)
    for index in order:
        if not rows_any[index].any():
            continue
        rows, cols = np.flatnonzero(rows_any[index]), np.flatnonzero(cols_any[index])
        window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        mask = masks[index][window]
        colour = np.asarray(class_colour(int(detections.labels[index])), dtype=np.float32)
        region = blended[window]
        region[mask] = (1 - MASK_OPACITY) * region[mask] + MASK_OPACITY * colour
        region[mask_contour(mask, line_width)] = colour
    return blended.round().astype(np.uint8)


def draw_detections(image_rgb: np.ndarray, detections: ImageDetections) -> Image.Image:
    """The image with each detection's mask (instance models), box and 'name score' label
    drawn on it.

    Drawn from the lowest score up, so where labels overlap (one object with several classes
    above the threshold) the best one is on top and readable."""
    if detections.masks is not None and len(detections):
        order = np.argsort(-detections.scores, kind='stable')[::-1]
        image_rgb = overlay_masks(image_rgb, detections, order,
                                  max(1, round(max(image_rgb.shape[:2]) / 400)))
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
