"""What an exported detdeploy model says about itself, stored in ONNX `metadata_props`.

Every value is a string (JSON for lists and dicts), so any ONNX tool shows it. Written by
`detdeploy.export`, read by the runtimes; needs no torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from detdeploy.errors import DetdeployError

from .preprocess import PreprocessConfig

OUTPUT_LAYOUTS = {
    'onnx': 'num_dets [B,1] int32; boxes [B,K,4] float32 xyxy network-input px; scores [B,K] '
            'float32; labels [B,K] int32; rows past num_dets are padding (0 boxes/scores, '
            'label -1)',
    'trt': 'num_dets [B,1] int32; boxes [B,K,4] float32 xyxy network-input px; scores [B,K] '
           'float32; labels [B,K] int32 (EfficientNMS_TRT); rows past num_dets are padding',
    'none': 'boxes [B,N,4] float32 xyxy network-input px per anchor; scores [B,N,C] float32 '
            'sigmoid class scores per anchor; no NMS',
}


class MetadataError(DetdeployError):
    """A model file without (complete) detdeploy metadata."""


@dataclass(frozen=True)
class ModelMetadata:
    arch: str
    class_names: tuple[str, ...]
    preprocess: PreprocessConfig
    nms_mode: str                       # 'onnx', 'trt' or 'none'
    nms: dict                           # score_thr, pre_top_k, iou_thr, max_det
    batch: int | None                   # None: dynamic batch
    dynamic_shape: bool                 # height and width symbolic (multiples of 32)
    opset: int
    detdeploy_version: str
    torch_version: str
    onnx_version: str
    checkpoint: str                     # path it was exported from, or 'random weights'
    checkpoint_sha256: str | None
    trt_plugin_domain: str | None = None

    @property
    def output_layout(self) -> str:
        return OUTPUT_LAYOUTS[self.nms_mode]

    def to_props(self) -> dict[str, str]:
        values = {
            'detdeploy_version': self.detdeploy_version,
            'arch': self.arch,
            'class_names': json.dumps(list(self.class_names)),
            'preprocess': json.dumps(self.preprocess.to_dict()),
            'nms_mode': self.nms_mode,
            'nms': json.dumps(self.nms),
            'output_layout': self.output_layout,
            'batch': 'dynamic' if self.batch is None else str(self.batch),
            'dynamic_shape': json.dumps(self.dynamic_shape),
            'opset': str(self.opset),
            'torch_version': self.torch_version,
            'onnx_version': self.onnx_version,
            'checkpoint': self.checkpoint,
            'checkpoint_sha256': self.checkpoint_sha256 or '',
        }
        if self.trt_plugin_domain:
            values['trt_plugin_domain'] = self.trt_plugin_domain
        return values

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = 'model') -> 'ModelMetadata':
        if 'detdeploy_version' not in props:
            raise MetadataError(
                f'{source} has no detdeploy metadata (was it exported by another tool?); '
                'export it with `detdeploy export`')
        try:
            return cls(
                arch=props['arch'],
                class_names=tuple(json.loads(props['class_names'])),
                preprocess=PreprocessConfig.from_dict(json.loads(props['preprocess'])),
                nms_mode=props['nms_mode'],
                nms=json.loads(props['nms']),
                batch=None if props['batch'] == 'dynamic' else int(props['batch']),
                dynamic_shape=json.loads(props['dynamic_shape']),
                opset=int(props['opset']),
                detdeploy_version=props['detdeploy_version'],
                torch_version=props['torch_version'],
                onnx_version=props['onnx_version'],
                checkpoint=props['checkpoint'],
                checkpoint_sha256=props['checkpoint_sha256'] or None,
                trt_plugin_domain=props.get('trt_plugin_domain'))
        except (KeyError, ValueError, TypeError) as exc:
            raise MetadataError(f'{source} has incomplete detdeploy metadata ({exc!r})') from None


def read_onnx_metadata(path: str | Path) -> ModelMetadata:
    """The metadata of an ONNX file, without loading its weights."""
    import onnx
    path = Path(path)
    if not path.is_file():
        raise DetdeployError(f'model file not found: {path}')
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for files that are not ONNX
        raise DetdeployError(f'{path} is not an ONNX model ({type(exc).__name__})') from None
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props}, str(path))
