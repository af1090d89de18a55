"""Host-side image handling in numpy: read, resize, pad, normalise, rescale boxes back.

Carries out a `core.preprocessing.PreprocessConfig` (which decides the sizes) as MMDetection's
test pipelines do (mmcv `imrescale` with OpenCV bilinear interpolation, `Pad`,
`DetDataPreprocessor`), without torch or OpenCV, so a deployment needs only numpy and Pillow.
Model execution and NMS are elsewhere.
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from detdeploy.core.errors import ImageError, ImageTooLargeError
from detdeploy.core.memory import memory_problem
from detdeploy.core.preprocessing import PreprocessConfig

RESIZE_COEF_BITS = 11                   # OpenCV's fixed-point precision for 8-bit bilinear
RESIZE_COEF_SCALE = 1 << RESIZE_COEF_BITS
DEFAULT_MAX_PIXELS = 100_000_000        # decompression-bomb limit: 100 megapixels


def allow_pixels(max_pixels: int | None) -> None:
    """Make Pillow's process-wide bomb check (an error above 2 x its MAX_IMAGE_PIXELS) no
    stricter than `max_pixels` (None or 0: no limit), so `read_image`'s own limit decides.
    For command lines; a library caller keeps Pillow's setting unless it calls this."""
    if not max_pixels:
        Image.MAX_IMAGE_PIXELS = None
    elif Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


@dataclass(frozen=True)
class ImageMeta:
    """Geometry of one image through preprocessing, needed to map boxes back."""
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    scale_wh: tuple[float, float]      # resized / original, per axis, as MMDetection's scale_factor


def read_image(source: str | Path | np.ndarray | bytes, array_order: str = 'bgr',
               max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str = 'uploaded image'
               ) -> np.ndarray:
    """An image as an HxWx3 uint8 RGB array.

    Files and encoded bytes (an upload, called `name` in messages) are read with Pillow, EXIF
    orientation applied. Gray (L, 1), gray+alpha (LA), palette
    (P, with or without transparency), RGBA, CMYK and YCbCr become RGB, alpha dropped (as
    OpenCV's IMREAD_COLOR, which MMDetection reads with, drops it). 16-bit images keep their
    high byte (value >> 8, as OpenCV/libpng reduce them), not clipped at 255. A file with more
    than `max_pixels` pixels (None or 0: no limit) is refused from its header, before decoding.
    Arrays are HxW (gray), HxWx1, HxWx3 or HxWx4 uint8 in `array_order` ('bgr' as OpenCV
    gives them, or 'rgb'); alpha is dropped.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, array_order)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError(f'cannot read {name}: it is empty')
        return _decode(io.BytesIO(source), name, max_pixels)
    path = Path(source)
    if path.is_dir():
        raise ImageError(f'{path} is a directory, not an image')
    try:
        if path.stat().st_size == 0:
            raise ImageError(f'cannot read image {path}: the file is empty')
    except FileNotFoundError:
        raise ImageError(f'image not found: {path}') from None
    except OSError as exc:
        raise ImageError(f'cannot read image {path}: {exc.strerror or exc}') from None
    return _decode(path, path, max_pixels)


def _decode(opened: Path | io.BytesIO, path: Path | str, max_pixels: int | None) -> np.ndarray:
    """Pillow's decoding of a file or an in-memory upload, every failure one ImageError line
    naming `path`."""
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns above 89 MP; the limit that applies is ours, below
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            with Image.open(opened) as image:
                width, height = image.size
                if max_pixels and width * height > max_pixels:
                    raise ImageTooLargeError(
                        f'{path} is {width}x{height} = {width * height / 1e6:.1f} megapixels, '
                        f'above the limit of {max_pixels / 1e6:g} (--max-pixels; 0 = no limit)')
                # decoded, then converted to RGB: two copies of at least 3 bytes per pixel
                too_big = memory_problem(2 * 3 * width * height,
                                         f'decoding {path} ({width}x{height})')
                if too_big:
                    raise ImageError(too_big)
                image.load()
                return _pil_to_rgb(ImageOps.exif_transpose(image), path)
    except FileNotFoundError:
        raise ImageError(f'image not found: {path}') from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f'{path} is larger than Pillow allows ({exc}); check the file, or '
                         'raise --max-pixels') from None
    except Image.UnidentifiedImageError:
        raise ImageError(f'cannot read image {path}: not an image, or a format Pillow cannot '
                         'decode') from None
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as exc:
        # truncated or corrupt data: Pillow raises OSError, ValueError, SyntaxError, ...
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImageError(f'cannot read image {path}: {text}') from None


def _pil_to_rgb(image: Image.Image, path: Path | str) -> np.ndarray:
    """A decoded Pillow image in any mode -> HxWx3 uint8 RGB."""
    mode = image.mode
    if mode.startswith('I;16') or mode == 'I':
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageError(f'{path}: 32-bit integer pixels outside 0..65535 are not '
                             'supported; convert the image to 8 or 16 bits')
        gray = (values >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == 'F':
        raise ImageError(f'{path}: floating-point images are not supported; convert it to 8 bits')
    if mode in ('P', 'PA'):
        # a palette with transparency converts to RGB only via RGBA without a warning
        image = image.convert('RGBA')
    rgb = np.asarray(image.convert('RGB'))
    if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape[:2]:
        raise ImageError(f'{path}: image of shape {rgb.shape} cannot be used')
    return rgb


def _array_to_rgb(array: np.ndarray, array_order: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ImageError(f'image arrays must be uint8, got {array.dtype}')
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape[:2]:
        raise ImageError(f'image array of shape {array.shape} is not HxW, HxWx1, HxWx3 or HxWx4')
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    rgb = array[:, :, :3]
    return np.ascontiguousarray(rgb[:, :, ::-1] if array_order == 'bgr' else rgb)


def _linear_taps(src_len: int, dst_len: int, edge_weights: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and 11-bit fixed-point weights of OpenCV's INTER_LINEAR along one axis.

    Along x OpenCV moves all weight onto the edge pixel outside the image (`edge_weights`);
    along y it keeps the fractional weights and clips the row indices, which rounds
    differently in its vectorised vertical pass.
    """
    dst = np.arange(dst_len, dtype=np.float64)
    pos = ((dst + 0.5) * (src_len / dst_len) - 0.5).astype(np.float32)
    first = np.floor(pos).astype(np.int64)
    frac = pos - first
    if edge_weights:
        frac[first < 0] = 0.0
        first = np.clip(first, 0, src_len - 1)
        frac[first >= src_len - 1] = 0.0
    second = np.clip(first + 1, 0, src_len - 1)
    first = np.clip(first, 0, src_len - 1)
    weight_second = np.rint(frac * RESIZE_COEF_SCALE).astype(np.int64)
    weight_first = np.rint((1.0 - frac) * RESIZE_COEF_SCALE).astype(np.int64)
    return first, second, np.stack([weight_first, weight_second])


