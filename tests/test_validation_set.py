"""`python -m bgmatte.train.validation`: a validation set laid out for `bgmatte eval`, and its refusals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bgmatte.errors import BgmatteError
from bgmatte.io.images import read_image, write_png
from bgmatte.train.validation import main, make_validation_set

pytestmark = pytest.mark.timeout(120)


def test_a_small_set_has_every_folder_and_a_trimap_that_fits_its_alpha(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    write_png(photos / "a.png", np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8))
    out = make_validation_set(tmp_path / "val", count=2, width=96, height=64, photos=photos)
    for name in ("src", "bgr", "pha", "fgr", "trimap"):
        assert sorted(path.name for path in (out / name).iterdir()) == ["0000.png", "0001.png"], name
    pha = read_image(out / "pha" / "0000.png", channels=1)
    trimap = read_image(out / "trimap" / "0000.png", channels=1)
    assert set(np.unique(trimap)) <= {0, 128, 255}
    assert (trimap[(pha > 0) & (pha < 255)] == 128).all()  # every fractional pixel is in the unknown band
    again = make_validation_set(tmp_path / "again", count=2, width=96, height=64, photos=photos)
    assert (read_image(again / "src" / "0001.png") == read_image(out / "src" / "0001.png")).all()  # seeded


def test_overwrite_removes_the_earlier_sets_samples_and_nothing_else(tmp_path):
    out = make_validation_set(tmp_path / "val", count=3, width=48, height=32)
    (out / "src" / "notes.txt").write_text("mine")
    (out / "pha" / "0001.jpg").write_text("mine")
    (out / "fgr" / "extra.png").write_text("mine")
    (out / "trimap" / "0002.png").unlink()
    (out / "trimap" / "0002.png").mkdir()  # a folder, even one named like a sample, is left alone
    make_validation_set(out, count=1, width=48, height=32, overwrite=True)
    kept = {"src": ["notes.txt"], "pha": ["0001.jpg"], "fgr": ["extra.png"], "trimap": ["0002.png"]}
    for name in ("src", "bgr", "pha", "fgr", "trimap"):
        assert sorted(path.name for path in (out / name).iterdir()) == sorted(["0000.png", *kept.get(name, [])]), name


def test_a_folder_that_is_not_empty_is_refused_in_pythons_terms_from_python(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BgmatteError) as refused:
        make_validation_set(tmp_path, count=1, width=48, height=32)
    assert str(refused.value) == f"{tmp_path}: already exists and is not empty (pass overwrite=True to write into it)"


@pytest.mark.parametrize("case, needle", [
    ("count", "at least 1"), ("file", "is a file"), ("dangling link", "is a file"), ("missing photos", "no such folder"),
    ("empty photos", "no images"), ("not empty", "already exists and is not empty (pass --overwrite to write into it)"), ("photos is a file", "is a file, not a folder"),
    ("under a file", "cannot create this folder"), ("uncreatable", "cannot create this folder"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, needle):
    plate = tmp_path / "plate.png"
    out = {"under a file": plate / "sub", "uncreatable": Path("/proc/bgmatte-test")}.get(case, tmp_path / "val")
    if case == "uncreatable" and not Path("/proc/self").is_dir():
        pytest.skip("needs /proc, where no folder can be created")
    argv = [str(out), "--count", "0" if case == "count" else "1"]
    if case in ("under a file", "photos is a file"):
        write_png(plate, np.zeros((8, 8, 3), np.uint8))
    if case == "photos is a file":
        argv += ["--photos", str(plate)]
    if case == "file":
        out.write_text("mine")
    if case == "dangling link":
        out.symlink_to(tmp_path / "nowhere")
    if case == "missing photos":
        argv += ["--photos", str(tmp_path / "nothere")]
    if case == "empty photos":
        (tmp_path / "empty").mkdir()
        argv += ["--photos", str(tmp_path / "empty")]
    if case == "not empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "overwrite=True" not in lines[0], lines
    if case == "file":
        assert out.read_text() == "mine"
    elif case == "dangling link":
        assert out.is_symlink() and not (tmp_path / "nowhere").exists()
    elif case == "not empty":
        assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]
    else:
        assert not out.exists()
