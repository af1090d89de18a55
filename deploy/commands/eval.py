"""`detdeploy eval`: COCO box mAP (instance models: and mask mAP) of a model on one or more
backends, with the difference to the first; rotated models get DOTA-style rotated mAP
(`evaluation.rotated_eval`) on a dataset whose annotations carry oriented boxes (`rbox`).

A registry name runs in PyTorch; with `ort` among the backends it is also exported to a
temporary ONNX file (same weights, same NMS preset) so both are scored on the same images.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from detdeploy.core.errors import DetdeployError

from .common import (DEFAULT_MODEL, FiniteFloat, ThreadCount, apply_max_pixels, export_for_ort,
                     foreign_model_options, load_model, max_pixels_option, model_overrides,
                     nms_line, no_overwrite_option, pytorch_model_options, refuse_weight_flags,
                     torch_device, weight_inputs)

EXIT_CHECK_FAILED = 1


def _registry_backends(model, backends, options, temp_dir: Path) -> list:
    from detdeploy.runtimes.torch_backend import TorchBackend
    detector = load_model(model, options['checkpoint'], options['class_names'],
                          options['trust_checkpoint'],
                          'uses random weights (expect an AP of 0)')
    nms = detector.spec.nms(options['nms_preset'])
    runners = []
    for backend in backends:
        if backend == 'torch':
            runners.append(TorchBackend(detector, nms=nms, device=torch_device(options['device'])))
        else:
            from detdeploy.runtimes.open import open_model_file
            path = export_for_ort(detector, nms, options['nms_preset'], temp_dir)
            runners.append(open_model_file(path, 'ort', device=options['device'],
                                           threads=options['threads']))
    return runners


def _not_eval_preset(model: str, metadata) -> str | None:
    """Why a file's AP may sit below the published one: its NMS is not its model's eval preset
    (a file keeps the settings it was exported with, by default the deploy preset)."""
    from detdeploy.core.errors import UnknownModelError
    if metadata.nms is None:
        return None
    try:
        from detdeploy.models.registry import get_spec
        eval_nms = get_spec(metadata.arch).nms('eval')
    except (UnknownModelError, KeyError):
        return None
    if metadata.nms == eval_nms:
        return None
    return (f"{model} has the NMS settings it was exported with ({metadata.nms.describe()}), "
            f"not {metadata.arch}'s eval preset ({eval_nms.describe()}) that COCO mAP is "
            'usually measured with, so its AP can be lower; for comparable numbers export '
            'with --nms-preset eval')


def _is_rotated(model: str) -> bool:
    from detdeploy.core.errors import UnknownModelError
    from detdeploy.models.registry import get_spec
    try:
        return get_spec(model).model_class.task == 'rotated'
    except UnknownModelError:
        return False            # load_model says what is wrong with the name


def headline(results) -> str:
    """The metric --min-ap and the differences use: COCO's AP, or for rotated models AP50 (the
    DOTA mAP at rotated IoU 0.5 that MMRotate reports)."""
    return 'AP50' if hasattr(results[0], 'per_class') else 'AP'


def format_table(results) -> str:
    from detdeploy.evaluation.coco_eval import METRIC_NAMES
    from detdeploy.evaluation.rotated_eval import ROTATED_METRIC_NAMES
    key = headline(results)
    names = ROTATED_METRIC_NAMES if key == 'AP50' else METRIC_NAMES
    header = f"{'backend':<24}" + ''.join(f'{m:>8}' for m in names) + \
        f"{'d' + key:>9}{'images':>8}{'dets':>8}{'s':>7}"
    lines = [header]
    rows = [(result.backend + (' bbox' if getattr(result, 'segm_metrics', None) else ''),
             result.metrics, result, 'bbox') for result in results]
    # instance models: a mask row (pycocotools iouType 'segm') under each box row
    rows += [(result.backend + ' segm', result.segm_metrics, result, 'segm')
             for result in results if getattr(result, 'segm_metrics', None)]
    base = {kind: metrics[key] for _, metrics, _, kind in reversed(rows)}
    first = {kind: next(r for r in rows if r[3] == kind)[2] for kind in base}
    for name, metrics, result, kind in rows:
        delta = ('(base)' if result is first[kind] else f"{metrics[key] - base[kind]:+.4f}")
        lines.append(f'{name:<24}' + ''.join(f'{metrics[m]:>8.4f}' for m in names)
                     + f'{delta:>9}{result.num_images:>8}{result.num_detections:>8}'
                     f'{result.seconds:>7.1f}')
    if key == 'AP50':
        lines.append('AP50 per class (' + results[0].backend + '): ' + ', '.join(
            f'{c.name} {c.ap:.4f}' for c in results[0].per_class if c.num_gts))
    return '\n'.join(lines)


@click.command('eval')
@click.argument('model', required=False)
@pytorch_model_options
@click.option('--ann', 'ann_file', required=True, type=click.Path(dir_okay=False),
              help='COCO instances JSON with the ground truth (rotated models: with oriented '
              'boxes, `rbox`, as make-dataset shapes --rotated writes).')
@click.option('--images', 'image_dir', required=True, type=click.Path(file_okay=False),
              help='Folder the annotation file names are relative to.')
@click.option('--backend', 'backends', help='Comma-separated torch,ort,trt [default: torch for '
              'registry names, ort for .onnx, trt for .engine]; the first is the baseline.')
@click.option('--device', default='cpu', show_default=True,
              help='torch: cpu, cuda, cuda:N; ort: cpu, cuda, tensorrt.')
@click.option('--threads', type=ThreadCount(), help='ort: intra-op threads.')
@click.option('--batch', 'batch_size', type=click.IntRange(min=1), default=1, show_default=True,
              help='Images per forward pass (a static-batch file runs at its own batch).')
@click.option('--nms-preset', type=click.Choice(['eval', 'deploy']), default='eval',
              show_default=True, help='NMS of registry models (files keep their own): eval = '
              'score 0.001, 300 detections, as COCO mAP is measured.')
@click.option('--min-ap', type=FiniteFloat(0, 1),
              help='Exit with code 1 when any backend scores an AP (rotated models: AP50) '
              'below this.')
@click.option('--json', 'json_path', type=click.Path(dir_okay=False),
              help='Write the metrics of every backend here.')
@click.option('--input-size', help='.onnx files from other tools with a dynamic input, and '
              '--dynamic-shape files: network input, 640 or HxW (multiples of the size divisor).')
@foreign_model_options
@max_pixels_option
@no_overwrite_option
def eval_command(model, model_name, checkpoint, class_names, trust_checkpoint, ann_file,
                 image_dir, backends, device, threads, batch_size, nms_preset, min_ap,
                 json_path, input_size, mean, std, channel_order, pad_value, max_pixels,
                 no_overwrite) -> None:
    """COCO box mAP (AP, AP50, AP75, small/medium/large) of MODEL on a COCO-format dataset;
    instance models add mask mAP (a 'segm' row per backend); for rotated models DOTA-style mAP
    (VOC 11-point AP per class at rotated IoU 0.5, 0.75 and 0.5:0.95) against the annotations'
    oriented boxes.

    MODEL: a registry name (with --checkpoint; the default is the bundled model), a .onnx or an
    .engine file. With several backends, a table and each one's AP difference to the first.
    """
    from detdeploy.core.coco import image_path
    from detdeploy.core.fileio import (check_input_file, check_output_file,
                                       refuse_overwriting_inputs)
    from detdeploy.core.progress import Progress
    from detdeploy.evaluation.coco_eval import evaluate, load_coco, write_json
    from detdeploy.evaluation.rotated_eval import evaluate_rotated
    from detdeploy.runtimes.open import backends_for, is_model_file, open_model_file, parse_backends

    if model and model_name:
        raise DetdeployError(f'give MODEL or --model, not both ({model}, {model_name})')
    model = model or model_name or DEFAULT_MODEL
    if is_model_file(model):
        check_input_file(model, 'model file')
    requested = parse_backends(backends)
    chosen = backends_for(model, requested)
    left_out = [b for b in requested or () if b not in chosen]
    if left_out:        # bench runs each MODEL on the backends that apply; eval has one MODEL
        raise DetdeployError(f'--backend {left_out[0]}: {model} is a file and runs on '
                             f"{','.join(chosen)} only; for PyTorch give the registry name "
                             '(with --checkpoint), or compare both with detdeploy parity')
    if json_path:
        check_output_file(json_path, overwrite=not no_overwrite, flag='--json')
    overrides = model_overrides(class_names if is_model_file(model) else None, input_size, mean,
                                std, channel_order, pad_value)
    if not is_model_file(model) and (overrides.input_size or overrides.preprocessing_flags()):
        raise DetdeployError('--input-size, --mean, --std, --channel-order and --pad-value are '
                             f'for model files, not the registry model {model}')
    if is_model_file(model):
        refuse_weight_flags(model, checkpoint, trust_checkpoint)
    limit = apply_max_pixels(max_pixels)
    coco = load_coco(ann_file)
    if not is_model_file(model) and _is_rotated(model):
        from detdeploy.core.rotated_coco import rotated_boxes
        rotated_boxes(coco.dataset, str(ann_file))       # before any model is built
    if json_path:                   # before any model runs
        refuse_overwriting_inputs(
            [('--json', json_path)],
            [('--ann', ann_file), ('model', model)] + weight_inputs(checkpoint, class_names)
            + [('image', image_path(image_dir, image['file_name']))
               for image in coco.imgs.values()])
    options = {'checkpoint': checkpoint, 'class_names': class_names, 'device': device,
               'trust_checkpoint': trust_checkpoint, 'nms_preset': nms_preset,
               'threads': threads}
    with tempfile.TemporaryDirectory(prefix='detdeploy_eval_') as temp:
        if is_model_file(model):
            runners = [open_model_file(model, b, device=device, threads=threads,
                                       overrides=overrides) for b in chosen]
        else:
            runners = _registry_backends(model, chosen, options, Path(temp))
        results = []
        for runner in runners:
            if runner.fallback:
                click.echo(f'warning: {runner.fallback}', err=True)
            with Progress(f'eval {runner.name}', total=len(coco.getImgIds())) as progress:
                scorer = evaluate_rotated if runner.metadata.task == 'rotated' else evaluate
                result = scorer(runner, ann_file, image_dir, batch_size=batch_size, coco=coco,
                                max_pixels=limit, progress=progress.update)
            for warning in result.warnings:
                click.echo(f'warning: {result.backend}: {warning}', err=True)
            # after the evaluation, so that bad input stays a one-line error
            note = _not_eval_preset(model, runner.metadata) if is_model_file(model) else None
            if note:
                click.echo(f'note: {note}', err=True)
            results.append(result)
    click.echo(format_table(results))
    for runner, result in zip(runners, results):
        click.echo(f'{result.backend} {nms_line(runner.metadata)}')
    if json_path:
        write_json(json_path, {'model': model, 'ann': str(ann_file), 'results': [
            {'backend': r.backend, 'metrics': r.metrics,
             **({'segm_metrics': r.segm_metrics} if getattr(r, 'segm_metrics', None) else {}),
             'images': r.num_images, 'detections': r.num_detections, 'seconds': r.seconds,
             **({'ap50_per_class': {c.name: c.ap for c in r.per_class if c.num_gts}}
                if hasattr(r, 'per_class') else {})} for r in results]},
            overwrite=not no_overwrite)
        click.echo(f'wrote {json_path}')
    if min_ap is not None:
        key = headline(results)
        below = [r for r in results if r.metrics[key] < min_ap]
        if below:
            click.echo(f'FAIL: {key} below --min-ap {min_ap}: ' + ', '.join(
                f"{r.backend} {r.metrics[key]:.4f}" for r in below))
            sys.exit(EXIT_CHECK_FAILED)
        click.echo(f'PASS: every {key} >= {min_ap}')
