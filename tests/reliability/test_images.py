"""Image files: every Pillow mode a user may have becomes the right RGB array; unreadable,
truncated, empty and oversized files are one-line errors, the size limit checked from the
header before decoding; `infer` over a folder skips bad images (warning each) and exits 2 at
the end, while `parity` and `eval` stop at the first one."""
import io
import json
import re
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

import io_helpers
from detdeploy.core.errors import ImageError
from detdeploy.runtimes.preprocess import DEFAULT_MAX_PIXELS, allow_pixels, read_image


def png_header_only(path, width: int, height: int):
    """A PNG that claims width x height (1-bit gray) with almost no data: what a decompression
    bomb looks like before it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack('>I', len(data)) + body + struct.pack('>I', zlib.crc32(body))
    ihdr = struct.pack('>IIBBBBB', width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) +
                     chunk(b'IDAT', zlib.compress(b'\x00' * 64)) + chunk(b'IEND', b''))
    return path


# ---- modes ------------------------------------------------------------------------------

def test_gray_gray_alpha_and_rgba(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, 'L').save(tmp_path / 'l.png')
    np.testing.assert_array_equal(read_image(tmp_path / 'l.png'), np.dstack([gray] * 3))
    Image.fromarray(np.dstack([gray, np.full_like(gray, 9)]), 'LA').save(tmp_path / 'la.png')
    np.testing.assert_array_equal(read_image(tmp_path / 'la.png'), np.dstack([gray] * 3))
    rgba = np.dstack([gray, gray // 2, gray // 4, np.zeros_like(gray)])      # fully transparent
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
    np.testing.assert_array_equal(read_image(tmp_path / 'rgba.png'), rgba[:, :, :3])


def test_16_bit_images_keep_their_high_byte_not_clipped(tmp_path):
    values = np.array([[0, 255, 256, 4095], [32768, 40000, 65280, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / 'i16.png')          # Pillow reads it as I;16
    with Image.open(tmp_path / 'i16.png') as image:
        assert image.mode == 'I;16'
    want = (values >> 8).astype(np.uint8)                     # libpng / OpenCV: the high byte
    np.testing.assert_array_equal(read_image(tmp_path / 'i16.png'), np.dstack([want] * 3))
    Image.fromarray(values.astype(np.int32), 'I').save(tmp_path / 'i32.tif')
    np.testing.assert_array_equal(read_image(tmp_path / 'i32.tif'), np.dstack([want] * 3))
    Image.fromarray(np.array([[-5, 70000]], np.int32), 'I').save(tmp_path / 'wide.tif')
    with pytest.raises(ImageError, match='outside 0..65535'):
        read_image(tmp_path / 'wide.tif')
    Image.fromarray(np.ones((2, 2), np.float32), 'F').save(tmp_path / 'f.tif')
    with pytest.raises(ImageError, match='floating-point images are not supported'):
        read_image(tmp_path / 'f.tif')


def test_palette_with_and_without_transparency(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(4)
    palette.save(tmp_path / 'p.png')
    palette.save(tmp_path / 'p_trns.png', transparency=bytes([0, 50, 255, 255]))
    palette.save(tmp_path / 'p_trns.gif', transparency=1)
    want = np.asarray(palette.convert('RGB'))
    for name in ('p.png', 'p_trns.png', 'p_trns.gif'):
        with warnings.catch_warnings():
            warnings.simplefilter('error')        # Pillow's "should be converted to RGBA"
            np.testing.assert_array_equal(read_image(tmp_path / name), want)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[0, 0] = 255                                     # a white top-left corner
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6                                       # rotate 90 degrees clockwise to view
    image.save(tmp_path / 'rotated.png', exif=exif)
    got = read_image(tmp_path / 'rotated.png')
    assert got.shape == (20, 10, 3)
    assert got[0, -1].tolist() == [255, 255, 255]          # the corner is now top-right


def test_cmyk_and_bilevel_convert(tmp_path):
    Image.new('CMYK', (4, 3), (0, 255, 255, 0)).save(tmp_path / 'cmyk.jpg')
    assert read_image(tmp_path / 'cmyk.jpg').shape == (3, 4, 3)
    Image.new('1', (4, 3), 1).save(tmp_path / 'bits.png')
    assert read_image(tmp_path / 'bits.png').tolist() == [[[255] * 3] * 4] * 3


# ---- broken files -----------------------------------------------------------------------

def broken_files(tmp_path) -> dict:
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(
        good, format='JPEG')
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), np.uint8)).save(
        png, format='PNG')
    files = {
        'text.jpg': b'just some text, not an image',
        'empty.png': b'',
        'truncated.jpg': good.getvalue()[:len(good.getvalue()) // 2],
        'truncated.png': png.getvalue()[:len(png.getvalue()) // 2],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


@pytest.mark.parametrize('name, message', [
    ('text.jpg', 'not an image, or a format Pillow cannot decode'),
    ('empty.png', 'the file is empty'),
    ('truncated.jpg', 'cannot read image'),
    ('truncated.png', 'cannot read image'),
])
def test_unreadable_files_are_one_line_errors(tmp_path, name, message):
    path = broken_files(tmp_path)[name]
    with pytest.raises(ImageError, match=re.escape(message)) as error:
        read_image(path)
    assert str(path) in str(error.value) and '\n' not in str(error.value)
    with pytest.raises(ImageError, match='is a directory'):
        read_image(tmp_path)


def test_decompression_bomb_refused_from_its_header(tmp_path):
    """144 megapixels: above our default limit (100) but below Pillow's error (179), so only
    our check stops it, before any decoding (the file holds almost no data) and without
    Pillow's warning."""
    bomb = png_header_only(tmp_path / 'bomb.png', 12000, 12000)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with pytest.raises(ImageError, match=r'12000x12000 = 144\.0 megapixels, above the limit '
                                             r'of 100 \(--max-pixels; 0 = no limit\)'):
            read_image(bomb)
    assert DEFAULT_MAX_PIXELS == 100_000_000
    with pytest.raises(ImageError, match='above the limit of 0.001'):
        read_image(io_helpers.save_image(tmp_path / 'small.png'), max_pixels=1000)


