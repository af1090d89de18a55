"""Read and write detector checkpoints: MMDetection's format and plain state dicts.

Reading uses `torch.load(weights_only=True)`; a file that needs arbitrary unpickling is refused
unless the caller passes `trust=True`. This module does not build models from names beyond
`registry.build_model`.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import detdeploy
from detdeploy.core.errors import CheckpointError
from detdeploy.core.fileio import atomic_write, file_sha256
from detdeploy.core.metadata import ModelMetadata
from detdeploy.core.nms import NMSConfig
from detdeploy.core.preprocessing import PreprocessConfig

from .base import Detector, ModelSpec
from .registry import get_spec

SHOWN_KEYS = 3


@dataclass
class LoadedDetector:
    """A model ready for inference, with what we know of where it came from."""
    model: Detector
    spec: ModelSpec
    class_names: tuple[str, ...]
    source: str                    # checkpoint path, or 'random weights'
    checkpoint_sha256: str | None = None

    def metadata(self, nms: NMSConfig, nms_mode: str = 'onnx',
                 preprocess: PreprocessConfig | None = None, **fields) -> ModelMetadata:
        """The description an exported file of this model carries (the PyTorch backend uses
        the same); `fields` sets the file-only ones (batch, opset, versions, ...)."""
        values = dict(batch=None, dynamic_shape=True, opset=0,
                      detdeploy_version=detdeploy.__version__, torch_version=torch.__version__,
                      onnx_version='')
        values.update(fields)
        return ModelMetadata(
            arch=self.spec.name, family=self.model.family, task=self.model.task,
            class_names=self.class_names, preprocess=preprocess or self.spec.preprocessing,
            nms_mode=nms_mode, nms=nms, checkpoint=self.source,
            checkpoint_sha256=self.checkpoint_sha256, **values)


def read_checkpoint(path: str | Path, trust: bool = False) -> tuple[dict, dict]:
    """(state_dict, meta) from an MMDetection checkpoint or a plain state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    with open(path, 'rb') as handle:
        magic = handle.read(4)
    if magic != b'PK\x03\x04' and magic[:1] != b'\x80':
        raise CheckpointError(f'{path} is not a PyTorch checkpoint (neither a zip nor a pickle file)')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=not trust)
    except pickle.UnpicklingError as exc:
        # torch names the refused global: "Unsupported global: GLOBAL m.C" for classes
        # outside its allow-list, "unsupported GLOBAL m.f whose module m is blocked" for
        # modules such as os or subprocess, whose functions would run when unpickled
        unsafe = re.search(r'unsupported (?:global: )?GLOBAL (\S+)', str(exc), re.IGNORECASE)
        if unsafe:
            blocked = ('whose module' in str(exc) and 'is blocked' in str(exc))
            runs = ', a function that would run while loading' if blocked else ''
            raise CheckpointError(
                f'{path} needs arbitrary unpickling to load (it stores {unsafe.group(1)}'
                f'{runs}); if you trust its source, pass --trust-checkpoint') from None
        reason = re.search(r'WeightsUnpickler error:\s*([^\n]+)', str(exc))
        if reason is None and 'Weights only load failed' in str(exc):
            raise CheckpointError(
                f"{path} needs arbitrary unpickling to load (torch's weights-only loader "
                'refused it); if you trust its source, pass --trust-checkpoint') from None
        raise CheckpointError(f'{path} is not a PyTorch checkpoint '
                              f'({reason.group(1) if reason else _first_line(exc)})') from None
    except Exception as exc:  # torch raises several types for files that are not checkpoints
        raise CheckpointError(f'cannot read checkpoint {path}: {_first_line(exc)}') from None
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path} holds a {type(obj).__name__}, not a state dict')
    state_dict = obj.get('state_dict', obj.get('model', obj))
    meta = obj.get('meta') or {}
    if not isinstance(state_dict, dict) or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f'{path} has no state dict of tensors')
    # Weights saved from a DistributedDataParallel wrapper carry a 'module.' prefix.
    if state_dict and all(k.startswith('module.') for k in state_dict):
        state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
    return state_dict, meta if isinstance(meta, dict) else {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f'{type(exc).__name__}: {text.splitlines()[0][:160]}' if text else type(exc).__name__


def class_names_from_meta(meta: dict) -> tuple[str, ...] | None:
    """Class names stored by detdeploy (meta['detdeploy']) or MMDetection (dataset_meta)."""
    for source in (meta.get('detdeploy', {}), meta.get('dataset_meta', {}), meta):
        names = source.get('class_names') or source.get('classes') or source.get('CLASSES')
        if names:
            return tuple(str(n) for n in names)
    return None


def input_size_from_meta(meta: dict, size_divisor: int) -> tuple[int, int] | None:
    """The (height, width) a checkpoint was trained for, if its meta says (and it fits)."""
    ours = meta.get('detdeploy') if isinstance(meta, dict) else None
    size = ours.get('input_size') if isinstance(ours, dict) else None
    if (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, int) and v > 0 and v % size_divisor == 0 for v in size)):
        return (size[0], size[1])
    return None


