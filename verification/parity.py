"""The `detdeploy parity` pipeline: does an exported model give the PyTorch model's answers?

Checks the file's metadata against the PyTorch model, runs the same preprocessed images through
PyTorch (with the file's NMS settings) and the backend and matches their detections, compares
the network's raw outputs by name (the graph tensors the metadata lists against
`Detector.named_raw_outputs`) and, on request, bisects the graph for the first diverging layer.
Returns a `ParityReport`; comparison rules live in `compare`, printing in the CLI command.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from detdeploy.core.errors import DetdeployError
from detdeploy.core.fileio import atomic_write
from detdeploy.core.memory import check_memory
from detdeploy.core.metadata import ModelMetadata
from detdeploy.core.nms import NMSConfig
from detdeploy.core.preprocessing import PreprocessConfig
from detdeploy.core.masks import MaskConfig, paste_masks
from detdeploy.core.tasks import DETECT, INSTANCE, ROTATED, output_schema
from detdeploy.runtimes.backend import INTERMEDIATE_TENSORS, Backend
from detdeploy.runtimes.pipeline import prepare_batch
from detdeploy.runtimes.preprocess import ImageMeta, read_image, rescale_boxes

from .compare import (ArrayComparison, DetectionSet, ImageMatch, RowPairing, Tolerances,
                      compare_arrays, match_detections, merge_comparisons, pair_rows,
                      tolerances_for)
from .layer_search import LayerDivergence, find_first_divergence

if TYPE_CHECKING:
    from detdeploy.models import LoadedDetector

RANDOM_IMAGE_SIZES = ((480, 640), (640, 427), (320, 320), (200, 500), (375, 500), (64, 96))


@dataclass
class ParityOptions:
    torch_device: str = 'cpu'
    tolerances: Tolerances | None = None  # None: the preset for the file's precision
    per_layer: bool = False
    batch_size: int | None = None         # None: the file's static batch, else 4
    progress: Callable[[int], None] | None = None     # called with the images each batch did


@dataclass
class MetadataIssue:
    """A way the file's self-description disagrees with the PyTorch model it came from."""
    field: str
    file_value: object
    expected: object
    explanation: str


