"""`bgmatte image`: files or folders, one plate or plates by name, both spellings, messages and exit codes."""
from __future__ import annotations

from pathlib import Path

import cv2
import pytest
import torch

import bgmatte.pipeline as pipeline
from bgmatte.cli import main
from bgmatte.io.images import write_png
from bgmatte.model.matting import MattingRefine
from bgmatte.predictor import Predictor
from media import HEIGHT, WIDTH, DifferenceModel, plate_image, subject_box, subject_frame

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.manual_seed(0)
    torch.save(MattingRefine("mobilenetv2").state_dict(), path)
    return path


@pytest.fixture()
def photos(tmp_path, monkeypatch):
    """src/beach.png and src/office.png, each with its own plate in bgr/ (and a shared plate.png)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    (tmp_path / "bgr").mkdir()
    for index, name in enumerate(["beach", "office"]):
        plate = plate_image(seed=index)
        write_png(tmp_path / "bgr" / f"{name}.png", plate)
        write_png(tmp_path / "src" / f"{name}.png", subject_frame(plate, 2 + index))
    write_png(tmp_path / "plate.png", plate_image(seed=0))
    return tmp_path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_reference_spelling_writes_a_folder_per_output(photos, capsys, checkpoint):
    code, out, err = run(
        capsys, "image", "--model-type", "mattingrefine", "--model-backbone", "mobilenetv2",
        "--model-backbone-scale", "0.25", "--model-refine-mode", "sampling", "--model-refine-sample-pixels", "2000",
        "--model-checkpoint", checkpoint, "--images-src", "src", "--images-bgr", "bgr", "--output-dir", "out",
        "--output-type", "com", "pha", "fgr", "err", "ref", "--device", "cpu", "-q",
    )
    assert code == 0, err
    for kind in ("com", "pha", "fgr", "err", "ref"):
        assert sorted(p.name for p in (photos / "out" / kind).iterdir()) == ["beach.png", "office.png"]
    cutout = cv2.imread(str(photos / "out" / "com" / "beach.png"), cv2.IMREAD_UNCHANGED)
    assert cutout.shape == (HEIGHT, WIDTH, 4)  # an RGBA cutout
    assert cv2.imread(str(photos / "out" / "pha" / "beach.png"), cv2.IMREAD_UNCHANGED).ndim == 2
    assert len(out.split()) == 10
    # -y, as the reference script has it, replaces the outputs.
    code, _, err = run(capsys, "image", "--model-checkpoint", checkpoint, "--images-src", "src", "--images-bgr", "bgr",
                       "--output-dir", "out", "--output-types", "com", "-y", "-q")
    assert code == 0, err


def test_short_spelling_with_files_one_plate_and_a_colour(photos, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_predictor", lambda *args, **kw: Predictor(DifferenceModel()))
    code, out, err = run(capsys, "image", "src/beach.png", "--bgr", "plate.png", "-o", "cut", "--outputs", "com", "pha",
                         "--target-bgr", "blue")
    assert code == 0, err
    assert out.split() == [str(Path("cut/com/beach.png")), str(Path("cut/pha/beach.png"))]
    assert "1 com image" in err
    com = cv2.cvtColor(cv2.imread(str(photos / "cut" / "com" / "beach.png")), cv2.COLOR_BGR2RGB)
    rows, columns = subject_box(2)
    assert com[0, 0].tolist() == [0, 0, 255] and com[rows, columns].reshape(-1, 3).mean(axis=0).tolist() == [255, 0, 255]


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bgmatte image: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_a_missing_plate_by_name_is_named(photos, capsys, checkpoint):
    (photos / "bgr" / "office.png").unlink()
    code, _, err = run(capsys, "image", "src", "--bgr", "bgr", "-o", "out", "--checkpoint", checkpoint)
    one_line_error(code, err, "no plate with the same name", "office.png")
    assert not (photos / "out").exists()


def test_unreadable_image_is_named(photos, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_predictor", lambda *args, **kw: Predictor(DifferenceModel()))
    (photos / "src" / "zebra.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    write_png(photos / "bgr" / "zebra.png", plate_image())
    code, _, err = run(capsys, "image", "src", "--bgr", "bgr", "-o", "out", "-q")
    one_line_error(code, err, "zebra.png")
    # The images before it were written, each one whole.
    assert sorted(p.name for p in (photos / "out" / "com").iterdir()) == ["beach.png", "office.png"]


def test_existing_outputs_are_refused_and_missing_arguments_explained(photos, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_predictor", lambda *args, **kw: Predictor(DifferenceModel()))
    (photos / "out" / "com").mkdir(parents=True)
    (photos / "out" / "com" / "office.png").write_bytes(b"precious")
    code, _, err = run(capsys, "image", "src", "--bgr", "bgr", "-o", "out")
    one_line_error(code, err, "office.png", "already exists")
    assert (photos / "out" / "com" / "office.png").read_bytes() == b"precious"
    code, _, err = run(capsys, "image", "src", "--bgr", "bgr")
    one_line_error(code, err, "-o")
    code, _, err = run(capsys, "image", "--bgr", "bgr", "-o", "out")
    one_line_error(code, err, "no images")
    code, _, err = run(capsys, "image", "nowhere", "--bgr", "bgr", "-o", "out")
    one_line_error(code, err, "nowhere", "no such file")
    code, _, err = run(capsys, "image", "src", "--bgr", "plate.png", "-o", "out2", "--target-bgr", "clip.mp4")
    one_line_error(code, err, "clip.mp4")
