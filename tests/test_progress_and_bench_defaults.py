"""Long steps are never silent (one line every few seconds when stderr is not a terminal), and
`bench` defaults to one thread count for every backend, says the load, and reports the spread
of its paired ratios."""
from __future__ import annotations

import io
import os

import pytest
import torch

from detdeploy.benchmark import system
from detdeploy.cli import main as cli_main
from detdeploy.core.progress import Progress


def test_progress_without_a_terminal_prints_lines():
    stream = io.StringIO()
    with Progress('eval torch', total=4, stream=stream, interval_s=0) as progress:
        assert not progress.terminal and progress.bar is None
        progress.update(1)
        progress.update(3)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith('eval torch: 1/4 img ~') and lines[0].endswith(' s)')
    assert lines[1].startswith('eval torch: 4/4 img (')
    assert lines[-1].startswith('eval torch: done 4/4 img (')


def test_progress_lines_are_periodic_not_per_item():
    stream = io.StringIO()
    with Progress('bench', total=1000, unit='rounds', stream=stream, interval_s=3600) as progress:
        for _ in range(1000):
            progress.update()
    assert stream.getvalue().splitlines() == [stream.getvalue().splitlines()[-1]]
    assert 'done 1000/1000 rounds' in stream.getvalue()


def test_stages_are_named_as_they_start():
    stream = io.StringIO()
    with Progress('export m.onnx', stream=stream) as progress:
        progress.stage('tracing the model')
        progress.stage('writing')
    lines = stream.getvalue().splitlines()
    assert [line.split(' (')[0] for line in lines] == [
        'export m.onnx: tracing the model', 'export m.onnx: writing', 'export m.onnx: done']


def test_progress_on_a_terminal_is_a_tqdm_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    stream = Terminal()
    with Progress('parity', total=2, stream=stream) as progress:
        progress.update(2)
    assert progress.bar.n == 2 and 'parity:' in stream.getvalue() and '\r' in stream.getvalue()


def test_physical_cores_and_the_load_warning():
    cores = system.physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    assert system.load_warning(cores - 0.5, cores) is None
    assert system.load_warning(None, cores) is None
    warning = system.load_warning(cores + 3.0, cores)
    assert f'above the {cores} cores' in warning and '--threads 1' in warning


def test_bench_defaults_threads_warns_on_load_and_reports_spread(monkeypatch, capsys):
    monkeypatch.setattr(os, 'getloadavg', lambda: (99.0, 50.0, 20.0))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_:
            cli_main(['bench', 'rtmdet', '--input-size', '64', '--batch', '1,2', '--warmup', '0',
                      '--iters', '3'])
        assert torch.get_num_threads() == system.physical_cores()
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    cores = system.physical_cores()
    assert f'bench: {cores} intra-op threads per backend ({cores} physical cores), load ' \
           'average 99.0 (1 min)' in err
    assert 'warning: load average 99.0 is above the' in err
    assert 'bench: done 3/3 rounds' in err                     # stderr is not a terminal here
    rows = [line for line in out.splitlines() if line.startswith('rtmdet-tiny torch/cpu b')]
    assert rows[0].endswith('1 (baseline)')
    median, spread = rows[1].split()[-2:]
    low, high = (float(v) for v in spread.strip('[]').split('-'))
    assert low <= float(median) <= high
    assert f'torch_intra_op {cores}' in out


def test_a_failed_step_ends_without_a_done_line():
    stream = io.StringIO()
    with pytest.raises(RuntimeError):
        with Progress('eval ort', total=2, stream=stream, interval_s=3600) as progress:
            progress.update(1)
            raise RuntimeError('bad image')
    assert stream.getvalue() == ''


def test_without_a_final_line_only_periodic_lines_are_printed():
    stream = io.StringIO()
    with Progress('infer', total=3, stream=stream, interval_s=float('inf'),
                  final_line=False) as progress:
        progress.update(3)
    assert stream.getvalue() == ''
