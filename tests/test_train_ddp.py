"""`torchrun --standalone --nproc_per_node 2 -m bgmatte train base ...` trains on this CPU with gloo, and resumes
(with the run's own options, refusing a conflicting one in one line); a refusal is said once, not per process. Rank 0
alone checks the training files; a damaged file that one process meets mid-run stops them all, saved for --resume."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bgmatte.train.config import TrainOptions
from bgmatte.train.loop import ResumableSampler

ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args: str, program: tuple[str, ...] = ("-m", "bgmatte"), timeout: float = 300
             ) -> subprocess.CompletedProcess:
    """Two processes of ``program`` under torchrun; a run that outlasts ``timeout`` is killed, workers and all, and
    fails the test (waiting on the launcher alone would wait on the workers that still hold its pipes)."""
    launcher = Path(sys.executable).with_name("torchrun")
    command = [str(launcher)] if launcher.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    command += ["--standalone", "--nproc_per_node", "2", *program, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the processes were still running after {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


TRACED = """\
import os, sys
from bgmatte.io import images
from bgmatte.train import data

log = open(f"{os.environ['BGMATTE_TRACE']}.{os.environ['RANK']}", "a")
read_header, read_background = images.header_size, data.BackgroundDataset.__getitem__

def header_size(path, **options):
    log.write(f"header {path}\\n"); log.flush()
    return read_header(path, **options)

def background(self, index):
    log.write(f"background {self.paths[index]}\\n"); log.flush()
    return read_background(self, index)

