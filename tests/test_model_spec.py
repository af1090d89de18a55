"""Every RTMDet size has exactly MMDetection 3.3.0's state-dict keys, shapes, dtypes and size."""
import re

import pytest
import torch

from conftest import SPEC_DIR
from detdeploy.models import MODEL_SPECS, build_model

SIZES = ['tiny', 's', 'm', 'l', 'x']
PUBLISHED_PARAMS_M = {'tiny': 4.90, 's': 8.89, 'm': 24.71, 'l': 52.3, 'x': 94.86}


def read_spec(size):
    text = (SPEC_DIR / f'keys_{size}.txt').read_text().splitlines()
    header = text[0]
    unique_params = int(re.search(r'(\d+) unique parameters', header).group(1))
    keys = {}
    for line in text[1:]:
        key, shape, dtype = line.split('\t')
        keys[key] = (tuple(int(d) for d in re.findall(r'\d+', shape)), dtype)
    return keys, unique_params


@pytest.mark.parametrize('size', SIZES)
def test_state_dict_matches_spec(size):
    spec_keys, spec_params = read_spec(size)
    model = build_model(f'rtmdet-{size}')
    ours = {k: (tuple(v.shape), str(v.dtype).replace('torch.', ''))
            for k, v in model.state_dict().items()}
    assert list(ours) == list(spec_keys)
    assert ours == spec_keys
    unique_params = sum(p.numel() for p in model.parameters())
    assert unique_params == spec_params
    published = PUBLISHED_PARAMS_M[size]
    decimals = len(str(published).split('.')[1])
    assert round(unique_params / 1e6, decimals) == published


def test_head_convs_shared_across_levels_bn_separate():
    head = build_model('rtmdet-tiny').bbox_head
    assert head.cls_convs[2][1].conv is head.cls_convs[0][1].conv
    assert head.reg_convs[1][0].conv is head.reg_convs[0][0].conv
    assert head.cls_convs[1][0].bn is not head.cls_convs[0][0].bn


def test_size_options_as_official_configs():
    assert [MODEL_SPECS[f'rtmdet-{s}'].arch['exp_on_reg'] for s in SIZES] == [False, False, True, True, True]
    bn = build_model('rtmdet-s').backbone.stem[0].bn
    assert (bn.eps, bn.momentum) == (1e-5, 0.1)      # SyncBN defaults, not CSPNeXt's 1e-3/0.03


def test_raw_output_shapes_and_initial_scores():
    model = build_model('rtmdet-tiny')
    with torch.no_grad():
        raw = model(torch.zeros(2, 3, 320, 256))
    assert [tuple(s.shape) for s in raw.cls_scores] == [(2, 80, 40, 32), (2, 80, 20, 16), (2, 80, 10, 8)]
    assert [tuple(b.shape) for b in raw.bbox_preds] == [(2, 4, 40, 32), (2, 4, 20, 16), (2, 4, 10, 8)]
    named = model.named_raw_outputs(raw)        # the names the exporter and parity use
    assert list(named) == ['cls_scores.0', 'cls_scores.1', 'cls_scores.2', 'bbox_preds.0',
                           'bbox_preds.1', 'bbox_preds.2']
    assert named['bbox_preds.1'] is raw.bbox_preds[1]
    # MMDetection's head init: classifier bias gives a prior probability of 0.01
    assert raw.cls_scores[0].sigmoid().mean().item() == pytest.approx(0.01, rel=0.05)


def test_model_option_help_names_every_registry_model():
    """The CLI's --model help is written by hand (generating it would import torch at every CLI
    start): each registry name appears, in full or as its family's '-suffix'."""
    from detdeploy.cli import cli
    infer = cli.commands['infer']
    [option] = [p for p in infer.params if p.name == 'model_name']
    for name in MODEL_SPECS:
        family, _, suffix = name.rpartition('-')
        assert name in option.help or (family in option.help and f'-{suffix}' in option.help), name