@dataclass
class ParityReport:
    model_file: str
    backend: str
    providers: list[str]
    arch: str
    checkpoint: str
    precision: str
    nms_mode: str
    nms: NMSConfig                      # the settings PyTorch ran with: the file's
    input_size: list[int]
    tolerances: Tolerances
    metadata_issues: list[MetadataIssue] = field(default_factory=list)
    images: list[ImageMatch] = field(default_factory=list)
    raw_by_image: list[dict[str, ArrayComparison]] = field(default_factory=list)
    raw: dict[str, ArrayComparison] = field(default_factory=dict)     # over all images
    row_pairings: list[RowPairing] = field(default_factory=list)      # per image and group
    notes: list[str] = field(default_factory=list)
    layer: LayerDivergence | None = None

    @property
    def failures(self) -> list[str]:
        """One line per reason the check fails; empty when it passes."""
        reasons = [f'metadata: {issue.explanation}' for issue in self.metadata_issues]
        failed_images = [m for m in self.images if m.status == 'FAIL' and
                         (m.failed_pairs or any(not u.borderline for u in m.unmatched))]
        if failed_images:
            reasons.append(f'detections differ on {len(failed_images)} of {len(self.images)} '
                           f'images ({", ".join(Path(m.source).name for m in failed_images[:3])}'
                           f'{", ..." if len(failed_images) > 3 else ""})')
        mask_images = [m for m in self.images if m.failed_masks]
        if mask_images:
            reasons.append(
                f'masks differ on {len(mask_images)} of {len(self.images)} images '
                f'({sum(m.failed_masks for m in mask_images)} matched detections; lowest mask '
                f'IoU {min(m.min_mask_iou for m in mask_images):.4f}, largest probability '
                f'difference {max(m.max_mask_prob_error for m in mask_images):.3g})')
        bad_raw = [name for name, c in self.raw.items() if not c.passed]
        if bad_raw:
            worst = max((self.raw[n] for n in bad_raw), key=lambda c: c.failing_share)
            reasons.append(f'raw outputs differ: {", ".join(bad_raw)} (up to '
                           f'{100 * worst.failing_share:.3g} % of elements out of tolerance, '
                           f'max abs error {worst.max_abs_error:.3g})')
        unpaired = [p for p in self.row_pairings if not p.passed]
        if unpaired:
            worst = max(unpaired, key=lambda p: (p.unexplained,
                                                 max(p.unpaired_torch, p.unpaired_backend)))
            reasons.append(
                f'raw rows unpaired: {", ".join(dict.fromkeys(p.key for p in unpaired))} on '
                f'{len(unpaired)} of {len(self.row_pairings)} images (worst '
                f'{Path(worst.image).name}: {worst.unpaired_torch} of {worst.torch_rows} '
                f'torch rows, {worst.unpaired_backend} of {worst.backend_rows} '
                f'{self.backend} rows without a partner, {worst.unexplained} not at an NMS '
                f'tie; budget {worst.budget} per side)')
        if self.layer:
            found = self.layer.found
            reasons.append(f'first diverging layer: {found.node} ({found.op_type}) -> '
                           f'{found.module or "unmapped tensor " + found.tensor}')
        return reasons

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {
            'verdict': 'PASS' if self.passed else 'FAIL', 'failures': self.failures,
            'model_file': self.model_file, 'backend': self.backend,
            'providers': self.providers, 'arch': self.arch, 'checkpoint': self.checkpoint,
            'precision': self.precision, 'nms_mode': self.nms_mode, 'nms': self.nms.to_dict(),
            'input_size': self.input_size, 'tolerances': self.tolerances.to_dict(),
            'metadata_issues': [dataclasses.asdict(i) for i in self.metadata_issues],
            'images': [m.to_dict() for m in self.images],
            'raw_outputs': {name: c.to_dict() for name, c in self.raw.items()},
            'raw_outputs_by_image': [{n: c.to_dict() for n, c in per.items()}
                                     for per in self.raw_by_image],
            'raw_row_pairing': [p.to_dict() for p in self.row_pairings],
            'per_layer': self.layer.to_dict() if self.layer else None,
            'notes': self.notes,
        }


def write_report(report: ParityReport, path: str | Path, overwrite: bool = True) -> None:
    """The full report as JSON, written atomically."""
    text = json.dumps(_strict_json(report.to_dict()), indent=2, default=_json_value,
                      allow_nan=False)
    with atomic_write(path, 'w', overwrite=overwrite) as handle:
        handle.write(text + '\n')


def _strict_json(value):
    """NaN and infinities (a broken file's outputs) as the strings 'nan', 'inf', '-inf': JSON
    has no literal for them."""
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return str(float(value))
    return value


def _json_value(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f'not JSON serialisable: {type(value).__name__}')


# ---- images -------------------------------------------------------------------------------

def recorded_checkpoint(metadata: ModelMetadata, model_file: str | Path) -> str | None:
    """The weights a file says it was exported from, for a parity check given no --checkpoint:
    the recorded checkpoint if it is here with the recorded sha256 (the bundled model is also
    found by its sha256 when installed elsewhere), None for a file exported from random
    weights; a one-line error when the weights are not here."""
    from detdeploy.core.fileio import file_sha256
    from detdeploy.models.bundled import BUNDLED_FILE
    recorded, sha256 = metadata.checkpoint, metadata.checkpoint_sha256
    if recorded == 'random weights' or not sha256:
        return None
    candidates = [Path(recorded), BUNDLED_FILE]
    for candidate in candidates:
        if candidate.is_file() and file_sha256(candidate) == sha256:
            return str(candidate)
    raise DetdeployError(f'{model_file} was exported from {recorded} (sha256 {sha256[:12]}...), '
                         'which is not here with that content: pass --checkpoint with those '
                         'weights (a comparison with other weights would fail for no reason)')


