"""`torchrun --standalone --nproc_per_node 2 -m bgmatte train base ...` trains on this CPU with gloo, and resumes
(with the run's own options, refusing a conflicting one in one line); a refusal is said once, not per process."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args: str) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).with_name("torchrun")
    command = [str(launcher)] if launcher.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    command += ["--standalone", "--nproc_per_node", "2", "-m", "bgmatte", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


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
