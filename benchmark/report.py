"""`detdeploy bench` output: the header and tables as text, the JSON file, the PNG plot.

Turns a `timing.BenchResult` into text and files; measures nothing.

JSON schema (`schema_version` 1), all times in milliseconds per batch:

    {"schema_version": 1, "tool": "detdeploy bench",
     "system": {date, hostname, platform, python, cpu_model, logical_cores, usable_cores,
                load_average_1_5_15min, gpu, torch_threads, thread_environment, versions},
     "load_average_end": [1, 5, 15 min], "measured_seconds": float,
     "settings": {warmup_rounds, rounds, iters, seconds_per_config, images, schedule, timer},
     "configs": [{"label", "model", "backend", "device", "batch",
                  "input_shape": [B, 3, H, W] (the shape fed in most timed rounds),
                  "input_shapes": [{"shape": [B, 3, H, W], "rounds": int}] (every shape fed:
                  a model padded to its size divisor gets each batch's own canvas),
                  "providers": [...], "threads": {...}, "precision" (the file's, or what the
                  backend runs, e.g. fp32+bf16), "nms_mode", "nms": {...} | null,
                  "weights", "inference_only_method", "notes": [...],
                  "samples_ms": {"preprocess": [...], "inference": [...], "postprocess": [...],
                                 "end_to_end": [...], "inference_io_binding": [...] (optional)},
                  "stats_ms": {stage: {count, mean, min, p50, p90, p99, max}} for every series
                              above plus "inference_only",
                  "throughput_images_per_s": {"end_to_end": float, "inference_only": float},
                  "ratio_to_baseline": {"end_to_end": {"median": float, "per_round": [...]},
                                        "inference_only": {...}}}]}

`samples_ms[stage][i]` is round i; the rounds of all configurations interleave. Ratios compare
time per image with the first configuration's in the same round.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from detdeploy.benchmark.stats import LatencyStats, summarize, throughput_ips
from detdeploy.benchmark.timing import STAGES, BenchResult, ConfigResult, Entry
from detdeploy.core.fileio import atomic_write

SCHEMA_VERSION = 1


def _stats(config: ConfigResult, key: str) -> LatencyStats:
    if key == 'inference_only':
        key = config.inference_only_key
    return summarize(config.samples_ms[key])


def _throughput(config: ConfigResult, key: str) -> float:
    if key == 'inference_only':
        key = config.inference_only_key
    return throughput_ips(config.samples_ms[key], config.batch)


def _nms_text(entry: Entry) -> str:
    if entry.raw_outputs:
        return 'none (raw outputs, no post-processing)'
    where = 'PyTorch eager' if entry.nms_mode == 'torch' else f'in graph ({entry.nms_mode})'
    settings = entry.backend.metadata.nms
    if settings is None:
        return f'{where}: settings unknown (the file does not record them)'
    return f'{where}: {settings.describe()}'


def _entries(configs: list[ConfigResult]) -> list[Entry]:
    """The entries of the configurations, once each, in table order."""
    return list(dict.fromkeys(config.entry for config in configs))


def header_lines(result: BenchResult) -> list[str]:
    system, settings = result.system, result.settings
    versions = ', '.join(f'{name} {version}' for name, version in system['versions'].items())
    lines = [
        f"date {system['date']}, host {system['hostname']}, {system['platform']}",
        f"CPU {system['cpu_model']}, {system['logical_cores']} logical cores "
        f"({system['usable_cores']} usable); GPU {system['gpu'] or 'none'}",
        f"load average (1/5/15 min) at start {system['load_average_1_5_15min']}, at end "
        f"{result.load_average_end}",
        f'versions: python {system["python"]}, {versions}',
    ]
    if system['thread_environment']:
        lines.append(f"thread variables: {system['thread_environment']}")
    lines.append(f"images: {settings['images']}")
    lines.append(f"schedule: {settings['warmup_rounds']} warm-up rounds, then "
                 f"{settings['rounds']} timed rounds in {result.seconds:.1f} s; "
                 f"{settings['schedule']}")
    for entry in _entries(result.configs):
        shapes = '; '.join(config.describe_input() for config in result.configs
                           if config.entry is entry)
        threads = ', '.join(f'{key} {value}' for key, value in entry.threads.items())
        lines.append(f'{entry.model} {entry.backend.name}/{entry.device}: providers '
                     f'{", ".join(entry.providers)}; threads: {threads or "n/a"}; input '
                     f'{shapes}; NMS {_nms_text(entry)}; inference-only = '
                     f'{entry.inference_only_method}; weights {entry.weights}')
        lines.extend(f'  note: {note}' for note in entry.notes)
    return lines


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    def line(cells):
        return '  '.join(str(cell).rjust(width) if index else str(cell).ljust(width)
                         for index, (cell, width) in enumerate(zip(cells, widths)))
    return [line(headers), line(['-' * width for width in widths]), *map(line, rows)]


def _latency_table(result: BenchResult, key: str) -> list[str]:
    rows = []
    for index, config in enumerate(result.configs):
        stats = _stats(config, key)
        ratio = '1 (baseline)' if index == 0 else _ratio_with_spread(result.ratios(index, key))
        rows.append([config.label, f'{stats.mean:.1f}', f'{stats.min:.1f}', f'{stats.p50:.1f}',
                     f'{stats.p90:.1f}', f'{stats.p99:.1f}', f'{stats.max:.1f}',
                     f'{_throughput(config, key):.2f}', ratio])
    return _table(['configuration', 'mean', 'min', 'p50', 'p90', 'p99', 'max', 'img/s',
                   'ratio'], rows)


def _ratio_with_spread(per_round: np.ndarray) -> str:
    """The median of the per-round ratios and, in brackets, their middle half (p25-p75)."""
    low, median, high = np.percentile(per_round, [25, 50, 75])
    return f'{median:.3f} [{low:.3f}-{high:.3f}]'


def _stage_table(result: BenchResult) -> list[str]:
    rows = []
    for config in result.configs:
        medians = {stage: float(np.median(config.samples_ms[stage])) for stage in STAGES}
        total = sum(medians[stage] for stage in STAGES[:3])
        rows.append([config.label] + [
            f'{medians[stage]:.1f} ({100 * medians[stage] / total:.0f}%)'
            for stage in STAGES[:3]] + [f"{medians['end_to_end']:.1f}"])
    return _table(['configuration', 'preprocess', 'inference', 'postprocess', 'end to end'],
                  rows)


def _mask_paste_lines(result: BenchResult) -> list[str]:
    """Instance models: the host's mask paste (part of postprocess) as its own stage line."""
    from .timing import MASK_PASTE_KEY
    lines = []
    for config in result.configs:
        if MASK_PASTE_KEY in config.samples_ms:
            paste = float(np.median(config.samples_ms[MASK_PASTE_KEY]))
            post = float(np.median(config.samples_ms['postprocess']))
            lines.append(f'mask paste (host, within postprocess): {config.label}: {paste:.1f} '
                         f'ms per batch median ({100 * paste / post:.0f}% of postprocess); '
                         'the masks computed in the graph are part of inference')
    return lines


