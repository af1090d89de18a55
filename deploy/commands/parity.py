"""`detdeploy parity`: check an exported model against the PyTorch model it came from."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from detdeploy.core.errors import DetdeployError, one_line
from detdeploy.runtimes.open import FILE_BACKENDS

from .common import (FiniteFloat, apply_max_pixels, load_model, max_pixels_option,
                     no_overwrite_option, pytorch_model_options, torch_device,
                     weight_inputs)

EXIT_MISMATCH = 1
SHOWN_UNMATCHED = 2


@click.command()
@click.argument('model_file', type=click.Path(dir_okay=False))
@click.argument('image_args', nargs=-1, metavar='[IMAGES_DIRS_GLOBS...]')
@pytorch_model_options
@click.option('--images', 'image_inputs', multiple=True,
              help='Image files, directories or quoted globs (repeatable; more may follow '
              'MODEL_FILE as arguments).')
@click.option('--recursive', '-r', is_flag=True, help='Search directories\' subfolders too.')
@click.option('--random', 'random_count', type=click.IntRange(min=1),
              help='Use N generated images (seeded) instead of --images.')
@click.option('--backend', 'backend_name', type=click.Choice(FILE_BACKENDS), default='auto',
              show_default=True,
              help='auto: by the suffix of MODEL_FILE (.onnx: ort, .engine/.plan: trt).')
@click.option('--device', default='cpu', show_default=True,
              help="The backend's device (ort: cpu, cuda, tensorrt); PyTorch: --torch-device.")
@click.option('--torch-device', 'torch_device_name', default='cpu', show_default=True,
              help='Device of the PyTorch reference.')
@click.option('--atol', type=FiniteFloat(min=0),
              help='Raw-output absolute tolerance [default: by precision, fp32 1e-2, bf16 3, '
              'int8 0.3].')
@click.option('--rtol', type=FiniteFloat(min=0),
              help='Raw-output relative tolerance [default: by precision, fp32 1e-3, bf16 0.5, '
              'int8 0.1].')
@click.option('--per-layer', is_flag=True,
              help='If raw outputs differ, bisect the graph for the first diverging layer.')
@click.option('--batch', 'batch_size', type=click.IntRange(min=1),
              help="Images per forward pass [default: the file's static batch, else 4].")
@click.option('--json', 'json_path', type=click.Path(dir_okay=False),
              help='Write the full report here (JSON).')
@max_pixels_option
@no_overwrite_option
def parity(model_file, image_args, recursive, model_name, checkpoint, class_names,
           trust_checkpoint, image_inputs, random_count, backend_name, device, torch_device_name,
           atol, rtol, batch_size, per_layer, json_path, max_pixels, no_overwrite) -> None:
    """Check that MODEL_FILE gives the PyTorch model's answers: metadata, detections, raw
    outputs (and with --per-layer, the first layer that differs). Exit 0 pass, 1 mismatch."""
    from detdeploy.core.fileio import (check_input_file, check_output_file,
                                       refuse_overwriting_inputs)
    from detdeploy.inference.batch import collect_images
    from detdeploy.runtimes.open import open_model_file
    from detdeploy.verification.compare import tolerances_for
    from detdeploy.verification.parity import (ParityOptions, file_images, random_images,
                                               recorded_checkpoint, run_parity, write_report)

    image_inputs = tuple(image_inputs) + tuple(image_args)
    if bool(image_inputs) == bool(random_count):
        raise DetdeployError('give either images (--images PATH, repeatable, or paths after '
                             'MODEL_FILE) or --random N')
    check_input_file(model_file, 'model file')
    if json_path:
        check_output_file(json_path, overwrite=not no_overwrite, flag='--json')
        image_files = collect_images(list(image_inputs)) if image_inputs else []
        refuse_overwriting_inputs([('--json', json_path)], [('model', model_file)]
                                  + [('image', path) for path in image_files]
                                  + weight_inputs(checkpoint, class_names))
    # a graph that does not fit its metadata is opened anyway: parity reports how it differs
    backend = open_model_file(model_file, backend_name, device=device, check_signature=False)
    images = (random_images(random_count) if random_count
              else file_images(collect_images(list(image_inputs), recursive=recursive),
                               apply_max_pixels(max_pixels)))
    if checkpoint is None and model_name is None and class_names is None:
        checkpoint = recorded_checkpoint(backend.metadata, model_file)   # the file's weights
        if checkpoint:
            click.echo(f'note: no --checkpoint given, using the one {model_file} was exported '
                       f'from: {checkpoint} (sha256 checked)', err=True)
    detector = load_model(model_name or backend.metadata.arch, checkpoint, class_names,
                          trust_checkpoint, 'uses random weights: the file must have been '
                          'exported from the same random weights to agree')
    tolerances = None
    if atol is not None or rtol is not None:
        base = tolerances_for(backend.describe().get('precision') or backend.metadata.precision)
        tolerances = dataclasses.replace(base, atol=base.atol if atol is None else atol,
                                         rtol=base.rtol if rtol is None else rtol)
    from detdeploy.core.progress import Progress
    with Progress('parity', total=len(images)) as progress:
        options = ParityOptions(torch_device=torch_device(torch_device_name),
                                tolerances=tolerances, per_layer=per_layer,
                                batch_size=batch_size, progress=progress.update)
        report = run_parity(model_file, backend, detector, images, options)
    if json_path:
        write_report(report, json_path, overwrite=not no_overwrite)
    lines = [one_line(line) for line in format_report(report)]   # names may hold newlines
    for line in lines[:-1]:
        click.echo(line)
    if json_path:
        click.echo(f'report: {json_path}')
    click.echo(lines[-1])
    if not report.passed:
        click.get_current_context().exit(EXIT_MISMATCH)


def format_report(report) -> list[str]:
    """The report as text: header, metadata, a table per image, raw outputs, layer, verdict."""
    from detdeploy.verification.compare import (MAX_UNPAIRED_ROW_SHARE,
                                                MIN_EXCUSED_UNPAIRED_ROWS, ROW_PAIRING_PX)
    tol = report.tolerances
    providers = f' ({", ".join(report.providers)})' if report.providers else ''
    lines = [f'parity: {report.model_file} on {report.backend}{providers} vs PyTorch '
             f'{report.arch} ({report.checkpoint}); {report.precision}, '
             f'{len(report.raw_by_image) or len(report.images)} images at '
             f'{report.input_size[0]}x{report.input_size[1]}']
    if report.metadata_issues:
        lines += [f'metadata: MISMATCH {issue.field}: {issue.explanation}'
                  for issue in report.metadata_issues]
    else:
        lines.append('metadata: ok (arch, preprocessing, class names, output layout)')
    if report.images:
        lines.append(f'nms (both sides, --nms {report.nms_mode}): {report.nms.describe()}')
        lines.append(f'detections (network-input px; box fails if off > {tol.box_atol_px:g} px '
                     f'and > {tol.box_rtol:g} rel, score if off > {tol.score_atol:g}; '
                     f'borderline: within {tol.borderline:g} of the score threshold or max-det '
                     'cut):')
        width = max(8, *(len(Path(m.source).name) for m in report.images))
        lines.append(f'  {"image":<{width}}  torch  {report.backend:>5}  matched  '
                     f'box err px  score err  unmatched (side:label@score)    status')
        for match in report.images:
            shown = ', '.join(f'{u.side}:{u.label}@{u.score:.4f}' + ('*' if u.borderline else '')
                              for u in match.unmatched[:SHOWN_UNMATCHED])
            if len(match.unmatched) > SHOWN_UNMATCHED:
                shown += f' +{len(match.unmatched) - SHOWN_UNMATCHED}'
            lines.append(f'  {Path(match.source).name:<{width}}  {match.torch_count:>5}  '
                         f'{match.backend_count:>5}  {match.matched:>7}  '
                         f'{match.max_box_error_px:>10.2e}  {match.max_score_error:>9.2e}  '
                         f'{shown or "-":<30}  {match.status}')
        if any(u.borderline for m in report.images for u in m.unmatched):
            lines.append('  (* borderline: not a failure)')
        if any(match.min_mask_iou is not None for match in report.images):
            lines.append(f'masks of matched detections (fail if over '
                         f'{tol.mask_prob_max_share:.0%} of the probabilities are off by more '
                         f'than {tol.mask_prob_atol:g}, or the IoU at the original resolution '
                         f'is below {tol.mask_min_iou:g} on masks of {tol.mask_iou_min_pixels}+ '
                         'px):')
            lines.append(f'  {"image":<{width}}  min IoU  max prob err  failed')
            for match in report.images:
                if match.min_mask_iou is not None:
                    lines.append(f'  {Path(match.source).name:<{width}}  '
                                 f'{match.min_mask_iou:>7.4f}  '
                                 f'{match.max_mask_prob_error:>12.2e}  {match.failed_masks:>6}')
        for match in report.images:
            if match.too_many_borderline:
                lines.append(f'  {Path(match.source).name}: {len(match.unmatched)} unmatched near '
                             f'the cut or threshold, more than {tol.max_borderline_share:.0%} of '
                             'a side: not a tie effect, counted as failures')
    if report.raw:
        lines.append(f'raw outputs before NMS (element fails if |a-b| > {tol.atol:g} and '
                     f'|a-b|/|b| > {tol.rtol:g}):')
        width = max(14, *(len(name) for name in report.raw))
        lines.append(f'  {"tensor":<{width}} max abs err  max rel err  failing   '
                     f'worst at (img,c,y,x)  {report.backend} / torch')
        for name, comparison in report.raw.items():
            lines.append(f'  {name:<{width}} {comparison.max_abs_error:>11.2e}  '
                         f'{comparison.max_rel_error:>11.2e}  '
                         f'{100 * comparison.failing_share:>6.2f} %  '
                         f'{str(tuple(comparison.worst_index)):<20}  '
                         f'{comparison.worst_got:.6g} / {comparison.worst_want:.6g}')
    for key in dict.fromkeys(p.key for p in report.row_pairings):
        pairings = [p for p in report.row_pairings if p.key == key]
        worst = max(pairings, key=lambda p: max(p.unpaired_torch, p.unpaired_backend))
        lines.append(
            f'  {key} rows paired by box (within {ROW_PAIRING_PX:g} px): '
            f'{sum(p.paired for p in pairings)} of {sum(p.torch_rows for p in pairings)} torch '
            f'/ {sum(p.backend_rows for p in pairings)} {report.backend} rows on '
            f'{len(pairings)} images ({sum(p.reordered for p in pairings)} in another '
            f'order); unpaired {sum(p.unpaired_torch for p in pairings)} torch '
            f'/ {sum(p.unpaired_backend for p in pairings)} {report.backend}, '
            f'{sum(p.unexplained for p in pairings)} not at an NMS tie (budget per image and '
            f'side: {MAX_UNPAIRED_ROW_SHARE:.0%} of the rows, at least '
            f'{MIN_EXCUSED_UNPAIRED_ROWS}; worst {Path(worst.image).name}: '
            f'{worst.unpaired_torch} / {worst.unpaired_backend} of budget {worst.budget})')
    if report.layer:
        layer = report.layer
        found = layer.found
        c = found.comparison
        lines.append(f'per-layer ({layer.steps} pruned runs, {layer.mapped_tensors} tensors '
                     f'mapped by {layer.mapping_source}, image {Path(layer.image).name}):')
        lines.append(f'  first diverging: node {found.node} ({found.op_type}) -> tensor '
                     f'{found.tensor} = module {found.module or "(unmapped)"}')
        lines.append(f'    max abs err {c.max_abs_error:.3g}, max rel err {c.max_rel_error:.3g}, '
                     f'{100 * c.failing_share:.2f} % failing, worst at {tuple(c.worst_index)}: '
                     f'{c.worst_got:.6g} vs {c.worst_want:.6g}')
        if layer.agreeing_inputs:
            lines.append('  its inputs agree: ' + ', '.join(
                f'{i.tensor} = {i.module} (max abs err {i.comparison.max_abs_error:.2g})'
                for i in layer.agreeing_inputs))
        weights = [w for s in layer.suspect_nodes for w in s['weights']]
        lines.append(f'  nodes in between ({len(layer.suspect_nodes)}): ' + ', '.join(
            f"{s['node']} ({s['op_type']})" for s in layer.suspect_nodes[:6]) +
            (', ...' if len(layer.suspect_nodes) > 6 else ''))
        if weights:
            lines.append(f'  their weights: {", ".join(weights[:6])}'
                         + (', ...' if len(weights) > 6 else ''))
    lines += [f'note: {note}' for note in report.notes]
    if report.passed:
        lines.append(f'PASS: {report.model_file} agrees with PyTorch on '
                     f'{len(report.raw_by_image) or len(report.images)} images')
    else:
        lines.append('FAIL: ' + '; '.join(report.failures))
    return lines
