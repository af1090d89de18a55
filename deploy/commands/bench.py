"""`detdeploy bench`: latency and throughput of models on PyTorch, ONNX Runtime and TensorRT.

Parses, opens one backend per model and runtime and calls `benchmark.timing.run_benchmark`;
the report (which names each configuration's NMS settings) and files are `benchmark.report`'s.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from detdeploy.core.errors import DetdeployError

from .common import (FiniteFloat, ThreadCount, apply_max_pixels, export_for_ort,
                     foreign_model_options, load_model, max_pixels_option, model_overrides,
                     no_overwrite_option, pytorch_model_options, torch_device,
                     weight_inputs)


def _registry_entries(name: str, backends: list[str], device: str, options: dict,
                      temp_dir: Path) -> list:
    """A registry model in PyTorch eager mode and/or exported on the fly to ONNX Runtime, with
    the same weights and NMS settings."""
    from detdeploy.benchmark.timing import Entry
    from detdeploy.models.synthetic_weights import randomize_detector
    from detdeploy.runtimes.open import open_model_file

    detector = load_model(name, options['checkpoint'], options['class_names'],
                          options['trust_checkpoint'], 'is benchmarked with synthetic weights '
                          '(spread scores, so NMS has work; detections are meaningless)')
    nms = detector.spec.nms(options['nms_preset'])
    if detector.source == 'random weights':
        randomize_detector(detector.model)
        detector.source = 'synthetic weights (randomize_detector)'
    entries = []
    for backend in backends:
        if backend == 'torch':
            import torch

            from detdeploy.runtimes.torch_backend import TorchBackend
            torch.set_num_threads(options['threads'])
            config = detector.spec.preprocessing.with_input_size(options['input_hw'])
            entries.append(Entry(detector.spec.name, TorchBackend(
                detector, nms=nms, device=torch_device(device), preprocess_config=config)))
        else:
            started = time.perf_counter()
            path = export_for_ort(detector, nms, options['nms_preset'], temp_dir,
                                  options['input_hw'])
            seconds = time.perf_counter() - started
            entries.append(Entry(detector.spec.name, open_model_file(
                path, 'ort', device=device, threads=options['threads']),
                [f'exported on the fly from the same weights as the torch run, in '
                 f'{seconds:.1f} s']))
    return entries


def _input_sizes(plan, input_hw) -> list[tuple[int, int]]:
    """The network input sizes the models will run at, as far as known before opening them
    (registry specs, detdeploy files' metadata), for the memory check of --batch; a registry
    model's --input-size is checked here, before its weights load (`check_input_size`)."""
    from detdeploy.runtimes.model_file import read_onnx_metadata
    from detdeploy.runtimes.open import model_kind
    sizes = []
    for model, _ in plan:
        if model_kind(model) == 'torch':
            from detdeploy.models.registry import get_spec    # torch: registry models only
            sizes.append(get_spec(model).preprocessing.with_input_size(input_hw).input_size)
            continue
        try:
            if model_kind(model) == 'ort':
                config = read_onnx_metadata(model).preprocess
            else:
                continue
        except DetdeployError:
            continue                # foreign or broken files: reported when opened
        sizes.append(tuple(input_hw or config.input_size))
    return sizes


@click.command()
@click.argument('models', nargs=-1, metavar='MODEL [MODEL...]')
@pytorch_model_options
@click.option('--backend', 'backends', help='Comma-separated torch,ort,trt,openvino,openvino-f32,'
              'openvino-bf16 [default: from each MODEL: ort for .onnx, trt for .engine, torch for '
              'registry names]. A registry name with ort is exported to a temporary ONNX file '
              'first; .onnx files run on each of ort and the openvino ones asked for.')
@click.option('--device', default='cpu', show_default=True,
              help='torch: cpu, cuda, cuda:N; ort: cpu, cuda, tensorrt.')
@click.option('--batch', 'batch_text', default='1', show_default=True,
              help='Batch sizes, comma-separated (1,4,8).')
@click.option('--warmup', type=click.IntRange(min=0), default=10, show_default=True,
              help='Untimed rounds first.')
@click.option('--iters', type=click.IntRange(min=1),
              help='Timed rounds: samples per configuration [default: 100].')
@click.option('--seconds', type=FiniteFloat(min=0, min_open=True, max=3600),
              help='Instead of --iters: measure for about this long per configuration '
              '(at most an hour).')
@click.option('--threads', type=ThreadCount(),
              help='Intra-op threads, the same for PyTorch and ONNX Runtime [default: the '
              'physical cores this process may use].')
@click.option('--images', 'images_dir', type=click.Path(),
              help='Folder of images [default: generated ones]; decoded once into memory.')
@click.option('--input-size', help="Network input for registry models: 640 or HxW "
              "[default: the model's]; for .onnx files, only with a --dynamic-shape export.")
@click.option('--nms-preset', type=click.Choice(['deploy', 'eval']), default='deploy',
              show_default=True, help='NMS settings of registry models (torch and ort exports); '
              'files keep their own.')
@click.option('--json', 'json_path', type=click.Path(dir_okay=False),
              help='Write every sample and the summary here.')
@click.option('--plot', 'plot_path', type=click.Path(dir_okay=False),
              help='Write a PNG: latency distributions and throughput by batch size.')
@foreign_model_options
@max_pixels_option
@no_overwrite_option
def bench(models, model_name, checkpoint, class_names, trust_checkpoint, backends, device,
          batch_text, warmup, iters, seconds, threads, images_dir, input_size, nms_preset,
          json_path, plot_path, mean, std, channel_order, pad_value, max_pixels,
          no_overwrite) -> None:
    """Time MODELs end to end and per stage, in alternating rounds.

    MODEL: a .onnx file (ONNX Runtime), a .engine file (TensorRT) or a registry name
    (PyTorch; with --checkpoint). Configurations are every model x backend x batch size;
    the first is the baseline the ratios compare with.
    """
    from detdeploy.benchmark.report import format_report, write_json, write_plot
    from detdeploy.benchmark.system import load_average, load_warning, physical_cores
    from detdeploy.benchmark.timing import (Entry, check_batch_memory, load_images,
                                            parse_int_list, run_benchmark)
    from detdeploy.core.fileio import (check_input_file, check_output_file,
                                       refuse_overwriting_inputs)
    from detdeploy.core.progress import Progress
    from detdeploy.inference.batch import collect_images
    from detdeploy.runtimes.open import backends_for, model_kind, open_model_file, parse_backends

    models = ((model_name,) if model_name else ()) + tuple(models)
    if not models:
        raise DetdeployError('no model given: detdeploy bench MODEL [MODEL...]')
    if iters is not None and seconds is not None:
        raise DetdeployError('give --iters or --seconds, not both')
    batches = parse_int_list(batch_text, '--batch')
    requested = parse_backends(backends)
    plan = [(model, backends_for(model, requested)) for model in models]
    registry_models = [model for model, _ in plan if model_kind(model) == 'torch']
    if checkpoint and len(registry_models) != 1:
        raise DetdeployError(f'--checkpoint fits one registry model; got '
                             f'{len(registry_models)}: {", ".join(registry_models) or "none"}')
    for model, _ in plan:
        if model_kind(model) != 'torch':
            check_input_file(model, 'model file')
    for flag, path in (('--json', json_path), ('--plot', plot_path)):
        if path:
            check_output_file(path, overwrite=not no_overwrite, flag=flag)
    if json_path and plot_path and Path(json_path).resolve() == Path(plot_path).resolve():
        raise DetdeployError('--json and --plot name the same file')
    refuse_overwriting_inputs(
        [(flag, path) for flag, path in (('--json', json_path), ('--plot', plot_path)) if path],
        [('model', model) for model, _ in plan] + weight_inputs(checkpoint, class_names)
        + ([('--images', path) for path in collect_images([images_dir])]
           if images_dir and Path(images_dir).is_dir() else []))
    cores = physical_cores()
    threads = threads or cores          # one default for every backend, not each library's own
    overrides = model_overrides(class_names, input_size, mean, std, channel_order, pad_value)
    if overrides.preprocessing_flags() and any(model_kind(m) != 'ort' for m, _ in plan):
        raise DetdeployError(f'{", ".join(overrides.preprocessing_flags())}: only for .onnx '
                             'files from other tools')
    options = {'checkpoint': checkpoint, 'class_names': class_names,
               'trust_checkpoint': trust_checkpoint, 'nms_preset': nms_preset,
               'input_hw': overrides.input_size, 'threads': threads}
    check_batch_memory(max(batches), _input_sizes(plan, overrides.input_size))
    images, names, description = load_images(images_dir, max(batches),
                                             apply_max_pixels(max_pixels))
    with tempfile.TemporaryDirectory(prefix='detdeploy_bench_') as temp:
        entries = []
        for model, model_backends in plan:
            if model_kind(model) == 'torch':
                entries += _registry_entries(model, model_backends, device, options, Path(temp))
            else:
                entries += [Entry(Path(model).name, open_model_file(
                    model, name, device=device, threads=threads, overrides=overrides))
                    for name in model_backends]
        for entry in entries:
            if entry.backend.fallback:
                click.echo(f'warning: {entry.model}: {entry.backend.fallback}', err=True)
        configs = len(entries) * len(batches)
        # said once everything is loaded, just before timing starts
        load = load_average()
        click.echo(f'bench: {threads} intra-op threads per backend ({cores} physical cores), '
                   f'load average {load[0] if load else "unknown"} (1 min)', err=True)
        warning = load_warning(load[0] if load else None, cores)
        if warning:
            click.echo(f'warning: {warning}', err=True)
        rounds = (iters or 100) if seconds is None else None
        with Progress('bench', total=rounds, unit='rounds') as progress:
            result = run_benchmark(
                entries, batches, images, names, description, warmup=warmup,
                iters=rounds, seconds=seconds, progress=lambda _: progress.update())
    click.echo(format_report(result))
    if json_path:
        write_json(result, json_path, overwrite=not no_overwrite)
        click.echo(f'wrote {json_path} (every sample of {configs} configurations)')
    if plot_path:
        write_plot(result, plot_path, overwrite=not no_overwrite)
        click.echo(f'wrote {plot_path}')