def format_report(result: BenchResult) -> str:
    rounds = result.settings['rounds']
    lines = header_lines(result)
    lines += ['', 'end to end (image array in, rescaled detections out), ms per batch:',
              *_latency_table(result, 'end_to_end'),
              '', 'inference only (backend call incl. NMS in the graph or in PyTorch), '
              'ms per batch:', *_latency_table(result, 'inference_only'),
              '', 'stages, median ms per batch (share of their sum):', *_stage_table(result),
              *_mask_paste_lines(result),
              '', f'ratio: time per image / the first row\'s, paired round by round, median of '
              f'{rounds} rounds (below 1 = faster), [p25-p75 of the rounds]: a wide spread '
              'means the machine was busy. img/s: batch x samples / total time.']
    return '\n'.join(lines)


def result_to_json(result: BenchResult) -> dict:
    configs = []
    for index, config in enumerate(result.configs):
        entry = config.entry
        series = list(config.samples_ms) + ['inference_only']
        ratios = {}
        for key in ('end_to_end', 'inference_only'):
            per_round = result.ratios(index, key)
            ratios[key] = {'median': float(np.median(per_round)),
                           'p25': float(np.percentile(per_round, 25)),
                           'p75': float(np.percentile(per_round, 75)),
                           'per_round': [float(value) for value in per_round]}
        configs.append({
            'label': config.label, 'model': entry.model, 'backend': entry.backend.name,
            'device': entry.device, 'batch': config.batch, 'input_shape': config.input_shape,
            'input_shapes': [{'shape': shape, 'rounds': count}
                             for shape, count in config.input_shapes],
            'providers': entry.providers, 'threads': entry.threads,
            'precision': entry.description.get('precision', entry.backend.metadata.precision),
            'nms_mode': entry.nms_mode, 'nms': entry.nms, 'weights': entry.weights,
            'inference_only_method': entry.inference_only_method, 'notes': list(entry.notes),
            'samples_ms': {key: [float(v) for v in values]
                           for key, values in config.samples_ms.items()},
            'stats_ms': {key: _stats(config, key).to_dict() for key in series},
            'throughput_images_per_s': {key: _throughput(config, key)
                                        for key in ('end_to_end', 'inference_only')},
            'ratio_to_baseline': ratios,
        })
    return {'schema_version': SCHEMA_VERSION, 'tool': 'detdeploy bench',
            'system': result.system, 'load_average_end': result.load_average_end,
            'measured_seconds': result.seconds, 'settings': result.settings,
            'configs': configs}


