"""The README's examples are commands that work after `make demo`: every `detdeploy` command line
in it parses (commands, options, choices, number ranges: click's own validation, nothing run),
every option in a usage synopsis exists, and every path an example reads is written by the demo,
by an earlier example, or is in the repository. The cheap error examples run for real and print
the README's error line."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from detdeploy import demo
from detdeploy.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
OUTPUT_OPTIONS = ('-o', '--output', '--out', '--json', '--plot', '--timing-cache',
                  '--trt-cache-dir')
PATH_LIKE = re.compile(r'(/|\.(onnx|pth|json|png|engine|plan|txt|jpg)$)')


def code_blocks() -> list[tuple[int, str, list[str]]]:
    """(line number of the opening fence, language, lines) of every fenced block."""
    blocks, current = [], None
    for number, line in enumerate(README.read_text(encoding='utf-8').splitlines(), 1):
        if line.startswith('```'):
            if current is None:
                current = (number, line[3:].strip(), [])
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current[2].append(line)
    assert current is None, 'unclosed code block'
    return blocks


def joined(lines: list[str]) -> list[tuple[int, str]]:
    """Lines with backslash continuations joined, each with its offset in the block."""
    result, pending, start = [], '', 0
    for offset, line in enumerate(lines):
        if not pending:
            start = offset
        if line.rstrip().endswith('\\'):
            pending += line.rstrip()[:-1] + ' '
            continue
        result.append((start, pending + line))
        pending = ''
    return result


class Example:
    def __init__(self, line: int, argv: list[str], output: list[str]):
        self.line, self.argv, self.output = line, argv, output    # output: the lines shown

    def __repr__(self) -> str:
        return f'README.md:{self.line}: {shlex.join(self.argv)}'


def examples() -> list[Example]:
    """Shell command lines: every line of `sh` blocks, `$ ` lines of the others (a usage
    synopsis without `$` is not an example)."""
    found = []
    for fence, language, lines in code_blocks():
        rows = joined(lines)
        for index, (offset, line) in enumerate(rows):
            if language == 'sh':
                text = line
            elif line.startswith('$ '):
                text = line[2:]
            else:
                continue
            argv = shlex.split(text, comments=True)
            if not argv:
                continue
            output = []
            for _, following in rows[index + 1:]:
                if following.startswith('$ ') or language == 'sh':
                    break
                output.append(following)
            found.append(Example(fence + 1 + offset, argv, output))
    return found


def detdeploy_args(argv: list[str]) -> list[str] | None:
    """The arguments after `detdeploy` (also `.venv/bin/detdeploy`, `-m detdeploy`)."""
    for index, word in enumerate(argv):
        if word.endswith('detdeploy') and (index == 0 or argv[index - 1] == '-m'
                                           or word.endswith('/detdeploy')):
            return argv[index + 1:]
    return None


def parse(args: list[str]) -> tuple[click.Command, click.Context]:
    """click's validation of a command line, without running it."""
    words = [word for word in args if word != '--debug']        # the group's only option
    if words[0] in ('-h', '--help', '--version'):
        raise click.exceptions.Exit(0)
    group = click.Context(cli, info_name='detdeploy')
    name, *rest = words
    command = cli.get_command(group, name)
    assert command is not None, f'no command {name}'
    return command, command.make_context(name, rest, parent=group)


ALL = examples()
CLI_EXAMPLES = [e for e in ALL if detdeploy_args(e.argv) is not None]


def test_the_readme_has_examples():
    assert len(CLI_EXAMPLES) >= 15
    assert any(e.argv[:2] == ['make', 'demo'] for e in ALL)


@pytest.fixture(scope='module')
def parse_cwd(tmp_path_factory):
    """Where the examples are parsed: the repository after `make demo`; before it (CI runs the
    suite first), a folder linking the repository's entries, with empty stand-ins for the demo's
    files that examples name (that the demo writes them is the paths test's job)."""
    if (ROOT / demo.DEMO_DIR).is_dir():
        return ROOT
    folder = tmp_path_factory.mktemp('readme-parse')
    for entry in ROOT.iterdir():
        (folder / entry.name).symlink_to(entry)
    for example in CLI_EXAMPLES:
        for word in detdeploy_args(example.argv):
            path = Path(word)
            if word.startswith(str(demo.DEMO_DIR) + '/') and demo_written(path) \
                    and path.suffix and not set('*?[') & set(word):
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                (folder / path).touch()
    return folder


@pytest.mark.parametrize('example', CLI_EXAMPLES, ids=lambda e: f'line{e.line}')
def test_every_detdeploy_example_parses(example, parse_cwd, monkeypatch):
    monkeypatch.chdir(parse_cwd)
    args = detdeploy_args(example.argv)
    try:
        parse(args)
    except click.exceptions.Exit as exit_:         # --help
        assert exit_.exit_code == 0
    except click.UsageError as error:
        pytest.fail(f'{example}: {error.format_message()}')


