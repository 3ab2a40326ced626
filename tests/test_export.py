"""Exports: TorchScript keeps the settings changeable, ONNX runs in onnxruntime with any size, both as the plain model."""
from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from bgmatte import BgmatteError
from bgmatte.cli import main
from bgmatte.export import (BaseNetwork, ExportableMatting, OnnxMatting, crop_windows, export_onnx, export_torchscript,
                            write_windows)
from bgmatte.model.build import load_model
from bgmatte.model.matting import MattingRefine, RefineOptions

from models import reference_style_model, subject_frames
from bgmatte.model.refiner import crop_patches, replace_patches


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: on a shared 2-core machine, two threads can wait a scheduler tick at every operation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_style(reference, backbone="mobilenetv2", seed=5, **settings) -> MattingRefine:
    return reference_style_model(reference, backbone, seed, **settings)


def frames(batch=1, height=96, width=128, seed=0):
    return subject_frames(batch, height, width, seed)


def assert_same(expected, got, atol=1e-5):
    assert torch.equal(torch.as_tensor(got[5]), expected[5])
    for e, g in zip(expected, got):
        torch.testing.assert_close(torch.as_tensor(g), e, atol=atol, rtol=0)


@pytest.mark.parametrize("mode,kernel", [("sampling", 3), ("thresholding", 3), ("full", 3), ("sampling", 1),
                                         ("full", 1)])
def test_exportable_form_computes_what_the_plain_model_computes(reference, mode, kernel):
    model = reference_style(reference, refine_mode=mode, refine_kernel_size=kernel, refine_sample_pixels=2400,
                            refine_threshold=0.3)
    exportable = ExportableMatting(model, BaseNetwork(model)).eval()
    src, bgr = frames(batch=2, height=97, width=130)
    with torch.no_grad():
        assert_same(model(src, bgr), exportable(src, bgr), atol=0)


def test_sampling_budget_larger_than_the_frame_refines_every_cell(reference):
    """The top-k runs over a padded list, so that k may exceed the frame's cells, as min() allows in the plain one."""
    model = reference_style(reference, refine_sample_pixels=80_000)
    exportable = ExportableMatting(model, BaseNetwork(model)).eval()
    src, bgr = frames(height=40, width=48)
    with torch.no_grad():
        expected, got = model(src, bgr), exportable(src, bgr)
    assert int(got[5].sum()) == 10 * 12
    assert_same(expected, got, atol=0)


def test_one_dimensional_gathers_cut_and_write_the_refiner_patches():
    x = torch.rand(2, 5, 12, 16)
    index = (torch.tensor([0, 1, 1]), torch.tensor([0, 2, 1]), torch.tensor([3, 0, 2]))
    assert torch.equal(crop_windows(x, index, 2, 3), crop_patches(x, index, 2, 3))
    patches = torch.rand(3, 5, 4, 4)
    assert torch.equal(write_windows(x, patches, index), replace_patches(x, patches, index))


def test_torchscript_round_trip_keeps_the_settings_changeable(reference, tmp_path):
    model = reference_style(reference, refine_sample_pixels=2400)
    path = export_torchscript(model, tmp_path / "model.torchscript")
    loaded = torch.jit.load(str(path))
    src, bgr = frames(batch=2, height=97, width=130)
    with torch.no_grad():
        assert_same(model(src, bgr), loaded(src, bgr), atol=0)
    # As with the reference's TorchScript models: the settings are top-level attributes.
    loaded.backbone_scale, loaded.refine_mode, loaded.refine_threshold = 0.5, "thresholding", 0.35
    model.configure(RefineOptions(0.5, "thresholding", refine_threshold=0.35))
    with torch.no_grad():
        assert_same(model(src, bgr), loaded(src, bgr), atol=0)
    loaded.backbone_scale, loaded.refine_mode, loaded.refine_sample_pixels = 0.25, "sampling", 800
    model.configure(RefineOptions(0.25, "sampling", 800))
    with torch.no_grad():
        got = loaded(src, bgr)
        assert_same(model(src, bgr), got, atol=0)
    assert int(got[5][0].sum()) == 800 // 16