def write_json(result: BenchResult, path: str | Path, overwrite: bool = True) -> None:
    with atomic_write(path, 'w', overwrite=overwrite) as handle:
        json.dump(result_to_json(result), handle, indent=1)
        handle.write('\n')


def write_plot(result: BenchResult, path: str | Path, overwrite: bool = True) -> None:
    """Left: end-to-end latency per image, one box per configuration (every sample);
    right: end-to-end and inference-only throughput by batch size, one line per entry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    configs = result.configs
    figure = Figure(figsize=(12, max(4.0, 0.45 * len(configs) + 2)))
    FigureCanvasAgg(figure)
    latency_axes, throughput_axes = figure.subplots(1, 2, width_ratios=[3, 2])
    per_image = [np.asarray(config.samples_ms['end_to_end']) / config.batch
                 for config in configs]
    latency_axes.boxplot(per_image, vert=False, whis=(1, 99), showmeans=True)
    latency_axes.set_yticks(range(1, len(configs) + 1), [config.label for config in configs],
                            fontsize=8)
    latency_axes.invert_yaxis()
    latency_axes.set_xlabel('end-to-end latency per image (ms); whiskers p1-p99, triangle mean')
    latency_axes.grid(axis='x', alpha=0.3)
    for entry in _entries(configs):
        own = [config for config in configs if config.entry is entry]
        name = f'{entry.model} {entry.backend.name}/{entry.device}'
        batches = [config.batch for config in own]
        line, = throughput_axes.plot(batches, [_throughput(c, 'end_to_end') for c in own],
                                     marker='o', label=f'{name} end to end')
        throughput_axes.plot(batches, [_throughput(c, 'inference_only') for c in own],
                             marker='x', linestyle='--', color=line.get_color(),
                             label=f'{name} inference only')
    throughput_axes.set_xlabel('batch size')
    throughput_axes.set_ylabel('images / s')
    throughput_axes.set_xticks(sorted({config.batch for config in configs}))
    throughput_axes.set_ylim(bottom=0)
    throughput_axes.grid(alpha=0.3)
    throughput_axes.legend(fontsize=7)
    system = result.system
    figure.suptitle(f"detdeploy bench, {system['date'][:10]}, {system['cpu_model']} "
                    f"({system['logical_cores']} cores), {result.settings['rounds']} "
                    'alternating rounds', fontsize=10)
    figure.tight_layout()
    with atomic_write(path, overwrite=overwrite) as handle:
        figure.savefig(handle, format='png', dpi=110)