def test_make_targets_exist():
    targets = set(re.findall(r'^([a-z-]+):', (ROOT / 'Makefile').read_text(), re.M))
    for example in ALL:
        if example.argv[0] == 'make':
            assert set(example.argv[1:]) <= targets, example


def test_every_synopsis_option_exists():
    """Usage blocks (`detdeploy CMD [--flag ...]` without a prompt) name real options."""
    checked = 0
    for fence, language, lines in code_blocks():
        if language or any(line.startswith('$ ') for line in lines):
            continue
        command = None
        for line in lines:
            words = line.split()
            if words[:1] == ['detdeploy'] and len(words) > 1:
                command = cli.get_command(None, words[1])
                assert command is not None, f'README.md:{fence}: no command {words[1]}'
            elif not line.startswith(' '):
                command = None
            if command is None:
                continue
            known = {opt for param in command.params for opt in param.opts + param.secondary_opts}
            for flag in re.findall(r'(?<![\w-])(--?[a-z][a-z0-9-]*)', line.split('#')[0]):
                if flag in ('-', '--') or flag.startswith('---'):
                    continue
                assert flag in known | {'-h', '--help'}, f'README.md:{fence}: {command.name} {flag}'
                checked += 1
    assert checked > 40


def demo_written(path: Path) -> bool:
    """A path the demo writes (or inside a folder it writes); after `make demo`, one that
    exists."""
    if (ROOT / demo.DEMO_DIR).is_dir():
        return (ROOT / path).exists()
    return any(path == written or written in path.parents for written in demo.WRITTEN)


def python_blocks() -> list[tuple[int, str]]:
    return [(fence, '\n'.join(lines)) for fence, language, lines in code_blocks()
            if language == 'python']


def test_python_examples_compile():
    for fence, source in python_blocks():
        compile(source, f'README.md:{fence}', 'exec')


def test_paths_are_written_by_the_demo_or_an_earlier_example():
    # files that python examples save (before the CLI examples that read them, in this README)
    created: set[Path] = {Path(name) for _, source in python_blocks() for name in re.findall(
        r"(?:save\(\w+, |av\.open\()'([^']+)'(?:\)|, mode='w')", source)}
    problems = []
    for example in CLI_EXAMPLES:
        args = detdeploy_args(example.argv)
        outputs = {Path(value) for flag, value in zip(args, args[1:]) if flag in OUTPUT_OPTIONS}
        for word in args:
            if word.startswith('-') or not PATH_LIKE.search(word) or '...' in word:
                continue
            path = Path(word)
            if set('*?[') & set(word):      # a glob: where it looks; after the demo, a match
                if (ROOT / demo.DEMO_DIR).is_dir() and word.startswith(str(demo.DEMO_DIR)):
                    if not list(ROOT.glob(word)):
                        problems.append(f'{example}: {word} matches nothing')
                    continue
                path = Path(word.split('*')[0].split('?')[0].split('[')[0]).parent
            if path in outputs or any(p in outputs for p in path.parents):
                continue
            made = path in created or any(p in created for p in path.parents)
            if word.startswith(str(demo.DEMO_DIR) + '/'):
                ok = demo_written(path) or made
            else:       # an absolute path must be made here: it may exist only on this machine
                ok = made or (not path.is_absolute() and (ROOT / path).exists())
            if not ok:
                problems.append(f'{example}: {word} is not written by the demo or an earlier '
                                'example, and is not in the repository')
        created |= outputs
        if args and args[0] == 'export' and not any(f in args for f in ('-o', '--output')):
            model = args[args.index('--model') + 1] if '--model' in args else 'rtmdet'
            created.add(Path(f'{model}.onnx'))
    assert problems == []


ERROR_EXAMPLES = [e for e in CLI_EXAMPLES if e.output and e.output[0].startswith('error:')
                  and not any(w.endswith(('.onnx', '.engine')) for w in e.argv)]


@pytest.fixture(scope='module')
def demo_like_cwd(tmp_path_factory):
    """A folder with the demo's sample images and the repository's models/ beside them."""
    from detdeploy.training.shapes import make_shapes_dataset
    folder = tmp_path_factory.mktemp('readme')
    make_shapes_dataset(folder / demo.SAMPLES, train=0, val=2, size=64, seed=1)
    (folder / 'models').symlink_to(ROOT / 'models')
    return folder


@pytest.mark.parametrize('example', ERROR_EXAMPLES, ids=lambda e: f'line{e.line}')
def test_error_examples_print_the_readme_line(example, demo_like_cwd, monkeypatch, capsys):
    from detdeploy.cli import main
    monkeypatch.chdir(demo_like_cwd)
    with pytest.raises(SystemExit) as exit_:
        main(detdeploy_args(example.argv))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == example.output[0]


def test_there_are_error_examples_run_for_real():
    assert len(ERROR_EXAMPLES) >= 3