def random_images(count: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """`count` generated RGB images of assorted sizes (landscape, portrait, square, tiny)."""
    from detdeploy.models.synthetic_weights import make_image
    if count < 1:
        raise DetdeployError(f'--random needs at least 1 image, got {count}')
    per_image = sum(3 * h * w for h, w in RANDOM_IMAGE_SIZES) // len(RANDOM_IMAGE_SIZES)
    check_memory(count * per_image, f'--random {count} (images kept for the comparison)')
    return [(f'random_{i}', make_image(*RANDOM_IMAGE_SIZES[i % len(RANDOM_IMAGE_SIZES)],
                                       seed + i)) for i in range(count)]


def file_images(paths: list[Path], max_pixels: int | None = None
                ) -> list[tuple[str, np.ndarray]]:
    """Every image read; an unreadable one stops the check (a partial comparison would pass
    on fewer images than asked for)."""
    return [(str(path), read_image(path, max_pixels=max_pixels)) for path in paths]


# ---- metadata -----------------------------------------------------------------------------

def check_metadata(metadata: ModelMetadata, detector: LoadedDetector,
                   outputs: list[tuple[str, str, int]] | None,
                   input_hw: tuple | None) -> list[MetadataIssue]:
    """What in the file's metadata (and its declared outputs) disagrees with the PyTorch model.

    `outputs`: the file's outputs in order as (name, dtype kind 'f'/'i', rank), when known,
    checked against the schema of the metadata's task and NMS mode (`core.tasks`);
    `input_hw`: the graph input's static (height, width), when known.
    """
    issues = []
    spec_pre: PreprocessConfig = detector.spec.preprocessing
    file_pre = metadata.preprocess
    name = detector.spec.name
    if metadata.arch != name:
        issues.append(MetadataIssue('arch', metadata.arch, name, (
            f"file says arch '{metadata.arch}' but it is compared with {name}")))
    if file_pre.channel_order != spec_pre.channel_order:
        issues.append(MetadataIssue('preprocess.channel_order', file_pre.channel_order,
                                    spec_pre.channel_order, (
            f'channel order is {file_pre.channel_order.upper()} in the file but {name} was '
            f'trained on {spec_pre.channel_order.upper()}: runtimes would feed red and blue '
            'swapped')))
    for key in ('mean', 'std'):
        got, want = getattr(file_pre, key), getattr(spec_pre, key)
        if not np.allclose(got, want, rtol=1e-6, atol=1e-6):
            issues.append(MetadataIssue(f'preprocess.{key}', list(got), list(want), (
                f'preprocess {key} {_fmt(got)} in the file differs from {name}\'s {_fmt(want)}: '
                'runtimes would normalise images differently from PyTorch')))
    if abs(file_pre.pad_value - spec_pre.pad_value) > 1e-6:
        issues.append(MetadataIssue('preprocess.pad_value', file_pre.pad_value,
                                    spec_pre.pad_value, (
            f'pad value {file_pre.pad_value:g} in the file, {spec_pre.pad_value:g} for {name}')))
    if file_pre.pad_fill != spec_pre.pad_fill:
        issues.append(MetadataIssue('preprocess.pad_fill', file_pre.pad_fill,
                                    spec_pre.pad_fill, (
            f"padding filled by '{file_pre.pad_fill}' in the file, '{spec_pre.pad_fill}' for "
            f'{name}: runtimes would pad images differently from PyTorch')))
    if input_hw and all(isinstance(s, int) for s in input_hw) and \
            tuple(input_hw) != tuple(file_pre.input_size):
        issues.append(MetadataIssue('preprocess.input_size', list(file_pre.input_size),
                                    list(input_hw), (
            f'metadata input size {_hw(file_pre.input_size)} but the graph takes '
            f'{_hw(input_hw)}')))
    if tuple(metadata.class_names) != tuple(detector.class_names):
        differ = [i for i, (a, b) in enumerate(zip(metadata.class_names, detector.class_names))
                  if a != b]
        where = (f'{len(metadata.class_names)} names vs {len(detector.class_names)}'
                 if len(metadata.class_names) != len(detector.class_names) else
                 f'{len(differ)} differ, first at {differ[0]}: '
                 f"'{metadata.class_names[differ[0]]}' vs '{detector.class_names[differ[0]]}'")
        issues.append(MetadataIssue('class_names', list(metadata.class_names),
                                    list(detector.class_names),
                                    f'class names differ from the checkpoint\'s ({where})'))
    if outputs is not None:
        expected = [(f.name, f.kind, f.rank)
                    for f in output_schema(metadata.task, metadata.nms_mode)]
        if [o[0] for o in outputs] != [e[0] for e in expected]:
            issues.append(MetadataIssue('outputs', [o[0] for o in outputs],
                                        [e[0] for e in expected], (
                f'outputs are ({", ".join(o[0] for o in outputs)}) but the layout in the '
                f'metadata is ({", ".join(e[0] for e in expected)}): runtimes read outputs by '
                'position')))
        elif [o[1:] for o in outputs] != [e[1:] for e in expected]:
            wrong = [o[0] for o, e in zip(outputs, expected) if o[1:] != e[1:]]
            issues.append(MetadataIssue('outputs', outputs, expected, (
                f'outputs {", ".join(wrong)} do not have the type and rank the metadata '
                'layout gives')))
    return issues


def _fmt(values) -> str:
    return '(' + ', '.join(f'{v:g}' for v in values) + ')'


def _hw(size) -> str:
    return f'{size[0]}x{size[1]}'


# ---- the pipeline -------------------------------------------------------------------------

def _onnx_outputs(model) -> list[tuple[str, str, int]]:
    import onnx
    outputs = []
    for info in model.graph.output:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
        outputs.append((info.name, 'f' if np.issubdtype(dtype, np.floating) else 'i',
                        len(info.type.tensor_type.shape.dim)))
    return outputs


def _static_input_hw(model) -> tuple | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    sides = tuple(d.dim_value if d.HasField('dim_value') else None for d in dims[2:4])
    return sides if len(sides) == 2 and None not in sides else None


def _detection_set(outputs, names: tuple[str, ...], index: int,
                   mask_config: MaskConfig | None = None, meta: ImageMeta | None = None
                   ) -> DetectionSet:
    """One image's detections from outputs laid out as `names` (the schema's order); instance
    models' masks also pasted into the original image (`meta`) as the host pipeline does."""
    by_name = dict(zip(names, outputs))
    count = int(by_name['num_dets'][index, 0])
    detections = DetectionSet(np.asarray(by_name['boxes'][index, :count], np.float64),
                              np.asarray(by_name['scores'][index, :count], np.float64),
                              np.asarray(by_name['labels'][index, :count], np.int64))
    if mask_config is not None and 'masks' in by_name:
        detections.mask_probabilities = np.asarray(by_name['masks'][index, :count], np.float32)
        original_boxes = rescale_boxes(np.asarray(by_name['boxes'][index, :count]), meta)
        detections.masks = paste_masks(detections.mask_probabilities, mask_config,
                                       original_boxes, meta.original_hw, meta.scale_wh)
    return detections


def _paired_rows(groups, got: dict, want: dict, image: str, pairings: list[RowPairing]
                 ) -> tuple[dict, dict]:
    """One image's raw outputs with the rows of each `RawRowGroup` (`Detector.raw_row_groups`)
    paired by box (`compare.pair_rows`; the pairing appended to `pairings`): only paired rows
    are compared element-wise, the unpaired ones are counted against the budget."""
    for group in groups:
        if group.key not in got or group.key not in want:
            continue
        pairing = pair_rows(got[group.key], want[group.key], group.nms_iou, group.max_rows,
                            group.key, image)
        pairings.append(pairing)
        rows = {group.key, *group.follow}
        got = {name: value[pairing.backend_index] if name in rows else value
               for name, value in got.items()}
        want = {name: value[pairing.torch_index] if name in rows else value
                for name, value in want.items()}
    return got, want


def run_parity(model_file: str | Path, backend: Backend, detector: LoadedDetector,
               images: list[tuple[str, np.ndarray]],
               options: ParityOptions = ParityOptions()) -> ParityReport:
    """Compare `model_file`, opened as `backend` (`runtimes.open.open_model_file`, best with
    `check_signature=False`: a graph that does not fit its metadata is reported here), with
    `detector` (PyTorch) on `images` (name, RGB uint8 array)."""
    import torch

    from detdeploy.runtimes.model_file import load_onnx_graph
    from detdeploy.runtimes.torch_backend import TorchBackend

    from .onnx_graph import Graph

    metadata: ModelMetadata = backend.metadata
    described = backend.describe()
    # an engine's build precision (fp16, int8) is not the ONNX file's, which its metadata keeps
    precision = str(described.get('precision') or metadata.precision)
    tol = options.tolerances or tolerances_for(precision)
    # A backend that returns graph tensors runs the ONNX file itself: its graph gives the
    # declared outputs, the static input size and the structure the raw outputs live in.
    onnx_model = load_onnx_graph(model_file) if backend.has(INTERMEDIATE_TENSORS) else None
    outputs = input_hw = None
    if onnx_model is not None:
        outputs, input_hw = _onnx_outputs(onnx_model), _static_input_hw(onnx_model)
    issues = check_metadata(metadata, detector, outputs, input_hw)

    nms = metadata.nms or detector.spec.nms('deploy')
    report = ParityReport(
        str(model_file), backend.name, list(described.get('providers', [])),
        detector.spec.name, detector.source, precision, metadata.nms_mode, nms,
        list(metadata.preprocess.input_size), tol, issues)

    # Both sides get the PyTorch model's preprocessing at the file's input size and padding
    # (a fixed-shape file takes only its size): this compares the networks; a preprocessing
    # difference in the metadata is reported above.
    config = dataclasses.replace(detector.spec.preprocessing,
                                 input_size=tuple(metadata.preprocess.input_size),
                                 pad=metadata.preprocess.pad)
    reference = TorchBackend(detector, nms=nms, device=options.torch_device,
                             preprocess_config=config)
    compare_detections = metadata.has_nms and metadata.task in (DETECT, ROTATED, INSTANCE) \
        and not any(i.field == 'outputs' for i in issues)
    if not metadata.has_nms:
        report.notes.append('the file has no NMS (--nms none): only raw outputs are compared')
    elif metadata.task not in (DETECT, ROTATED, INSTANCE):
        report.notes.append(f"detections not compared: parity matches boxes and masks "
                            f"(detect, instance, rotated), the file's task is {metadata.task}")
    elif not compare_detections:
        report.notes.append('detections not compared: the outputs do not follow the layout')
    elif metadata.nms is None:
        report.notes.append(f'the file states no NMS settings: PyTorch ran '
                            f"{detector.spec.name}'s deploy preset")
    # masks are compared when both sides frame them alike (else a metadata issue says why)
    mask_config = metadata.mask if compare_detections and metadata.task == INSTANCE else None
    if mask_config is not None and mask_config != detector.model.mask_config:
        report.metadata_issues.append(MetadataIssue(
            'mask', metadata.mask.to_dict(), detector.model.mask_config.to_dict()
            if detector.model.mask_config else None,
            f'mask settings in the file ({metadata.mask.describe()}) differ from '
            f"{detector.spec.name}'s: runtimes would paste its masks differently"))
        mask_config = None

    graph = None
    raw_names: list[str] = []
    if onnx_model is None:
        report.notes.append(f'raw outputs and --per-layer need the graph\'s tensors, which the '
                            f'{backend.name} backend does not return (compare the ONNX file '
                            'with --backend ort)')
    elif not metadata.raw_outputs:
        report.notes.append('raw outputs not compared: the file names none (exported by an '
                            'older detdeploy?)')
    else:
        graph = Graph(onnx_model)
        raw_names = [name for name in metadata.raw_outputs if name in graph.producer]
        absent = [name for name in metadata.raw_outputs if name not in graph.producer]
        if absent:
            report.metadata_issues.append(MetadataIssue(
                'raw_outputs', list(metadata.raw_outputs), raw_names, (
                f'raw outputs {", ".join(absent)} named in the metadata are not tensors of '
                'the graph')))

    batch_size = options.batch_size or metadata.batch or 4
    batches_by_image: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch, metas = prepare_batch([image for _, image in chunk], config)
        batches_by_image.extend(batch[i:i + 1] for i in range(len(chunk)))
        if compare_detections:
            want = reference.run(batch)
            got = backend.run(batch)
            for index, (name, _) in enumerate(chunk):
                report.images.append(match_detections(
                    _detection_set(want, reference.metadata.output_names, index, mask_config,
                                   metas[index]),
                    _detection_set(got, metadata.output_names, index, mask_config,
                                   metas[index]), tol, nms.score_thr, nms.max_det, name,
                    backend.name))
        if raw_names:
            got_raw = backend.run_tensors(raw_names, batch)
            with torch.no_grad():
                want_raw = detector.model.named_raw_outputs(
                    detector.model(torch.from_numpy(batch).to(options.torch_device)))
            unknown = [name for name in raw_names if name not in want_raw]
            if unknown:
                report.metadata_issues.append(MetadataIssue(
                    'raw_outputs', list(metadata.raw_outputs), list(want_raw), (
                    f'raw outputs {", ".join(unknown)} named in the metadata are not outputs '
                    f'of {detector.spec.name} ({", ".join(want_raw)})')))
                raw_names = [name for name in raw_names if name in want_raw]
            for index in range(len(chunk)):
                per_image = {}
                got_image, want_image = _paired_rows(
                    detector.model.raw_row_groups,
                    {name: got_raw[name][index] for name in raw_names},
                    {name: want_raw[name][index].cpu().numpy() for name in raw_names},
                    chunk[index][0], report.row_pairings)
                got_image, want_image, pairing = detector.model.paired_raw_outputs(
                    got_image, want_image)
                if pairing:
                    report.notes.append(f'{chunk[index][0]}: {pairing}')
                for name in raw_names:
                    comparison = compare_arrays(got_image[name], want_image[name],
                                                tol.atol, tol.rtol, name)
                    per_image[name] = comparison
                    report.raw[name] = merge_comparisons(report.raw.get(name), comparison,
                                                         image_index=start + index)
                report.raw_by_image.append(per_image)

        if options.progress is not None:
            options.progress(len(chunk))

    if options.per_layer and raw_names:
        failing = [(i, name) for i, per in enumerate(report.raw_by_image)
                   for name, c in per.items() if not c.passed]
        if failing:
            image_index = failing[0][0]
            # the earliest failing raw output of that image, in graph order
            name = min((n for i, n in failing if i == image_index), key=graph.producer.get)
            report.layer = find_first_divergence(
                graph, backend, detector.model, batches_by_image[image_index],
                (name, report.raw_by_image[image_index][name]), tol.atol, tol.rtol,
                images[image_index][0])
        else:
            report.notes.append('--per-layer: raw outputs agree, nothing to search' + (
                '' if report.passed else
                ' (the difference arises after the raw outputs: decoding or NMS)'))
    return report
