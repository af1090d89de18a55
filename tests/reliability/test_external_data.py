"""ONNX files with external data: locations outside the model's folder (absolute, `..`, a
symlink leading out), missing data files and sizes that do not fit are refused in one line
(exit 2) before ONNX Runtime, `parity` or `build-engine` opens the file."""
import re
import shutil

import numpy as np
import pytest

import io_helpers
from detdeploy.core.errors import ModelFileError
from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend

BOX = 'box'                     # the initializer whose external data the tests edit (16 bytes)


@pytest.fixture
def external(tmp_path):
    """A valid model with its initializers in weights.bin next to it."""
    folder = tmp_path / 'model'
    folder.mkdir()
    return io_helpers.save_with_external_data(io_helpers.detector_model(), folder / 'm.onnx')


def test_valid_external_data_runs(external):
    backend = OnnxRuntimeBackend(external)
    num_dets, boxes, _, _ = backend.run(np.zeros((1, 3, 64, 64), np.float32))
    assert num_dets[0, 0] == 1 and boxes[0, 0].tolist() == io_helpers.BOX_XYXY


def outside_file(tmp_path):
    secret = tmp_path / 'secret.bin'
    secret.write_bytes(bytes(64))
    return secret


@pytest.mark.parametrize('case, message', [
    ('absolute', 'reads its data from the absolute path'),
    ('dotdot', "outside the model's directory"),
    ('symlink', "outside the model's directory"),
    ('missing', 'is missing (looked for'),
    ('past_end', 'the data file is truncated or belongs to another model'),
    ('short', 'needs 16 bytes'),
    ('offset', 'needs 16 bytes'),
    ('no_number', 'non-numeric external data offset or length'),
])
def test_unsafe_or_broken_external_data_is_refused(external, tmp_path, case, message):
    secret = outside_file(tmp_path)
    if case == 'absolute':
        io_helpers.edit_external_data(external, BOX, location=str(secret))
    elif case == 'dotdot':
        io_helpers.edit_external_data(external, BOX, location='../secret.bin', offset='0',
                                      length='16')
    elif case == 'symlink':
        (external.parent / 'link.bin').symlink_to(secret)
        io_helpers.edit_external_data(external, BOX, location='link.bin', offset='0',
                                      length='16')
    elif case == 'missing':
        (external.parent / 'weights.bin').unlink()
    elif case == 'past_end':
        io_helpers.edit_external_data(external, BOX, offset='100000', length='16')
    elif case == 'short':
        io_helpers.edit_external_data(external, BOX, length='8')
    elif case == 'offset':      # no length: the rest of the file from the offset, too much
        io_helpers.edit_external_data(external, BOX, drop=('length',), offset='8')
    elif case == 'no_number':
        io_helpers.edit_external_data(external, BOX, offset='zero')
    with pytest.raises(ModelFileError, match=re.escape(message)) as error:
        OnnxRuntimeBackend(external)
    assert '\n' not in str(error.value)


def test_cli_refuses_before_any_session_in_infer_parity_and_build_engine(external, tmp_path,
                                                                         capsys):
    secret = outside_file(tmp_path)
    io_helpers.edit_external_data(external, BOX, location='../secret.bin', offset='0',
                                  length='16')
    image = tmp_path / 'x.png'
    io_helpers.save_image(image)
    for args in (['infer', external, image],
                 ['parity', external, '--random', '1'],
                 ['build-engine', external, '-o', tmp_path / 'm.engine']):
        code, _, err = io_helpers.run_main(capsys, *args)
        io_helpers.assert_one_line_error(code, err, "outside the model's directory")
    assert not (tmp_path / 'm.engine').exists()


def test_real_process_exit_code(external, tmp_path):
    shutil.move(external.parent / 'weights.bin', tmp_path / 'elsewhere.bin')
    image = tmp_path / 'x.png'
    io_helpers.save_image(image)
    done = io_helpers.run_subprocess('infer', external, image)
    io_helpers.assert_one_line_error(done.returncode, done.stderr,
                                     'external data file weights.bin of tensor')
