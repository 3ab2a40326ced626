"""`python -m bgmatte.train.backgrounds`: reserved packages never reach training, and outputs are checked first.

apt-get is a stand-in script on PATH that hands out .deb files built here with dpkg-deb, so nothing is
downloaded; dpkg is wrapped to record each call, to tell whether anything was unpacked.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from bgmatte.errors import BgmatteError
from bgmatte.train.backgrounds import check_packages, download_package, main

pytestmark = pytest.mark.timeout(120)

DPKG = shutil.which("dpkg")
DPKG_DEB = shutil.which("dpkg-deb")
needs_dpkg = pytest.mark.skipif(DPKG is None or DPKG_DEB is None,
                                reason="dpkg and dpkg-deb are needed to build and unpack test packages")


def build_deb(folder: Path, package: str, file_name: str, pictures: dict[str, np.ndarray | bytes]) -> Path:
    """A small real .deb whose control file says `package`, saved as `file_name`, holding `pictures`
    under usr/share/backgrounds/."""
    root = folder / f"root-{file_name}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 1.0-1\nArchitecture: all\nMaintainer: Test <test@example.org>\n"
        "Description: pictures for a test\n")
    pictures_dir = root / "usr" / "share" / "backgrounds"
    pictures_dir.mkdir(parents=True)
    for name, image in pictures.items():
        if isinstance(image, bytes):  # a file as it is, such as a crafted header
            (pictures_dir / name).write_bytes(image)
        else:
            assert cv2.imwrite(str(pictures_dir / name), image)
    deb = folder / file_name
    subprocess.run([DPKG_DEB, "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    shutil.rmtree(root)
    return deb


def noise(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


class StandIns:
    """apt-get and dpkg on PATH for one test: `offer` puts a .deb where `apt-get download NAME` finds it;
    `calls()` are the commands they were given, one line each."""

    def __init__(self, tmp_path: Path, monkeypatch):
        self.repository = tmp_path / "repository"
        self.repository.mkdir()
        self.log = tmp_path / "calls.log"
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        apt_get = bin_dir / "apt-get"
        apt_get.write_text(
            "#!/bin/sh\n"
            f'echo "apt-get $*" >> "{self.log}"\n'
            'if [ "$1" = update ]; then exit 0; fi\n'
            f'if [ "$1" = download ] && [ -d "{self.repository}/$2" ]; then cp "{self.repository}/$2"/*.deb .; exit 0; fi\n'
            'echo "E: Unable to locate package $2" >&2\nexit 100\n')
        apt_get.chmod(0o755)
        if DPKG is not None:
            dpkg = bin_dir / "dpkg"
            dpkg.write_text(f'#!/bin/sh\necho "dpkg $*" >> "{self.log}"\nexec "{DPKG}" "$@"\n')
            dpkg.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")

    def offer(self, package: str, deb: Path) -> None:
        (self.repository / package).mkdir(exist_ok=True)
        shutil.copy(deb, self.repository / package / deb.name)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    return StandIns(tmp_path, monkeypatch)


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("name", [
    "mate-background.", "mate-backgrounds+", "opencv-do.", "mate-*", "mate-backgrounds/bookworm", "Mate-Backgrounds",
    "?name(mate)", "~nmate", "a",
])
def test_names_apt_would_read_as_a_pattern_are_refused_before_apt_runs(tmp_path, capsys, stand_ins, name):
    with pytest.raises(BgmatteError, match="not a plain Debian package name"):
        check_packages([name])
    assert main([str(tmp_path / "out"), "--packages", "ukui-wallpapers", name]) == 2
    assert "not a plain Debian package name" in one_error_line(capsys)
    assert stand_ins.calls() == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["mate-backgrounds", " opencv-doc ", "mate-backgrounds:all", "opencv-doc=4.6.0"])
def test_reserved_packages_are_refused_by_name(name):
    with pytest.raises(BgmatteError, match="reserved for held-out evaluation"):
        check_packages([name])


def test_plain_names_pass_and_options_do_not():
    with pytest.raises(BgmatteError, match="not a plain Debian package name"):
        check_packages(["-oDir::Cache=/tmp"])
    assert check_packages(["ukui-wallpapers", "gnome-backgrounds:all", "plasma-workspace-wallpapers=4:5.27"]) == [
        "ukui-wallpapers", "gnome-backgrounds", "plasma-workspace-wallpapers"]


@needs_dpkg
@pytest.mark.parametrize("inside, file_name, needle", [
    ("mate-backgrounds", "mate-backgrounds_1.26.0-1_all.deb", "reserved for held-out evaluation"),
    ("mate-backgrounds", "ukui-wallpapers_1.0-1_all.deb", "reserved for held-out evaluation"),  # disguised
    ("opencv-doc", "ukui-wallpapers_1.0-1_all.deb", "reserved for held-out evaluation"),
    ("other-wallpapers", "ukui-wallpapers_1.0-1_all.deb", "fetched other-wallpapers instead"),
])
def test_a_download_is_judged_by_the_package_inside_it_and_deleted_unpacked(tmp_path, capsys, stand_ins, inside,
                                                                             file_name, needle):
    stand_ins.offer("ukui-wallpapers", build_deb(tmp_path, inside, file_name, {"sky.png": noise(300, 400, 0)}))
    folder = tmp_path / "downloads"
    folder.mkdir()
    with pytest.raises(BgmatteError, match=needle):
        download_package("ukui-wallpapers", folder, log=lambda line: None)
    assert list(folder.iterdir()) == []  # deleted, not left for anyone to unpack
    out = tmp_path / "out"
    assert main([str(out), "--packages", "ukui-wallpapers"]) == 2
    assert needle in one_error_line(capsys)
    assert list(out.iterdir()) == []
    assert not any(call.startswith("dpkg ") for call in stand_ins.calls())  # nothing was unpacked


@needs_dpkg
def test_pictures_are_written_through_temporary_names_and_never_replaced_unasked(tmp_path, capsys, stand_ins):
    pictures = {"sky.png": noise(300, 400, 1), "sky.jpg": noise(400, 300, 2), "tiny.png": noise(100, 100, 3)}
    stand_ins.offer("ukui-wallpapers", build_deb(tmp_path, "ukui-wallpapers", "ukui-wallpapers_1.0-1_all.deb",
                                                 pictures))
    out = tmp_path / "out"
    assert main([str(out), "--packages", "ukui-wallpapers", "--max-side", "256"]) == 0
    written = sorted(out.iterdir())
    assert len(written) == 2, written  # sky.png and sky.jpg both kept, under two names; tiny.png is too small
    assert all(path.name.startswith("ukui-wallpapers--") and path.suffix == ".jpg" for path in written)
    assert all(max(cv2.imread(str(path)).shape[:2]) == 256 for path in written)
    before = {path: path.read_bytes() for path in written}
    capsys.readouterr()

    downloads = len(stand_ins.calls())
    assert main([str(out), "--packages", "ukui-wallpapers"]) == 2
    line = one_error_line(capsys)
    assert "already exists (pass --overwrite to replace it)" in line and "overwrite=True" not in line
    assert len(stand_ins.calls()) == downloads  # refused before downloading
    assert {path: path.read_bytes() for path in sorted(out.iterdir())} == before

    # An output that is a link to a file of the user's is replaced, not written through.
    theirs = tmp_path / "theirs.jpg"
    theirs.write_bytes(b"mine")
    written[0].unlink()
    written[0].symlink_to(theirs)
    assert main([str(out), "--packages", "ukui-wallpapers", "--max-side", "256", "--overwrite"]) == 0
    assert theirs.read_bytes() == b"mine"
    assert not written[0].is_symlink() and written[0].read_bytes() == before[written[0]]
    assert sorted(out.iterdir()) == written  # no temporary file left beside them


@needs_dpkg
def test_a_picture_above_the_pixel_limit_is_left_out_by_name_not_decoded(tmp_path, capsys, stand_ins):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)  # 400 megapixels: under OpenCV's own limit
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    pictures = {"sky.png": noise(300, 400, 1), "huge.png": bomb}
    stand_ins.offer("ukui-wallpapers", build_deb(tmp_path, "ukui-wallpapers", "ukui-wallpapers_1.0-1_all.deb",
                                                 pictures))
    out = tmp_path / "out"
    assert main([str(out), "--packages", "ukui-wallpapers", "--max-side", "256"]) == 0
    assert [path.name for path in out.iterdir()] == ["ukui-wallpapers--usr-share-backgrounds-sky.jpg"]
    said = capsys.readouterr()
    assert "huge.png" in said.out + said.err and "decompression bomb" in said.out + said.err


@pytest.mark.parametrize("max_side", ["0", "-5", "255"])
def test_a_longest_side_under_256_is_refused_before_apt_runs(tmp_path, capsys, stand_ins, max_side):
    assert main([str(tmp_path / "out"), "--packages", "ukui-wallpapers", "--max-side", max_side]) == 2
    assert "at least 256" in one_error_line(capsys)
    assert stand_ins.calls() == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, needle", [
    ("file", "is a file, not a folder"), ("dangling link", "is a file, not a folder"),
    ("under a file", "cannot create this folder"), ("uncreatable", "cannot create this folder"),
    ("not writable", "cannot write in this folder"),
])
def test_a_bad_output_folder_is_one_line_before_apt_runs(tmp_path, capsys, monkeypatch, stand_ins, case, needle):
    plate = tmp_path / "plate.png"
    plate.write_bytes(b"mine")
    out = {"file": plate, "under a file": plate / "sub", "uncreatable": Path("/proc/bgmatte-test")}.get(
        case, tmp_path / "out")
    if case == "uncreatable" and not Path("/proc/self").is_dir():
        pytest.skip("needs /proc, where no folder can be created")
    if case == "dangling link":
        out.symlink_to(tmp_path / "nowhere")
    if case == "not writable":  # chmod would not stop root, so the check itself is told no
        out.mkdir()
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != out and real_access(path, mode, **kw))
    assert main([str(out), "--packages", "ukui-wallpapers"]) == 2
    assert needle in one_error_line(capsys)
    assert stand_ins.calls() == []
    assert plate.read_bytes() == b"mine"
