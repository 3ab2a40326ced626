"""Loading checkpoints: formats, backbone detection, partial and unsafe files, the default model."""
from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from safetensors.torch import load_file

import bgmatte
from bgmatte import BgmatteError
from bgmatte.model import build
from bgmatte.model.build import load_model, read_state_dict, save_weights
from bgmatte.model.matting import MattingBase, MattingRefine


@pytest.fixture(scope="module")
def mobilenet_state():
    torch.manual_seed(1)
    return MattingRefine("mobilenetv2", refine_kernel_size=3).state_dict()


def test_released_pth_loads_with_backbone_detected(tmp_path, mobilenet_state):
    path = tmp_path / "pytorch_mobilenetv2.pth"
    torch.save(mobilenet_state, path)
    model = load_model(path, device="cpu")
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.backbone_name == "mobilenetv2"
    assert torch.equal(model.refiner.conv1.weight, mobilenet_state["refiner.conv1.weight"])
    pha, fgr, pha_sm, fgr_sm, err_sm, ref_sm = model(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
    assert pha.shape == (1, 1, 64, 64)


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101"])
def test_resnet_backbones_are_detected_from_their_keys(tmp_path, backbone):
    state = MattingRefine(backbone).state_dict()
    assert build.detect_backbone(state) == backbone
    path = tmp_path / "w.safetensors"
    save_weights(MattingRefine(backbone), path)
    assert load_model(path, device="cpu", backbone_scale=0.125, refine_mode="thresholding").backbone_name == backbone


def test_safetensors_fp16_round_trip_loads_into_fp32(tmp_path, mobilenet_state):
    model = MattingRefine("mobilenetv2")
    model.load_state_dict(mobilenet_state)
    path = tmp_path / "w.safetensors"
    save_weights(model, path, half=True)
    assert load_file(str(path))["refiner.conv1.weight"].dtype == torch.float16
    loaded = load_model(path, device="cpu")
    assert loaded.refiner.conv1.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.refiner.conv1.weight, mobilenet_state["refiner.conv1.weight"],
                               atol=1e-3, rtol=1e-3)


def test_settings_are_applied_and_kernel_size_read_from_weights(tmp_path):
    path = tmp_path / "k1.pth"
    torch.save(MattingRefine("mobilenetv2", refine_kernel_size=1).state_dict(), path)
    model = load_model(path, device="cpu", backbone_scale=0.5, refine_mode="thresholding", refine_threshold=0.3)
    assert model.refiner.kernel_size == 1 and model.backbone_scale == 0.5
    assert model.refiner.mode == "thresholding" and model.refiner.threshold == 0.3


def test_base_only_checkpoint_loads_with_a_warning(tmp_path):
    base = MattingBase("mobilenetv2")
    path = tmp_path / "base.pth"
    torch.save(base.state_dict(), path)
    with pytest.warns(UserWarning, match="refiner is untrained"):
        model = load_model(path, device="cpu")
    assert torch.equal(model.decoder.conv4.weight, base.decoder.conv4.weight)


