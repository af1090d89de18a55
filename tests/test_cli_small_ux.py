"""Small CLI behaviours a new user meets: the `predict` alias, help texts, the note that a
deploy-preset file is not scored at the eval preset."""
from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from conftest import fake_metadata
from detdeploy.cli import cli
from detdeploy.commands.eval import _not_eval_preset
from detdeploy.core.nms import NMSConfig


def test_predict_is_infer():
    assert cli.get_command(None, 'predict') is cli.get_command(None, 'infer')


def test_every_option_has_help():
    """`eval --batch` once had none; no option of any command may lack it."""
    missing = [f'{name} {option.opts[0]}' for name, command in cli.commands.items()
               for option in command.params
               if option.param_type_name == 'option' and not option.help
               and option.opts[0] not in ('--help',)]
    assert missing == []


def test_eval_help_names_batch():
    result = CliRunner().invoke(cli, ['eval', '--help'])
    assert 'Images per forward pass' in result.output


def test_eval_says_a_deploy_preset_file_is_not_the_eval_preset():
    from detdeploy.models.registry import get_spec
    spec = get_spec('rtmdet-tiny')
    deploy = fake_metadata(nms=spec.nms('deploy'))
    note = _not_eval_preset('m.onnx', deploy)
    assert "not rtmdet-tiny's eval preset" in note and '--nms-preset eval' in note
    assert _not_eval_preset('m.onnx', fake_metadata(nms=spec.nms('eval'))) is None
    assert _not_eval_preset('m.onnx', fake_metadata(arch='foreign', nms=NMSConfig())) is None
    agnostic = dataclasses.replace(spec.nms('eval'), class_agnostic=True)
    assert _not_eval_preset('m.onnx', fake_metadata(nms=agnostic)) is not None


def test_eval_refuses_a_backend_a_file_cannot_run_on(tmp_path, capsys):
    """eval has one MODEL: a backend it cannot run on is an error, never silently dropped."""
    from detdeploy.cli import main
    model = tmp_path / 'model.onnx'
    model.write_bytes(b'not read: the backends are checked first')
    ann = tmp_path / 'ann.json'
    ann.write_text('{}')
    with pytest.raises(SystemExit) as exit_info:
        main(['eval', str(model), '--backend', 'torch,ort', '--ann', str(ann), '--images',
              str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f'error: --backend torch: {model} is a file and runs on ort only; for PyTorch give the '
        'registry name (with --checkpoint), or compare both with detdeploy parity']
