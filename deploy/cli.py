"""The `detdeploy` command line: a click group of thin commands (one module each in
`detdeploy.commands`) that parse, call a pipeline, and print.

User errors (`DetdeployError`, usage errors, OS errors such as a full disk) become one line on
stderr and exit code 2; `--debug` shows the traceback instead. Exit codes: 0 ok, 1 a check
failed, 2 bad input, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 129 hung up (SIGHUP).
Command modules import heavy libraries (torch, onnxruntime) inside the command, so
`detdeploy infer model.onnx` never loads torch.
"""
from __future__ import annotations

import contextlib
import signal
import sys

import click

from detdeploy import __version__
from detdeploy.core.errors import DetdeployError, one_line

from .commands import bench as bench_command
from .commands import build_engine as build_engine_command
from .commands import eval as eval_command
from .commands import export, infer, make_dataset, train
from .commands import parity as parity_command
from .commands import batch_infer, export_triton
from .commands import serve as serve_command
from .commands import quantize as quantize_command

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130          # 128 + SIGINT, what shells report for Ctrl-C
EXIT_TERMINATED = 143           # 128 + SIGTERM
EXIT_HUNG_UP = 129              # 128 + SIGHUP (the terminal closed)
NO_ARGS_IS_HELP = getattr(click.exceptions, 'NoArgsIsHelpError', ())   # click >= 8.2


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so temp files are cleaned up on
    the way."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _interruption(exc: BaseException) -> BaseException | None:
    """The Ctrl-C or termination behind `exc`, if a library wrapped one raised inside its
    callback (torch.save's writer, a C++ extension) into an error of its own."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (KeyboardInterrupt, Terminated)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@click.group(context_settings={'help_option_names': ['-h', '--help']})
@click.option('--debug', is_flag=True, help='Show full tracebacks for errors.')
@click.version_option(__version__, prog_name='detdeploy')
def cli(debug: bool) -> None:
    """Export PyTorch detectors to ONNX / TensorRT and check them against PyTorch."""


cli.add_command(infer.infer)
cli.add_command(infer.infer, 'predict')          # the name Ultralytics users type
cli.add_command(export.export)
cli.add_command(parity_command.parity)
cli.add_command(build_engine_command.build_engine)
cli.add_command(bench_command.bench)
cli.add_command(make_dataset.make_dataset)
cli.add_command(train.train)
cli.add_command(eval_command.eval_command)
# the serve extra (Ray, Triton): each command imports its libraries when it runs
cli.add_command(serve_command.serve)
cli.add_command(batch_infer.batch_infer)
cli.add_command(export_triton.export_triton)
cli.add_command(quantize_command.quantize)


def _run(args: list[str]) -> int:
    """The command, with SIGTERM and SIGHUP raising `Terminated` while it runs (so
    `atomic_write` removes its temp file); the previous handlers are restored afterwards."""
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):      # only the main thread may set handlers
            previous[signum] = signal.signal(signum, _raise_terminated)
    try:
        with cli.make_context('detdeploy', args) as ctx:
            cli.invoke(ctx)
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and exit with 0 ok, 1 a check failed, 2 bad input, 130 on
    Ctrl-C (143 on SIGTERM). Every predictable error is one line on stderr; `--debug` (before
    the command) shows the traceback of `DetdeployError`s and OS errors instead."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in args
    try:
        try:
            code = _run(args)
        except Exception as exc:
            interruption = _interruption(exc)
            if interruption is None or debug:
                raise
            raise interruption from None
    except click.exceptions.Exit as exc:           # --help, --version, ctx.exit(code)
        code = exc.exit_code
    except NO_ARGS_IS_HELP as exc:                  # `detdeploy` alone: the full help
        exc.show()
        code = exc.exit_code
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else 'detdeploy'
        message = ' '.join(exc.format_message().split())
        click.echo(f'error: {message} (see {command} --help)', err=True)
        code = exc.exit_code
    except click.ClickException as exc:
        click.echo(f'error: {" ".join(exc.format_message().split())}', err=True)
        code = EXIT_BAD_INPUT
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo('aborted: interrupted (Ctrl-C)', err=True)
        code = EXIT_INTERRUPTED
    except Terminated as exc:
        hung_up = exc.signum == signal.SIGHUP
        click.echo(f'aborted: {"hung up (SIGHUP)" if hung_up else "terminated (SIGTERM)"}',
                   err=True)
        code = EXIT_HUNG_UP if hung_up else EXIT_TERMINATED
    except DetdeployError as exc:
        if debug:
            raise
        click.echo(f'error: {one_line(str(exc))}', err=True)
        code = EXIT_BAD_INPUT
    except OSError as exc:
        # the environment, not detdeploy: a full disk, a permission, a vanished file
        if debug:
            raise
        where = f': {exc.filename}' if exc.filename else ''
        click.echo(one_line(f'error: {exc.strerror or exc}{where} (--debug shows where)'),
                   err=True)
        code = EXIT_BAD_INPUT
    sys.exit(code if isinstance(code, int) else 0)
