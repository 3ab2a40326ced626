"""The Makefile's set-up (the PyTorch it installs is torch==2.13.0 unless the user names another, or an index) and the
rules that run on it."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def make_commands(tmp_path: Path, target: str, *variables: str) -> list[str]:
    """What `make TARGET` would run for a fresh virtual environment (printed, not run: `make -n`). Run from `make
    test` (CI), make would see itself as a sub-make and print the directory it enters: the outer make's variables
    are left out."""
    outer = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"}
    env = {name: value for name, value in os.environ.items() if name not in outer}
    done = subprocess.run(["make", "-n", "-B", target, f"VENV={tmp_path / 'venv'}", *variables], cwd=ROOT,
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if not line.startswith("#")]


def setup_commands(tmp_path: Path, *variables: str) -> list[str]:
    """What `make setup` would run for a fresh virtual environment."""
    return make_commands(tmp_path, "setup", *variables)


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


def test_make_bench_sets_up_then_runs_a_short_benchmark(tmp_path):
    """`make bench` said "Nothing to be done for 'bench'" and ran nothing: .PHONY named it, but it had no rule."""
    from bgmatte.cli import build_parser

    commands = make_commands(tmp_path, "bench")
    setup = setup_commands(tmp_path)
    assert commands[:len(setup)] == setup  # a fresh machine is set up first, as for make demo
    assert len(commands) == len(setup) + 1
    program, *argv = commands[-1].split()
    assert program == f"{tmp_path / 'venv' / 'bin'}/bgmatte" and argv[0] == "bench"
    args = build_parser().parse_args(argv)  # options bgmatte bench takes
    assert args.resolution == "720p" and not args.pipeline  # short: the default 1080p takes twice as long
    assert make_commands(tmp_path, "bench", "BENCH=--pipeline")[-1].endswith("bgmatte bench --pipeline")
    assert "make bench" in (ROOT / "README.md").read_text()
