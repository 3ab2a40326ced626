"""`bgmatte eval`: the table, the JSON shape, the errors, and the --model path with a random-weights model."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from bgmatte.cli import main
from bgmatte.evaluate import METRICS


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def _ground_truth(root: Path, names=("one", "two"), size=(8, 8)) -> None:
    rng = np.random.default_rng(0)
    for name in names:
        _write(root / "pha" / f"{name}.png", (rng.random(size) * 255).astype(np.uint8))
        _write(root / "fgr" / f"{name}.png", (rng.random((*size, 3)) * 255).astype(np.uint8))
        trimap = np.zeros(size, np.uint8)
        trimap[2:-2, 2:-2] = 128
        _write(root / "trimap" / f"{name}.png", trimap)


def _predictions(gt: Path, pred: Path) -> None:
    """Copy the ground truth as predictions, with 'one' wrong in its top row."""
    for name in ("one", "two"):
        pha = cv2.imread(str(gt / "pha" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        if name == "one":
            pha[0, :] = 255 - pha[0, :]
        _write(pred / "pha" / f"{name}.png", pha)
        _write(pred / "fgr" / f"{name}.png", cv2.imread(str(gt / "fgr" / f"{name}.png")))


def test_json_output_has_exactly_the_documented_shape(tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _ground_truth(gt)
    _predictions(gt, pred)
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"mean", "per_image"}
    assert list(data["mean"]) == list(METRICS)
    assert [row["name"] for row in data["per_image"]] == ["one", "two"]
    assert list(data["per_image"][0]) == ["name", *METRICS]
    one, two = data["per_image"]
    assert one["sad_all"] > 0 and two["sad_all"] == 0
    assert one["sad"] == 0  # the top row is outside the trimap's unknown region
    assert data["mean"]["sad_all"] == pytest.approx(one["sad_all"] / 2)


def test_table_shows_the_mean_row_then_each_image(tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _ground_truth(gt)
    _predictions(gt, pred)
    assert main(["eval", "--pred", str(pred), "--gt", str(gt)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", *METRICS]
    assert lines[2].split()[0] == "mean"
    assert [line.split()[0] for line in lines[4:]] == ["one", "two"]


@pytest.mark.parametrize("problem", ["missing_dir", "unreadable", "size", "trimap", "colour"])
def test_errors_are_one_line_naming_the_file(tmp_path, capsys, problem):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _ground_truth(gt)
    _predictions(gt, pred)
    if problem == "missing_dir":
        args, expected = ["--pred", str(tmp_path / "absent"), "--gt", str(gt)], "absent"
    elif problem == "unreadable":
        (pred / "pha" / "two.png").write_bytes(b"garbage")
        args, expected = ["--pred", str(pred), "--gt", str(gt)], "two.png"
    elif problem == "trimap":
        _write(gt / "trimap" / "two.png", np.full((8, 8), 127, np.uint8))
        args, expected = ["--pred", str(pred), "--gt", str(gt)], "trimap/two.png: a trimap may only hold"
    elif problem == "colour":
        _write(gt / "pha" / "two.png", np.dstack([np.zeros((8, 8)), np.full((8, 8), 99), np.zeros((8, 8))]))
        args, expected = ["--pred", str(pred), "--gt", str(gt)], "pha/two.png: a colour image, not a matte"
    else:
        (pred / "pha" / "two.png").unlink()
        _write(pred / "pha" / "two.png", np.zeros((16, 8), np.uint8))
        args, expected = ["--pred", str(pred), "--gt", str(gt)], "two.png"
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bgmatte eval: error:") and expected in err


def test_modes_cannot_be_mixed_or_half_given(tmp_path, capsys):
    assert main(["eval", "--pred", str(tmp_path)]) == 2
    assert main(["eval", "--model", "x.safetensors", "--pred", str(tmp_path), "--gt", str(tmp_path)]) == 2
    assert main(["eval", "--model", "x.safetensors"]) == 2
    assert "error" in capsys.readouterr().err


def test_model_path_runs_a_checkpoint_over_src_and_bgr_then_scores(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import bgmatte

    model = bgmatte.MattingRefine("mobilenetv2").eval()
    checkpoint = tmp_path / "random.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    data = tmp_path / "data"
    size = (66, 70)  # not multiples of 4: cropped to 64x68 like benchmark.m
    _ground_truth(data, names=("frame",), size=size)
    rng = np.random.default_rng(1)
    _write(data / "src" / "frame.png", (rng.random((*size, 3)) * 255).astype(np.uint8))
    _write(data / "bgr" / "frame.jpg", (rng.random((*size, 3)) * 255).astype(np.uint8))
    out = tmp_path / "out"
    code = main(["eval", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--json",
                 "--device", "cpu", "--refine-sample-pixels", "2000"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in result["per_image"]] == ["frame"]
    assert all(result["mean"][name] is not None for name in METRICS)
    pha = cv2.imread(str(out / "pha" / "frame.png"), cv2.IMREAD_UNCHANGED)
    fgr = cv2.imread(str(out / "fgr" / "frame.png"), cv2.IMREAD_UNCHANGED)
    assert pha.shape == (64, 68) and fgr.shape == (64, 68, 3)
    # the written prediction is what was scored
    true = cv2.imread(str(data / "pha" / "frame.png"), cv2.IMREAD_UNCHANGED)[:64, :68] / 255
    assert result["mean"]["sad_all"] == pytest.approx(np.abs(pha / 255 - true).sum() / 1000)
    assert torch is not None


def test_model_path_without_out_uses_a_temporary_folder_and_removes_it(tmp_path, capsys, monkeypatch):
    import tempfile

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import bgmatte

    model = bgmatte.MattingRefine("mobilenetv2").eval()
    checkpoint = tmp_path / "random.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    data = tmp_path / "data"
    _ground_truth(data, names=("frame",), size=(32, 32))
    _write(data / "src" / "frame.png", np.full((32, 32, 3), 200, np.uint8))
    _write(data / "bgr" / "frame.png", np.full((32, 32, 3), 20, np.uint8))
    assert main(["eval", "--model", str(checkpoint), "--data", str(data), "--device", "cpu"]) == 0
    assert "mean" in capsys.readouterr().out
    assert list(temporary.iterdir()) == []
    assert sorted(p.name for p in (data).iterdir()) == ["bgr", "fgr", "pha", "src", "trimap"]


def test_model_path_names_a_missing_background_plate(tmp_path, capsys):
    checkpoint, data = _model_data(tmp_path)
    (data / "bgr" / "frame.png").unlink()
    assert main(["eval", "--model", str(checkpoint), "--data", str(data), "--device", "cpu"]) == 2
    assert "'frame'" in capsys.readouterr().err


@pytest.mark.parametrize(("folder", "size", "what"), [("pha", (16, 32), "ground truth"), ("bgr", (32, 16), "plate")])
def test_model_path_refuses_files_that_do_not_go_together_before_loading(tmp_path, capsys, folder, size, what):
    """A ground truth or plate of another size than its source is named before any model is loaded or run (it
    was found after the model had run and written half its predictions into --out, naming a prediction)."""
    _, data = _model_data(tmp_path)
    path = data / folder / "frame.png"
    _write(path, np.full((*size, 3) if folder == "bgr" else size, 100, np.uint8))
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tmp_path / "absent.pth"), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"bgmatte eval: error: {path}: the {what} is {size[1]}x{size[0]} but its source " \
                  f"{data / 'src' / 'frame.png'} is 32x32\n"
    assert not out.exists()


def _model_data(tmp_path: Path) -> tuple[Path, Path]:
    """A random-weights checkpoint and a one-image dataset for the --model path."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import bgmatte

    checkpoint = tmp_path / "random.safetensors"
    model = bgmatte.MattingRefine("mobilenetv2")
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    data = tmp_path / "data"
    _ground_truth(data, names=("frame",), size=(32, 32))
    _write(data / "src" / "frame.png", np.full((32, 32, 3), 200, np.uint8))
    _write(data / "bgr" / "frame.png", np.full((32, 32, 3), 20, np.uint8))
    return checkpoint, data


