"""What a detdeploy model says about itself: family, task, classes, preprocessing, NMS settings,
precision and origin; validated in one place, stored as ONNX `metadata_props` strings.

Every value is a string (JSON for lists and dicts), so any ONNX tool shows it. Written by
`detdeploy.export`, read by the runtimes (`runtimes.model_file` reads it out of a file), built
for PyTorch models by `detdeploy.models`. Command-line overrides (class names, input size,
preprocessing of files from other tools) are applied here too.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

from .errors import DetdeployError, MetadataError
from .masks import MaskConfig
from .memory import format_bytes, image_batch_bytes, memory_limit_bytes
from .nms import NMSConfig
from .preprocessing import CHANNEL_ORDERS, PreprocessConfig
from .tasks import NMS_MODES, TASKS, describe_layout, has_nms, has_schema, output_schema

FOREIGN_ARCH = 'foreign'                # arch of a file without detdeploy metadata
PRECISIONS = ('fp32', 'fp16', 'bf16', 'int8')


@dataclass(frozen=True)
class ModelMetadata:
    arch: str                           # registry name, or FOREIGN_ARCH
    class_names: tuple[str, ...]
    preprocess: PreprocessConfig
    nms_mode: str                       # 'onnx', 'trt' or 'none' (core.tasks.NMS_MODES)
    nms: NMSConfig | None               # None: unknown (a file from another tool)
    batch: int | None                   # None: dynamic batch
    dynamic_shape: bool                 # height and width symbolic (multiples of size_divisor)
    opset: int
    detdeploy_version: str
    torch_version: str
    onnx_version: str
    checkpoint: str                     # path it was exported from, or 'random weights'
    checkpoint_sha256: str | None
    trt_plugin_domain: str | None = None
    family: str = 'rtmdet'
    task: str = 'detect'
    precision: str = 'fp32'
    raw_outputs: tuple[str, ...] = ()   # graph tensors holding the network's raw outputs
    # int8 files: method, target, calibration size, nodes kept float and why (`quantization`)
    quantization: dict = field(default_factory=dict)
    mask: MaskConfig | None = None      # instance models: how `masks` is framed (`core.masks`)
    extra: dict = field(default_factory=dict)   # further props, kept as they are

    @property
    def output_layout(self) -> str:
        return describe_layout(self.task, self.nms_mode)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in output_schema(self.task, self.nms_mode))

    @property
    def has_nms(self) -> bool:
        return has_nms(self.nms_mode)

    def to_props(self) -> dict[str, str]:
        values = {
            **self.extra,
            'detdeploy_version': self.detdeploy_version,
            'family': self.family,
            'arch': self.arch,
            'task': self.task,
            'class_names': json.dumps(list(self.class_names)),
            'preprocess': json.dumps(self.preprocess.to_dict()),
            'nms_mode': self.nms_mode,
            'nms': json.dumps(self.nms.to_dict() if self.nms else {}),
            'output_layout': self.output_layout,
            'batch': 'dynamic' if self.batch is None else str(self.batch),
            'dynamic_shape': json.dumps(self.dynamic_shape),
            'precision': self.precision,
            'opset': str(self.opset),
            'torch_version': self.torch_version,
            'onnx_version': self.onnx_version,
            'checkpoint': self.checkpoint,
            'checkpoint_sha256': self.checkpoint_sha256 or '',
        }
        if self.raw_outputs:
            values['raw_outputs'] = json.dumps(list(self.raw_outputs))
        if self.quantization:
            values['quantization'] = json.dumps(self.quantization)
        if self.mask is not None:
            values['mask'] = json.dumps(self.mask.to_dict())
        if self.trt_plugin_domain:
            values['trt_plugin_domain'] = self.trt_plugin_domain
        return values

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = 'model') -> 'ModelMetadata':
        """Parse and validate; files written before `family`, `task`, `precision` and
        `raw_outputs` existed read as an fp32 RTMDet detector without raw output names."""
        if 'detdeploy_version' not in props:
            raise MetadataError(
                f'{source} has no detdeploy metadata (was it exported by another tool?); '
                'export it with `detdeploy export`')
        known = {'detdeploy_version', 'family', 'arch', 'task', 'class_names', 'preprocess',
                 'nms_mode', 'nms', 'output_layout', 'batch', 'dynamic_shape', 'precision',
                 'opset', 'torch_version', 'onnx_version', 'checkpoint', 'checkpoint_sha256',
                 'raw_outputs', 'trt_plugin_domain', 'quantization', 'mask'}
        field_name = 'class_names'
        try:
            class_names = json.loads(props['class_names'])
            if not isinstance(class_names, list):
                raise ValueError(f'class_names is a {type(class_names).__name__}, not a list')
            field_name = 'preprocess'
            preprocess = PreprocessConfig.from_dict(json.loads(props['preprocess']))
            field_name = 'nms'
            nms_values = json.loads(props['nms'])
            nms = NMSConfig.from_dict(nms_values) if nms_values else None
            field_name = 'raw_outputs'
            raw_outputs = json.loads(props.get('raw_outputs', '[]'))
            if not isinstance(raw_outputs, list):
                raise ValueError(f'a {type(raw_outputs).__name__}, not a list of tensor names')
            raw_outputs = tuple(raw_outputs)
            field_name = 'quantization'
            quantization = json.loads(props.get('quantization', '{}'))
            if not isinstance(quantization, dict):
                raise ValueError(f'quantization is a {type(quantization).__name__}, not a dict')
            field_name = 'mask'
            mask = MaskConfig.from_dict(json.loads(props['mask'])) if 'mask' in props else None
            field_name = 'batch'
            batch = None if props['batch'] == 'dynamic' else int(props['batch'])
            field_name = 'dynamic_shape'
            dynamic_shape = json.loads(props['dynamic_shape'])
            field_name = 'opset'
            metadata = cls(
                arch=props['arch'], class_names=tuple(class_names), preprocess=preprocess,
                nms_mode=props['nms_mode'], nms=nms, batch=batch, dynamic_shape=dynamic_shape,
                opset=int(props['opset']), detdeploy_version=props['detdeploy_version'],
                torch_version=props['torch_version'], onnx_version=props['onnx_version'],
                checkpoint=props['checkpoint'],
                checkpoint_sha256=props['checkpoint_sha256'] or None,
                trt_plugin_domain=props.get('trt_plugin_domain'),
                family=props.get('family', 'rtmdet'), task=props.get('task', 'detect'),
                precision=props.get('precision', 'fp32'), raw_outputs=raw_outputs,
                quantization=quantization, mask=mask,
                extra={k: v for k, v in props.items() if k not in known})
        except KeyError as exc:
            raise MetadataError(f'{source} has incomplete detdeploy metadata (no '
                                f'{exc.args[0]})') from None
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise MetadataError(f'{source} has invalid detdeploy metadata: {field_name}: '
                                f'{type(exc).__name__ if isinstance(exc, RecursionError) else exc}'
                                ) from None
        problem = metadata.problem()
        if problem:
            raise MetadataError(f'{source} has invalid detdeploy metadata: {problem}')
        return metadata

    def problem(self) -> str | None:
        """What makes these values unusable (a hand-edited or damaged file), or None."""
        if not self.class_names or not all(isinstance(n, str) for n in self.class_names):
            return 'class_names must be a non-empty list of strings'
        problem = self.preprocess.problem()
        if problem:
            return f'preprocess.{problem}'
        if self.task not in TASKS:
            return f"task '{self.task}' is not one of {', '.join(TASKS)}"
        if self.nms_mode not in NMS_MODES:
            return f"nms_mode '{self.nms_mode}' is not one of {', '.join(NMS_MODES)}"
        if not has_schema(self.task, self.nms_mode):
            return f"task '{self.task}' has no outputs defined for nms_mode '{self.nms_mode}'"
        if (self.task == 'instance') != (self.mask is not None):
            return ('an instance model needs mask settings' if self.mask is None
                    else f"mask settings are for instance models, not task '{self.task}'")
        if self.mask is not None and self.mask.problem():
            return f'mask: {self.mask.problem()}'
        if self.nms is not None and self.nms.problem():
            return f'nms: {self.nms.problem()}'
        if self.precision not in PRECISIONS:
            return f"precision '{self.precision}' is not one of {', '.join(PRECISIONS)}"
        if self.batch is not None and self.batch < 1:
            return f'batch {self.batch} is below 1'
        if self.batch is not None:
            needed = image_batch_bytes(self.batch, *self.preprocess.input_size)
            limit = memory_limit_bytes()
            if limit is not None and needed > limit:
                return (f'batch {self.batch} at {self.preprocess.input_size[0]}x'
                        f'{self.preprocess.input_size[1]} needs at least '
                        f'{format_bytes(needed)} of memory, more than this machine has '
                        f'({format_bytes(limit)})')
        if not isinstance(self.dynamic_shape, bool):
            return f'dynamic_shape must be true or false, got {self.dynamic_shape!r}'
        if not all(isinstance(name, str) and name for name in self.raw_outputs):
            return 'raw_outputs must be a list of tensor names'
        return None

    def with_input_size(self, input_hw: tuple[int, int] | None, source: str) -> 'ModelMetadata':
        """The metadata at another input size: only a dynamic-shape file takes one."""
        fixed = self.preprocess.input_size
        if input_hw is None or tuple(input_hw) == tuple(fixed):
            return self
        if not self.dynamic_shape:
            raise DetdeployError(f'{source} has a fixed {fixed[0]}x{fixed[1]} input; '
                                 f'--input-size {input_hw[0]}x{input_hw[1]} needs a '
                                 '--dynamic-shape export')
        return replace(self, preprocess=self.preprocess.with_input_size(input_hw))


@dataclass(frozen=True)
class ModelOverrides:
    """What the command line adds to a model file's description: class names and the input size
    for any file (a dynamic-shape file's input size must be given to change it); preprocessing
    only for files without detdeploy metadata ("foreign" files from other tools)."""
    class_names: tuple[str, ...] | None = None
    input_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] | None = None      # in channel_order
    std: tuple[float, float, float] | None = None
    channel_order: str | None = None                    # 'rgb' or 'bgr'
    pad_value: float | None = None

    def preprocessing_flags(self) -> list[str]:
        return [flag for flag, value in (('--mean', self.mean), ('--std', self.std),
                                         ('--channel-order', self.channel_order),
                                         ('--pad-value', self.pad_value)) if value is not None]

    def check(self) -> 'ModelOverrides':
        """Finite numbers, a known channel order, std above 0: or a one-line error."""
        for flag, values in (('--mean', self.mean), ('--std', self.std),
                             ('--pad-value', None if self.pad_value is None
                              else (self.pad_value,))):
            if values is not None and not all(math.isfinite(v) for v in values):
                raise DetdeployError(f'{flag} {",".join(f"{v:g}" for v in values)}: values must '
                                     'be finite numbers')
        if self.channel_order is not None and self.channel_order not in CHANNEL_ORDERS:
            raise DetdeployError(f"--channel-order '{self.channel_order}': use rgb or bgr")
        if self.std is not None and any(value <= 0 for value in self.std):
            raise DetdeployError(f'--std {self.std}: every value must be above 0')
        return self


def apply_overrides(metadata: ModelMetadata, overrides: ModelOverrides, source: str
                    ) -> ModelMetadata:
    """A detdeploy file's metadata with command-line class names or input size."""
    given = overrides.preprocessing_flags()
    if given:
        raise DetdeployError(f'{", ".join(given)}: {source} has detdeploy metadata, which sets '
                             'its preprocessing; these flags are for files from other tools')
    if overrides.class_names is not None:
        if len(overrides.class_names) != len(metadata.class_names):
            raise DetdeployError(f'--class-names gives {len(overrides.class_names)} names but '
                                 f'{source} has {len(metadata.class_names)} classes')
        metadata = replace(metadata, class_names=tuple(overrides.class_names))
    return metadata.with_input_size(overrides.input_size, source)
