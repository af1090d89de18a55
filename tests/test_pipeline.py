"""The host-side loop: batching, rescaling to original pixels, clamping, dropping padding boxes."""
import numpy as np

from conftest import fake_metadata
from detdeploy.runtimes.backend import Backend
from detdeploy.runtimes.pipeline import detect


class FixedOutputBackend(Backend):
    """Returns the same network-pixel detections for every image and records batch shapes."""
    name = 'fixed'
    metadata = fake_metadata((64, 64), ('a', 'b'))

    def __init__(self):
        self.batch_shapes = []

    def _run(self, batch):
        self.batch_shapes.append(batch.shape)
        size = len(batch)
        boxes = np.array([[8, 8, 24, 16], [40, 10, 80, 30], [10, 40, 20, 60], [0, 0, 0, 0]],
                         dtype=np.float32)
        return (np.full((size, 1), 3, np.int32), np.repeat(boxes[None], size, 0),
                np.repeat(np.array([[0.9, 0.8, 0.7, 0.0]], np.float32), size, 0),
                np.repeat(np.array([[1, 0, 1, -1]], np.int32), size, 0))


def test_rescale_clamp_and_drop_boxes_in_padding():
    backend = FixedOutputBackend()
    image = np.zeros((16, 32, 3), dtype=np.uint8)          # resized x2 to 32x64, padded to 64x64
    results = list(detect(backend, [image, image, image], batch_size=2))
    assert backend.batch_shapes == [(2, 3, 64, 64), (1, 3, 64, 64)]
    detections, kept_image = results[0]
    assert kept_image is None and detections.image_hw == (16, 32)
    # box 1 is clamped to the image's right edge; box 2 lies wholly in the padding (y >= 32)
    np.testing.assert_allclose(detections.boxes_xyxy_px, [[4, 4, 12, 8], [20, 5, 32, 15]])
    assert detections.labels.tolist() == [1, 0]
    np.testing.assert_allclose(detections.scores, [0.9, 0.8])
    assert detections.to_dict()['detections'][0]['label_name'] == 'b'
