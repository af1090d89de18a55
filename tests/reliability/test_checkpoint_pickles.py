"""Checkpoints are read with `torch.load(weights_only=True)`: a pickled custom class or a
payload that would run code is refused in one line naming `--trust-checkpoint`, and nothing in
it runs; `--trust-checkpoint` opts in for files the user trusts."""
import os
import textwrap

import pytest
import torch

import io_helpers
from detdeploy.core.errors import CheckpointError
from detdeploy.models import load_detector, read_checkpoint
from detdeploy.models.registry import build_model

STATE_MODULE = '''
class TrainingState:
    """A custom class a training framework might pickle into its checkpoints."""
    def __init__(self, epoch):
        self.epoch = epoch
'''


@pytest.fixture(scope='module')
def tiny_state_dict():
    torch.manual_seed(0)
    return build_model('rtmdet-tiny', num_classes=2).state_dict()


@pytest.fixture
def custom_class_checkpoint(tmp_path, monkeypatch, tiny_state_dict):
    (tmp_path / 'framework_state.py').write_text(textwrap.dedent(STATE_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import framework_state
    path = tmp_path / 'custom.pth'
    torch.save({'meta': {'state': framework_state.TrainingState(7)},
                'state_dict': tiny_state_dict}, path)
    return path


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_custom_class_refused_then_trusted(custom_class_checkpoint):
    with pytest.raises(CheckpointError, match=(
            r'needs arbitrary unpickling to load \(it stores framework_state.TrainingState\); '
            'if you trust its source, pass --trust-checkpoint')):
        read_checkpoint(custom_class_checkpoint)
    detector = load_detector('rtmdet-tiny', custom_class_checkpoint, trust=True)
    assert len(detector.class_names) == 2


def test_code_in_a_checkpoint_never_runs(tmp_path, tiny_state_dict):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': tiny_state_dict, 'hook': RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match=r'it stores (posix|os)\.system, a function that '
                                              r'would run while loading\); if you trust'):
        read_checkpoint(path)
    assert not marker.exists()


def test_cli_one_line_and_opt_in(custom_class_checkpoint, tmp_path, capsys):
    image = io_helpers.save_image(tmp_path / 'x.png')
    code, _, err = io_helpers.run_main(capsys, 'infer', '--model', 'rtmdet-tiny', '--checkpoint',
                                       custom_class_checkpoint, image)
    io_helpers.assert_one_line_error(code, err, 'pass --trust-checkpoint')
    code, out, err = io_helpers.run_main(capsys, 'infer', '--model', 'rtmdet-tiny',
                                         '--checkpoint', custom_class_checkpoint,
                                         '--trust-checkpoint', '--input-size', 64, image)
    assert code == 0, err
    assert out.splitlines()[0].startswith('nms: ') and out.splitlines()[1].startswith(f'{image}: ')
