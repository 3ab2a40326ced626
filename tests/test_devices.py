"""Devices: what `resolve_device` accepts, and that every other name is one line saying which devices work."""
from __future__ import annotations

import pytest
import torch

from bgmatte import BgmatteError
from bgmatte.cli import main
from bgmatte.io.images import write_png
from bgmatte.model.build import load_model, resolve_device
from bgmatte.model.matting import MattingRefine
from media import make_clip, plate_image


@pytest.fixture()
def cpu_only(monkeypatch):
    """A machine with neither CUDA nor MPS, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.save(MattingRefine("mobilenetv2").state_dict(), path)
    return path


def test_auto_and_none_pick_the_cpu_without_a_gpu(cpu_only):
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("device", ["mps", "xpu", "hip", "meta", "gpu", "cuda", "cuda:1", "", "cuda:-1"])
def test_devices_that_cannot_run_here_are_one_line_naming_the_ones_that_can(cpu_only, device):
    with pytest.raises(BgmatteError, match=r"use auto or cpu$") as caught:
        resolve_device(device)
    assert repr(device) in str(caught.value) and "\n" not in str(caught.value)


def test_mps_is_accepted_where_this_pytorch_has_it(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")
    with pytest.raises(BgmatteError, match="mps:1"):
        resolve_device("mps:1")


def test_a_cuda_index_past_the_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(BgmatteError, match=r"sees 2 CUDA GPU\(s\).*use auto, cpu, cuda or cuda:0 to cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("device", ["meta", None])
def test_load_model_checks_the_device_before_building(cpu_only, checkpoint, device):
    """meta used to be accepted and fail deep inside the model; None used to be a TypeError."""
    if device is None:
        assert next(load_model(checkpoint, device=None, optimize=False).parameters()).device.type == "cpu"
    else:
        with pytest.raises(BgmatteError, match="'meta' cannot run the model"):
            load_model(checkpoint, device=device)


def test_cli_video_with_an_unusable_device_is_one_line(cpu_only, checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_clip(tmp_path / "shot.mp4", 2)
    write_png(tmp_path / "plate.png", plate_image())
    code = main(["video", "shot.mp4", "--bgr", "plate.png", "--checkpoint", str(checkpoint), "--device", "mps"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "'mps'" in err and "use auto or cpu" in err and "Traceback" not in err
    assert not (tmp_path / "shot_com.mp4").exists()


@pytest.mark.parametrize("command", [
    ["video", "missing.mp4", "--bgr", "missing.png"],
    ["image", "missing.png", "--bgr", "missing.png", "-o", "out"],
    ["webcam", "--camera", "missing.mp4", "--record", "out.mp4", "--no-preview"],
    ["eval", "--model", "missing.pth", "--data", "missing"],
    ["export", "torchscript", "missing.pth", "-o", "out.pt"],
    ["bench", "--resolution", "64x64", "--repeats", "1"],
    ["bench", "--pipeline", "--resolution", "64x64", "--repeats", "1"],
])
def test_every_command_refuses_a_device_it_cannot_use_before_looking_at_any_input(cpu_only, tmp_path, monkeypatch,
                                                                                 capsys, command):
    """`webcam --device cuda` without a GPU was reported after the camera had opened and the weights had been read,
    `image`, `eval` and `export` after their inputs: the inputs named here do not exist, so the device must be the
    first thing refused."""
    monkeypatch.chdir(tmp_path)
    code = main([*command, "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"bgmatte {command[0]}: error: device 'cuda' was asked for, but PyTorch sees no CUDA GPU"), err
    assert not list(tmp_path.iterdir())


def test_load_model_refuses_the_device_before_reading_the_weights(cpu_only, tmp_path):
    with pytest.raises(BgmatteError, match="'cuda' was asked for"):
        load_model(tmp_path / "missing.pth", device="cuda")
