"""Numpy preprocessing against hand-computed values: resize rule, bilinear taps, pad, normalise."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import DATA_DIR
from detdeploy.core.errors import ImageError
from detdeploy.core.preprocessing import PreprocessConfig
from detdeploy.runtimes.preprocess import (ImageMeta,
                                           preprocess, read_image, rescale_boxes, resize_bilinear)


@pytest.mark.parametrize('original, expected', [
    ((300, 400), (480, 640)),      # scale 1.6, limited by the long side
    ((500, 333), (640, 426)),      # 333 * 1.28 = 426.24
    ((1000, 10), (640, 6)),        # 10 * 0.64 = 6.4
    ((640, 640), (640, 640)),
    ((10, 1000), (6, 640)),
])
def test_keep_ratio_size(original, expected):
    assert PreprocessConfig(input_size=(640, 640)).resized_size(original) == expected


def test_keep_ratio_size_fits_non_square_inputs():
    assert PreprocessConfig(input_size=(256, 384)).resized_size((500, 333)) == (256, 170)
    assert PreprocessConfig(input_size=(256, 384)).resized_size((300, 400)) == (256, 341)


def test_bilinear_upsample_matches_hand_computation():
    # OpenCV maps dst x to src (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25: weights per axis are
    # [1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1] (edges replicated).
    image = np.array([[0, 100], [200, 255]], dtype=np.uint8)[:, :, None].repeat(3, axis=2)
    expected = np.array([
        [0, 25, 75, 100],
        [50, 72, 117, 139],          # 0.75*[0,25,75,100] + 0.25*[200,213.75,241.25,255]
        [150, 167, 200, 216],        # 0.25*row0 + 0.75*row1, rounded half up
        [200, 214, 241, 255],
    ], dtype=np.uint8)
    resized = resize_bilinear(image, (4, 4))
    assert resized.dtype == np.uint8
    np.testing.assert_array_equal(resized[:, :, 0], expected)
    np.testing.assert_array_equal(resized[:, :, 2], expected)


def test_bilinear_identity_and_downsample_by_two():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_bilinear(image, (6, 8)), image)
    # Halving maps dst x to src 2x + 0.5: the mean of each 2x2 block, rounded half up.
    half = resize_bilinear(image, (3, 4)).astype(int)
    blocks = image.astype(int).reshape(3, 2, 4, 2, 3).sum(axis=(1, 3))
    np.testing.assert_array_equal(half, (blocks * 1024 * 1024 + (1 << 21)) >> 22)


def test_preprocess_pads_normalises_and_orders_channels():
    config = PreprocessConfig(input_size=(64, 64))
    image = np.zeros((16, 32, 3), dtype=np.uint8)
    image[:] = (10, 20, 30)                                  # RGB
    tensor, meta = preprocess(image, config)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == np.float32
    assert meta == ImageMeta((16, 32), (32, 64), (2.0, 2.0))
    expected_bgr = [(30 - 103.53) / 57.375, (20 - 116.28) / 57.12, (10 - 123.675) / 58.395]
    np.testing.assert_allclose(tensor[:, 0, 0], expected_bgr, rtol=1e-6)
    np.testing.assert_allclose(tensor[:, 31, 63], expected_bgr, rtol=1e-6)
    expected_pad = [(114 - 103.53) / 57.375, (114 - 116.28) / 57.12, (114 - 123.675) / 58.395]
    np.testing.assert_allclose(tensor[:, 32, 0], expected_pad, rtol=1e-6)
    np.testing.assert_allclose(tensor[:, 63, 63], expected_pad, rtol=1e-6)


def test_scale_resize_divisor_pad_after_normalising():
    """MMDetection's (1333, 800) keep-ratio rule, padding to a multiple of 32 and, like its
    DetDataPreprocessor, padding the normalised image with 0 (RetinaNet, Faster R-CNN)."""
    config = PreprocessConfig(input_size=(800, 1333), channel_order='rgb',
                              mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
                              pad_value=0.0, resize='scale', pad='divisor', pad_fill='mean')
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    image[:] = (10, 20, 30)
    tensor, meta = preprocess(image, config)
    assert meta.resized_hw == (800, 1067) and tensor.shape == (3, 800, 1088)
    np.testing.assert_allclose(tensor[:, 0, 1066], [(10 - 123.675) / 58.395,
                                                    (20 - 116.28) / 57.12,
                                                    (30 - 103.53) / 57.375], rtol=1e-6)
    assert (tensor[:, :, 1067:] == 0).all()
    assert PreprocessConfig.from_dict(config.to_dict()) == config


def test_rgb_channel_order_keeps_rgb():
    config = PreprocessConfig(input_size=(32, 32), channel_order='rgb', mean=(0, 0, 0),
                              std=(1, 1, 1))
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[:] = (10, 20, 30)
    tensor, _ = preprocess(image, config)
    np.testing.assert_array_equal(tensor[:, 5, 5], [10, 20, 30])


def test_rescale_boxes_back_to_original_and_clamps():
    meta = ImageMeta((300, 400), (480, 640), (1.6, 1.6))
    boxes = np.array([[16, 32, 160, 320], [600, 400, 700, 500]], dtype=np.float32)
    np.testing.assert_allclose(rescale_boxes(boxes, meta), [[10, 20, 100, 200], [375, 250, 400, 300]])


def test_read_image_modes(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(gray).save(tmp_path / 'gray.png')
    np.testing.assert_array_equal(read_image(tmp_path / 'gray.png'), gray[:, :, None].repeat(3, 2))

    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 7
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
    assert read_image(tmp_path / 'rgba.png')[0, 0].tolist() == [200, 0, 0]

    Image.fromarray(rgba[..., :3]).convert('P').save(tmp_path / 'palette.png')
    assert read_image(tmp_path / 'palette.png').shape == (3, 4, 3)

    wide = Image.fromarray(np.zeros((10, 20, 3), dtype=np.uint8))
    exif = wide.getexif()
    exif[0x0112] = 6                                  # orientation: rotate 90 degrees clockwise
    wide.save(tmp_path / 'rotated.jpg', exif=exif)
    assert read_image(tmp_path / 'rotated.jpg').shape == (20, 10, 3)


def test_read_image_arrays():
    bgr = np.zeros((2, 2, 3), dtype=np.uint8)
    bgr[..., 0] = 255                                         # blue in OpenCV order
    assert read_image(bgr)[0, 0].tolist() == [0, 0, 255]
    assert read_image(bgr, array_order='rgb')[0, 0].tolist() == [255, 0, 0]
    assert read_image(np.full((2, 3), 9, np.uint8)).shape == (2, 3, 3)
    assert read_image(np.zeros((2, 2, 4), np.uint8)).shape == (2, 2, 3)
    with pytest.raises(ImageError, match='uint8'):
        read_image(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ImageError, match='shape'):
        read_image(np.zeros((2, 2, 2), np.uint8))


def test_read_image_errors(tmp_path):
    with pytest.raises(ImageError, match='not found'):
        read_image(tmp_path / 'missing.jpg')
    (tmp_path / 'bad.jpg').write_bytes(b'not an image')
    with pytest.raises(ImageError, match='cannot read image'):
        read_image(tmp_path / 'bad.jpg')


def test_bilinear_matches_opencv_bit_for_bit():
    """Against cv2.resize outputs stored in tests/data (OpenCV is not a dependency)."""
    reference = json.loads((DATA_DIR / 'opencv_resize_reference.json').read_text())
    for case in reference['cases']:
        image = np.random.default_rng(case['seed']).integers(
            0, 256, (*case['input_hw'], 3), dtype=np.uint8)
        np.testing.assert_array_equal(resize_bilinear(image, tuple(case['output_hw'])),
                                      np.array(case['output'], dtype=np.uint8))


def _pad_then_normalise(image, config, canvas_hw):
    """MMDetection's order written plainly (resize, channel order, pad an HWC canvas, then
    scale, subtract and divide in float32 over the whole canvas), the reference for the
    batch path that writes each channel plane in place."""
    resized_hw = config.resized_size(image.shape[:2])
    resized = resize_bilinear(image, resized_hw).astype(np.float32)
    if config.channel_order == 'bgr':
        resized = resized[:, :, ::-1]
    mean, std = np.float32(config.mean), np.float32(config.std)
    if config.pad_fill == 'mean':
        canvas = np.zeros((*canvas_hw, 3), np.float32)
        normalised = resized * np.float32(config.pixel_scale) if config.pixel_scale != 1 else resized
        canvas[:resized_hw[0], :resized_hw[1]] = (normalised - mean) / std
    else:
        canvas = np.full((*canvas_hw, 3), config.pad_value, np.float32)
        canvas[:resized_hw[0], :resized_hw[1]] = resized
        if config.pixel_scale != 1:
            canvas = canvas * np.float32(config.pixel_scale)
        canvas = (canvas - mean) / std
    return canvas.transpose(2, 0, 1)


@pytest.mark.parametrize('config', [
    PreprocessConfig(input_size=(96, 128)),                                   # RTMDet, BGR
    PreprocessConfig(input_size=(96, 128), channel_order='rgb', pad_value=0.0, pixel_scale=1 / 255,
                     mean=(0, 0, 0), std=(1, 1, 1)),                          # YOLO-style
    PreprocessConfig(input_size=(100, 160), channel_order='rgb', resize='scale', pad='divisor',
                     pad_fill='mean', mean=(123.675, 116.28, 103.53),
                     std=(58.395, 57.12, 57.375)),                            # RetinaNet-style
])
def test_batch_written_in_place_equals_pad_then_normalise(config):
    """prepare_batch writes each image straight into its slot of the batch (no canvas, no
    stack); every value must equal the plain pad-then-normalise order, bit for bit."""
    from detdeploy.runtimes.pipeline import prepare_batch
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=shape, dtype=np.uint8)
              for shape in [(37, 211, 3), (96, 128, 3), (150, 90, 3), (1, 1, 3)]]
    batch, metas = prepare_batch(images, config)
    canvas_hw = batch.shape[2:]
    for image, tensor, meta in zip(images, batch, metas):
        np.testing.assert_array_equal(tensor, _pad_then_normalise(image, config, canvas_hw))
        assert meta.resized_hw == config.resized_size(image.shape[:2])


def test_bilinear_resize_of_a_single_channel_image():
    image = np.arange(30, dtype=np.uint8).reshape(5, 6)
    rgb = np.repeat(image[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(resize_bilinear(image, (3, 9)),
                                  resize_bilinear(rgb, (3, 9))[:, :, 0])
