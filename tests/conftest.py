"""Shared fixtures: the reference test vectors and small random models."""
from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path

# On a busy 2-core machine, OpenMP threads that spin while waiting make small operations many times
# slower; passive waiting must be chosen before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

# Under pytest-xdist (`make test` runs `-n auto`) each worker takes its share of the cores, so that
# workers x threads does not oversubscribe the machine; subprocesses the tests start inherit it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _SHARE = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_SHARE)
    os.environ.setdefault("OMP_NUM_THREADS", str(_SHARE))

# The tests of Ctrl-C and of stopping signals expect them handled as under a terminal. A launcher may hand pytest
# (and the subprocesses it starts) a signal ignored: a script's background job ignores SIGINT, `nohup` SIGHUP, and
# bgmatte rightly leaves an ignored signal ignored. Those tests would then fail by how pytest was started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
for _name in ("SIGTERM", "SIGHUP"):
    if hasattr(signal, _name) and signal.getsignal(getattr(signal, _name)) is signal.SIG_IGN:
        signal.signal(getattr(signal, _name), signal.SIG_DFL)

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_DIR = Path(os.environ.get("BGMATTE_REFERENCE", ROOT.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference():
    """The reference vectors module (`load_case`, `cases`); CI must have it, elsewhere the tests skip."""
    module_path = REFERENCE_DIR / "vectors.py"
    if not module_path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"reference vectors not found at {REFERENCE_DIR}")
        pytest.skip(f"reference vectors not found at {REFERENCE_DIR}")
    spec = importlib.util.spec_from_file_location("bgmatte_reference_vectors", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture()
def one_thread():
    """Two shared cores: torch's thread pool only slows tiny inputs down (modules opt in with usefixtures)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
