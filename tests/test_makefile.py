"""The Makefile's set-up: the PyTorch it installs is torch==2.13.0 unless the user names another, or an index."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def setup_commands(tmp_path: Path, *variables: str) -> list[str]:
    """What `make setup` would run for a fresh virtual environment (printed, not run: `make -n`). Run from `make
    test` (CI), make would see itself as a sub-make and print the directory it enters: the outer make's variables
    are left out."""
    outer = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"}
    env = {name: value for name, value in os.environ.items() if name not in outer}
    done = subprocess.run(["make", "-n", "-B", "setup", f"VENV={tmp_path / 'venv'}", *variables], cwd=ROOT,
                          capture_output=True, text=True, check=True, env=env)
    return [line for line in done.stdout.splitlines() if not line.startswith("#")]


def test_the_default_set_up_is_unchanged(tmp_path):
    bin = tmp_path / "venv" / "bin"
    assert setup_commands(tmp_path) == [
        f"python3 -m venv {tmp_path / 'venv'}",
        f"{bin}/pip install --quiet --upgrade pip",
        f"{bin}/pip install --quiet torch==2.13.0",
        f'{bin}/pip install --quiet -e ".[dev]"',
        f"touch {bin}/bgmatte",
    ]


def test_the_torch_pin_and_its_index_can_be_overridden(tmp_path):
    """`pip install torch==2.13.0` gets the CPU build only from an index that has it first (this machine's local one);
    elsewhere a user names PyTorch's CPU index, or another build."""
    bin = tmp_path / "venv" / "bin"
    commands = setup_commands(tmp_path, "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
    assert f"{bin}/pip install --quiet torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in commands
    commands = setup_commands(tmp_path, "TORCH=torch==2.13.0+cu128")
    assert f"{bin}/pip install --quiet torch==2.13.0+cu128" in commands
    readme = (ROOT / "README.md").read_text()
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in readme
