"""What every model family provides, and how a registry name describes a model.

A family (one folder: `models/rtmdet/`, ...) subclasses `Detector`: a plain `nn.Module` whose
`forward` gives the raw head outputs and whose `postprocess` turns them, traceably, into its
task's outputs (`core.tasks`) for an NMS mode. The exporter, the PyTorch backend, parity and the
synthetic weights use only this interface. `ModelSpec` is a named size of a family with its
preprocessing and NMS presets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, NamedTuple

import torch
from torch import nn

from detdeploy.core.nms import NMSConfig
from detdeploy.core.preprocessing import PreprocessConfig

from .nms import DetectionOutputs, Detections, split_detections


class RawRowGroup(NamedTuple):
    """Raw outputs whose rows (the first axis of one image's tensor) come out of an NMS inside
    the network, so another runtime may keep near-tied rows in another order or keep a
    neighbour instead: `parity` pairs their rows by `key`'s boxes (xyxy px; rows without a
    positive extent are padding) and compares `key` and `follow` row by row
    (`verification.compare.pair_rows`). `nms_iou` is that NMS's IoU threshold (which rows a tie
    can swap); `max_rows` the NMS's row cap (which rows a tie can push below the cut)."""
    key: str
    follow: tuple[str, ...]
    nms_iou: float
    max_rows: int


class Detector(nn.Module):
    """Base class of the families. Subclasses set the class attributes and implement the
    methods below; module attribute names follow the checkpoint format they load."""

    family: ClassVar[str]             # 'rtmdet', ...
    task: ClassVar[str] = 'detect'    # one of core.tasks.TASKS
    num_classes_key: ClassVar[str]    # state-dict key that tells the class count (`num_classes_in`)

    @classmethod
    def num_classes_in(cls, state_dict: Mapping[str, torch.Tensor]) -> int | None:
        """The class count a checkpoint's weights were trained for, or None if they don't say.
        Families whose classifier has more rows than classes (a background row, anchors per
        cell) override this."""
        key = cls.num_classes_key
        return state_dict[key].shape[0] if key in state_dict else None

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def mask_config(self):
        """Instance models: how their `masks` output is framed (`core.masks.MaskConfig`);
        None for other tasks."""
        return None

    @property
    def size_divisor(self) -> int:
        """Input sides must be multiples of this (the largest stride)."""
        raise NotImplementedError

    @property
    def raw_output_names(self) -> tuple[str, ...]:
        """Names of the raw output tensors (e.g. `cls_scores.0`), in `raw_tensors` order: the
        names the exporter gives them in the graph and parity compares by."""
        raise NotImplementedError

    def raw_tensors(self, raw) -> tuple[torch.Tensor, ...]:
        """The tensors of `forward`'s output, flattened in `raw_output_names` order."""
        raise NotImplementedError

    def named_raw_outputs(self, raw) -> dict[str, torch.Tensor]:
        return dict(zip(self.raw_output_names, self.raw_tensors(raw), strict=True))

    @property
    def raw_row_groups(self) -> tuple[RawRowGroup, ...]:
        """Raw outputs whose rows follow an NMS in the network (a two-stage RoI head), which
        `parity` pairs by box before comparing; none by default."""
        return ()

    def paired_raw_outputs(self, got: dict, want: dict) -> tuple[dict, dict, str | None]:
        """One image's raw outputs from a runtime (`got`) and from PyTorch (`want`), numpy
        arrays by name, after `parity` paired the `raw_row_groups`, arranged for element-wise
        comparison, and a note on what was left out. As they are by default (prefer declaring
        `raw_row_groups`: `parity` then counts the unpaired rows against its budget)."""
        return got, want, None

    def forward_for(self, images: torch.Tensor, nms: NMSConfig, nms_mode: str):
        """`forward` for a graph that ends in `postprocess(..., nms, nms_mode)`. A family whose
        raw outputs follow the final NMS (Mask R-CNN: its mask head runs on the final
        detections) runs that NMS here with these settings; others just run `forward`."""
        return self(images)

    def postprocess(self, raw, input_hw: tuple[int, int], nms: NMSConfig, nms_mode: str
                    ) -> tuple[torch.Tensor, ...]:
        """Raw outputs -> the task's outputs for `nms_mode` (`core.tasks.output_schema`), in
        network-input pixels. Traceable: the exporter exports exactly this."""
        raise NotImplementedError

    def check_nms_mode(self, nms_mode: str) -> None:
        """Raise a `DetdeployError` (one line, saying what to use) if this model cannot
        post-process in `nms_mode` although its task has a schema for it; nothing by default."""

    def synthetic_head(self) -> tuple[list[nn.Conv2d], list[tuple[nn.Conv2d, str]], float]:
        """For `synthetic_weights`: the head's tower convs, its predictor convs each with its
        kind ('logits', 'box', 'angle', or 'kernel': any other output, spread 0.2 and bias 0),
        and the bias that gives the box predictors a positive extent."""
        raise NotImplementedError

    def adjust_synthetic_weights(self, generator: torch.Generator) -> None:
        """For `synthetic_weights`, last: family-specific changes (e.g. a predictor whose
        channels mix logits and box terms); nothing by default."""

    @torch.no_grad()
    def predict_outputs(self, images: torch.Tensor, nms: NMSConfig, nms_mode: str = 'onnx'
                        ) -> tuple[torch.Tensor, ...]:
        """The task's outputs for a preprocessed batch; boxes are clamped to the network input's
        extent where the family's MMDetection head clamps them (RTMDet: its `Pad` sets
        `img_shape` to the padded size; YOLOv3 does not clamp), and the host clamps them to
        the image after rescaling."""
        return self.postprocess(self.forward_for(images, nms, nms_mode),
                                tuple(images.shape[-2:]), nms, nms_mode)

    def predict(self, images: torch.Tensor, nms: NMSConfig) -> list[Detections]:
        """Detections per image, best first, in network-input pixels (`detect` models)."""
        return split_detections(DetectionOutputs(*self.predict_outputs(images, nms)))


@dataclass(frozen=True)
class ModelSpec:
    """One registry name: a family's class, its constructor arguments, preprocessing, NMS
    presets (`core.nms.NMS_PRESETS`) and default class names."""
    name: str
    model_class: type[Detector]
    arch: Mapping[str, Any]
    preprocessing: PreprocessConfig
    nms_presets: Mapping[str, NMSConfig]
    class_names: tuple[str, ...]

    def nms(self, preset: str) -> NMSConfig:
        return self.nms_presets[preset]

    def build(self, num_classes: int | None = None) -> Detector:
        """A randomly initialised model of this size, in eval mode."""
        model = self.model_class(**self.arch, num_classes=num_classes or len(self.class_names))
        return model.eval()
