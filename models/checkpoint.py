"""Read and write detector checkpoints: MMDetection's format and plain state dicts.

Reading uses `torch.load(weights_only=True)`; a file that needs arbitrary unpickling is refused
unless the caller passes `trust=True`. This module does not build models from names beyond
`registry.build_model`.
"""
from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import detdeploy
from detdeploy.core.errors import CheckpointError, DetdeployError
from detdeploy.core.fileio import atomic_write, check_input_file, file_sha256
from detdeploy.core.metadata import ModelMetadata
from detdeploy.core.nms import NMSConfig
from detdeploy.core.preprocessing import PreprocessConfig, check_input_size

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
            checkpoint_sha256=self.checkpoint_sha256, mask=self.model.mask_config, **values)


def load_checkpoint_file(path: str | Path, trust: bool = False) -> dict:
    """The dict a checkpoint file holds, read with torch's weights-only loader (unless `trust`);
    every way a file can fail to be one (missing, not a regular file, truncated, not a pickle,
    refused by the safe loader) is a one-line `CheckpointError` naming it."""
    path = Path(path)
    try:
        check_input_file(path, 'checkpoint')
    except CheckpointError:
        raise
    except DetdeployError as exc:
        raise CheckpointError(str(exc)) from None
    with open(path, 'rb') as handle:
        magic = handle.read(4)
    if magic != b'PK\x03\x04' and magic[:1] != b'\x80':
        raise CheckpointError(f'{path} is not a PyTorch checkpoint (neither a zip nor a pickle file)')
    try:
        with warnings.catch_warnings():     # torch warns about sparse tensors it then loads
            warnings.simplefilter('ignore', UserWarning)
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
    except Exception as exc:  # torch raises many types for files that are not checkpoints
        raise CheckpointError(f'cannot read checkpoint {path}: {_first_line(exc)}') from None
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path} holds a {type(obj).__name__}, not a state dict')
    return obj


def read_checkpoint(path: str | Path, trust: bool = False) -> tuple[dict, dict]:
    """(state_dict, meta) from an MMDetection checkpoint or a plain state dict, checked
    (`check_state_dict`): string keys, dense tensors, finite floating-point values."""
    obj = load_checkpoint_file(path, trust)
    state_dict = obj.get('state_dict', obj.get('model', obj))
    meta = obj.get('meta') or {}
    if not isinstance(state_dict, dict) or not state_dict or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f'{path} has no state dict of tensors')
    check_state_dict(state_dict, path)
    # Weights saved from a DistributedDataParallel wrapper carry a 'module.' prefix.
    if all(k.startswith('module.') for k in state_dict):
        state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
    return state_dict, meta if isinstance(meta, dict) else {}


def check_state_dict(state_dict: dict, path: str | Path) -> None:
    """The schema of a state dict: string keys and dense tensors; floating-point tensors hold
    finite values (a NaN or infinite weight makes a model that silently detects nothing)."""
    for key, tensor in state_dict.items():
        if not isinstance(key, str):
            raise CheckpointError(f'{path}: state dict key {key!r} is a {type(key).__name__}, '
                                  'not a parameter name')
        if tensor.layout != torch.strided:
            raise CheckpointError(f'{path}: {key} is a {str(tensor.layout).split(".")[-1]} '
                                  'tensor; checkpoints hold dense tensors (call .to_dense())')
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f'{path}: {key} holds {count} non-finite values (NaN or '
                                  'infinity): the weights are broken (a diverged run?)')


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f'{type(exc).__name__}: {text.splitlines()[0]}' if text else type(exc).__name__


def class_names_from_meta(meta: dict, path: str | Path = 'checkpoint'
                          ) -> tuple[str, ...] | None:
    """Class names stored by detdeploy (meta['detdeploy']) or MMDetection (dataset_meta): a
    list of strings, or a one-line error (one string would otherwise be split into letters)."""
    for where in ('detdeploy', 'dataset_meta', None):
        source = meta.get(where, {}) if where else meta
        if not isinstance(source, dict):
            continue
        for key in ('class_names', 'classes', 'CLASSES'):
            names = source.get(key)
            if names is None or (isinstance(names, (list, tuple)) and not names):
                continue
            field = f"meta{f'.{where}' if where else ''}.{key}"
            if isinstance(names, str):
                raise CheckpointError(f'{path}: {field} is one string ({names[:40]!r}), not a '
                                      'list of class names')
            if not isinstance(names, (list, tuple)) or not all(
                    isinstance(name, str) and name for name in names):
                raise CheckpointError(f'{path}: {field} must be a list of non-empty strings, '
                                      f'got {type(names).__name__}')
            return tuple(names)
    return None


def input_size_from_meta(meta: dict, size_divisor: int, path: str | Path = 'checkpoint'
                         ) -> tuple[int, int] | None:
    """The (height, width) a checkpoint was trained for, if its meta says (and it fits; a
    size too large for this machine's memory is an error, `check_input_size`)."""
    ours = meta.get('detdeploy') if isinstance(meta, dict) else None
    size = ours.get('input_size') if isinstance(ours, dict) else None
    if (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                    and v % size_divisor == 0 for v in size)):
        check_input_size((size[0], size[1]), size_divisor, f'{path}: meta.detdeploy.input_size')
        return (size[0], size[1])
    return None


def describe_mismatch(model: torch.nn.Module, state_dict: dict) -> str | None:
    """A one-line summary of missing, unexpected and mis-shaped keys, or None if all fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}'
                 for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    # an integer or bool tensor for a float parameter loads (converted) into nonsense
    mistyped = [f'{k} {str(state_dict[k].dtype).split(".")[-1]}' for k in own
                if k in state_dict and own[k].is_floating_point()
                and not state_dict[k].is_floating_point()]
    parts = []
    for label, keys in (('missing', missing), ('unexpected', unexpected),
                        ('mis-shaped (checkpoint vs model)', misshaped),
                        ('not floating point (for float parameters)', mistyped)):
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
    class_count_key = spec.model_class.num_classes_key
    classifier = state_dict.get(class_count_key)
    if classifier is not None and (classifier.dim() == 0 or classifier.shape[0] < 1):
        raise CheckpointError(f'checkpoint {checkpoint}: {class_count_key} has shape '
                              f'{list(classifier.shape)}; a classifier has one row per class')
    num_classes = spec.model_class.num_classes_in(state_dict)
    if num_classes is None:
        num_classes = len(spec.class_names)
    if num_classes < 1:
        raise CheckpointError(f'checkpoint {checkpoint}: {class_count_key} has shape '
                              f'{list(classifier.shape)}, which leaves no classes for '
                              f'{spec.name}')
    model = spec.build(num_classes)
    mismatch = describe_mismatch(model, state_dict)
    if mismatch:
        raise CheckpointError(f'checkpoint {checkpoint} does not fit {spec.name}: {mismatch}')
    model.load_state_dict(state_dict, strict=True)
    input_size = input_size_from_meta(meta, spec.preprocessing.size_divisor, checkpoint)
    if input_size:
        spec = replace(spec, preprocessing=spec.preprocessing.with_input_size(input_size))
    names = class_names or class_names_from_meta(meta, checkpoint)
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
