"""The `detdeploy` command line: a click group of thin commands (one module each in
`detdeploy.commands`) that parse, call a pipeline, and print.

User errors (`DetdeployError`) become one line on stderr and exit code 2; `--debug` shows the
traceback instead. Exit codes: 0 ok, 1 a check failed, 2 bad input. Command modules import
heavy libraries (torch, onnxruntime) inside the command, so `detdeploy infer model.onnx`
never loads torch.
"""
from __future__ import annotations

import sys

import click

from detdeploy import __version__
from detdeploy.errors import DetdeployError

from .commands import bench as bench_command
from .commands import build_engine as build_engine_command
from .commands import eval as eval_command
from .commands import export, infer, make_dataset, train
from .commands import parity as parity_command

EXIT_BAD_INPUT = 2


@click.group(context_settings={'help_option_names': ['-h', '--help']})
@click.option('--debug', is_flag=True, help='Show full tracebacks for errors.')
@click.version_option(__version__, prog_name='detdeploy')
def cli(debug: bool) -> None:
    """Export PyTorch detectors to ONNX / TensorRT and check them against PyTorch."""


cli.add_command(infer.infer)
cli.add_command(export.export)
cli.add_command(parity_command.parity)
cli.add_command(build_engine_command.build_engine)
cli.add_command(bench_command.bench)
cli.add_command(make_dataset.make_dataset)
cli.add_command(train.train)
cli.add_command(eval_command.eval_command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning user errors into a one-line message and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    try:
        code = cli.main(args=args, prog_name='detdeploy', standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo('aborted', err=True)
        code = 130
    except DetdeployError as exc:
        if '--debug' in args:
            raise
        click.echo(f'error: {exc}', err=True)
        code = EXIT_BAD_INPUT
    sys.exit(code if isinstance(code, int) else 0)