def test_beyond_pillows_own_limit_is_still_one_line(tmp_path, monkeypatch):
    # Pillow's default, whatever an earlier in-process command (--max-pixels 0) left
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', int(1024 * 1024 * 1024 // 4 // 3))
    bomb = png_header_only(tmp_path / 'huge.png', 20000, 20000)           # 400 MP
    with pytest.raises(ImageError, match='larger than Pillow allows'):
        read_image(bomb, max_pixels=None)
    allow_pixels(500_000_000)              # what the CLI does for --max-pixels 500000000
    assert Image.MAX_IMAGE_PIXELS == 500_000_000
    with pytest.raises(ImageError, match='above the limit of 300'):
        read_image(bomb, max_pixels=300_000_000)
    allow_pixels(0)
    assert Image.MAX_IMAGE_PIXELS is None


# ---- what the commands do with a bad image ----------------------------------------------

@pytest.fixture
def mixed_folder(tmp_path):
    folder = tmp_path / 'images'
    folder.mkdir()
    io_helpers.save_image(folder / 'a_good.png', seed=1)
    (folder / 'b_text.jpg').write_bytes(b'not an image')
    io_helpers.save_image(folder / 'c_good.png', seed=2)
    png_header_only(folder / 'd_bomb.png', 12000, 12000)
    (folder / 'e_empty.png').write_bytes(b'')
    return folder


def test_infer_skips_bad_images_warns_and_exits_2(tmp_path, mixed_folder, capsys):
    model = io_helpers.save(io_helpers.detector_model(), tmp_path / 'm.onnx')
    out = tmp_path / 'out'
    code, stdout, err = io_helpers.run_main(capsys, 'infer', model, mixed_folder, '--out', out,
                                            '--batch', 2)
    assert code == 2 and 'Traceback' not in err
    lines = err.strip().splitlines()
    assert [line.split(':')[0] for line in lines] == ['warning'] * 3 + ['error']
    assert 'b_text.jpg' in lines[0] and 'd_bomb.png' in lines[1] and 'e_empty.png' in lines[2]
    assert all(line.endswith('; skipped') for line in lines[:3])
    assert lines[3] == ('error: 3 of 5 images could not be read (warnings above); the others '
                        'were processed')
    assert sorted(p.name for p in out.iterdir()) == [
        'a_good.json', 'a_good.png', 'c_good.json', 'c_good.png', 'coco_results.json']
    rows = json.loads((out / 'coco_results.json').read_text())
    # image_id is the position in the sorted input, so ids do not shift past a bad image
    assert [(r['image_id'], r['file_name'].split('/')[-1]) for r in rows] == [
        (0, 'a_good.png'), (2, 'c_good.png')]
    assert len(stdout.strip().splitlines()) == 4        # NMS settings, two images, results


def test_infer_max_pixels_flag(tmp_path, capsys):
    model = io_helpers.save(io_helpers.detector_model(), tmp_path / 'm.onnx')
    image = io_helpers.save_image(tmp_path / 'x.png')                     # 4096 pixels
    code, _, err = io_helpers.run_main(capsys, 'infer', model, image, '--max-pixels', 4000)
    assert code == 2 and 'above the limit of 0.004 (--max-pixels' in err
    code, out, err = io_helpers.run_main(capsys, 'infer', model, image, '--max-pixels', 0)
    assert code == 0, err
    code, _, err = io_helpers.run_main(capsys, 'infer', model, image, '--max-pixels', -1)
    io_helpers.assert_one_line_error(code, err, "Invalid value for '--max-pixels'")


def test_parity_and_eval_stop_at_a_bad_image(tmp_path, mixed_folder, capsys):
    """A comparison or an mAP over fewer images than asked for would mislead: one line, exit
    2."""
    model = io_helpers.save(io_helpers.detector_model(), tmp_path / 'm.onnx')
    code, _, err = io_helpers.run_main(capsys, 'parity', model, '--images', mixed_folder)
    io_helpers.assert_one_line_error(code, err, 'b_text.jpg: not an image')
    coco = {'images': [{'id': 1, 'file_name': 'a_good.png', 'height': 64, 'width': 64},
                       {'id': 2, 'file_name': 'b_text.jpg', 'height': 64, 'width': 64}],
            'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [4, 8, 36, 40]}],
            'categories': [{'id': 1, 'name': 'circle'}, {'id': 2, 'name': 'square'}]}
    (tmp_path / 'ann.json').write_text(json.dumps(coco))
    code, _, err = io_helpers.run_main(capsys, 'eval', model, '--ann', tmp_path / 'ann.json',
                                       '--images', mixed_folder)
    io_helpers.assert_one_line_error(code, err, 'b_text.jpg: not an image')
