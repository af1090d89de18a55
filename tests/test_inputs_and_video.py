"""Inputs a user expects: folders (recursive with --recursive), quoted globs, several paths, and
video files (decoded with PyAV, written back as an annotated video and per-frame JSON)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detdeploy.cli import main as cli_main
from detdeploy.core.errors import DetdeployError
from detdeploy.inference.batch import collect_images
from detdeploy.models.synthetic_weights import make_image

av = pytest.importorskip('av', reason='PyAV is the video extra (and in the test extra)')


def run_main(capsys, *args) -> tuple[int, str, str]:
    try:
        cli_main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """top/a.png, top/b.jpg, top/notes.txt, top/sub/c.png, top/sub/deeper/d.png"""
    top = tmp_path_factory.mktemp('tree')
    (top / 'sub' / 'deeper').mkdir(parents=True)
    for index, name in enumerate(['a.png', 'b.jpg', 'sub/c.png', 'sub/deeper/d.png']):
        Image.fromarray(make_image(48, 64, index)).save(top / name)
    (top / 'notes.txt').write_text('not an image')
    return top


def names(paths, top):
    return [str(p.relative_to(top)) for p in paths]


def test_folders_are_searched_recursively_only_when_asked(tree):
    assert names(collect_images([tree]), tree) == ['a.png', 'b.jpg']
    assert names(collect_images([tree], recursive=True), tree) == [
        'a.png', 'b.jpg', 'sub/c.png', 'sub/deeper/d.png']
    empty = tree / 'sub' / 'nothing_here'
    empty.mkdir(exist_ok=True)
    with pytest.raises(DetdeployError, match=r'no images found in: .*\(--recursive searches'):
        collect_images([empty])


def test_globs_and_several_paths_in_the_order_given(tree):
    assert names(collect_images([f'{tree}/*.png']), tree) == ['a.png']
    assert names(collect_images([f'{tree}/**/*.png']), tree) == [
        'a.png', 'sub/c.png', 'sub/deeper/d.png']
    assert names(collect_images([tree / 'sub' / 'c.png', f'{tree}/*.jpg', tree / 'a.png']),
                 tree) == ['sub/c.png', 'b.jpg', 'a.png']
    with pytest.raises(DetdeployError, match=r'no images match .*\*\.gif'):
        collect_images([f'{tree}/*.gif'])


def test_infer_takes_a_recursive_folder_and_a_glob(tree, tmp_path, capsys, one_torch_thread):
    code, out, err = run_main(capsys, 'infer', 'rtmdet', tree, f'{tree}/sub/*.png',
                              '--recursive', '--input-size', '64')
    assert code == 0, err
    sources = [line.split(': ')[0] for line in out.splitlines() if ' detections, ' in line]
    assert names(map(Path, sources), tree) == [
        'a.png', 'b.jpg', 'sub/c.png', 'sub/deeper/d.png', 'sub/c.png']


def test_parity_takes_image_paths_after_the_model_file(capsys):
    code, _, err = run_main(capsys, 'parity', 'missing.onnx', 'a.png', 'b.png', '--random', '1')
    assert code == 2 and 'give either images' in err        # the paths count as images


FRAMES, HEIGHT, WIDTH = 6, 96, 128


@pytest.fixture(scope='module')
def video(tmp_path_factory):
    """A short H.264 video of generated images, written with PyAV."""
    path = tmp_path_factory.mktemp('video') / 'clip.mp4'
    with av.open(str(path), mode='w') as container:
        stream = container.add_stream('libx264' if 'libx264' in av.codecs_available
                                      else 'mpeg4', rate=10)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, 'yuv420p'
        for index in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(make_image(HEIGHT, WIDTH, index), format='rgb24')
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_video_frames_out_as_annotated_video_and_json(video, tmp_path, capsys, one_torch_thread):
    out = tmp_path / 'out'
    code, stdout, err = run_main(capsys, 'infer', 'rtmdet', video, '--out', out, '--batch', 4,
                                 '--show-thr', 0.05, '--input-size', '64')
    assert code == 0, err
    line = next(line for line in stdout.splitlines() if line.startswith(str(video)))
    assert f'{FRAMES} frames' in line and str(out / 'clip.mp4') in line
    record = json.loads((out / 'clip.json').read_text())
    assert record['fps'] == 10 and [f['frame'] for f in record['frames']] == list(range(FRAMES))
    assert record['frames'][3]['time_s'] == pytest.approx(0.3)
    assert all((f['height'], f['width']) == (HEIGHT, WIDTH) for f in record['frames'])
    assert sum(len(f['detections']) for f in record['frames']) > 0
    with av.open(str(out / 'clip.mp4')) as container:
        decoded = [f.to_ndarray(format='rgb24') for f in container.decode(video=0)]
    with av.open(str(video)) as container:
        original = [f.to_ndarray(format='rgb24') for f in container.decode(video=0)]
    assert len(decoded) == FRAMES and decoded[0].shape == (HEIGHT, WIDTH, 3)
    # boxes were drawn: the written frames differ from the input beyond codec noise
    assert max(np.abs(a.astype(int) - b).max() for a, b in zip(decoded, original)) > 100


def test_video_output_never_overwrites_the_input(video, capsys):
    code, _, err = run_main(capsys, 'infer', 'rtmdet', video, '--out', video.parent)
    assert code == 2 and 'would overwrite the input' in err
