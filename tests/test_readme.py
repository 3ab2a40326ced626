"""The README against the code: its Python blocks run, its command lines parse, and every option it names exists, so
that the page a newcomer copies from cannot drift from the API again."""
from __future__ import annotations

import ast
import contextlib
import inspect
import io
import re
import shlex
from pathlib import Path

import pytest
import torch

from bgmatte.cli import build_parser, build_parsers
from bgmatte.demo import write_sample
from bgmatte.model.matting import MattingRefine

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.timeout(120)

# Options of other programs the README shows (torchrun's, in the multi-GPU training line).
FOREIGN_OPTIONS = {"--standalone", "--nproc_per_node"}


def blocks(language: str) -> list[str]:
    """The README's fenced code blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def section(title: str) -> str:
    """The text of one `## title` section of the README, up to the next."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.S | re.M)
    assert match is not None, f"README has no '## {title}' section"
    return match.group(1)


def command_lines() -> list[str]:
    """Each `bgmatte ...` command of the README's shell blocks, continuation lines joined and comments cut; the
    torchrun line from its `-m bgmatte` on."""
    lines = []
    for block in blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if "-m bgmatte " in line:
                line = "bgmatte " + line.split("-m bgmatte ", 1)[1]
            if line.startswith("bgmatte "):
                lines.append(line)
    return lines


def subcommands() -> dict:
    """The `bgmatte` subcommands' parsers, by name."""
    return build_parsers()[1]


def option_strings(parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def help_text(main, argv: list[str]) -> str:
    """What a `main(argv + ['--help'])` prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*argv, "--help"])
    return out.getvalue()


def test_the_readme_shows_commands_and_python():
    assert len(command_lines()) >= 20 and blocks("python")


@pytest.mark.parametrize("line", command_lines())
def test_each_command_line_of_the_readme_parses(line):
    """Every option of a command line exists for its subcommand; a line without `...` (an elided rest) parses whole,
    its choices and values included. They are parsed, not run: training and ONNX export take minutes, the webcam
    line needs a camera and pyvirtualcam."""
    argv = shlex.split(line.replace("[", "").replace("]", ""))[1:]
    parser = subcommands()[argv[0]]
    unknown = [token for token in argv if token.startswith("-") and token not in option_strings(parser)]
    assert not unknown, f"bgmatte {argv[0]} has no option {', '.join(unknown)}"
    if "..." not in argv:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                build_parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"{line}: {err.getvalue().strip().splitlines()[-1]}")


def test_every_option_the_readme_names_exists():
    """An option named in the prose (`--resume`, `--plate-solve on|off` ...) is one of a `bgmatte` command's, or of
    the validation-set and background-fetching modules the Development section shows."""
    from bgmatte.train import backgrounds, validation

    known = option_strings(build_parser()) | FOREIGN_OPTIONS
    for parser in subcommands().values():
        known |= option_strings(parser)
    for main in (validation.main, backgrounds.main):
        known |= set(re.findall(r"--[a-z][a-z0-9_-]*", help_text(main, [])))
    named = set(re.findall(r"--[a-z][a-z0-9_-]*", README))
    assert not named - known, f"the README names options that do not exist: {sorted(named - known)}"


def test_the_networks_defaults_are_those_the_readme_lists():
    listed = re.search(r"`bgmatte\.MattingRefine\(backbone, (.*?)\)`", " ".join(README.split()))
    assert listed is not None
    defaults = {name: ast.literal_eval(value) for name, value in (part.split("=") for part in listed.group(1).split(", "))}
    signature = inspect.signature(MattingRefine).parameters
    assert defaults == {name: signature[name].default for name in defaults}


def test_the_gpu_model_options_the_readme_shows_are_accepted():
    """`ModelOptions(checkpoint, device="cuda", precision="fp16")`, made as written; running it needs a GPU, so the
    device is checked only when a model loads, which is not done here."""
    import bgmatte

    call = re.search(r"`model=(bgmatte\.ModelOptions\(checkpoint, [^`]*\))`", README)
    assert call is not None
    options = eval(call.group(1), {"bgmatte": bgmatte, "checkpoint": "pytorch_resnet50.pth"})
    assert (options.checkpoint, options.device, options.precision) == ("pytorch_resnet50.pth", "cuda", "fp16")


def inputs_for(code: str, folder: Path) -> None:
    """The files a README block reads, made small in `folder`: `shot.mp4` and `plate.png` (the generated sample,
    1 s at 160x96) and each `.pth` it names, random weights of the backbone its name says."""
    if "shot.mp4" in code or "plate.png" in code:
        video, plate = write_sample(folder, seconds=1.0, fps=8, width=160, height=96)
        video.rename(folder / "shot.mp4")
    for name in sorted(set(re.findall(r"[\"']([\w.-]+\.pth)[\"']", code))):
        backbone = next((b for b in ("resnet101", "resnet50", "mobilenetv2") if b in name), "mobilenetv2")
        torch.save(MattingRefine(backbone).state_dict(), folder / name)


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_each_python_block_of_the_readme_runs(index, tmp_path, monkeypatch):
    """Run as written, in a folder holding the files it reads. The `convert_video` call writes the composite and,
    beside it, the alpha under the composite's name (`out.mp4`, `out_pha.mp4`)."""
    code = blocks("python")[index]
    inputs_for(code, tmp_path)
    monkeypatch.chdir(tmp_path)
    space: dict = {}
    exec(compile(code, f"README.md, Python block {index + 1}", "exec"), space)
    if "convert_video" in code:
        assert (tmp_path / "out.mp4").stat().st_size > 0 and (tmp_path / "out_pha.mp4").stat().st_size > 0
    if "com" in space:
        assert space["com"].shape == space["src"].shape
