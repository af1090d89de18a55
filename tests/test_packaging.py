"""The install exposes only the `detdeploy` namespace, mapped from the repo's folders."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('name', ['models', 'export', 'runtimes', 'deploy'])
def test_no_generic_top_level_packages(name, tmp_path):
    result = subprocess.run([sys.executable, '-c', f'import {name}'], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode != 0 and 'ModuleNotFoundError' in result.stderr


def test_subpackages_map_to_repo_folders(tmp_path):
    code = ('import detdeploy, detdeploy.models, detdeploy.export, detdeploy.runtimes;'
            'print(detdeploy.__file__); print(detdeploy.models.__file__);'
            'print(detdeploy.export.__file__); print(detdeploy.runtimes.__file__)')
    result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                            text=True, check=True)
    folders = [Path(line).parent for line in result.stdout.split()]
    assert folders == [REPO / 'deploy', REPO / 'models', REPO / 'export', REPO / 'runtimes']


def test_python_dash_m_and_version():
    result = subprocess.run([sys.executable, '-m', 'detdeploy', '--version'], capture_output=True,
                            text=True)
    assert result.returncode == 0 and result.stdout.startswith('detdeploy, version ')