images.header_size, data.BackgroundDataset.__getitem__ = header_size, background
from bgmatte.cli import main
sys.exit(main(sys.argv[1:]))
"""
"""`bgmatte` with a record, per process, of the image headers it reads and of the backgrounds it composites over."""


def traced(trace: Path, rank: int) -> list[tuple[str, str]]:
    """What one process of a `TRACED` run read: (what, path) in order."""
    path = trace.with_name(f"{trace.name}.{rank}")
    return [tuple(line.split(" ", 1)) for line in path.read_text().splitlines()] if path.exists() else []


def photomatte(root: Path, count: int = 8, small_backgrounds: int = 0) -> tuple[Path, Path]:
    """A PhotoMatte-style folder of `count` 48x40 pairs, and a folder of two 48x40 backgrounds and
    `small_backgrounds` 16x16 ones (too small to train on)."""
    rng = np.random.default_rng(0)
    for folder in ("data/fgr", "data/pha", "bg"):
        (root / folder).mkdir(parents=True)
    for i in range(count):
        assert cv2.imwrite(str(root / "data" / "fgr" / f"{i:04d}.png"), rng.integers(0, 256, (40, 48, 3), np.uint8))
        assert cv2.imwrite(str(root / "data" / "pha" / f"{i:04d}.png"), rng.integers(0, 256, (40, 48), np.uint8))
    for i in range(2):
        assert cv2.imwrite(str(root / "bg" / f"{i}.jpg"), rng.integers(0, 256, (40, 48, 3), np.uint8))
    for i in range(small_backgrounds):
        assert cv2.imwrite(str(root / "bg" / f"small{i}.jpg"), rng.integers(0, 256, (16, 16, 3), np.uint8))
    return root / "data", root / "bg"


TINY = ["--crop", "64", "--batch-size", "4", "--backbone", "mobilenetv2", "--device", "cpu", "--val-every", "0",
        "--save-every", "0", "--log-every", "1"]


@pytest.mark.slow
def test_two_gloo_processes_train_save_once_and_resume(tmp_path):
    out = tmp_path / "run"
    common = ["train", "base", "--out", str(out), "--crop", "64", "--batch-size", "4", "--backbone", "mobilenetv2",
              "--device", "cpu", "--num-workers", "0", "--val-every", "2", "--val-samples", "2", "--log-every", "1",
              "--save-every", "2"]
    refused = torchrun(*common, "--steps", "2", "--init", str(tmp_path / "missing.pth"))  # each process reads it
    assert refused.returncode != 0
    assert refused.stderr.count("bgmatte train: error:") == 1, refused.stderr[-3000:]
    assert "missing.pth: checkpoint not found" in refused.stderr
    first = torchrun(*common, "--steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    conflicting = torchrun("train", "base", "--out", str(out), "--resume", "--crop", "96", "--device", "cpu")
    assert conflicting.returncode != 0
    assert conflicting.stderr.count("bgmatte train: error:") == 1, conflicting.stderr[-3000:]  # said by rank 0 alone
    assert "state.pt: the run was started with --crop 64" in conflicting.stderr
    # A log only rank 0 reads: its refusal reaches the other process too, which neither crashes nor waits.
    log = (out / "train.csv").read_bytes()
    (out / "train.csv").write_bytes(b"\xff\xfe\x00binary")
    damaged = torchrun("train", "base", "--out", str(out), "--resume", "--steps", "4", "--device", "cpu",
                       "--num-workers", "0")
    # Rank 1 refuses too rather than crash in DDP (torchrun may stop it first, so its exit code is not checked).
    assert damaged.returncode != 0 and "[rank1]" not in damaged.stderr, damaged.stderr[-3000:]
    assert damaged.stderr.count("bgmatte train: error:") == 1 and "train.csv: cannot read this log" in damaged.stderr
    (out / "train.csv").write_bytes(log)
    # The run's own options (crop, batch, validation and saving) carry on without being repeated.
    second = torchrun("train", "base", "--out", str(out), "--resume", "--steps", "4", "--device", "cpu",
                      "--num-workers", "0")
    assert second.returncode == 0, second.stderr[-3000:]

    state = torch.load(out / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 4 and state["world_size"] == 2
    ranks = state["random"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # each rank its own stream
    with (out / "train.csv").open(newline="") as file:
        steps = [int(row["step"]) for row in csv.DictReader(file)]
    assert steps == [1, 2, 3, 4]  # one writer: no rows twice
    weights = load_file(str(out / "last.safetensors"))
    assert torch.equal(weights["decoder.conv4.weight"], state["model"]["decoder.conv4.weight"])
    assert not any(key.startswith("module.") for key in weights)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_training_files_are_checked_by_rank_0_alone_which_says_a_refusal_or_warning_once(tmp_path, monkeypatch):
    data, behind = photomatte(tmp_path, small_backgrounds=3)
    trace, script = tmp_path / "trace", tmp_path / "traced.py"
    script.write_text(TRACED)
    monkeypatch.setenv("BGMATTE_TRACE", str(trace))  # torchrun hands the environment on
    common = ["train", "base", *TINY, "--dataset", "photomatte", "--data-root", str(data), "--backgrounds",
              str(behind), "--num-workers", "0", "--steps", "2"]
    matte = data / "pha" / "0003.png"
    whole = matte.read_bytes()
    assert cv2.imwrite(str(matte), np.zeros((36, 48), np.uint8))  # a pair of two sizes, seen in the headers
    refused = torchrun(*common, "--out", str(tmp_path / "refused"), program=(str(script),), timeout=90)
    assert refused.returncode != 0 and "[rank" not in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.count("bgmatte train: error:") == 1, refused.stderr[-3000:]
    assert "0003.png: matte is 48x36 but 0003.png is 48x40" in refused.stderr
    assert traced(trace, 1) == []  # the other process waited for rank 0's verdict
    matte.write_bytes(whole)
    for rank in (0, 1):
        trace.with_name(f"trace.{rank}").unlink(missing_ok=True)

    done = torchrun(*common, "--out", str(tmp_path / "run"), program=(str(script),), timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("3 background images under 32 pixels a side left out") == 1, done.stderr[-3000:]
    files = sorted(str(p) for p in [*data.rglob("*.png"), *behind.iterdir()])
    assert sorted(path for what, path in traced(trace, 0) if what == "header") == files  # each header read once
    assert not any(what == "header" for what, _ in traced(trace, 1))
    composited = {path for rank in (0, 1) for what, path in traced(trace, rank) if what == "background"}
    assert composited and all(Path(path).name in ("0.jpg", "1.jpg") for path in composited)  # as rank 0 kept


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_damaged_file_in_one_process_stops_them_all_saved_for_resume_and_said_once(tmp_path):
    data, behind = photomatte(tmp_path)
    # Process 1's second batch starts with a foreground cut short past its header: the check before training
    # passes it, and process 1's loader worker meets it after one step, while process 0 has a batch to train on.
    order = [index for _, index in islice(ResumableSampler(range(8), 1, 2, TrainOptions.seed), 4)]
    victim = data / "fgr" / f"{order[2]:04d}.png"
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "run"
    failed = torchrun("train", "base", "--out", str(out), *TINY, "--steps", "4", "--dataset", "photomatte",
                      "--data-root", str(data), "--backgrounds", str(behind), "--num-workers", "1", timeout=90)
    assert failed.returncode != 0 and "[rank" not in failed.stderr, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if "bgmatte train: error:" in line]
    assert len(errors) == 1, failed.stderr[-3000:]
    assert f"error: process 1: {victim}: damaged or truncated PNG; stopped at step 1 with the run saved" in errors[0]
    assert "--resume" in errors[0]
    state = torch.load(out / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 1 and state["world_size"] == 2
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())

    victim.write_bytes(whole)  # repaired: the run goes on from where it stopped
    resumed = torchrun("train", "base", "--out", str(out), "--resume", "--device", "cpu", "--num-workers", "0",
                       timeout=90)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(out / "state.pt", map_location="cpu", weights_only=True)["step"] == 4
    with (out / "train.csv").open(newline="") as file:
        assert [int(row["step"]) for row in csv.DictReader(file)] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_pool_too_small_for_one_process_is_refused_by_all_and_said_once(tmp_path):
    # 3 samples over 2 processes of batch 2: rank 0 keeps 2, rank 1 only 1.
    refused = torchrun("train", "base", "--out", str(tmp_path / "run"), "--steps", "2", "--train-samples", "3",
                       "--num-workers", "0", *TINY, timeout=120)
    assert refused.returncode != 0
    assert refused.stderr.count("bgmatte train: error:") == 1, refused.stderr[-3000:]
    assert "process 1: --train-samples 3 leaves 1 samples per process, fewer than its batch of 2" in refused.stderr
    assert "[rank" not in refused.stderr, refused.stderr[-3000:]  # no process's traceback (torchrun prints its own)
    assert not (tmp_path / "run").exists()  # nor its folder, its samples/ or its logs left behind


@pytest.mark.timeout(150)
def test_options_refused_under_torchrun_create_nothing(tmp_path):
    """Rank 0 made the run's folder and its samples/ before the batch size was checked against the processes, and
    a refused run left them there, empty."""
    out = tmp_path / "runs" / "run"
    refused = torchrun("train", "base", "--out", str(out), "--steps", "1", "--num-workers", "0", *TINY,
                       "--batch-size", "3", timeout=120)
    assert refused.returncode != 0
    assert refused.stderr.count("bgmatte train: error:") == 1, refused.stderr[-3000:]
    assert "--batch-size 3 does not split evenly over 2 processes" in refused.stderr, refused.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_damaged_file_in_one_process_pool_stops_them_all_said_once(tmp_path):
    data, behind = photomatte(tmp_path)
    victim = data / "fgr" / "0001.png"  # in process 1's pool (items 1, 3, 5, 7); made before step 1 by each process
    victim.write_bytes(victim.read_bytes()[:200])
    # Collectives that give up after 8 s (NCCL's 10 minutes, shortened; 3 s was too short for a loaded machine's
    # set-up), and a process 0 whose pool takes longer (4 items, 3 s each).
    wrapper = tmp_path / "slow_pool.py"
    wrapper.write_text("""\
import os, sys, time
from datetime import timedelta
import torch.distributed as dist
from bgmatte.train import data
start, read = dist.init_process_group, data.MatteDataset.__getitem__

def short(*args, **options):
    return start(*args, **{**options, "timeout": timedelta(seconds=8)})

def slow(self, index):
    if os.environ["RANK"] == "0":
        time.sleep(3)
    return read(self, index)

dist.init_process_group, data.MatteDataset.__getitem__ = short, slow
from bgmatte.cli import main
sys.exit(main(sys.argv[1:]))
""")
    refused = torchrun("train", "base", "--out", str(tmp_path / "run"), *TINY, "--steps", "3", "--dataset",
                       "photomatte", "--data-root", str(data), "--backgrounds", str(behind), "--num-workers", "0",
                       "--train-samples", "8", program=(str(wrapper),), timeout=120)
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.startswith("bgmatte train: error:")]
    assert errors == [f"bgmatte train: error: process 1: {victim}: damaged or truncated PNG (repair or remove that "
                      "file)"], refused.stderr[-3000:]
    assert "[rank" not in refused.stderr, refused.stderr[-3000:]