def resize_bilinear(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 HxWxC image as OpenCV's `cv2.resize(INTER_LINEAR)` does it:
    same pixel mapping, 11-bit weights, and the rounding of its vectorised vertical pass."""
    if tuple(image.shape[:2]) == tuple(size_hw):
        return image.copy()
    return _resize_rounded(image, size_hw).astype(np.uint8)


def _resize_rounded(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """`resize_bilinear`'s values as int32 (0..255), computing the horizontal pass only for
    the source rows the vertical pass reads. int32 holds every intermediate: a row value is at
    most 255 * 2048, and (that >> 4) * 2048 < 2**31."""
    src_h, src_w = image.shape[:2]
    channels = int(np.prod(image.shape[2:], dtype=np.int64))
    top, bottom, wy = _linear_taps(src_h, size_hw[0], edge_weights=False)
    left, right, wx = _linear_taps(src_w, size_hw[1], edge_weights=True)
    needed, inverse = np.unique(np.concatenate([top, bottom]), return_inverse=True)
    # Rows flattened to W*C values: a gather along a 2-D row is far faster than along the
    # middle axis of a 3-D array.
    source = image[needed].reshape(len(needed), src_w * channels)
    offsets = np.arange(channels)

    def horizontal_tap(index: np.ndarray, weight: np.ndarray) -> np.ndarray:
        taken = np.take(source, (index[:, None] * channels + offsets).ravel(), axis=1)
        return taken.astype(np.int32) * np.repeat(weight.astype(np.int32), channels)

    rows = horizontal_tap(left, wx[0])
    rows += horizontal_tap(right, wx[1])
    rows >>= 4
    # (b0 * (S0 >> 4)) >> 16 + (b1 * (S1 >> 4)) >> 16, then round off 2 more bits: 22 in all
    upper = rows[inverse[:len(top)]]
    upper *= wy[0].astype(np.int32)[:, None]
    upper >>= 16
    lower = rows[inverse[len(top):]]
    lower *= wy[1].astype(np.int32)[:, None]
    lower >>= 16
    upper += lower
    upper += 2
    upper >>= 2
    np.clip(upper, 0, 255, out=upper)
    return upper.reshape(*size_hw, *image.shape[2:])


def preprocess(image_rgb: np.ndarray, config: PreprocessConfig,
               canvas_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, ImageMeta]:
    """One RGB uint8 image -> normalised CHW float32 network input and its geometry.

    The image is resized as `config` says and padded bottom/right to `canvas_hw` (default: the
    config's canvas for this image; a batch passes its largest)."""
    canvas_hw = canvas_hw or config.canvas_size(config.resized_size(image_rgb.shape[:2]))
    out = np.empty((3, *canvas_hw), dtype=np.float32)
    return out, preprocess_into(image_rgb, config, out)


def preprocess_into(image_rgb: np.ndarray, config: PreprocessConfig, out: np.ndarray
                    ) -> ImageMeta:
    """`preprocess` writing straight into `out`, a [3, H, W] float32 array (e.g. one slot of
    a batch), with no intermediate canvas: the resized pixels go to the top-left of each
    channel plane and the padding gets the value a padded pixel normalises to, computed with
    the same float32 operations, so the values equal MMDetection's pad-then-normalise."""
    original_hw = image_rgb.shape[:2]
    resized_hw = config.resized_size(original_hw)
    canvas_hw = out.shape[1:]
    if resized_hw[0] > canvas_hw[0] or resized_hw[1] > canvas_hw[1]:
        raise ValueError(f'resized image {resized_hw} does not fit the canvas {canvas_hw}')
    if tuple(original_hw) == tuple(resized_hw):
        resized = image_rgb
    else:
        resized = _resize_rounded(image_rgb, resized_hw)
    order = (2, 1, 0) if config.channel_order == 'bgr' else (0, 1, 2)
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    scale = np.float32(config.pixel_scale)
    height, width = resized_hw
    for channel, source in enumerate(order):
        plane = out[channel]
        if config.pad_fill == 'mean':   # MMDetection's DetDataPreprocessor: 0 after normalising
            fill = np.float32(0.0)
        else:                           # the raw pixel value pad_value (MMDetection's Pad)
            fill = _normalized(np.float32(config.pad_value), scale, mean[channel], std[channel])
        plane[height:, :] = fill
        plane[:height, width:] = fill
        pixels = plane[:height, :width]
        pixels[...] = resized[:, :, source]
        if scale != 1.0:
            pixels *= scale
        pixels -= mean[channel]
        pixels /= std[channel]
    scale_wh = (resized_hw[1] / original_hw[1], resized_hw[0] / original_hw[0])
    return ImageMeta(tuple(original_hw), resized_hw, scale_wh)


def _normalized(value: np.float32, scale: np.float32, mean: np.float32, std: np.float32
                ) -> np.float32:
    """One float32 pixel value through `preprocess_into`'s normalisation."""
    if scale != 1.0:
        value = np.float32(value * scale)
    return np.float32(np.float32(value - mean) / std)


def batch_canvas_size(images_rgb: list[np.ndarray], config: PreprocessConfig
                      ) -> tuple[int, int]:
    """The padded size shared by a batch: the config's fixed size, or (padding to a size
    divisor) the largest padded image."""
    canvases = [config.canvas_size(config.resized_size(image.shape[:2])) for image in images_rgb]
    return max(h for h, _ in canvases), max(w for _, w in canvases)


def rescale_boxes(boxes_xyxy: np.ndarray, meta: ImageMeta) -> np.ndarray:
    """Network-input pixels -> original-image pixels, clamped to the original image."""
    scale = np.asarray([meta.scale_wh[0], meta.scale_wh[1]] * 2, dtype=np.float32)
    boxes = boxes_xyxy.astype(np.float32) / scale
    height, width = meta.original_hw
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes


def rescale_rotated_boxes(boxes: np.ndarray, meta: ImageMeta) -> np.ndarray:
    """Rotated boxes [K, 5] (cx, cy, w, h, angle) in network-input pixels -> original-image
    pixels, as MMRotate's `RotatedBoxes.rescale_` with the inverse scale factor (exact for
    equal x and y scales; otherwise the rotated box closest to the stretched one). Not clamped:
    MMRotate keeps rotated boxes that reach past the image."""
    boxes = boxes.astype(np.float64)
    scale_x, scale_y = 1 / meta.scale_wh[0], 1 / meta.scale_wh[1]
    cos, sin = np.cos(boxes[:, 4]), np.sin(boxes[:, 4])
    out = np.empty_like(boxes)
    out[:, 0], out[:, 1] = boxes[:, 0] * scale_x, boxes[:, 1] * scale_y
    out[:, 2] = boxes[:, 2] * np.sqrt((scale_x * cos) ** 2 + (scale_y * sin) ** 2)
    out[:, 3] = boxes[:, 3] * np.sqrt((scale_x * sin) ** 2 + (scale_y * cos) ** 2)
    out[:, 4] = np.arctan2(scale_x * sin, scale_y * cos)
    return out.astype(np.float32)
