"""The supported versions the README and pyproject.toml state are the ones the tests run on."""
import pathlib
import re
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _version(text):
    return tuple(int(v) for v in re.match(r"(\d+)\.(\d+)", text).groups())


def test_running_versions_are_supported():
    pyproject = (ROOT / "pyproject.toml").read_text()
    python_floor = _version(re.search(r'requires-python = ">=([\d.]+)"', pyproject).group(1))
    torch_floor = _version(re.search(r'"torch>=([\d.]+)"', pyproject).group(1))
    assert sys.version_info[:2] >= python_floor
    assert _version(torch.__version__) >= torch_floor
    readme = (ROOT / "README.md").read_text()
    stated = re.search(r"Supported versions: Python ([\d.]+) and newer with torch ([\d.]+) and newer",
                       readme)
    assert stated, "the README states the supported versions"
    assert _version(stated.group(1)) == python_floor and _version(stated.group(2)) == torch_floor


def test_license_matches_pyproject():
    assert "BSD-3-Clause" in (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "LICENSE").read_text().startswith("BSD 3-Clause License")
