"""The public Python API's `model=` argument: every kind of model it takes, and the ones it refuses in one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import bgmatte
from bgmatte.errors import BgmatteError
from bgmatte.io.images import read_image, write_png
from bgmatte.model.matting import MattingBase, MattingRefine
from bgmatte.predictor import Predictor
from media import DifferenceModel, make_clip, plate_image, read_frames, subject_box, subject_frame

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]



@pytest.fixture()
def scene(tmp_path):
    """A 5-frame clip of the subject over the plate, the plate as a PNG, and one still of it."""
    clip, plate, still = tmp_path / "src.mp4", tmp_path / "plate.png", tmp_path / "still.png"
    make_clip(clip, 5, audio=False)
    write_png(plate, plate_image())
    write_png(still, subject_frame(plate_image(), 2))
    return clip, plate, still


def one_line(caught: pytest.ExceptionInfo) -> str:
    message = str(caught.value)
    assert "\n" not in message
    return message


# -------------------------------------------------------------------------------------- training mode


@pytest.mark.parametrize("call", ["video", "images"])
def test_a_model_in_training_mode_is_refused_and_left_as_it_was(scene, tmp_path, call):
    clip, plate, still = scene
    model = MattingRefine("mobilenetv2")  # no .eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(BgmatteError, match=r"training mode.*\.eval\(\)") as caught:
        if call == "video":
            bgmatte.convert_video(clip, plate, output_dir=tmp_path / "out", model=model, progress=False)
        else:
            bgmatte.matte_images(still, plate, output_dir=tmp_path / "out", model=model, progress=False)
    one_line(caught)
    assert model.training  # the caller's module is not switched for them
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())  # nor its statistics
    assert not (tmp_path / "out").exists()
    with pytest.raises(BgmatteError, match="training mode"):
        Predictor(model)


def test_a_module_without_training_behaviour_needs_no_eval(scene, tmp_path):
    clip, plate, _ = scene
    model = DifferenceModel()  # in training mode, but nothing in it behaves differently there
    result = bgmatte.convert_video(clip, plate, output_dir=tmp_path / "out", outputs=["pha"], model=model,
                                   progress=False)
    assert result.frames == 5 and model.calls == [1] * 5


# ----------------------------------------------------------------------------------------- model types


def difference_onnx(path: Path) -> Path:
    """A tiny ONNX graph with bgmatte's inputs, outputs and settings: alpha 1 where src and bgr differ by
    more than 0.1, the source as foreground (what `DifferenceModel` does), in place of a minute's export."""
    import onnx
    from onnx import TensorProto, helper

    sizes = ["batch", 3, "height", "width"]
    nodes = [
        helper.make_node("Sub", ["src", "bgr"], ["diff"]),
        helper.make_node("Abs", ["diff"], ["distance"]),
        helper.make_node("ReduceMax", ["distance"], ["largest"], axes=[1], keepdims=1),
        helper.make_node("Greater", ["largest", "threshold"], ["differs"]),
        helper.make_node("Cast", ["differs"], ["alpha"], to=TensorProto.FLOAT),
        helper.make_node("Identity", ["alpha"], ["pha"]),
        helper.make_node("Identity", ["src"], ["fgr"]),
        helper.make_node("Identity", ["alpha"], ["pha_sm"]),
        helper.make_node("Identity", ["src"], ["fgr_sm"]),
        helper.make_node("Identity", ["alpha"], ["err_sm"]),
        helper.make_node("Identity", ["alpha"], ["ref_sm"]),
    ]
    graph = helper.make_graph(
        nodes, "difference",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, sizes) for name in ("src", "bgr")],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
         for name in ("pha", "fgr", "pha_sm", "fgr_sm", "err_sm", "ref_sm")],
        [helper.make_tensor("threshold", TensorProto.FLOAT, [], [0.1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {
        "backbone": "mobilenetv2", "backbone_scale": "0.25", "refine_mode": "sampling",
        "refine_sample_pixels": "80000", "refine_threshold": "0.1", "refine_kernel_size": "3",
        "refine_prevent_oversampling": "True",
    })
    onnx.save(model, str(path))
    return path


def test_a_model_from_the_onnxruntime_backend_is_taken(scene, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    clip, plate, still = scene
    model = bgmatte.load_model(difference_onnx(tmp_path / "difference.onnx"), backend="onnxruntime", device="cpu")
    assert model.device == torch.device("cpu") and Predictor(model).device == torch.device("cpu")
    result = bgmatte.convert_video(clip, plate, output_dir=tmp_path / "video", outputs=["pha"], model=model,
                                   progress=False)
    frames = read_frames(result.outputs["pha"])
    rows, columns = subject_box(3)
    assert len(frames) == 5 and frames[3][rows, columns].mean() > 240 and frames[3][0, 0].max() < 16
    written = bgmatte.matte_images(still, plate, output_dir=tmp_path / "images", outputs=["pha"], model=model,
                                   progress=False)
    rows, columns = subject_box(2)
    assert read_image(written["pha"][0])[rows, columns].min() == 255


def test_an_onnx_session_is_placed_where_its_provider_really_loaded():
    """onnxruntime falls back to the CPU when the CUDA libraries are missing: the device follows the session."""
    from bgmatte.export import _session_device

    class Session:
        def __init__(self, loaded):
            self.loaded = loaded

        def get_providers(self):
            return self.loaded

    asked = [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert _session_device(Session(["CUDAExecutionProvider", "CPUExecutionProvider"]), asked) == torch.device("cuda", 1)
    assert _session_device(Session(["CPUExecutionProvider"]), asked) == torch.device("cpu")
    assert _session_device(Session(["CPUExecutionProvider"]), ["CPUExecutionProvider"]) == torch.device("cpu")


@pytest.mark.parametrize("call", ["video", "images"])
def test_an_unsupported_model_type_is_named(scene, tmp_path, call):
    clip, plate, still = scene
    for wrong, name in ((42, "int"), (lambda src, bgr: None, "function")):
        with pytest.raises(BgmatteError, match=f"model.*not {name}") as caught:
            if call == "video":
                bgmatte.convert_video(clip, plate, output_dir=tmp_path / "out", model=wrong, progress=False)
            else:
                bgmatte.matte_images(still, plate, output_dir=tmp_path / "out", model=wrong, progress=False)
        one_line(caught)
    assert not (tmp_path / "out").exists()


def test_the_base_network_alone_runs_without_ref(scene, tmp_path):
    clip, plate, still = scene
    base = MattingBase("mobilenetv2").eval()
    result = bgmatte.convert_video(clip, plate, output_dir=tmp_path / "video", outputs=["com", "err"], model=base,
                                   progress=False)
    assert result.frames == 5 and len(read_frames(result.outputs["err"])) == 5
    written = bgmatte.matte_images(still, plate, output_dir=tmp_path / "images", outputs=["pha"], model=base,
                                   progress=False)
    assert read_image(written["pha"][0]).shape[:2] == (64, 96)
    for call in (lambda: bgmatte.convert_video(clip, plate, output_dir=tmp_path / "v2", outputs=["com", "ref"],
                                               model=base, progress=False),
                 lambda: bgmatte.matte_images(still, plate, output_dir=tmp_path / "i2", outputs=["ref"], model=base,
                                              progress=False)):
        with pytest.raises(BgmatteError, match="ref output needs the refine model.*MattingRefine") as caught:
            call()
        one_line(caught)
    assert not (tmp_path / "v2").exists() and not (tmp_path / "i2").exists()


def test_a_predictor_around_the_base_network_runs_and_is_checked_once(scene, tmp_path, monkeypatch):
    import bgmatte.pipeline as pipeline

    clip, plate, still = scene
    model = Predictor(MattingBase("mobilenetv2").eval())
    checks = []
    check_model = pipeline.check_model
    monkeypatch.setattr(pipeline, "check_model", lambda *args: checks.append(args) or check_model(*args))
    result = bgmatte.convert_video(clip, plate, output_dir=tmp_path / "video", outputs=["pha"], model=model,
                                   progress=False)
    assert result.frames == 5 and len(checks) == 1
    written = bgmatte.matte_images(still, plate, output_dir=tmp_path / "images", outputs=["pha"], model=model,
                                   progress=False)
    assert len(written["pha"]) == 1 and len(checks) == 2
    with pytest.raises(BgmatteError, match="ref output needs the refine model") as caught:
        bgmatte.matte_images(still, plate, output_dir=tmp_path / "i2", outputs=["ref"], model=model, progress=False)
    one_line(caught)


def test_a_half_precision_module_runs_in_its_own_precision(scene, tmp_path):
    clip, plate, still = scene
    weights = tmp_path / "w.pth"
    torch.save(MattingRefine("mobilenetv2").state_dict(), weights)
    model = bgmatte.load_model(weights, precision="fp16", optimize=False, device="cpu", refine_sample_pixels=2000)
    assert Predictor(model).dtype == torch.float16
    assert next(model.parameters()).dtype == torch.float16  # left as it is
    result = bgmatte.convert_video(clip, plate, output_dir=tmp_path / "video", outputs=["pha"], model=model,
                                   progress=False)
    assert result.frames == 5
    written = bgmatte.matte_images(still, plate, output_dir=tmp_path / "images", outputs=["pha"], model=model,
                                   progress=False)
    assert len(written["pha"]) == 1


# ---------------------------------------------------------------------------------- inputs kept safe


@pytest.mark.parametrize("role", ["source", "plate", "target"])
def test_matte_images_never_overwrites_its_own_inputs(tmp_path, role):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "com").mkdir(parents=True)  # where the com outputs of output_dir=work go
    elsewhere.mkdir()
    # The input in the role named is work/com/a.png, just where the output for a.png goes.
    source = (work / "com" if role == "source" else elsewhere) / "a.png"
    plate = work / "com" / "a.png" if role == "plate" else elsewhere / "plate.png"
    target = work / "com" / "a.png" if role == "target" else elsewhere / "beach.png"
    write_png(plate, plate_image())
    write_png(target, plate_image(seed=3))
    write_png(source, subject_frame(plate_image(), 2))
    kept = (work / "com" / "a.png").read_bytes()
    (tmp_path / "alias").symlink_to(work, target_is_directory=True)  # the same folder, spelled another way
    model = DifferenceModel()
    for folder in (work, tmp_path / "alias"):
        with pytest.raises(BgmatteError, match=f"com.a.png: .*would overwrite the {role}") as caught:
            bgmatte.matte_images(source, plate.parent if role == "plate" else plate, output_dir=folder,
                                 target_bgr=str(target), model=model, overwrite=True, progress=False)
        one_line(caught)
    assert (work / "com" / "a.png").read_bytes() == kept and model.calls == []


# -------------------------------------------------------------------------------------------- exports


def test_model_options_are_exported_lazily():
    import bgmatte.pipeline

    assert "ModelOptions" in bgmatte.__all__
    assert bgmatte.ModelOptions is bgmatte.pipeline.ModelOptions


# ---------------------------------------------------------------------------------------- frame sizes


@pytest.mark.parametrize("optimized", [False, True], ids=["plain", "fast"])
def test_a_predictor_refuses_frames_too_small_for_the_backbone_scale_in_one_line(optimized):
    from bgmatte.model.fast import optimize_model

    model = MattingRefine("mobilenetv2", backbone_scale=0.05).eval()
    predictor = Predictor(optimize_model(model) if optimized else model)
    frame = torch.zeros(1, 12, 20, 3, dtype=torch.uint8)  # 20x12: the base network would get 1x0 pixels
    with pytest.raises(BgmatteError) as caught:
        predictor(frame, frame)
    assert "20x12" in one_line(caught) and "0.05" in one_line(caught)
    predictor(torch.zeros(1, 20, 20, 3, dtype=torch.uint8), torch.zeros(1, 20, 20, 3, dtype=torch.uint8))  # 1x1: runs


@pytest.mark.parametrize("failure", ["InvalidArgument", "RuntimeException"])
def test_an_onnx_model_that_fails_to_run_is_one_line_and_running_out_of_memory_is_not_enough_memory(tmp_path,
                                                                                                   failure):
    """onnxruntime's exceptions are neither RuntimeError nor MemoryError: they passed the Predictor's memory handling
    and reached the caller as tracebacks of onnxruntime's own types."""
    pytest.importorskip("onnx")
    state = pytest.importorskip("onnxruntime.capi.onnxruntime_pybind11_state")
    from bgmatte.predictor import NotEnoughMemory

    model = bgmatte.load_model(difference_onnx(tmp_path / "difference.onnx"), backend="onnxruntime", device="cpu")
    message = ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Non-zero status code returned while running Pad node.\n"
               "more" if failure == "InvalidArgument" else
               "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer of size 8")

    class Failing:
        def run(self, names, feed):
            raise getattr(state, failure)(message)

    model.session = Failing()
    frame = torch.zeros(1, 4, 8, 3, dtype=torch.uint8)
    expected = NotEnoughMemory if failure == "RuntimeException" else BgmatteError
    with pytest.raises(expected) as caught:
        Predictor(model)(frame, frame)
    text = one_line(caught)
    if failure == "InvalidArgument":
        assert "difference.onnx" in text and "8x4" in text and "Pad node" in text
    else:
        assert text.startswith("not enough memory to matte 1 frame of 8x4")


@pytest.mark.parametrize(("name", "value"), [("refine_threshold", float("nan")), ("refine_threshold", float("inf")),
                                             ("backbone_scale", float("nan")), ("backbone_scale", 0.75),
                                             ("refine_sample_pixels", float("nan")), ("refine_sample_pixels", -5),
                                             ("refine_kernel_size", 5), ("refine_mode", "everything")])
def test_model_options_refuse_an_unusable_refine_setting_when_made_before_anything_is_read(name, value):
    """ModelOptions passed these on unchecked: a NaN threshold refined nothing, and the others failed only once the
    video was open and the weights read."""
    with pytest.raises(BgmatteError, match=name) as caught:
        bgmatte.ModelOptions(**{name: value})
    one_line(caught)


def test_the_package_docstring_names_every_public_name():
    """It described the public API without RefineOptions, which __all__ exports."""
    missing = [name for name in bgmatte.__all__ if name != "__version__" and f"``{name}``" not in bgmatte.__doc__]
    assert missing == []


@pytest.mark.parametrize(("name", "value"), [("plate_solve", "off"), ("optimize", "no")])
def test_model_options_refuse_a_switch_that_is_not_true_or_false(name, value):
    """ModelOptions(plate_solve="off") turned the plate solve on: any non-empty string is true."""
    with pytest.raises(BgmatteError, match=f"{name} must be True or False") as caught:
        bgmatte.ModelOptions(**{name: value})
    one_line(caught)


def test_the_base_network_from_weights_of_another_backbone_is_named_with_theirs(tmp_path):
    """`model_type="mattingbase"` with a backbone the weights are not for listed missing keys only."""
    from bgmatte import pipeline

    path = tmp_path / "w.pth"
    torch.save(MattingBase("mobilenetv2").state_dict(), path)
    options = bgmatte.ModelOptions(checkpoint=path, model_type="mattingbase", backbone="resnet50", device="cpu")
    with pytest.raises(BgmatteError, match="w.pth: holds mobilenetv2 weights, not resnet50") as caught:
        pipeline._load_base(options)
    one_line(caught)


def test_model_options_refuse_an_unknown_backbone_when_made():
    """It was refused only once the inputs were open and the weights read, and for the base network as "cannot tell
    the backbone from the weights"."""
    with pytest.raises(BgmatteError, match="unknown backbone 'vgg16': choose one of resnet50, resnet101, mobilenetv2"):
        bgmatte.ModelOptions(backbone="vgg16", model_type="mattingbase")


def test_one_output_can_be_named_by_a_plain_string(scene, tmp_path):
    """``outputs="pha"`` was taken letter by letter and refused as "unknown output 'p'"."""
    _, plate, still = scene
    written = bgmatte.matte_images(still, plate, output_dir=tmp_path / "out", outputs="pha",
                                   model=Predictor(DifferenceModel()), progress=False)
    assert list(written) == ["pha"] and len(written["pha"]) == 1


def test_a_target_background_can_be_a_path_and_anything_else_is_refused_in_one_line(scene, tmp_path):
    """A Path (or a colour tuple) failed with "'PosixPath' object has no attribute 'kind'"."""
    _, plate, still = scene
    target = tmp_path / "target.png"
    write_png(target, plate_image())
    written = bgmatte.matte_images(still, plate, output_dir=tmp_path / "out", target_bgr=target,
                                   model=Predictor(DifferenceModel()), progress=False)
    assert len(written["com"]) == 1
    with pytest.raises(BgmatteError, match="target_bgr takes .* not tuple") as caught:
        bgmatte.matte_images(still, plate, output_dir=tmp_path / "out2", target_bgr=(0, 255, 0),
                             model=Predictor(DifferenceModel()), progress=False)
    one_line(caught)


@pytest.mark.parametrize("size", ["2", 2.5, True])
def test_a_batch_size_that_is_not_a_whole_number_is_refused_in_one_line(scene, tmp_path, size):
    """"2" failed comparing a str with an int, and 2.5 ran batches of 3."""
    clip, plate, _ = scene
    with pytest.raises(BgmatteError, match=f"batch size must be a whole number, 1 or more, not {size!r}") as caught:
        bgmatte.convert_video(clip, plate, output=tmp_path / "out.mp4", batch_size=size,
                              model=Predictor(DifferenceModel()), progress=False)
    one_line(caught)