@pytest.mark.parametrize("format", ["torchscript", "onnx"])
def test_exporting_a_model_in_training_mode_leaves_each_of_its_layers_in_its_own_mode(tmp_path, monkeypatch, format):
    """An export mid-training (a script exporting its model every so often) must not turn the model's layers to eval
    mode: its batch norms would then stop learning their statistics, with the model itself still saying training."""
    from onnx import helper

    proto = helper.make_model(helper.make_graph([], "empty", [], []), opset_imports=[helper.make_opsetid("", 18)])
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: type("Program", (), {"model_proto": proto}))
    model = MattingRefine("mobilenetv2").train()
    model.aspp.eval()  # a part held still, as --freeze-base holds the base network
    modes = {name: module.training for name, module in model.named_modules()}
    export = export_torchscript if format == "torchscript" else export_onnx
    export(model, tmp_path / f"m.{format}")
    assert {name: module.training for name, module in model.named_modules()} == modes


def test_cli_exports_torchscript_from_a_checkpoint(tmp_path, capsys):
    checkpoint = tmp_path / "w.pth"
    torch.save(MattingRefine("mobilenetv2", refine_kernel_size=1).state_dict(), checkpoint)
    output = tmp_path / "m.torchscript"
    assert main(["export", "torchscript", str(checkpoint), "-o", str(output), "--refine-mode", "full"]) == 0
    assert str(output) in capsys.readouterr().out
    loaded = torch.jit.load(str(output))
    assert loaded.refine_mode == "full" and loaded.refine_kernel_size == 1


