"""Import directions between the rooms, read from the source (every import, also those inside
functions) and checked in a fresh interpreter: the layout the README draws is the one the code
has."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# top-level folder -> package, as setup.cfg maps them
ROOMS = {'core': 'detdeploy.core', 'models': 'detdeploy.models', 'export': 'detdeploy.export',
         'runtimes': 'detdeploy.runtimes', 'inference': 'detdeploy.inference',
         'verification': 'detdeploy.verification', 'evaluation': 'detdeploy.evaluation',
         'benchmark': 'detdeploy.benchmark', 'training': 'detdeploy.training',
         'serving': 'detdeploy.serving', 'quantization': 'detdeploy.quantization',
         'deploy': 'detdeploy'}
CLI_MODULES = ('detdeploy.cli', 'detdeploy.commands', 'detdeploy.demo', 'detdeploy.__main__')


def module_name(path: Path) -> str:
    room = path.relative_to(ROOT).parts[0]
    parts = [*ROOMS[room].split('.'), *path.relative_to(ROOT / room).with_suffix('').parts]
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module `path` imports, relative imports resolved."""
    package = module_name(path).split('.')
    if path.name != '__init__.py':
        package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = '.'.join([*base, *(node.module.split('.') if node.module else [])])
            names.add(module)
            names.update(f'{module}.{alias.name}' for alias in node.names)
    return names


def room_files(room: str) -> list[Path]:
    return sorted(p for p in (ROOT / room).rglob('*.py') if '__pycache__' not in p.parts)


def offending(room: str, forbidden) -> list[str]:
    return [f'{path.relative_to(ROOT)} imports {name}' for path in room_files(room)
            for name in sorted(imports_of(path)) if forbidden(path, name)]


def ours(name: str) -> bool:
    return name == 'detdeploy' or name.startswith('detdeploy.')


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + '.')


def test_core_imports_nothing_of_ours_and_no_torch():
    assert offending('core', lambda path, name: (ours(name) and not within(name, 'detdeploy.core'))
                     or within(name, 'torch') or within(name, 'torchvision')) == []


def test_nothing_below_the_cli_imports_it():
    below = [room for room in ROOMS if room != 'deploy']
    problems = [line for room in below for line in offending(
        room, lambda path, name: any(within(name, cli) for cli in CLI_MODULES))]
    assert problems == []


def test_runtimes_import_torch_only_in_the_pytorch_backend():
    assert offending('runtimes', lambda path, name: path.name != 'torch_backend.py' and (
        within(name, 'torch') or within(name, 'torchvision')
        or within(name, 'detdeploy.models') or within(name, 'detdeploy.export'))) == []


def test_models_never_import_runtimes_or_the_rooms_above():
    above = ('detdeploy.runtimes', 'detdeploy.export', 'detdeploy.inference',
             'detdeploy.verification', 'detdeploy.evaluation', 'detdeploy.benchmark',
             'detdeploy.training', 'detdeploy.serving', 'detdeploy.quantization', *CLI_MODULES)
    assert offending('models', lambda path, name: any(within(name, a) for a in above)) == []


def test_export_never_imports_runtimes_or_the_rooms_above():
    above = ('detdeploy.runtimes', 'detdeploy.inference', 'detdeploy.verification',
             'detdeploy.evaluation', 'detdeploy.benchmark', 'detdeploy.training',
             'detdeploy.serving', 'detdeploy.quantization')
    assert offending('export', lambda path, name: any(within(name, a) for a in above)) == []


def test_serving_sits_beside_inference():
    """serving/ (Ray, Triton) builds on runtimes, core and inference like inference/ does:
    never on models, export, torch or the CLI."""
    allowed = ('detdeploy.core', 'detdeploy.runtimes', 'detdeploy.inference',
               'detdeploy.serving')
    assert offending('serving', lambda path, name: (ours(name) and not any(
        within(name, room) for room in allowed)) or within(name, 'torch')) == []


def test_the_cli_loads_without_ray_or_tritonclient():
    """The serve extra's libraries load only inside its commands: `detdeploy --help` and
    every other command stay as fast as before."""
    code = ('import sys, detdeploy.cli\n'
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ray', 'tritonclient', 'starlette', 'torch')))")
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '[]'


@pytest.mark.parametrize('modules', [
    ['detdeploy.core.' + p.stem for p in room_files('core') if p.stem != '__init__'],
    ['detdeploy.runtimes.pipeline', 'detdeploy.runtimes.open', 'detdeploy.runtimes.model_file',
     'detdeploy.runtimes.onnxruntime_backend', 'detdeploy.inference.batch',
     'detdeploy.evaluation.coco_eval', 'detdeploy.serving.http_detect',
     'detdeploy.serving.triton', 'detdeploy.serving.triton_python',
     'detdeploy.runtimes.openvino_backend', 'detdeploy.quantization.quantize',
     'detdeploy.quantization.fp16']])
def test_torch_free_rooms_load_without_torch(modules):
    """What the static check says, in a real interpreter: importing these loads no torch."""
    code = ('import importlib, sys\n'
            f'for name in {modules!r}:\n'
            '    importlib.import_module(name)\n'
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))")
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '[]'


def test_every_room_is_packaged():
    """setup.cfg maps each top-level room into detdeploy.*, so an installed copy has them all."""
    config = (ROOT / 'setup.cfg').read_text()
    for room, package in ROOMS.items():
        assert f'{package} = {room}' in config