def describe_mismatch(model: torch.nn.Module, state_dict: dict) -> str | None:
    """A one-line summary of missing, unexpected and mis-shaped keys, or None if all fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}'
                 for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    parts = []
    for label, keys in (('missing', missing), ('unexpected', unexpected),
                        ('mis-shaped (checkpoint vs model)', misshaped)):
        if keys:
            more = f', ... (+{len(keys) - SHOWN_KEYS})' if len(keys) > SHOWN_KEYS else ''
            parts.append(f'{len(keys)} {label}: {", ".join(keys[:SHOWN_KEYS])}{more}')
    return '; '.join(parts) or None


def load_detector(name: str, checkpoint: str | Path | None = None,
                  class_names: tuple[str, ...] | None = None, trust: bool = False
                  ) -> LoadedDetector:
    """Build the named model and load a checkpoint into it (strict), or keep random weights.

    The number of classes comes from the checkpoint's classifier shape; names from
    `class_names`, else the checkpoint's meta, else the registry's (if the count fits).
    """
    spec = get_spec(name)
    if checkpoint is None:
        names = class_names or spec.class_names
        return LoadedDetector(spec.build(len(names)), spec, tuple(names), 'random weights')

    state_dict, meta = read_checkpoint(checkpoint, trust=trust)
    num_classes = spec.model_class.num_classes_in(state_dict)
    if num_classes is None:
        num_classes = len(spec.class_names)
    model = spec.build(num_classes)
    mismatch = describe_mismatch(model, state_dict)
    if mismatch:
        raise CheckpointError(f'checkpoint {checkpoint} does not fit {spec.name}: {mismatch}')
    model.load_state_dict(state_dict, strict=True)
    input_size = input_size_from_meta(meta, spec.preprocessing.size_divisor)
    if input_size:
        spec = replace(spec, preprocessing=spec.preprocessing.with_input_size(input_size))
    names = class_names or class_names_from_meta(meta)
    if names is None:
        names = (spec.class_names if num_classes == len(spec.class_names)
                 else tuple(f'class_{i}' for i in range(num_classes)))
    if len(names) != num_classes:
        raise CheckpointError(f'{len(names)} class names given but checkpoint {checkpoint} '
                              f'has {num_classes} classes')
    return LoadedDetector(model.eval(), spec, tuple(names), str(checkpoint),
                          file_sha256(checkpoint))


def save_checkpoint(path: str | Path, model: torch.nn.Module | dict, spec: ModelSpec,
                    class_names: tuple[str, ...], extra_meta: dict | None = None,
                    extra: dict | None = None) -> None:
    """Write `{'meta', 'state_dict'}` as MMDetection does, with our metadata, atomically.

    `model` is a module or a state dict; `extra` adds top-level entries (training state)."""
    meta = {
        'dataset_meta': {'classes': tuple(class_names)},
        'detdeploy': {'arch': spec.name, 'class_names': list(class_names),
                      'input_size': list(spec.preprocessing.input_size)},
        **(extra_meta or {}),
    }
    with atomic_write(path) as handle:
        state_dict = model if isinstance(model, dict) else model.state_dict()
        torch.save({'meta': meta, 'state_dict': state_dict, **(extra or {})}, handle)