def test_cli_export_refuses_an_existing_output_unless_overwrite(tmp_path, capsys):
    checkpoint = tmp_path / "w.pth"
    torch.save(MattingRefine("mobilenetv2").state_dict(), checkpoint)
    output = tmp_path / "m.torchscript"
    output.write_text("precious")
    assert main(["export", "torchscript", str(checkpoint), "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    assert output.read_text() == "precious"
    assert main(["export", "torchscript", str(checkpoint), "-o", str(output), "--overwrite"]) == 0
    assert torch.jit.load(str(output)).refine_mode == "sampling"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.torchscript", "w.pth"]  # no temporary file left


@pytest.mark.parametrize("format", ["torchscript", "onnx"])
def test_cli_export_never_replaces_the_checkpoint_it_reads(tmp_path, capsys, monkeypatch, format):
    """Even with --overwrite, under its own name or through a link; nor the embedded weights (it wrote over the
    checkpoint and said so, exit 0)."""
    checkpoint = tmp_path / "w.pth"
    torch.save(MattingRefine("mobilenetv2").state_dict(), checkpoint)
    before = checkpoint.read_bytes()
    link = tmp_path / "link.pth"
    link.symlink_to(checkpoint)
    for output in (checkpoint, link):
        assert main(["export", format, str(checkpoint), "-o", str(output), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err == f"bgmatte export: error: {output}: is the checkpoint being exported ({checkpoint}); choose " \
                      "another output\n"
    assert checkpoint.read_bytes() == before
    embedded = tmp_path / "default.safetensors"
    embedded.write_bytes(b"weights")
    monkeypatch.setattr("bgmatte.model.build.DEFAULT_WEIGHTS", embedded)
    assert main(["export", format, "-o", str(embedded), "--overwrite"]) == 2
    assert "is the checkpoint being exported" in capsys.readouterr().err and embedded.read_bytes() == b"weights"


@pytest.mark.parametrize("format", ["torchscript", "onnx"])
def test_cli_export_into_a_folder_that_cannot_be_made_is_a_one_line_error(tmp_path, capsys, monkeypatch, format):
    def no_work(*args, **kwargs):
        raise AssertionError("the output is checked before the model is loaded")

    monkeypatch.setattr("bgmatte.model.build.read_state_dict", no_work)
    (tmp_path / "file").write_text("")
    output = tmp_path / "file" / "m.out"
    assert main(["export", format, "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bgmatte export: error: {output}: cannot create the folder {output.parent} (")
    assert err.count("\n") == 1
    assert main(["export", format, "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_onnx_export_checks_the_output_before_tracing(tmp_path, monkeypatch):
    def no_trace(*args, **kwargs):
        raise AssertionError("the output is checked before the minute-long trace")

    monkeypatch.setattr(torch.onnx, "export", no_trace)
    model = MattingRefine("mobilenetv2").eval()
    (tmp_path / "m.onnx").write_text("precious")
    with pytest.raises(BgmatteError, match="already exists"):
        export_onnx(model, tmp_path / "m.onnx")
    (tmp_path / "file").write_text("")
    with pytest.raises(BgmatteError, match="cannot create the folder"):
        export_onnx(model, tmp_path / "file" / "m.onnx")


def test_onnx_export_refuses_an_opset_it_cannot_make_before_tracing(tmp_path, monkeypatch, capsys):
    import onnx

    def no_trace(*args, **kwargs):
        raise AssertionError("the opset is checked before the minute-long trace")

    monkeypatch.setattr(torch.onnx, "export", no_trace)
    newest = onnx.defs.onnx_opset_version()
    with pytest.raises(BgmatteError, match=f"ONNX opset {newest + 1} is newer than this onnx package knows "
                                           f"\\({newest}\\): use 18 to {newest}"):
        export_onnx(MattingRefine("mobilenetv2").eval(), tmp_path / "m.onnx", opset=newest + 1)
    # The exporter's operators start at 18, and its conversion down to 17 fails (no adapter for Pad): it wrote 18.
    assert main(["export", "onnx", "-o", str(tmp_path / "m.onnx"), "--opset", "17"]) == 2
    assert capsys.readouterr().err.endswith("bgmatte export: error: ONNX opset 17 is too old: use 18 or later\n")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("problem", ["too old", "too new", "onnx missing"])
def test_cli_onnx_export_refuses_an_opset_or_a_missing_onnx_before_the_model_loads(tmp_path, capsys, monkeypatch,
                                                                                  problem):
    import onnx

    def no_work(*args, **kwargs):
        raise AssertionError("the weights were read for an export that cannot be made")

    monkeypatch.setattr("bgmatte.model.build.read_state_dict", no_work)
    newest = onnx.defs.onnx_opset_version()
    opset = {"too old": 17, "too new": newest + 1, "onnx missing": 18}[problem]
    if problem == "onnx missing":
        monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", "onnx", "-o", str(tmp_path / "m.onnx"), "--opset", str(opset)]) == 2
    err = capsys.readouterr().err
    assert err == "bgmatte export: error: " + {
        "too old": "ONNX opset 17 is too old: use 18 or later",
        "too new": f"ONNX opset {opset} is newer than this onnx package knows ({newest}): use 18 to {newest}",
        "onnx missing": "onnx is not installed: install the extra with `pip install bgmatte[onnx]`",
    }[problem] + "\n"
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_export_refuses_a_model_the_exporter_left_at_another_opset(tmp_path, monkeypatch):
    """The exporter's opset conversion can fail with only a logged warning, leaving its own opset: that file is not
    written under the opset asked for."""
    from onnx import helper

    graph = helper.make_graph([], "empty", [], [])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: type("Program", (), {"model_proto": proto}))
    with pytest.raises(BgmatteError, match=r"m\.onnx: the exporter could not make ONNX opset 20 \(it made opset 18\)"):
        export_onnx(MattingRefine("mobilenetv2").eval(), tmp_path / "m.onnx", opset=20)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", [RuntimeError("[enforce fail] cannot open file\nmore detail"),
                                     KeyboardInterrupt()])
def test_a_failed_or_interrupted_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch,
                                                                                     failure):
    import bgmatte.export

    def half_save(module, path):
        with open(path, "wb") as file:
            file.write(b"half a model")
        raise failure

    monkeypatch.setattr(bgmatte.export, "to_torchscript", lambda model: object())  # no scripting: only the write
    monkeypatch.setattr(torch.jit, "save", half_save)
    output = tmp_path / "m.torchscript"
    output.write_text("precious")
    if isinstance(failure, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            export_torchscript(MattingRefine("mobilenetv2"), output, overwrite=True)
    else:
        with pytest.raises(BgmatteError, match=r"m\.torchscript: cannot write the TorchScript model "
                                               r"\(\[enforce fail\] cannot open file\)$"):
            export_torchscript(MattingRefine("mobilenetv2"), output, overwrite=True)
    assert output.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["m.torchscript"]


def test_cli_export_without_a_checkpoint_asks_for_one(monkeypatch, tmp_path, capsys):
    from bgmatte.model import build

    monkeypatch.setattr(build, "DEFAULT_WEIGHTS", tmp_path / "absent.safetensors")
    assert main(["export", "onnx", "-o", str(tmp_path / "m.onnx")]) == 2
    assert "pass a checkpoint" in capsys.readouterr().err


def test_onnx_export_without_onnx_installed_says_which_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # what an absent package looks like to import
    with pytest.raises(BgmatteError, match=r"onnx is not installed.*pip install bgmatte\[onnx\]"):
        export_onnx(MattingRefine("mobilenetv2").eval(), tmp_path / "m.onnx")


def test_onnxruntime_backend_refuses_low_precision(tmp_path):
    with pytest.raises(BgmatteError, match="fp32 models only"):
        load_model(tmp_path / "m.onnx", backend="onnxruntime", precision="fp16")


class _Notices(logging.Handler):
    """The messages a logger passes on (a logger's filters run before its handlers)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def onnx_export(reference, tmp_path_factory):
    """One export for the ONNX tests (it takes the better part of a minute): MobileNetV2, sampling 2400 px;
    with what the exporter's operator registry logged meanwhile."""
    model = reference_style(reference, refine_sample_pixels=2400)
    checkpoint = tmp_path_factory.mktemp("onnx") / "w.pth"
    torch.save(model.state_dict(), checkpoint)
    path = checkpoint.with_suffix(".onnx")
    loggers, notices = ("torch.onnx._internal.exporter._registration", "onnx_ir._convenience"), _Notices()
    for name in loggers:
        logging.getLogger(name).addHandler(notices)
    try:
        assert main(["export", "onnx", str(checkpoint), "-o", str(path), "--refine-sample-pixels", "2400"]) == 0
    finally:
        for name in loggers:
            logging.getLogger(name).removeHandler(notices)
    return model, path, notices.messages


@pytest.fixture(scope="module")
def onnx_model(onnx_export):
    model, path, _ = onnx_export
    return model, path


@pytest.mark.slow
@pytest.mark.parametrize("size", [(1, 96, 128), (2, 97, 130), (1, 40, 48)])
def test_onnx_model_runs_in_onnxruntime_at_any_size_as_the_plain_model(onnx_model, size):
    model, path = onnx_model
    runner = load_model(path, backend="onnxruntime", device="cpu")
    assert isinstance(runner, OnnxMatting) and runner.backbone_name == "mobilenetv2"
    assert runner.options == RefineOptions(refine_sample_pixels=2400)
    src, bgr = frames(*size)
    with torch.no_grad():
        expected = model(src, bgr)
    got = runner(src, bgr)
    assert torch.equal(got[5], expected[5])
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        np.testing.assert_allclose(g.numpy(), e.numpy(), atol=1e-3, rtol=0)


@pytest.mark.slow
def test_onnx_opset_and_dynamic_sizes_are_recorded(onnx_model):
    import onnx

    _, path = onnx_model
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1] == 3 and isinstance(dims[2], str) and isinstance(dims[3], str)


class _ErrorFreeBase(torch.nn.Module):
    """A stand-in base network (one conv, quick to export) whose error map is zero everywhere."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 37, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(0.1)
            self.conv.bias[:4] = 0.5
            self.conv.bias[4] = -5.0

    def forward(self, src, bgr):
        return self.conv(torch.cat([src, bgr], dim=1))


@pytest.mark.slow
def test_onnx_graph_runs_frames_without_patches(reference, tmp_path):
    """The exporter is told that the patch count is never zero; the graph must still run when it is."""
    import onnxruntime

    model = reference_style(reference, refine_sample_pixels=2400)
    exportable = ExportableMatting(model, _ErrorFreeBase()).eval()
    src, bgr = frames(batch=2, height=96, width=128)
    dims = {0: torch.export.Dim("batch", min=1, max=8), 2: torch.export.Dim("height", min=16, max=1024),
            3: torch.export.Dim("width", min=16, max=1024)}
    with torch.no_grad():
        torch.onnx.export(exportable, (src, bgr), str(tmp_path / "m.onnx"), dynamo=True, opset_version=18,
                          external_data=False, dynamic_shapes={"src": dims, "bgr": dims})
        expected = exportable(*frames(batch=1, height=64, width=80))
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    src, bgr = frames(batch=1, height=64, width=80)
    got = session.run(None, {"src": src.numpy(), "bgr": bgr.numpy()})
    assert int(expected[5].sum()) == 0 and got[5].sum() == 0
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e.numpy(), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_onnx_settings_are_fixed_and_other_ones_are_refused(onnx_model):
    _, path = onnx_model
    with pytest.raises(BgmatteError, match="refine_mode='sampling'.*export again"):
        load_model(path, backend="onnxruntime", refine_mode="thresholding")
    with pytest.raises(BgmatteError, match="backbone mobilenetv2, not resnet50"):
        load_model(path, backend="onnxruntime", backbone="resnet50")
    # An explicit request for a default value is a request too: it used to pass unseen, running 2400 pixels.
    with pytest.raises(BgmatteError, match="refine_sample_pixels=2400.*export again with refine_sample_pixels=80000"):
        load_model(path, backend="onnxruntime", refine_sample_pixels=80_000)
    assert load_model(path, backend="onnxruntime", refine_sample_pixels=2400).options.refine_sample_pixels == 2400


@pytest.mark.slow
def test_onnx_export_does_not_print_the_exporter_s_notices(onnx_export):
    """torch's exporter logs one "torchvision is not installed" line per torchvision operator (bgmatte uses none),
    and onnx_ir one about an empty attribute list in torch's own graph."""
    *_, messages = onnx_export
    assert not [message for message in messages if "torchvision" in message or "Attribute type" in message]


@pytest.mark.slow
def test_onnx_model_refuses_what_the_torch_model_refuses(onnx_model):
    """uint8 frames used to be cast to float unscaled (a matte of garbage), numpy arrays an AttributeError."""
    _, path = onnx_model
    runner = load_model(path, backend="onnxruntime", device="cpu")
    src, bgr = frames()
    with pytest.raises(ValueError, match="float tensors"):
        runner((src * 255).to(torch.uint8), (bgr * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="torch tensors, got ndarray"):
        runner(src.numpy(), bgr.numpy())
    with pytest.raises(ValueError, match="same shape"):
        runner(src, bgr[..., :-1])


@pytest.mark.slow
@pytest.mark.parametrize("device", ["gpu", "mps", "meta"])
def test_onnxruntime_backend_refuses_devices_it_cannot_run_on(onnx_model, device):
    """'gpu' used to run on the CPU without a word, although the torch backend refuses it."""
    _, path = onnx_model
    with pytest.raises(BgmatteError, match=f"cannot run on device '{device}': use auto, cpu, cuda or cuda:N"):
        load_model(path, backend="onnxruntime", device=device)


def test_onnxruntime_backend_checks_for_cuda_before_exporting(tmp_path, monkeypatch):
    import onnxruntime

    def no_export(*args, **kwargs):
        raise AssertionError("the device is checked before the minute-long export")

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr("bgmatte.export.export_checkpoint", no_export)
    checkpoint = tmp_path / "w.pth"
    torch.save(MattingRefine("mobilenetv2").state_dict(), checkpoint)
    with pytest.raises(BgmatteError, match="no CUDA provider"):
        load_model(checkpoint, backend="onnxruntime", device="cuda")


def test_onnxruntime_providers_follow_the_device(monkeypatch):
    import onnxruntime

    from bgmatte.export import onnx_providers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx_providers("auto") == onnx_providers(None) == ["CPUExecutionProvider"]  # torch's GPU is not enough
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_providers("auto")[0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert onnx_providers("cuda:1")[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert onnx_providers(torch.device("cpu")) == ["CPUExecutionProvider"]
