"""Checkpoint round trips (MMDetection format and plain state dicts) and clear refusals."""
import pytest
import torch

from conftest import randomize_detector
from detdeploy.core.errors import CheckpointError
from detdeploy.models import build_model, get_spec, load_detector, read_checkpoint, save_checkpoint


def outputs(model, images):
    with torch.no_grad():
        raw = model(images)
    return torch.cat([t.flatten() for t in (*raw.cls_scores, *raw.bbox_preds)])


def test_mmdet_format_round_trip_is_exact(tiny_detector, tiny_checkpoint):
    obj = torch.load(tiny_checkpoint, weights_only=True)
    assert set(obj) == {'meta', 'state_dict'}
    assert obj['meta']['dataset_meta']['classes'][:2] == ('person', 'bicycle')
    loaded = load_detector('rtmdet-tiny', tiny_checkpoint)
    reference = tiny_detector.model.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    images = torch.randn(1, 3, 96, 64)
    assert torch.equal(outputs(loaded.model, images), outputs(tiny_detector.model, images))
    assert loaded.source == str(tiny_checkpoint) and len(loaded.checkpoint_sha256) == 64


def test_plain_and_ddp_prefixed_state_dicts(tmp_path, tiny_detector):
    state = tiny_detector.model.state_dict()
    torch.save(state, tmp_path / 'plain.pth')
    torch.save({'state_dict': {f'module.{k}': v for k, v in state.items()}}, tmp_path / 'ddp.pth')
    for name in ('plain.pth', 'ddp.pth'):
        loaded = load_detector('rtmdet', tmp_path / name)
        assert torch.equal(loaded.model.bbox_head.rtm_cls[1].bias,
                           tiny_detector.model.bbox_head.rtm_cls[1].bias)


def test_class_count_and_names_come_from_checkpoint(tmp_path):
    model = randomize_detector(build_model('rtmdet-tiny', num_classes=3))
    names = ('circle', 'square', 'star')
    save_checkpoint(tmp_path / 'three.pth', model, get_spec('rtmdet-tiny'), names)
    loaded = load_detector('rtmdet-tiny', tmp_path / 'three.pth')
    assert loaded.model.num_classes == 3 and loaded.class_names == names
    overridden = load_detector('rtmdet-tiny', tmp_path / 'three.pth', class_names=('a', 'b', 'c'))
    assert overridden.class_names == ('a', 'b', 'c')
    with pytest.raises(CheckpointError, match='2 class names given but .* has 3 classes'):
        load_detector('rtmdet-tiny', tmp_path / 'three.pth', class_names=('a', 'b'))
    # no names in the file and a count that is not COCO's: generic names
    torch.save(model.state_dict(), tmp_path / 'bare.pth')
    assert load_detector('rtmdet-tiny', tmp_path / 'bare.pth').class_names == (
        'class_0', 'class_1', 'class_2')


def test_wrong_arch_names_arch_and_keys(tiny_checkpoint):
    with pytest.raises(CheckpointError) as info:
        load_detector('rtmdet-s', tiny_checkpoint)
    message = str(info.value)
    assert 'does not fit rtmdet-s' in message
    assert 'mis-shaped (checkpoint vs model)' in message
    assert 'backbone.stem.0.conv.weight (12, 3, 3, 3) vs (16, 3, 3, 3)' in message
    assert '\n' not in message


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny_detector):
    state = dict(tiny_detector.model.state_dict())
    del state['neck.out_convs.0.conv.weight']
    state['extra.weight'] = torch.zeros(1)
    torch.save({'meta': {}, 'state_dict': state}, tmp_path / 'broken.pth')
    with pytest.raises(CheckpointError, match=r'1 missing: neck\.out_convs\.0\.conv\.weight; '
                                              r'1 unexpected: extra\.weight'):
        load_detector('rtmdet-tiny', tmp_path / 'broken.pth')


def test_unsafe_pickle_refused_unless_trusted(tmp_path, tiny_detector):
    # a pickled class from outside torch's allow-list: weights_only=True refuses it
    torch.save({'meta': {'hook': torch.nn.Identity()},
                'state_dict': tiny_detector.model.state_dict()}, tmp_path / 'unsafe.pth')
    with pytest.raises(CheckpointError, match='needs arbitrary unpickling.*--trust-checkpoint'):
        read_checkpoint(tmp_path / 'unsafe.pth')
    state_dict, meta = read_checkpoint(tmp_path / 'unsafe.pth', trust=True)
    assert 'bbox_head.rtm_cls.0.bias' in state_dict and 'hook' in meta


@pytest.mark.parametrize('content, match', [
    (b'\xff\xd8\xff\xe0 jpeg bytes', 'not a PyTorch checkpoint'),
    (b'PK\x03\x04 truncated zip', 'cannot read checkpoint'),
])
def test_not_a_checkpoint(tmp_path, content, match):
    (tmp_path / 'bad.pth').write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(tmp_path / 'bad.pth')
    with pytest.raises(CheckpointError, match='not found'):
        read_checkpoint(tmp_path / 'missing.pth')


def test_saving_is_atomic(tmp_path, tiny_detector, monkeypatch):
    target = tmp_path / 'model.pth'
    target.write_bytes(b'old')

    def fail(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', fail)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(target, tiny_detector.model, tiny_detector.spec, tiny_detector.class_names)
    assert target.read_bytes() == b'old'
    assert list(tmp_path.iterdir()) == [target]


def test_unwritable_target_is_a_user_error(tiny_detector):
    from detdeploy.core.errors import DetdeployError
    with pytest.raises(DetdeployError, match='cannot write /proc/model.pth'):
        save_checkpoint('/proc/model.pth', tiny_detector.model, tiny_detector.spec,
                        tiny_detector.class_names)
