"""`bgmatte demo`, the README's main job: the default model over the generated sample, and its refusals; `--version`; an
unknown argument named under its command."""
from __future__ import annotations

import av
import numpy as np
import pytest

from bgmatte.cli import main

pytestmark = pytest.mark.timeout(180)


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def frames(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_the_demo_writes_a_composite_and_an_alpha_video_with_the_subject(tmp_path, capsys):
    code, err = run(capsys, "demo", "--out", tmp_path / "demo", "--quiet")
    assert code == 0, err
    names = sorted(path.name for path in (tmp_path / "demo").iterdir())
    assert names == ["com.mp4", "com_pha.mp4", "plate.png", "sample.mp4"]  # no temporary files left
    composite, alpha = frames(tmp_path / "demo" / "com.mp4"), frames(tmp_path / "demo" / "com_pha.mp4")
    assert len(composite) == len(alpha) == 48 and alpha[0].shape == (360, 640, 3)
    coverage = np.mean([(frame[..., 0] > 128).mean() for frame in alpha])
    assert 0.03 < coverage < 0.6, coverage  # a person, not an empty or a full matte
    # Over the blue target colour (#3a7bd5) where alpha is empty.
    empty = alpha[10][..., 0] < 10
    assert np.abs(composite[10][empty].mean(axis=0) - (0x3A, 0x7B, 0xD5)).max() < 12


def test_the_demo_keeps_an_existing_sample_and_says_so(tmp_path, capsys):
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "sample.mp4").write_bytes(b"mine")
    code, err = run(capsys, "demo", "--out", folder, "--quiet")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "sample.mp4: already exists" in lines[0]
    assert (folder / "sample.mp4").read_bytes() == b"mine" and sorted(folder.iterdir()) == [folder / "sample.mp4"]


def test_a_file_given_as_the_demo_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    code, err = run(capsys, "demo", "--out", tmp_path / "afile", "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "afile: is a file, not a folder" in err
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_demo_whose_model_cannot_load_leaves_no_folder(tmp_path, capsys):
    code, err = run(capsys, "demo", "--out", tmp_path / "demo", "--checkpoint", tmp_path / "nothere.pth", "--quiet")
    assert code == 2 and "nothere.pth: checkpoint not found" in err and not (tmp_path / "demo").exists()


def test_version_is_the_installed_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"bgmatte {version('bgmatte')}"


@pytest.mark.parametrize("argv", [["eval", "--pred", "p", "--gt", "g", "-q"], ["export", "onnx", "a.pth", "-o", "m.onnx",
                                                                               "extra"]])
def test_an_unknown_argument_is_named_under_its_command(argv, capsys):
    """`bgmatte eval ... -q` (a flag eval lacks) said 'bgmatte: error: unrecognized arguments: -q' under the top
    level's usage, which lists no option of eval; now the error and the usage are eval's, as for any other of its
    argument errors."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith(f"usage: bgmatte {argv[0]} ")
    assert err.strip().splitlines()[-1] == f"bgmatte {argv[0]}: error: unrecognized arguments: {argv[-1]}"


def test_an_unknown_option_before_the_command_is_the_top_level_s(capsys):
    """`bgmatte -q video ...`: -q is video's, but not where it stands."""
    with pytest.raises(SystemExit) as stop:
        main(["-q", "video", "clip.mp4"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("usage: bgmatte [-h]")
    assert err.strip().splitlines()[-1] == "bgmatte: error: unrecognized arguments: -q"


MINIMAL_ARGV = {"video": ["in.mp4"], "image": [], "webcam": [], "train": ["refine", "--out", "run"],
                "eval": ["--pred", "p", "--gt", "g"], "export": ["onnx", "a.pth", "-o", "m.onnx"], "bench": [],
                "demo": []}


@pytest.mark.parametrize("command", sorted(MINIMAL_ARGV))
def test_every_command_names_an_unknown_argument_under_its_own_usage(command, capsys):
    """Each subcommand, not only eval and export, says an unknown argument after it under its own usage (exit 2):
    this pins the behaviour for every parser that `main` has to find."""
    from bgmatte.cli import SUBCOMMANDS

    assert sorted(SUBCOMMANDS) == sorted(MINIMAL_ARGV)
    with pytest.raises(SystemExit) as stop:
        main([command, *MINIMAL_ARGV[command], "--bogus=x"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith(f"usage: bgmatte {command} ")
    assert err.strip().splitlines()[-1] == f"bgmatte {command}: error: unrecognized arguments: --bogus=x"


def test_the_cli_uses_only_public_argparse():
    """argparse's private names (`parser._actions`, `argparse._SubParsersAction`, ...) may change in any Python
    release; bgmatte/cli finds its subcommands' parsers through public calls only."""
    import re
    from pathlib import Path

    import bgmatte.cli

    private = re.compile(r"\bargparse\._\w+|\.(_actions|_subparsers|_group_actions|_option_string_actions|"
                         r"_name_parser_map|_registries|_defaults|_positionals|_optionals|_action_groups|"
                         r"_mutually_exclusive_groups|_get_\w+|_check_value|_print_message)\b")
    found = [f"{path.name}:{number}: {line.strip()}"
             for path in sorted(Path(bgmatte.cli.__file__).parent.glob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert found == []


def test_subcommands_keeps_each_parser_under_its_names_and_aliases():
    """`main` looks a command's parser up by the name typed, which argparse sets to an alias where one is used."""
    import argparse

    from bgmatte.cli import Subcommands

    top = argparse.ArgumentParser(prog="tool")
    subcommands = Subcommands(top.add_subparsers(dest="command"))
    one = subcommands.add_parser("one", aliases=["uno"], help="the first")
    two = subcommands.add_parser("two")
    assert subcommands.parsers == {"one": one, "uno": one, "two": two}
    assert one.prog == "tool one" and top.parse_args(["uno"]).command == "uno"