class _RunsCode:
    """Unpickling this would run a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"backbone.features.0.0.weight": torch.zeros(1), "x": _RunsCode(marker)}, path)
    with pytest.raises(BgmatteError, match="evil.pth: refused to load"):
        load_model(path, device="cpu")
    assert not marker.exists()


def test_keys_that_fit_no_backbone_are_named(tmp_path, mobilenet_state):
    state = dict(mobilenet_state)
    del state["decoder.conv1.weight"]
    state["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(BgmatteError) as info:
        load_model(path, device="cpu")
    message = str(info.value)
    assert "odd.pth" in message and "decoder.conv1.weight" in message and "decoder.extra.weight" in message
    assert "\n" not in message


def test_unknown_keys_only_are_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(BgmatteError, match="fit no known backbone"):
        load_model(path, device="cpu")


def test_wrong_backbone_forced_names_the_mismatch(tmp_path, mobilenet_state):
    path = tmp_path / "m.pth"
    torch.save(mobilenet_state, path)
    with pytest.raises(BgmatteError, match="m.pth: holds mobilenetv2 weights, not resnet50"):
        load_model(path, backbone="resnet50", device="cpu")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"hello\n", b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
                                     b"PK\x03\x04" + bytes(60)])
def test_garbage_files_get_a_clear_error(tmp_path, content):
    for name in ("g.pth", "g.safetensors"):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(BgmatteError, match=name) as info:
            read_state_dict(path)
        assert "could run code" not in str(info.value) and "\n" not in str(info.value)


def test_a_torchscript_model_is_named_as_one_in_one_line(tmp_path, capsys):
    from bgmatte.cli import main
    from bgmatte.export import export_torchscript

    path = export_torchscript(MattingRefine("mobilenetv2").eval(), tmp_path / "m.torchscript")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.load's own "looks like a TorchScript archive" warning is not said
        with pytest.raises(BgmatteError, match=r"m\.torchscript: a TorchScript model, not a checkpoint of weights"):
            load_model(path)
    assert main(["export", "torchscript", str(path), "-o", str(tmp_path / "again.torchscript")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bgmatte export: error: ")


def test_legacy_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"x": _RunsCode(marker)}, protocol=2))
    with pytest.raises(BgmatteError, match="evil.pth: refused to load: the file holds Python objects"):
        read_state_dict(path)
    assert not marker.exists()


def test_pickled_dict_without_string_keys_is_not_a_state_dict(tmp_path):
    path = tmp_path / "ints.pth"
    torch.save({1: torch.zeros(1)}, path)
    with pytest.raises(BgmatteError, match="ints.pth: not a state_dict of tensors"):
        read_state_dict(path)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(BgmatteError, match="nope.pth: checkpoint not found"):
        load_model(tmp_path / "nope.pth")


def test_default_model_without_shipped_weights_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "DEFAULT_WEIGHTS", tmp_path / "absent.safetensors")
    with pytest.raises(BgmatteError, match="no embedded default model"):
        load_model()


def test_ddp_prefixed_checkpoints_load(tmp_path, mobilenet_state):
    path = tmp_path / "ddp.pth"
    torch.save({"module." + k: v for k, v in mobilenet_state.items()}, path)
    assert load_model(path, device="cpu").backbone_name == "mobilenetv2"


def test_public_api_names():
    assert bgmatte.MattingRefine is MattingRefine and bgmatte.load_model is load_model


def test_embedded_default_model_loads_and_says_when_it_is_interim(monkeypatch, tmp_path):
    path = tmp_path / "default.safetensors"
    save_weights(MattingRefine("mobilenetv2"), path, half=True, metadata={"status": "interim"})
    monkeypatch.setattr(build, "DEFAULT_WEIGHTS", path)
    with pytest.warns(UserWarning, match="interim checkpoint"):
        model = load_model(device="cpu")
    assert model.backbone_name == "mobilenetv2"
    with pytest.warns(UserWarning, match=f"{path.name} is an interim checkpoint"):  # named, as the card's examples do
        load_model(path, device="cpu")
    save_weights(MattingRefine("mobilenetv2"), path, half=True, metadata={"status": "release"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(device="cpu")


def test_the_shipped_default_weights_are_a_trained_mobilenetv2():
    if not build.DEFAULT_WEIGHTS.is_file():
        pytest.skip("no default weights in this checkout")
    state = read_state_dict(build.DEFAULT_WEIGHTS)
    assert build.detect_backbone(state) == "mobilenetv2"
    assert any(k.startswith("refiner.") for k in state)
    assert build.weights_metadata(build.DEFAULT_WEIGHTS).get("steps")
    assert build.DEFAULT_WEIGHTS.stat().st_size < 12_000_000


def test_an_onnx_model_is_named_as_one_with_the_way_to_run_it(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from bgmatte.cli import main

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [value],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(graph), str(path))
    with pytest.raises(BgmatteError, match=r"m\.onnx: an ONNX model, not a checkpoint of weights: .*"
                                           r"backend=\"onnxruntime\""):
        load_model(path)
    assert main(["export", "torchscript", str(path), "-o", str(tmp_path / "m.torchscript")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "an ONNX model" in err


@pytest.mark.parametrize(("name", "value"), [("plate_solve", "off"), ("plate_solve", "no"), ("optimize", "false")])
def test_a_switch_that_is_not_true_or_false_is_refused_naming_it(tmp_path, mobilenet_state, name, value):
    """``plate_solve="off"`` (the command line's spelling) was taken as true: the plate solve ran."""
    path = tmp_path / "w.pth"
    torch.save(mobilenet_state, path)
    with pytest.raises(BgmatteError, match=f"{name} must be True or False.*not '{value}'"):
        load_model(path, device="cpu", **{name: value})
    if name == "plate_solve":
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            MattingRefine("mobilenetv2", plate_solve=value)


def test_a_folder_given_as_the_checkpoint_is_called_a_folder(tmp_path):
    """It was "checkpoint not found", though it is there."""
    folder = tmp_path / "weights.pth"
    folder.mkdir()
    with pytest.raises(BgmatteError, match="weights.pth: a folder, not a checkpoint file"):
        load_model(folder)


@pytest.mark.parametrize(("saved", "asked"), [("mobilenetv2", "resnet50"), ("resnet50", "resnet101"),
                                              ("resnet50", "mobilenetv2")])
def test_a_backbone_that_the_weights_are_not_for_is_named_with_theirs(tmp_path, saved, asked):
    """The error listed hundreds of missing and unexpected keys without saying whose weights the file holds."""
    path = tmp_path / "w.pth"
    torch.save(MattingRefine(saved).state_dict(), path)
    with pytest.raises(BgmatteError, match=f"w.pth: holds {saved} weights, not {asked}: leave backbone out") as info:
        load_model(path, backbone=asked, device="cpu")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_model_loaded_inside_inference_mode_runs_and_matches_one_loaded_outside(tmp_path, mobilenet_state,
                                                                                  precision):
    """Loading in the block that runs the model is natural; its weights were then inference tensors, which the fast
    path's check for changed weights cannot read: 'Inference tensors do not track version counter'."""
    path = tmp_path / "w.pth"
    torch.save(mobilenet_state, path)
    src, bgr = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    dtype = build.PRECISIONS[precision]
    outside = load_model(path, device="cpu", precision=precision)
    with torch.inference_mode():
        expected = outside(src.to(dtype), bgr.to(dtype))
        inside = load_model(path, device="cpu", precision=precision)
        got = inside(src.to(dtype), bgr.to(dtype))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not any(parameter.is_inference() for parameter in inside.parameters())