def test_model_path_refuses_existing_predictions_before_loading_unless_overwrite(tmp_path, capsys):
    checkpoint, data = _model_data(tmp_path)
    out = tmp_path / "out"
    (out / "fgr").mkdir(parents=True)
    (out / "fgr" / "frame.png").write_bytes(b"precious")
    # the checkpoint is never read: the refusal comes first
    assert main(["eval", "--model", str(tmp_path / "absent.pth"), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out / "fgr" / "frame.png") in err and "--overwrite" in err
    assert (out / "fgr" / "frame.png").read_bytes() == b"precious"
    assert main(["eval", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--overwrite",
                 "--device", "cpu", "--refine-sample-pixels", "400"]) == 0
    capsys.readouterr()
    assert cv2.imread(str(out / "fgr" / "frame.png")).shape == (32, 32, 3)
    assert sorted(p.name for p in (out / "pha").iterdir()) == ["frame.png"]


@pytest.mark.parametrize("problem", ["file", "under_a_file", "data_itself"])
def test_model_path_with_an_unusable_out_is_a_one_line_error(tmp_path, capsys, problem):
    checkpoint, data = _model_data(tmp_path)
    (tmp_path / "file").write_text("")
    out = {"file": tmp_path / "file", "under_a_file": tmp_path / "file" / "out", "data_itself": data}[problem]
    code = main(["eval", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--overwrite",
                 "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bgmatte eval: error:")
    assert ("ground truth" if problem == "data_itself" else str(tmp_path / "file")) in err
    assert sorted(p.name for p in data.iterdir()) == ["bgr", "fgr", "pha", "src", "trimap"]


def test_overwrite_goes_with_out(tmp_path, capsys):
    checkpoint, data = _model_data(tmp_path)
    assert main(["eval", "--model", str(checkpoint), "--data", str(data), "--overwrite"]) == 2
    assert "--overwrite goes with --out" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["no pha folder", "empty pha folder", "trimap missing", "fgr missing"])
def test_model_path_refuses_ground_truth_it_cannot_score_before_loading(tmp_path, capsys, problem):
    """Without ground truth to score against (no pha/ folder, an empty one, a trimap/ or fgr/ lacking an image's
    file), the model was loaded and run over every image and its predictions written into --out, and only then
    did the scoring name the problem."""
    _, data = _model_data(tmp_path)
    removed = {"no pha folder": data / "pha", "empty pha folder": data / "pha" / "frame.png",
               "trimap missing": data / "trimap" / "frame.png", "fgr missing": data / "fgr" / "frame.png"}[problem]
    if removed.is_dir():
        for path in removed.iterdir():
            path.unlink()
        removed.rmdir()
    else:
        removed.unlink()
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tmp_path / "absent.pth"), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    expected = {"no pha folder": f"{data / 'pha'}: folder not found", "empty pha folder": f"{data / 'pha'}: no images",
                "trimap missing": f"{data / 'trimap'}: no trimap named 'frame'",
                "fgr missing": f"{data / 'fgr'}: no foreground named 'frame'"}[problem]
    assert err.startswith(f"bgmatte eval: error: {expected}") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("folder", ["trimap", "fgr"])
