"""Detection over HTTP without a server: check an upload (content type, size), decode it, run a
batch of uploads on a backend, answer with `detdeploy infer`'s per-image JSON.

No web framework and no Ray here: `ray_serve.py` wires this into a Ray Serve deployment, and the
tests call it directly. Every refusal is a `RequestError` carrying its HTTP status.
"""
from __future__ import annotations

from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP

import numpy as np

from detdeploy.core.detections import ImageDetections
from detdeploy.core.errors import DetdeployError, ImageError, ImageTooLargeError
from detdeploy.runtimes.backend import Backend
from detdeploy.runtimes.pipeline import prepare_batch, require_detections, to_detections
from detdeploy.runtimes.preprocess import DEFAULT_MAX_PIXELS, read_image

DEFAULT_MAX_BYTES = 20 * 1024 * 1024        # one upload; a 20 MB JPEG is ~100 megapixels
RAW_TYPES = ('application/octet-stream',)   # besides image/*
MULTIPART = 'multipart/form-data'
UPLOAD_FIELDS = ('image', 'file')           # multipart field names taken, in this order
DEFAULT_UPLOAD_NAME = 'upload'


class RequestError(DetdeployError):
    """A request the service refuses; `status` is the HTTP status to answer with (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Upload:
    """One image as it arrived: its encoded bytes and the name its answer carries."""
    name: str
    data: bytes


def upload_from_body(content_type: str | None, body: bytes, max_bytes: int = DEFAULT_MAX_BYTES
                     ) -> Upload:
    """The image of a request: the whole body for `image/*` or `application/octet-stream`,
    or the `image` (else `file`) part of a `multipart/form-data` form. 413 above `max_bytes`,
    415 for other content types, 400 for a form without an image part."""
    if len(body) > max_bytes:
        raise RequestError(413, f'request body is {len(body)} bytes, above the limit of '
                                f'{max_bytes} (--max-bytes)')
    media_type = (content_type or '').split(';')[0].strip().lower()
    if media_type.startswith('image/') or media_type in RAW_TYPES:
        return Upload(DEFAULT_UPLOAD_NAME, body)
    if media_type == MULTIPART:
        return _form_image(content_type, body)
    shown = media_type or 'none'
    raise RequestError(415, f"content type '{shown}' is not an image: send the image bytes as "
                            f'image/* or application/octet-stream, or a {MULTIPART} form with '
                            f"an '{UPLOAD_FIELDS[0]}' file")


def _form_image(content_type: str, body: bytes) -> Upload:
    """The image part of a multipart form (the standard library's MIME parser)."""
    message = BytesParser(policy=HTTP).parsebytes(
        b'Content-Type: ' + content_type.encode('latin-1') + b'\r\n\r\n' + body)
    if not message.is_multipart():
        raise RequestError(400, f'{MULTIPART} body could not be parsed (boundary missing?)')
    parts = {part.get_param('name', header='content-disposition'): part
             for part in message.iter_parts()}
    field = next((name for name in UPLOAD_FIELDS if name in parts), None)
    if field is None:
        raise RequestError(400, f"the form has no '{UPLOAD_FIELDS[0]}' field (fields: "
                                f"{', '.join(str(name) for name in parts) or 'none'})")
    part = parts[field]
    data = part.get_payload(decode=True) or b''
    return Upload(part.get_filename() or DEFAULT_UPLOAD_NAME, data)


def detect_by_canvas(backend: Backend, names: list[str], images_rgb: list[np.ndarray]
                     ) -> list[ImageDetections]:
    """Detections of decoded images, in order, batched as the backend allows but grouped by
    the padded input size each image gets on its own: batching never changes an image's
    padding, so the results equal `infer`'s one image at a time."""
    config = backend.preprocess_config
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images_rgb):
        canvas_hw = config.canvas_size(config.resized_size(image.shape[:2]))
        groups.setdefault(canvas_hw, []).append(index)
    found: list[ImageDetections | None] = [None] * len(images_rgb)
    for indices in groups.values():
        batch, metas = prepare_batch([images_rgb[i] for i in indices], config)
        outputs = backend.run(batch)
        for index, detections in zip(indices, to_detections(
                outputs, [names[i] for i in indices], metas, backend.class_names,
                backend.source, backend.metadata.mask)):
            found[index] = detections
    return found


class DetectionService:
    """A backend answering batches of uploads, as `infer` would answer for the same files."""

    def __init__(self, backend: Backend, score_thr: float | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        require_detections(backend)
        self.backend = backend
        self.score_thr = score_thr
        self.max_pixels = max_pixels

    def decode(self, upload: Upload) -> np.ndarray:
        """The upload as RGB pixels; 400 if it is not an image Pillow reads, 413 above
        `max_pixels`."""
        try:
            return read_image(upload.data, max_pixels=self.max_pixels, name=upload.name)
        except ImageTooLargeError as error:
            raise RequestError(413, str(error)) from None
        except ImageError as error:
            raise RequestError(400, str(error)) from None

    def detect(self, names: list[str], images_rgb: list[np.ndarray]) -> list[dict]:
        """Per image, its JSON answer (`ImageDetections.to_dict`), in order."""
        return [self._answer(detections)
                for detections in detect_by_canvas(self.backend, names, images_rgb)]

    def _answer(self, detections: ImageDetections) -> dict:
        if self.score_thr is not None:
            detections = detections.above(self.score_thr)
        return detections.to_dict()

    def health(self) -> dict:
        metadata = self.backend.metadata
        return {'status': 'ok', 'model': self.backend.source, 'arch': metadata.arch,
                'backend': self.backend.name, 'classes': len(metadata.class_names),
                'input_size': list(metadata.preprocess.input_size),
                'batch': 'dynamic' if metadata.batch is None else metadata.batch}
