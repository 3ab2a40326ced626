"""`bgmatte bench`: both candidates timed in one run, interleaved, reported as a table or JSON."""
from __future__ import annotations

import json

import pytest
import torch

from bgmatte import BgmatteError
from bgmatte.bench import (BenchOptions, benchmark, benchmark_pipeline, example_frames, format_result,
                           parse_resolution, random_model, time_interleaved)
from bgmatte.cli import main
from bgmatte.model.matting import RefineOptions


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread (and the caller's count restored): on a shared 2-core machine two threads can wait a
    scheduler tick at every operation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_json_gives_both_timings_and_their_ratio(capsys):
    code = main(["bench", "--resolution", "128x96", "--pixels", "1600", "--repeats", "2", "--warmup", "0",
                 "--threads", "1", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for side in ("plain", "fast"):
        assert report[side]["ms_per_frame"] > 0 and report[side]["fps"] > 0
        assert len(report[side]["seconds_per_call"]) == 2
    assert report["ratio"] == pytest.approx(report["plain"]["ms_per_frame"] / report["fast"]["ms_per_frame"], rel=0.01)
    assert report["threads"] == 1 and report["device"] == "cpu"
    assert report["settings"]["width"] == 128 and report["settings"]["height"] == 96
    assert report["settings"]["options"]["refine_sample_pixels"] == 1600
    assert report["refined_pixels_per_frame"] == 1600  # random weights still refine the whole budget
    assert "random" in report["weights"] and report["machine"]


def test_table_names_the_machine_and_prints_ms_fps_and_ratio(capsys):
    assert main(["bench", "--resolution", "96x64", "--mode", "thresholding", "--repeats", "1", "--warmup", "0",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "machine:" in out and "ms/frame" in out and "fps" in out and "ratio" in out
    assert "plain module" in out and "fast path" in out


def test_precision_runs_both_candidates_in_it():
    options = BenchOptions(width=96, height=64, options=RefineOptions(refine_sample_pixels=800), precision="bf16",
                           threads=1, device="cpu", repeats=1, warmup=0)
    result = benchmark(options)
    assert result.plain.median_ms > 0 and result.fast.median_ms > 0
    assert "bf16" in format_result(result)


def test_candidates_take_turns_in_abba_order():
    calls = []
    seconds = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(seconds["a"]) == len(seconds["b"]) == 4


def test_random_weights_give_an_error_map_without_zeros():
    model = random_model("mobilenetv2", RefineOptions(refine_sample_pixels=1600))
    src, bgr = example_frames(1, 96, 128)
    with torch.no_grad():
        *_, err_sm, ref_sm = model(src, bgr)
    assert err_sm.min() > 0 and int(ref_sm.sum()) == 1600 // 16


@pytest.mark.parametrize("text,size", [("1920x1080", (1920, 1080)), ("hd", (1920, 1080)), ("4K", (3840, 2160)),
                                       (" 640x480 ", (640, 480))])
def test_resolutions_are_sizes_or_names(text, size):
    assert parse_resolution(text) == size


@pytest.mark.parametrize("text", ["1920", "1920x", "0x10", "axb", "8k"])
def test_bad_resolutions_are_refused_with_the_accepted_forms(text):
    with pytest.raises(BgmatteError, match="WIDTHxHEIGHT"):
        parse_resolution(text)


def test_bad_settings_become_one_line_errors(capsys):
    assert main(["bench", "--scale", "0.8", "--repeats", "1"]) == 2
    assert "--scale 0.8: the value must be a number in (0, 1/2]" in capsys.readouterr().err  # the option, as given
    assert main(["bench", "--threads", "0", "--resolution", "64x64", "--repeats", "1"]) == 2
    assert "threads" in capsys.readouterr().err


def test_a_negative_warm_up_is_refused(capsys):
    assert main(["bench", "--warmup", "-3", "--resolution", "64x64", "--repeats", "1"]) == 2
    assert capsys.readouterr().err == "bgmatte bench: error: warmup must be 0 or more, not -3\n"


@pytest.mark.parametrize("option", ["--batch", "--repeats"])
def test_a_batch_or_repeats_below_one_is_refused_by_name_and_value(capsys, option):
    args = {"--batch": "1", "--repeats": "1", option: "0"}
    assert main(["bench", "--resolution", "64x64", "--warmup", "0", *[x for item in args.items() for x in item]]) == 2
    assert capsys.readouterr().err == f"bgmatte bench: error: {option[2:]} must be at least 1, not 0\n"


def test_neither_candidate_runs_before_the_warm_up_it_is_told(monkeypatch):
    """--warmup 0 times both candidates cold: the plain module's refined-pixel count is not an extra warm-up."""
    import bgmatte.bench as bench

    calls: list[str] = []
    plain_model = bench._plain_model

    def watched(options, device):
        plain, weights, options = plain_model(options, device)
        plain.register_forward_pre_hook(lambda module, args: calls.append("call"))
        return plain, weights, options

    def timed(candidates, repeats, warmup, synchronize=lambda: None):
        assert calls == [], "the plain module ran before its timing began"
        return time_interleaved(candidates, repeats, warmup, synchronize)

    monkeypatch.setattr(bench, "_plain_model", watched)
    monkeypatch.setattr(bench, "time_interleaved", timed)
    result = benchmark(BenchOptions(width=96, height=64, options=RefineOptions(refine_sample_pixels=800), threads=1,
                                    device="cpu", repeats=1, warmup=0))
    assert result.refined_pixels == 800


def test_plate_solve_compare_prices_the_step_on_the_fast_path(capsys):
    code = main(["bench", "--resolution", "128x96", "--pixels", "1600", "--repeats", "2", "--warmup", "0",
                 "--threads", "1", "--plate-solve", "compare", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plain"]["name"] == "fast path" and report["fast"]["name"] == "+ plate solve"
    assert report["settings"]["plate_solve"] == "compare"


def test_plate_solve_compare_needs_the_torch_backend():
    with pytest.raises(BgmatteError, match="backend torch"):
        benchmark(BenchOptions(width=64, height=48, backend="onnxruntime", plate_solve="compare"))


def test_the_backbone_is_read_from_the_checkpoint(tmp_path, capsys):
    from bgmatte.model.matting import MattingRefine

    checkpoint = tmp_path / "r50.pth"
    torch.save(MattingRefine("resnet50").state_dict(), checkpoint)
    assert main(["bench", "--checkpoint", str(checkpoint), "--resolution", "64x64", "--pixels", "256",
                 "--repeats", "1", "--warmup", "0", "--threads", "1", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["backbone"] == "resnet50" and report["weights"] == str(checkpoint)


def test_random_weights_default_to_mobilenetv2():
    result = benchmark(BenchOptions(width=64, height=64, options=RefineOptions(refine_sample_pixels=256), threads=1,
                                    device="cpu", repeats=1, warmup=0))
    assert result.options.backbone == "mobilenetv2" and "mobilenetv2" in format_result(result)


@pytest.mark.parametrize("extra,expected", [(["--backend", "onnxruntime"], "backend onnxruntime"),
                                            (["--plate-solve", "compare"], "not compare"),
                                            (["--warmup", "1"], "--warmup")])
def test_pipeline_refuses_the_options_it_cannot_honour(capsys, extra, expected):
    assert main(["bench", "--pipeline", "--resolution", "64x64", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


@pytest.fixture
def measured(monkeypatch):
    """Stands in for measure_pipeline: records the predictor and the rounds it was given, times nothing."""
    from bgmatte import pipeline

    calls = []

    def measure(predictor, **kwargs):
        calls.append((predictor, kwargs))
        return pipeline.PipelineSpeed(kwargs["width"], kwargs["height"], 32, 1, ("com",), 1, 10.0, 9.0, 10.0, 9.0)

    monkeypatch.setattr(pipeline, "measure_pipeline", measure)
    return calls


def test_pipeline_plate_solve_is_off_unless_asked_whatever_the_weights_say(tmp_path, capsys, measured):
    from bgmatte.model.build import save_weights
    from bgmatte.model.matting import MattingRefine

    checkpoint = tmp_path / "solved.safetensors"
    save_weights(MattingRefine("mobilenetv2"), checkpoint, metadata={"plate_solve": "on"})
    args = ["bench", "--pipeline", "--checkpoint", str(checkpoint), "--resolution", "64x64", "--device", "cpu"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plate_solve"] == "off" and report["backbone"] == "mobilenetv2" and report["model_fps"] == 10.0
    assert main([*args, "--plate-solve", "on", "--repeats", "5"]) == 0
    assert "plate solve on" in capsys.readouterr().out
    (first, first_kwargs), (second, second_kwargs) = measured
    assert first.model.plate_solve is False and second.model.plate_solve is True
    assert first_kwargs["rounds"] == 2 and second_kwargs["rounds"] == 5  # --repeats: rounds over the clip


def test_python_and_the_cli_agree_on_the_default_rounds_and_repeats(capsys, measured, monkeypatch):
    from bgmatte import bench

    result = benchmark_pipeline(BenchOptions(width=64, height=64, device="cpu"))
    assert main(["bench", "--pipeline", "--resolution", "64x64", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["repeats"] == 2
    assert [kwargs["rounds"] for _, kwargs in measured] == [2, 2] and result.options.repeats == 2

    timed = []

    def time_nothing(candidates, repeats, warmup, synchronize):
        timed.append(repeats)
        return {name: [0.01] for name in candidates}

    monkeypatch.setattr(bench, "time_interleaved", time_nothing)
    result = benchmark(BenchOptions(width=64, height=64, options=RefineOptions(refine_sample_pixels=256),
                                    threads=1, device="cpu"))
    assert main(["bench", "--resolution", "64x64", "--pixels", "256", "--threads", "1", "--device", "cpu"]) == 0
    assert timed == [10, 10] and result.options.repeats == 10
    assert "median of 10 interleaved runs after 2 warm-up" in capsys.readouterr().out


def test_the_pipeline_benchmark_itself_refuses_what_needs_a_second_candidate():
    with pytest.raises(BgmatteError, match="backend onnxruntime"):
        benchmark_pipeline(BenchOptions(width=64, height=64, backend="onnxruntime"))
    with pytest.raises(BgmatteError, match="not compare"):
        benchmark_pipeline(BenchOptions(width=64, height=64, plate_solve="compare"))


def test_a_resolution_too_small_for_the_scale_is_refused_before_any_model_is_built(capsys, monkeypatch):
    import bgmatte.bench

    monkeypatch.setattr(bgmatte.bench, "random_model", lambda *args, **kwargs: pytest.fail("a model was built"))
    assert main(["bench", "--resolution", "96x64", "--scale", "0.01", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "96x64" in err and "0.01" in err


def test_a_resolution_above_the_pixel_limit_is_refused_before_any_model_is_built(capsys, monkeypatch):
    import bgmatte.bench

    monkeypatch.setattr(bgmatte.bench, "random_model", lambda *args, **kwargs: pytest.fail("a model was built"))
    assert main(["bench", "--resolution", "100000x100000", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err == ("bgmatte bench: error: resolution 100000x100000 is 10000 megapixels, above the limit of 100\n")


@pytest.mark.parametrize("missing,extra,expected", [
    ("onnxruntime", [], "onnxruntime is not installed: install the extra with `pip install bgmatte[onnx]`"),
    ("onnx", [], "onnx is not installed: install the extra with `pip install bgmatte[onnx]`"),
    (None, ["--precision", "fp16"], "the onnxruntime backend runs fp32 models only"),
])
def test_what_the_onnxruntime_candidate_cannot_run_is_refused_before_any_model_is_built_and_exported(
        capsys, monkeypatch, missing, extra, expected):
    """onnxruntime was imported only after the model was built and exported (about a minute)."""
    import sys

    import bgmatte.bench
    import bgmatte.export

    monkeypatch.setattr(bgmatte.bench, "random_model", lambda *args, **kwargs: pytest.fail("a model was built"))
    monkeypatch.setattr(bgmatte.export, "export_onnx", lambda *args, **kwargs: pytest.fail("a model was exported"))
    if missing is not None:
        monkeypatch.setitem(sys.modules, missing, None)  # what an absent package looks like to import
    assert main(["bench", "--backend", "onnxruntime", "--resolution", "64x64", "--repeats", "1", *extra]) == 2
    assert capsys.readouterr().err == f"bgmatte bench: error: {expected}\n"


def test_running_out_of_memory_is_one_line_saying_what_to_lower(capsys, monkeypatch):
    import bgmatte.bench

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 120000000000 bytes.\nmore")

    monkeypatch.setattr(bgmatte.bench, "example_frames", no_memory)
    assert main(["bench", "--resolution", "64x64", "--repeats", "1", "--batch", "3"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("bgmatte bench: error: not enough memory")
    assert "64x64" in err and "batch of 3" in err


def test_onnxruntime_runs_on_as_many_threads_as_the_plain_module_and_the_table_says(capsys, monkeypatch):
    """Without --threads, both candidates get PyTorch's current count, which the table prints: onnxruntime left
    to itself would take every core."""
    import bgmatte.export

    asked = []

    class FakeOnnx:
        def __init__(self, path, *, device, threads):
            asked.append(threads)

        def __call__(self, src, bgr):
            return (torch.zeros(1),) * 6

    monkeypatch.setattr(bgmatte.export, "export_onnx", lambda model, path: path)
    monkeypatch.setattr(bgmatte.export, "OnnxMatting", FakeOnnx)
    torch.set_num_threads(1)
    assert main(["bench", "--backend", "onnxruntime", "--resolution", "64x64", "--pixels", "256", "--repeats", "1",
                 "--warmup", "0", "--device", "cpu"]) == 0
    assert asked == [1] and "1 threads" in capsys.readouterr().out