def test_model_path_refuses_a_trimap_or_foreground_of_another_size_than_its_matte_before_loading(tmp_path, capsys,
                                                                                                folder):
    """Found after the model had run over every image and written its predictions into --out."""
    _, data = _model_data(tmp_path)
    path = data / folder / "frame.png"
    _write(path, np.zeros((16, 32, 3) if folder == "fgr" else (16, 32), np.uint8))
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tmp_path / "absent.pth"), "--data", str(data), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"bgmatte eval: error: {path}: image is 32x16 but the ground truth is 32x32\n"
    assert not out.exists()


def test_a_base_stage_checkpoint_is_scored_as_the_base_network_it_is(tmp_path, capsys):
    # `bgmatte train base` writes weights without a refiner; scoring them through MattingRefine would score a
    # refiner of random weights instead of what was trained.
    torch = pytest.importorskip("torch")
    from bgmatte.model.build import save_weights
    from bgmatte.model.matting import MattingBase

    torch.manual_seed(0)
    base = MattingBase("mobilenetv2").eval()
    checkpoint = tmp_path / "base.safetensors"
    save_weights(base, checkpoint, metadata={"format": "bgmatte", "stage": "base", "backbone": "mobilenetv2"})
    data = tmp_path / "data"
    _ground_truth(data, names=("frame",), size=(32, 32))
    rng = np.random.default_rng(2)
    src, bgr = (rng.random((32, 32, 3)) * 255).astype(np.uint8), (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    _write(data / "src" / "frame.png", src)
    _write(data / "bgr" / "frame.png", bgr)
    out = tmp_path / "out"
    assert main(["eval", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--device", "cpu"]) == 0
    assert "scored as MattingBase" in capsys.readouterr().err
    with torch.inference_mode():  # the file's own network, on the images as the command reads them (RGB)
        expected = base(*(torch.from_numpy(image[:, :, ::-1] / 255).permute(2, 0, 1)[None].float()
                          for image in (src, bgr)))[0][0, 0].clamp(0, 1).numpy()
    written = cv2.imread(str(out / "pha" / "frame.png"), cv2.IMREAD_UNCHANGED)
    assert np.abs(written.astype(float) - np.round(expected * 255)).max() <= 1


def test_model_path_refuses_a_source_without_its_plate_before_loading(tmp_path, capsys):
    """A source image without a plate (and without ground truth, so no matte asked for its plate) was found only
    once the model was loaded and had written the other images' predictions into --out."""
    _, data = _model_data(tmp_path)
    _write(data / "src" / "zz_extra.png", np.full((32, 32, 3), 200, np.uint8))
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tmp_path / "absent.pth"), "--data", str(data), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"bgmatte eval: error: {data / 'bgr'}: no plate named 'zz_extra' "
                                       f"(needed for {data / 'src' / 'zz_extra.png'})\n")
    assert not out.exists()
