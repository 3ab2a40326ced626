"""The training engine: loss goes down, checkpoints load, resume is exact, Ctrl-C saves, options are checked."""
from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch._utils import ExceptionWrapper

from bgmatte import BgmatteError
from bgmatte.cli import build_parser, main
from bgmatte.cli.train import parse_save_every, training_options
from bgmatte.model.build import load_model
from bgmatte.model.matting import MattingBase, MattingRefine
from bgmatte.train import loop
from bgmatte.train.config import PAPER_LEARNING_RATES, TrainOptions, scaled_sample_pixels

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--crop", "64", "--batch-size", "2", "--backbone", "mobilenetv2", "--device", "cpu", "--quiet"]


def tiny_options(out: Path, **changes) -> TrainOptions:
    settings = dict(stage="base", out=out, backbone="mobilenetv2", steps=4, batch_size=2, crop=64, num_workers=0,
                    val_every=0, val_samples=2, save_every=0, log_every=1, device="cpu", progress=False)
    settings.update(changes)
    return TrainOptions(**settings)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A base run through the CLI that overfits one fixed batch of two synthetic samples for 12 steps."""
    out = tmp_path_factory.mktemp("base") / "run"
    code = main(["train", "base", "--out", str(out), *TINY, "--steps", "12", "--train-samples", "2",
                 "--num-workers", "0", "--val-every", "6", "--val-samples", "2", "--save-every", "6",
                 "--log-every", "1", "--lr-backbone", "3e-4", "--lr-aspp", "1e-3", "--lr-decoder", "1e-3"])
    assert code == 0
    return out


# -- a short run ------------------------------------------------------------------------------


@pytest.mark.slow
def test_overfitting_one_batch_lowers_the_training_loss(base_run):
    losses = [float(row["loss"]) for row in read_rows(base_run / "train.csv")]
    assert [int(row["step"]) for row in read_rows(base_run / "train.csv")] == list(range(1, 13))
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3


@pytest.mark.slow
def test_base_run_writes_weights_that_load_model_reads(base_run):
    for name in ("last.safetensors", "best.safetensors"):
        with pytest.warns(UserWarning, match="base-only"):
            model = load_model(base_run / name, device="cpu")
        assert model.backbone_name == "mobilenetv2"
        pha = model(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))[0]
        assert pha.shape == (1, 1, 64, 64)
    last = load_file(str(base_run / "last.safetensors"))
    assert not any(key.startswith("refiner.") for key in last)
    assert set(last) == set(MattingBase("mobilenetv2").state_dict())


@pytest.mark.slow
def test_state_is_plain_data_that_weights_only_load_reads(base_run):
    state = torch.load(base_run / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 12 and state["stage"] == "base" and state["world_size"] == 1
    assert torch.equal(state["model"]["decoder.conv4.weight"],
                       load_file(str(base_run / "last.safetensors"))["decoder.conv4.weight"])
    assert [group["name"] for group in state["optimizer"]["param_groups"]] == ["backbone", "aspp", "decoder"]
    assert [group["lr"] for group in state["optimizer"]["param_groups"]] == [3e-4, 1e-3, 1e-3]
    assert isinstance(state["random"][0]["torch"], torch.Tensor)
    assert not any(p.name.endswith(".tmp") for p in base_run.iterdir())


@pytest.mark.slow
def test_validation_logs_losses_and_alpha_errors_and_writes_sample_grids(base_run):
    rows = read_rows(base_run / "valid.csv")
    assert [int(row["step"]) for row in rows] == [6, 12]
    for row in rows:
        assert float(row["sad"]) >= 0 and 0 <= float(row["mse"]) <= 1 and float(row["loss"]) > 0
        assert {"pha_l1", "pha_sobel_l1", "fgr_l1", "err_mse"} <= set(row)
    import cv2

    grid = cv2.imread(str(base_run / "samples" / "step_0000012.png"))
    assert grid.shape == (2 * 64, 6 * 64, 3)  # two samples; src, bgr, true and predicted alpha, composite, error
    best = min(float(row["loss"]) for row in rows)
    assert load_file(str(base_run / "best.safetensors"))  # written when the validation loss improved
    assert torch.load(base_run / "state.pt", weights_only=True)["best"] == pytest.approx(best, rel=1e-4)


@pytest.mark.slow
def test_refine_stage_starts_from_a_base_checkpoint_and_saves_a_full_model(base_run, tmp_path):
    out = tmp_path / "refine"
    result = loop.train(tiny_options(out, stage="refine", steps=2, init=base_run / "last.safetensors",
                                     train_samples=2, sample_pixels=256))
    assert result.step == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a full model: no base-only warning
        model = load_model(out / "last.safetensors", device="cpu")
    assert isinstance(model, MattingRefine) and model.refiner.kernel_size == 3
    weights = load_file(str(out / "last.safetensors"))
    assert set(weights) == set(MattingRefine("mobilenetv2").state_dict())
    assert set(read_rows(out / "train.csv")[0]) >= {"pha_sm_l1", "err_sm_mse", "fgr_l1"}


@pytest.mark.slow
def test_freeze_base_trains_the_refiner_alone(base_run, tmp_path):
    out = tmp_path / "frozen"
    code = main(["train", "refine", "--out", str(out), *TINY, "--steps", "3", "--train-samples", "2",
                 "--num-workers", "0", "--val-every", "2", "--val-samples", "2", "--save-every", "0",
                 "--init", str(base_run / "last.safetensors"), "--sample-pixels", "256", "--freeze-base",
                 "--lr-refiner", "1e-3"])
    assert code == 0
    before, after = load_file(str(base_run / "last.safetensors")), load_file(str(out / "last.safetensors"))
    base = [key for key in before if not key.startswith("refiner.")]
    assert any(key.endswith("running_mean") for key in base)
    moved = [key for key in base if not torch.equal(before[key], after[key].to(before[key].dtype))]
    assert not moved, f"{len(moved)} base tensors changed, e.g. {moved[:3]}"  # weights and batch-norm statistics
    refiner = MattingRefine("mobilenetv2").state_dict()
    assert any(key.startswith("refiner.") and key in after for key in refiner)


def test_freeze_base_is_for_the_refine_stage_and_its_refiner_rate():
    with pytest.raises(BgmatteError, match="refine stage only"):
        TrainOptions(stage="base", out="x", freeze_base=True)
    with pytest.raises(BgmatteError, match="--lr-refiner alone"):
        TrainOptions(stage="refine", out="x", freeze_base=True, lr={"decoder": 1e-4})
    with pytest.raises(BgmatteError, match="--freeze-base keeps the base network as --init gives it: give --init"):
        TrainOptions(stage="refine", out="x", freeze_base=True)  # else it would freeze random weights
    model = MattingRefine("mobilenetv2")
    loop.freeze_base(model)
    groups = loop.parameter_groups(model, TrainOptions(stage="refine", out="x").learning_rates)
    assert [group["name"] for group in groups] == ["refiner"]
    loop.train_mode(model)
    assert model.refiner.training and not model.backbone.training and not model.decoder.training


def test_plate_options_set_how_often_the_plate_differs_from_the_background(tmp_path):
    with pytest.raises(BgmatteError, match="--plate-color is a share"):
        TrainOptions(stage="base", out="x", plate_color=1.5)
    paper = loop.open_dataset(tiny_options(tmp_path), "train", 0).augment
    assert (paper.plate_color_probability, paper.plate_affine_probability) == (0.8, 0.3)
    dataset = loop.open_dataset(tiny_options(tmp_path, plate_color=0.0, plate_misalign=0.0), "train", 0)
    assert (dataset.augment.plate_color_probability, dataset.augment.plate_affine_probability) == (0.0, 0.0)
    assert dataset.augment.noise_probability == paper.noise_probability  # the rest of the recipe stays


# -- resuming ---------------------------------------------------------------------------------


def _assert_same_weights(first: Path, second: Path) -> None:
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("stage, workers", [("base", 1), ("refine", 0)])
def test_resumed_run_matches_an_uninterrupted_one_bit_for_bit(tmp_path, stage, workers):
    settings = dict(stage=stage, num_workers=workers, val_every=2, sample_pixels=256)
    loop.train(tiny_options(tmp_path / "straight", steps=4, **settings))
    loop.train(tiny_options(tmp_path / "halves", steps=2, **settings))
    loop.train(tiny_options(tmp_path / "halves", steps=4, resume=True, **settings))
    _assert_same_weights(tmp_path / "straight" / "last.safetensors", tmp_path / "halves" / "last.safetensors")
    straight = read_rows(tmp_path / "straight" / "train.csv")
    halves = read_rows(tmp_path / "halves" / "train.csv")
    assert [row["loss"] for row in straight] == [row["loss"] for row in halves]
    assert len(read_rows(tmp_path / "halves" / "valid.csv")) == 2


def test_a_resume_after_a_skipped_batch_goes_on_with_the_batches_the_run_would_have_used(tmp_path, monkeypatch):
    # The second batch of a run gives a non-finite loss and is skipped: step 2 trains on the third batch. A run
    # saved at step 2 and resumed must go on with the fourth, as the run that never stopped does.
    real_loss, calls = loop.stage_loss, []

    def loss_failing_on(bad_call):
        def stage_loss(stage, outputs, batch):
            calls.append(None)
            loss, terms = real_loss(stage, outputs, batch)
            return (loss, {**terms, "pha_l1": math.nan}) if len(calls) == bad_call else (loss, terms)
        return stage_loss

    monkeypatch.setattr(loop, "stage_loss", loss_failing_on(2))
    loop.train(tiny_options(tmp_path / "straight", steps=4))
    calls.clear()
    loop.train(tiny_options(tmp_path / "halves", steps=2))
    monkeypatch.setattr(loop, "stage_loss", loss_failing_on(0))
    loop.train(tiny_options(tmp_path / "halves", steps=4, resume=True))
    _assert_same_weights(tmp_path / "straight" / "last.safetensors", tmp_path / "halves" / "last.safetensors")


def test_a_skipped_batch_leaves_the_batch_norm_statistics_as_they_were(tmp_path, monkeypatch):
    # The forward pass of a batch whose loss is not finite (an fp16 overflow) has already moved the batch norms'
    # running statistics, perhaps to inf or NaN, which the model would then carry into validation and its weights.
    # A pool of two samples in batches of two: every batch holds the same images. The decoder's statistics follow the
    # ASPP's dropout, whose masks the skipped forward pass drew, so only its count of batches is compared.
    real_loss, calls = loop.stage_loss, []

    def first_not_finite(stage, outputs, batch):
        calls.append(None)
        loss, terms = real_loss(stage, outputs, batch)
        return (loss, {**terms, "pha_l1": math.nan}) if len(calls) == 1 else (loss, terms)

    loop.train(tiny_options(tmp_path / "plain", steps=1, train_samples=2))
    monkeypatch.setattr(loop, "stage_loss", first_not_finite)
    loop.train(tiny_options(tmp_path / "skipped", steps=1, train_samples=2))
    plain, skipped = (load_file(str(tmp_path / name / "last.safetensors")) for name in ("plain", "skipped"))
    compared = [key for key in plain if "num_batches" in key or ("running_" in key and not key.startswith("decoder."))]
    assert len(compared) > 100
    for key in compared:
        torch.testing.assert_close(skipped[key], plain[key], rtol=1e-4, atol=1e-6, msg=key)


class _Killed(BaseException):
    """Stands in for a kill -9: nothing after it runs, and no handler of the loop catches it."""


def test_a_resume_after_a_crash_between_a_better_best_and_the_state_keeps_that_best(tmp_path, monkeypatch):
    # A validation at step 3 improves best.safetensors; the process then dies before state.pt is saved again, so the
    # state still holds step 2 and its best loss. The resumed run used to take that older loss for the best, and its
    # worse validation at step 3 replaced the better best.safetensors of the run that died.
    out, real_validate, scripted = tmp_path / "run", loop.validate, []

    def validate(model, batches, stage, amp):
        metrics, outputs = real_validate(model, batches, stage, amp)
        return {**metrics, "loss": scripted.pop(0)}, outputs

    monkeypatch.setattr(loop, "validate", validate)
    scripted[:] = [0.5, 0.4]
    loop.train(tiny_options(out, steps=2, val_every=1, train_samples=2))
    real_save = loop.save_training_state

    def die(path, state):
        raise _Killed

    scripted[:] = [0.2, 0.35]
    monkeypatch.setattr(loop, "save_training_state", die)
    with pytest.raises(_Killed):
        loop.train(tiny_options(out, steps=4, val_every=1, train_samples=2, resume=True))
    monkeypatch.setattr(loop, "save_training_state", real_save)
    assert torch.load(out / "state.pt", weights_only=True)["best"] == 0.4
    best = (out / "best.safetensors").read_bytes()
    with safe_open(str(out / "best.safetensors"), "pt") as weights:
        assert (weights.metadata()["step"], float(weights.metadata()["valid_loss"])) == ("3", 0.2)

    scripted[:] = [0.3, 0.25]  # better than the state's best, worse than best.safetensors'
    result = loop.train(tiny_options(out, steps=4, val_every=1, train_samples=2, resume=True))
    assert (out / "best.safetensors").read_bytes() == best
    assert result.best_valid_loss == 0.2
    assert torch.load(out / "state.pt", weights_only=True)["best"] == 0.2
    scripted[:] = [0.1]  # and a better one still replaces it
    loop.train(tiny_options(out, steps=5, val_every=1, train_samples=2, resume=True))
    with safe_open(str(out / "best.safetensors"), "pt") as weights:
        assert (weights.metadata()["step"], float(weights.metadata()["valid_loss"])) == ("5", 0.1)


def test_the_best_loss_is_recorded_in_full_so_that_a_resume_reads_it_back_exactly(tmp_path, monkeypatch):
    out, real_validate = tmp_path / "run", loop.validate

    def validate(model, batches, stage, amp):
        metrics, outputs = real_validate(model, batches, stage, amp)
        return {**metrics, "loss": 0.123456789}, outputs

    monkeypatch.setattr(loop, "validate", validate)
    loop.train(tiny_options(out, steps=1, val_every=1, train_samples=2))
    with safe_open(str(out / "best.safetensors"), "pt") as weights:
        assert float(weights.metadata()["valid_loss"]) == 0.123456789
    assert loop.best_weights_loss(out / "best.safetensors", "base", "mobilenetv2") == 0.123456789
    assert loop.best_weights_loss(out / "best.safetensors", "refine", "mobilenetv2") is None  # another run's
    assert loop.best_weights_loss(out / "missing.safetensors", "base", "mobilenetv2") is None
    (out / "best.safetensors").write_bytes(b"not weights")
    assert loop.best_weights_loss(out / "best.safetensors", "base", "mobilenetv2") is None


def test_a_run_folder_is_not_overwritten_without_resume(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"")
    with pytest.raises(BgmatteError, match="--resume"):
        loop.train(tiny_options(tmp_path, steps=1))


def test_resume_needs_a_saved_state(tmp_path):
    with pytest.raises(BgmatteError, match="no training state"):
        loop.train(tiny_options(tmp_path, steps=1, resume=True))


def test_a_folder_with_an_earlier_runs_files_but_no_state_is_refused(tmp_path):
    (tmp_path / "last.safetensors").write_bytes(b"weights of an earlier run")
    (tmp_path / "train.csv").write_text("step,loss\n1,0.5\n")
    with pytest.raises(BgmatteError, match=r"earlier run's files \(last.safetensors, train.csv\).*another --out"):
        loop.train(tiny_options(tmp_path, steps=1))
    assert (tmp_path / "last.safetensors").read_bytes() == b"weights of an earlier run"
    assert (tmp_path / "train.csv").read_text() == "step,loss\n1,0.5\n"
    assert not (tmp_path / "samples").exists()


def test_logs_without_rows_and_empty_folders_are_not_an_earlier_run(tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "train.csv").write_text("step,loss\n")  # a run that failed before its first step
    (tmp_path / "notes.txt").write_text("mine")
    assert loop.earlier_run_files(tmp_path) == []
    (tmp_path / "samples" / "step_0000002.png").write_bytes(b"")
    (tmp_path / "best.safetensors").write_bytes(b"")
    assert loop.earlier_run_files(tmp_path) == ["best.safetensors", "samples/"]


def test_an_out_that_is_a_file_or_cannot_be_made_is_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out, problem in ((afile, "is a file, not a folder"), (afile / "run", "cannot create the run's folder")):
        assert main(["train", "base", "--out", str(out), *TINY, "--steps", "1", "--num-workers", "0"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"bgmatte train: error: {out}: {problem}"), lines
    assert afile.read_text() == "mine"


def _fake_state(out: Path, **options) -> Path:
    """A state.pt with a run's options and learning rates but no weights: enough to settle a resume's options."""
    record = tiny_options(out, **options).to_record()
    groups = [{"name": "backbone", "lr": 1e-4, "params": []}, {"name": "aspp", "lr": 5e-4, "params": []},
              {"name": "decoder", "lr": 2e-3, "params": []}]
    if record["stage"] == "refine":
        groups = [*([] if record["freeze_base"] else groups), {"name": "refiner", "lr": 3e-4, "params": []}]
    state = {"format": loop.STATE_FORMAT, "stage": record["stage"], "backbone": "mobilenetv2", "step": 1,
             "options": {k: v for k, v in record.items() if not isinstance(v, dict)},
             "optimizer": {"state": {}, "param_groups": groups}}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / "state.pt")
    return out / "state.pt"


def test_a_resume_takes_the_options_not_given_from_the_run(tmp_path):
    path = _fake_state(tmp_path, crop=96, batch_size=4, seed=7, plate_color=0.0, data_root=tmp_path, val_every=3,
                       num_workers=3)
    saved = torch.load(path, weights_only=True)
    given = {"stage", "out", "resume", "steps", "crop", "device", "lr"}
    options = loop.resumed_options(TrainOptions(stage="base", out=tmp_path, resume=True, steps=9, crop=96,
                                                lr={"aspp": 1e-3}), saved, given, path)
    assert (options.crop, options.batch_size, options.seed, options.plate_color) == (96, 4, 7, 0.0)
    assert options.data_root == tmp_path and options.val_every == 3 and options.backbone == "mobilenetv2"
    assert options.steps == 9  # given anew
    assert options.num_workers == 2  # of this session, not of the run
    assert options.learning_rates == {"backbone": 1e-4, "aspp": 1e-3, "decoder": 2e-3}


@pytest.mark.parametrize("given", [{"crop", "steps", "val_every", "device"}, None])
def test_a_resume_refuses_a_new_value_for_an_option_that_makes_the_run(tmp_path, given):
    path = _fake_state(tmp_path, crop=96)
    saved = torch.load(path, weights_only=True)
    changed = tiny_options(tmp_path, crop=128, resume=True)
    with pytest.raises(BgmatteError, match=r"state.pt: the run was started with --crop 96; .* --crop 128"):
        loop.resumed_options(changed, saved, given, path)
    adjusted = tiny_options(tmp_path, crop=96, resume=True, steps=50, val_every=5, device="cpu")
    resumed = loop.resumed_options(adjusted, saved, given, path)
    assert (resumed.steps, resumed.val_every) == (50, 5)  # meant to change from one session to the next


def test_the_command_line_refuses_a_conflicting_option_on_resume_in_one_line(tmp_path, capsys):
    _fake_state(tmp_path / "run", crop=96)
    code = main(["train", "base", "--out", str(tmp_path / "run"), "--resume", "--batch-size", "4", "--quiet"])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "state.pt: the run was started with --batch-size 2" in lines[0], lines


def test_paths_are_saved_absolute_and_a_resume_knows_them_however_spelled(tmp_path, monkeypatch):
    (tmp_path / "wd1" / "tex").mkdir(parents=True)
    (tmp_path / "wd2").mkdir()
    (tmp_path / "weights.pth").write_bytes(b"")
    (tmp_path / "wd2" / "link").symlink_to(tmp_path / "wd1" / "tex")
    monkeypatch.chdir(tmp_path / "wd1")
    started, _ = loop._open_run_folder(tiny_options(Path("../run"), data_root="tex", init="../weights.pth"), None)
    tex, weights = (tmp_path / "wd1" / "tex").resolve(), (tmp_path / "weights.pth").resolve()
    assert (started.data_root, started.init) == (tex, weights)
    path = _fake_state(tmp_path / "run", data_root=started.data_root, init=started.init)
    saved = torch.load(path, weights_only=True)
    assert (saved["options"]["data_root"], saved["options"]["init"]) == (str(tex), str(weights))

    monkeypatch.chdir(tmp_path / "wd2")  # resumed from elsewhere: the paths left out are the run's
    kept = loop.resumed_options(tiny_options(Path("../run"), resume=True), saved, {"steps"}, path)
    assert (kept.data_root, kept.init) == (tex, weights)
    for spelling in ("../wd1/tex", "link", str(tex), "../wd1/../wd1/tex/"):
        again = tiny_options(Path("../run"), resume=True, data_root=spelling, init="../weights.pth")
        assert loop.resumed_options(again, saved, None, path).data_root == Path(spelling)
    with pytest.raises(BgmatteError, match=r"started with --data-root .*tex; it cannot go on with --data-root \."):
        loop.resumed_options(tiny_options(Path("../run"), resume=True, data_root="."), saved, {"data_root"}, path)


def test_relative_paths_that_older_versions_saved_are_found_or_asked_for(tmp_path, monkeypatch, capsys):
    (tmp_path / "wd1" / "tex").mkdir(parents=True)
    (tmp_path / "wd2").mkdir()
    path = _fake_state(tmp_path / "run", data_root="tex")  # saved as typed, in wd1
    saved = torch.load(path, weights_only=True)
    monkeypatch.chdir(tmp_path / "wd1")
    resumed = loop.resumed_options(tiny_options(tmp_path / "run", resume=True), saved, {"steps"}, path)
    assert resumed.data_root == (tmp_path / "wd1" / "tex").resolve()
    beside = _fake_state(tmp_path / "run2", data_root="wd1/tex")  # relative to the run folder's parent
    monkeypatch.chdir(tmp_path / "wd2")
    resumed = loop.resumed_options(tiny_options(tmp_path / "run2", resume=True),
                                   torch.load(beside, weights_only=True), {"steps"}, beside)
    assert resumed.data_root == (tmp_path / "wd1" / "tex").resolve()

    with pytest.raises(BgmatteError, match="started with --data-root tex, a relative path .* give --data-root again"):
        loop.resumed_options(tiny_options(tmp_path / "run", resume=True), saved, {"steps"}, path)
    again = tiny_options(tmp_path / "run", resume=True, data_root="../wd1/tex")
    assert loop.resumed_options(again, saved, {"data_root"}, path).data_root == Path("../wd1/tex")
    code = main(["train", "base", "--out", str(tmp_path / "run"), "--resume", "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].endswith("give --data-root again"), lines


def test_a_resume_checks_that_options_fit_together_once_the_runs_own_are_in(tmp_path):
    path = _fake_state(tmp_path / "run", stage="refine", crop=40, backbone_scale=0.5)
    args = build_parser().parse_args(["train", "refine", "--out", str(tmp_path / "run"), "--resume", "--crop", "40"])
    options, given = training_options(args)  # --crop 40 would not do at the default backbone scale, 0.25
    resumed = loop.resumed_options(options, torch.load(path, weights_only=True), given, path)
    assert (resumed.crop, resumed.backbone_scale) == (40, 0.5)

    frozen = _fake_state(tmp_path / "frozen", stage="refine", freeze_base=True, init=tmp_path / "base.pth")
    args = build_parser().parse_args(["train", "refine", "--out", str(tmp_path / "frozen"), "--resume",
                                      "--lr-backbone", "1e-5"])
    options, given = training_options(args)  # fine alone; not with the run's --freeze-base
    with pytest.raises(BgmatteError, match="do not fit the run's: with --freeze-base only the refiner learns"):
        loop.resumed_options(options, torch.load(frozen, weights_only=True), given, frozen)


@pytest.mark.slow
def test_resuming_from_the_command_line_keeps_the_runs_options(tmp_path):
    out = tmp_path / "run"
    first = ["train", "base", "--out", str(out), "--crop", "64", "--batch-size", "2", "--device", "cpu", "--quiet",
             "--num-workers", "0", "--val-every", "0", "--seed", "3", "--plate-color", "0", "--lr-decoder", "1e-3",
             "--steps", "1"]
    assert main(first) == 0
    stale = out / ".state.pt.99999999.tmp"  # left by a save that was killed (no such process runs)
    stale.write_bytes(b"half a state")
    assert main(["train", "base", "--out", str(out), "--resume", "--steps", "2", "--device", "cpu", "--quiet",
                 "--num-workers", "0"]) == 0
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 2
    kept = {key: state["options"][key] for key in ("crop", "batch_size", "seed", "plate_color", "val_every")}
    assert kept == {"crop": 64, "batch_size": 2, "seed": 3, "plate_color": 0.0, "val_every": 0}
    rates = {group["name"]: group["lr"] for group in state["optimizer"]["param_groups"]}
    assert rates == {**PAPER_LEARNING_RATES["base"], "decoder": 1e-3}
    assert not stale.exists() and not list((out / "samples").iterdir())


def test_only_the_temporary_files_of_interrupted_saves_are_removed(tmp_path):
    dead = 99_999_999
    ours = [tmp_path / f".state.pt.{dead}.tmp", tmp_path / f".last.safetensors.{dead}.tmp",
            tmp_path / f".best.safetensors.{os.getpid()}.tmp", tmp_path / f".train.csv.{dead}.tmp"]
    for path in ours:
        path.write_bytes(b"half a file")
    loop.save_model_weights(MattingBase("mobilenetv2"), tmp_path / "w.safetensors", {"format": "bgmatte"})
    (tmp_path / "w.safetensors").rename(tmp_path / ".tmpAb12Cd")  # what safetensors itself left before
    kept = {".tmpXy34Zw": b"someone's", ".state.pt.tmp": b"", f".notes.txt.{dead}.tmp": b"",
            f".state.pt.{os.getppid()}.tmp": b"a save under way", "last.safetensors.1.tmp": b"", "x.tmp": b""}
    for name, data in kept.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / f".state.pt.{dead + 1}.tmp").symlink_to(tmp_path / "x.tmp")
    removed = loop.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([*(p.name for p in ours), ".tmpAb12Cd"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, f".state.pt.{dead + 1}.tmp"])


def test_weights_are_written_through_our_own_temporary_name(tmp_path, monkeypatch):
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("safetensors' save_file adds a temporary file of its own")

    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda source, target: renamed.append(Path(source).name)
                        or real_replace(source, target))
    model = MattingBase("mobilenetv2")
    loop.save_model_weights(model, tmp_path / "last.safetensors", {"format": "bgmatte"})
    assert renamed == [f".last.safetensors.{os.getpid()}.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]
    assert torch.equal(load_file(str(tmp_path / "last.safetensors"))["decoder.conv4.weight"],
                       model.state_dict()["decoder.conv4.weight"])


def test_a_log_rewritten_on_resume_survives_a_crash_midway(tmp_path, monkeypatch):
    log = tmp_path / "train.csv"
    log.write_text("step,loss,time\n1,0.5,10\n2,0.4,11\n3,0.3,12\n")
    earlier = log.read_bytes()

    class FullDisk(csv.DictWriter):
        def writerows(self, rows):
            raise OSError(28, "No space left on device")  # after the header went out

    monkeypatch.setattr(loop.csv, "DictWriter", FullDisk)
    with pytest.raises(BgmatteError, match="train.csv: cannot write the log .No space left on device"):
        loop.CsvLog(log, ["step", "loss", "time"], resume_step=2)
    assert log.read_bytes() == earlier and [p.name for p in tmp_path.iterdir()] == ["train.csv"]
    monkeypatch.undo()
    resumed = loop.CsvLog(log, ["step", "loss", "time"], resume_step=2)
    resumed.write({"step": 3, "loss": 0.25, "time": "13"})
    assert [(row["step"], row["loss"]) for row in read_rows(log)] == [("1", "0.5"), ("2", "0.4"), ("3", "0.25")]


def test_a_resumed_log_drops_damaged_rows_and_refuses_a_file_that_is_no_log(tmp_path, capsys):
    log = tmp_path / "train.csv"
    # Row 3 was cut short by a crash while it was appended; one row's step is not a number.
    log.write_text("step,loss,time\n1,0.5,10\nx,0.45,10\n2,0.4,11\n3,0.3\n")
    loop.CsvLog(log, ["step", "loss", "time"], resume_step=5)
    assert [(row["step"], row["loss"]) for row in read_rows(log)] == [("1", "0.5"), ("2", "0.4")]
    assert "dropped 2 damaged row(s)" in capsys.readouterr().err
    log.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(BgmatteError, match="train.csv: cannot read this log"):
        loop.CsvLog(log, ["step", "loss", "time"], resume_step=5)
    assert log.read_bytes() == b"\xff\xfe\x00binary"


def test_a_state_holding_code_is_refused(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    with (tmp_path / "state.pt").open("wb") as file:
        pickle.dump({"format": 1, "payload": Payload()}, file, protocol=2)
    with pytest.raises(BgmatteError, match="not a readable bgmatte training state"):
        loop.load_training_state(tmp_path / "state.pt")


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory) -> Path:
    """A base run of one step, whose state.pt the tests below spoil before resuming a copy of it."""
    out = tmp_path_factory.mktemp("one_step") / "run"
    loop.train(tiny_options(out, steps=1, train_samples=2))
    return out


def _edited(change):
    """A state.pt editor: ``change`` alters the loaded state in place, and the result is saved as torch does."""
    def edit(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)
    return edit


def _replaced(make):
    """A state.pt editor that saves what ``make(state)`` returns instead of the state."""
    def edit(path: Path) -> None:
        torch.save(make(torch.load(path, weights_only=True)), path)
    return edit


def _first_param_state(state) -> dict:
    return next(iter(state["optimizer"]["state"].values()))


def _shape_changed(state) -> None:
    state["model"]["decoder.conv4.weight"] = torch.zeros(3, 3)


STATE_DAMAGE = {
    "not a torch save": lambda path: path.write_bytes(b"a text file, not a torch save\n"),
    "an empty file": lambda path: path.write_bytes(b""),
    "a truncated file": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "a list": _replaced(lambda state: [state]),
    "a tensor": _replaced(lambda state: torch.zeros(3)),
    "no stage": _edited(lambda state: state.pop("stage")),
    "no backbone": _edited(lambda state: state.pop("backbone")),
    "an unknown backbone": _edited(lambda state: state.update(backbone="vgg16")),
    "no kernel size": _edited(lambda state: state.pop("refine_kernel_size")),
    "no step": _edited(lambda state: state.pop("step")),
    "a step that is text": _edited(lambda state: state.update(step="one")),
    "a best that is text": _edited(lambda state: state.update(best="low")),
    "no world size": _edited(lambda state: state.pop("world_size")),
    "batches that are text": _edited(lambda state: state.update(batches="two")),
    "a damaged log window": _edited(lambda state: state.update(log_window={"steps": 1, "sums": 3, "seconds": 1.0})),
    "no model": _edited(lambda state: state.pop("model")),
    "a model that is a tensor": _edited(lambda state: state.update(model=torch.zeros(3))),
    "a model tensor of the wrong shape": _edited(_shape_changed),
    "a model missing a tensor": _edited(lambda state: state["model"].pop("decoder.conv4.weight")),
    "a model entry that is not a tensor": _edited(lambda state: state["model"].update({"decoder.conv4.bias": 1.0})),
    "another backbone's model": _edited(lambda state: state.update(model=MattingBase("resnet50").state_dict())),
    "no optimizer": _edited(lambda state: state.pop("optimizer")),
    "an optimizer that is a list": _edited(lambda state: state.update(optimizer=[])),
    "an optimizer without its state": _edited(lambda state: state["optimizer"].pop("state")),
    "an optimizer without its groups": _edited(lambda state: state["optimizer"].pop("param_groups")),
    "an optimizer group without its betas": _edited(lambda state: state["optimizer"]["param_groups"][0].pop("betas")),
    "an optimizer group with text for a rate": _edited(
        lambda state: state["optimizer"]["param_groups"][1].update(eps="small")),
    "an optimizer moment of the wrong shape": _edited(
        lambda state: _first_param_state(state).update(exp_avg=torch.zeros(7))),
    "an optimizer entry that is a number": _edited(
        lambda state: state["optimizer"]["state"].update({0: 1.5})),
    "an optimizer entry without its moment": _edited(lambda state: _first_param_state(state).pop("exp_avg_sq")),
    "optimizer state for a parameter the groups lack": _edited(
        lambda state: state["optimizer"]["state"].update({10_000: dict(_first_param_state(state))})),
    "no random state": _edited(lambda state: state.pop("random")),
    "a random state for no process": _edited(lambda state: state.update(random=[])),
    "a damaged random state": _edited(lambda state: state["random"][0].update(torch=torch.zeros(3))),
}


@pytest.mark.parametrize("damage", list(STATE_DAMAGE))
def test_a_state_that_does_not_fit_the_run_is_refused_in_one_line_on_resume(one_step_run, tmp_path, capsys, damage):
    # A state.pt of another run, hand-edited or damaged: each of these used to end --resume in a traceback (a
    # KeyError, a RuntimeError of load_state_dict, or one of Adam's at the first step) instead of one line.
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    STATE_DAMAGE[damage](out / "state.pt")
    spoiled = (out / "state.pt").read_bytes()
    code = main(["train", "base", "--out", str(out), "--resume", "--steps", "2", "--device", "cpu", "--num-workers",
                 "0", "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"bgmatte train: error: {out / 'state.pt'}: "), lines
    assert (out / "state.pt").read_bytes() == spoiled
    assert [row["step"] for row in read_rows(out / "train.csv")] == ["1"]


@pytest.mark.parametrize("damage, said", [("not a torch save", "not a file that torch.save writes"),
                                          ("an empty file", "is empty"),
                                          ("a truncated file", "cut short or damaged (PytorchStreamReader failed "
                                                               "reading zip archive: failed finding central "
                                                               "directory)")])
def test_a_state_file_that_torch_cannot_read_is_said_in_words(one_step_run, tmp_path, damage, said):
    # They were one line already, but said "pop from empty list", "EOFError", or PyTorch's paragraph on miniz.
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    STATE_DAMAGE[damage](out / "state.pt")
    with pytest.raises(BgmatteError) as refused:
        loop.load_training_state(out / "state.pt")
    assert str(refused.value) == f"{out / 'state.pt'}: not a readable bgmatte training state: {said}"


def test_the_unspoiled_state_of_that_run_resumes(one_step_run, tmp_path):
    # The damage above is all that keeps those runs from resuming.
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    assert main(["train", "base", "--out", str(out), "--resume", "--steps", "2", "--device", "cpu", "--num-workers",
                 "0", "--quiet"]) == 0
    assert [row["step"] for row in read_rows(out / "train.csv")] == ["1", "2"]


def test_a_resume_past_the_steps_asked_for_is_refused_in_one_line_and_keeps_the_run(one_step_run, tmp_path, capsys):
    # It ended at once and said "done at step 5", as if it had trained up to --steps 2, and exited 0.
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    _edited(lambda state: state.update(step=5, batches=5))(out / "state.pt")
    kept = (out / "state.pt").read_bytes()
    code = main(["train", "base", "--out", str(out), "--resume", "--steps", "2", "--device", "cpu", "--num-workers",
                 "0"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == [f"bgmatte train: error: {out / 'state.pt'}: the run is already at step 5, past "
                                   "--steps 2, so there is nothing to train (--steps is the run's total, not a number "
                                   "to add: give more than 5 to go on)"], lines
    assert (out / "state.pt").read_bytes() == kept
    assert [row["step"] for row in read_rows(out / "train.csv")] == ["1"]


def test_a_resume_with_another_number_of_processes_says_that_it_does_not_go_on_exactly(one_step_run, tmp_path,
                                                                                      capsys):
    """Resumed with another number of processes than it was saved with, a run draws other batches and random numbers
    than the uninterrupted one would have: it went on without a word, as if it resumed exactly."""
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    _edited(lambda state: state.update(world_size=2, random=state["random"] * 2))(out / "state.pt")
    assert main(["train", "base", "--out", str(out), "--resume", "--steps", "2", "--device", "cpu", "--num-workers",
                 "0", "--quiet"]) == 0
    assert capsys.readouterr().err == (f"bgmatte train: warning: {out / 'state.pt'}: saved by 2 processes and resumed "
                                       "by 1, so the run goes on with other batches and random numbers than it "
                                       "would have with 2 (not exactly as if it had not stopped)\n")


def test_random_states_survive_a_weights_only_round_trip(tmp_path):
    import random

    import numpy as np

    saved = loop.capture_random_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.save(saved, tmp_path / "rng.pt")
    loop.restore_random_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_resumable_sampler_continues_mid_epoch_and_shards_processes():
    def take(sampler, n):
        return list(islice(iter(sampler), n))

    first = take(loop.ResumableSampler(range(10), 0, 1, seed=3), 25)
    assert take(loop.ResumableSampler(range(10), 0, 1, seed=3, start=13), 12) == first[13:]
    assert [epoch for epoch, _ in first] == [0] * 10 + [1] * 10 + [2] * 5
    assert sorted(index for _, index in first[:10]) == list(range(10))  # an epoch is a permutation
    assert [i for _, i in first[:10]] != [i for _, i in first[10:20]]  # reshuffled every epoch
    shards = [take(loop.ResumableSampler(range(10), rank, 2, seed=3), 5) for rank in (0, 1)]
    assert sorted(index for _, index in shards[0] + shards[1]) == list(range(10))


def test_batches_made_on_the_device_depend_only_on_seed_rank_and_step():
    from bgmatte.train.data import build_dataset

    dataset = build_dataset("synthetic", size=32, length=8)
    runtime = loop.Runtime(torch.device("cpu"))
    stream = loop.generated_batches(dataset, 5, runtime, 2, 0)
    batches = [next(stream) for _ in range(3)]
    resumed = next(loop.generated_batches(dataset, 5, runtime, 2, 2))
    assert all(torch.equal(resumed[key], batches[2][key]) for key in ("src", "bgr", "pha", "fgr"))
    assert batches[0]["src"].shape == (2, 3, 32, 32) and not torch.equal(batches[0]["pha"], batches[1]["pha"])
    other_rank = next(loop.generated_batches(dataset, 5, loop.Runtime(torch.device("cpu"), rank=1), 2, 0))
    assert not torch.equal(other_rank["pha"], batches[0]["pha"])


# -- interruption -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status", "said"), [(signal.SIGINT, 130, "interrupted"),
                                                       (signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                       (signal.SIGHUP, 129, "terminated (SIGHUP)")])
def test_ctrl_c_sigterm_or_sighup_saves_state_and_weights_then_exits_nonzero(tmp_path, signum, status, said):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "bgmatte", "train", "base", "--out", str(out), *TINY, "--steps", "10000",
               "--train-samples", "2", "--num-workers", "0", "--val-every", "0", "--save-every", "0",
               "--log-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if (out / "train.csv").is_file() and len(read_rows(out / "train.csv")) >= 1:
                break
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()[1].decode()
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == status, stderr.decode()
    assert said in stderr.decode()
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] >= 1
    assert load_file(str(out / "last.safetensors"))
    assert int(read_rows(out / "train.csv")[-1]["step"]) == state["step"]


@pytest.mark.parametrize("save_every, signals", [(0, 1), (1, 2)])
def test_ctrl_c_during_a_save_waits_until_weights_and_state_are_both_written(tmp_path, monkeypatch, save_every,
                                                                            signals):
    # A Ctrl-C in the final save (0, 1), or a second one in a periodic save (1, 2), used to stop the process
    # between last.safetensors and state.pt: the weights of step 2 beside the state of step 1.
    out = tmp_path / "run"
    loop.train(tiny_options(out, steps=1))
    real_save = loop.save_model_weights

    def save_then_ctrl_c(model, path, metadata):
        real_save(model, path, metadata)
        if path.name == "last.safetensors":
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(loop, "save_model_weights", save_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        loop.train(tiny_options(out, steps=2, save_every=save_every, resume=True))
    monkeypatch.setattr(loop, "save_model_weights", real_save)
    state = torch.load(out / "state.pt", weights_only=True)
    with safe_open(str(out / "last.safetensors"), "pt") as weights:
        assert weights.metadata()["step"] == str(state["step"]) == "2"
    loop.train(tiny_options(out, steps=3, resume=True))
    assert [row["step"] for row in read_rows(out / "train.csv")] == ["1", "2", "3"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_during_a_step_saves_at_the_end_of_that_step(tmp_path, monkeypatch, signum):
    # A signal met during step 2 stopped the run after step 3: the step under way, then one more, which a job
    # scheduler's grace period may not leave time for.
    real_loss, calls = loop.stage_loss, []

    def signal_in_step_2(stage, outputs, batch):
        calls.append(None)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)
        return real_loss(stage, outputs, batch)

    monkeypatch.setattr(loop, "stage_loss", signal_in_step_2)
    with pytest.raises((KeyboardInterrupt, loop.Terminated)):
        loop.train(tiny_options(tmp_path / "run", steps=6))
    assert len(calls) == 2
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"] == 2
    assert [row["step"] for row in read_rows(tmp_path / "run" / "train.csv")] == ["1", "2"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["INT", "TERM", "HUP"])
def test_a_signal_the_process_ignores_does_not_stop_the_run(tmp_path, monkeypatch, signum):
    # `nohup bgmatte train ... &` ignores SIGHUP so that closing the terminal leaves the run going, and a script's
    # background job ignores SIGINT: the run used to catch them anyway and stop, saved, at the terminal's close.
    previous = signal.signal(signum, signal.SIG_IGN)
    real_loss, calls = loop.stage_loss, []

    def signal_in_step_2(stage, outputs, batch):
        calls.append(None)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)  # a second one too, which would act at once
        return real_loss(stage, outputs, batch)

    monkeypatch.setattr(loop, "stage_loss", signal_in_step_2)
    try:
        try:
            result = loop.train(tiny_options(tmp_path / "run", steps=4, save_every=2))
        except (KeyboardInterrupt, loop.Terminated):
            pytest.fail(f"an ignored {signal.Signals(signum).name} stopped the run at step 2")
        assert signal.getsignal(signum) is signal.SIG_IGN  # left as the run found it
    finally:
        signal.signal(signum, previous)
    assert result.step == 4 and len(calls) == 4
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"] == 4


def test_a_run_stopped_midway_between_log_rows_logs_the_same_rows_once_resumed(tmp_path, monkeypatch):
    # Logged every 2 steps, a run stopped by Ctrl-C after step 3 and resumed must log at step 4 the mean of steps 3
    # and 4, as the run that never stopped does: the step that the stop cut off from its row used to be dropped.
    loop.train(tiny_options(tmp_path / "straight", steps=4, log_every=2))
    real_loss, calls = loop.stage_loss, []

    def ctrl_c_in_step_3(stage, outputs, batch):
        calls.append(None)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the step finishes, then the run saves and stops
        return real_loss(stage, outputs, batch)

    monkeypatch.setattr(loop, "stage_loss", ctrl_c_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        loop.train(tiny_options(tmp_path / "halves", steps=4, log_every=2))
    assert torch.load(tmp_path / "halves" / "state.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(loop, "stage_loss", real_loss)
    loop.train(tiny_options(tmp_path / "halves", steps=4, log_every=2, resume=True))
    _assert_same_weights(tmp_path / "straight" / "last.safetensors", tmp_path / "halves" / "last.safetensors")
    columns = ["step", "loss", *loop.loss_terms("base")]
    straight, halves = (read_rows(tmp_path / name / "train.csv") for name in ("straight", "halves"))
    assert [[row[c] for c in columns] for row in halves] == [[row[c] for c in columns] for row in straight]
    assert all(float(row["sec_per_step"]) > 0 for row in halves)


def _photomatte(root: Path, count: int = 4) -> tuple[Path, Path]:
    """A PhotoMatte-style folder of `count` pairs and a folder of two backgrounds, all 48x40."""
    rng = np.random.default_rng(0)
    for i in range(count):
        for folder, image in (("fgr", rng.integers(0, 256, (40, 48, 3))), ("pha", rng.integers(0, 256, (40, 48)))):
            (root / "data" / folder).mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(root / "data" / folder / f"{i:04d}.png"), image.astype(np.uint8))
    (root / "bg").mkdir()
    for i in range(2):
        assert cv2.imwrite(str(root / "bg" / f"{i}.jpg"), rng.integers(0, 256, (40, 48, 3)).astype(np.uint8))
    return root / "data", root / "bg"


@pytest.mark.slow
def test_a_damaged_file_met_in_a_loader_worker_is_one_line_exits_at_once_and_leaves_a_resumable_run(tmp_path):
    data, behind = _photomatte(tmp_path)
    # The second batch's first item: its foreground is cut short past the header, which the check before
    # training cannot see, so that the run trains one step and then meets it in the worker.
    order = [index for _, index in islice(loop.ResumableSampler(range(4), 0, 1, TrainOptions.seed), 4)]
    victim = data / "fgr" / f"{order[2]:04d}.png"
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "run"
    command = [sys.executable, "-m", "bgmatte", "train", "base", "--out", str(out), *TINY, "--steps", "4",
               "--dataset", "photomatte", "--data-root", str(data), "--backgrounds", str(behind),
               "--num-workers", "1", "--val-every", "0", "--save-every", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the run did not exit after the damaged file")
    lines = stderr.decode().strip().splitlines()
    assert process.returncode == 2 and len(lines) == 1, lines
    assert f"{victim.name}: damaged or truncated PNG; stopped at step 1" in lines[0] and "--resume" in lines[0]
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 1
    victim.write_bytes(whole)  # repaired: the run goes on from where it stopped
    assert main(["train", "base", "--out", str(out), "--resume", "--num-workers", "0", "--quiet"]) == 0
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 4


def test_a_damaged_file_before_the_first_step_leaves_a_folder_that_can_be_run_again(tmp_path, capsys):
    data, behind = _photomatte(tmp_path, 2)
    victim = data / "pha" / "0001.png"
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])
    command = ["train", "base", "--out", str(tmp_path / "run"), *TINY, "--steps", "2", "--dataset", "photomatte",
               "--data-root", str(data), "--backgrounds", str(behind), "--num-workers", "0", "--val-every", "0"]
    assert main(command) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("0001.png: damaged or truncated PNG"), lines
    assert not (tmp_path / "run" / "state.pt").exists()
    victim.write_bytes(whole)
    assert main(command) == 0


@pytest.mark.parametrize("problem", ["empty data root", "missing data root", "empty backgrounds"])
def test_a_problem_of_all_the_training_data_is_not_said_as_one_of_the_validation_set(tmp_path, capsys, problem):
    """The validation set is made first, so a data root or background folder that holds nothing for any split was
    refused as the validation set's problem, advising '--val-every 0', which only led to the same refusal; and a
    data root that does not exist was said to lack fgr/ + pha/ (directly or under valid/)."""
    data, behind = _photomatte(tmp_path, 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    data, behind, expected = {
        "empty data root": (empty, behind, f"{empty}: expected fgr/ + pha/ (directly or under train/)"),
        "missing data root": (tmp_path / "absent", behind, f"{tmp_path / 'absent'}: folder not found"),
        "empty backgrounds": (data, empty, f"{empty}: no images ("),
    }[problem]
    command = ["train", "base", "--out", str(tmp_path / "run"), *TINY, "--steps", "2", "--dataset", "photomatte",
               "--data-root", str(data), "--backgrounds", str(behind), "--num-workers", "0", "--val-every", "2"]
    assert main(command) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines()
             if not line.startswith("bgmatte train: warning:")]  # validating on the training images, said first
    assert len(lines) == 1 and lines[0].startswith(f"bgmatte train: error: {expected}"), lines
    assert "validation" not in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_worker_error_keeps_only_the_original_message():
    try:
        raise loop.DataError("/data/fgr/0002.png: damaged or truncated PNG")
    except loop.DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(loop.DataError) as raised:
        wrapped.reraise()
    assert str(raised.value) == "/data/fgr/0002.png: damaged or truncated PNG"


def test_pytorch_still_has_the_worker_shutdown_the_loop_relies_on():
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    assert callable(getattr(_MultiProcessingDataLoaderIter, "_shutdown_workers", None))


def test_a_loader_without_that_shutdown_is_warned_about():
    class Renamed:
        """A multi-process iterator of a PyTorch that renamed its clean-up."""

        _workers = ["worker"]

    with pytest.warns(UserWarning, match="cannot shut down the data loader's workers"):
        loop._shut_down(Renamed())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loop._shut_down(iter(torch.utils.data.DataLoader(range(2))))  # no workers: nothing to say


# -- options ----------------------------------------------------------------------------------


def test_learning_rates_per_part_follow_the_paper_and_can_be_overridden():
    refine = TrainOptions(stage="refine", out="x", lr={"refiner": 1e-3})
    groups = loop.parameter_groups(MattingRefine("mobilenetv2"), refine.learning_rates)
    assert {g["name"]: g["lr"] for g in groups} == {**PAPER_LEARNING_RATES["refine"], "refiner": 1e-3}
    assert PAPER_LEARNING_RATES["base"] == {"backbone": 1e-4, "aspp": 5e-4, "decoder": 5e-4}
    assert PAPER_LEARNING_RATES["refine"]["refiner"] == 3e-4
    assert {g["name"] for g in loop.parameter_groups(MattingBase("mobilenetv2"),
                                                     TrainOptions(stage="base", out="x").learning_rates)} \
        == {"backbone", "aspp", "decoder"}


def test_stage_defaults_for_crop_batch_and_refined_pixels():
    base = TrainOptions(stage="base", out="x")
    assert (base.crop_size, base.batch_size) == (256, 8)
    refine = TrainOptions(stage="refine", out="x")
    assert (refine.crop_size, refine.batch_size) == (512, 4)
    assert refine.refine_sample_pixels == scaled_sample_pixels(512)
    assert scaled_sample_pixels(1536) == 80_000 and scaled_sample_pixels(8) == 16
    model = loop.build_model(refine, "mobilenetv2")
    assert model.backbone_scale == 0.25 and model.refiner.mode == "sampling"
    assert model.refiner.sample_pixels == refine.refine_sample_pixels


@pytest.mark.parametrize("changes, message", [
    (dict(stage="middle"), "stage"),
    (dict(stage="refine", crop=66), "multiple of 4"),
    (dict(stage="refine", crop=40), "less than 16 pixels"),
    (dict(stage="base", lr={"refiner": 1e-3}), "refine stage only"),
    (dict(stage="base", lr={"head": 1e-3}), "unknown network parts"),
    (dict(stage="base", precision="fp8"), "precision"),
    (dict(stage="base", steps=0), "--steps"),
    # Found only once the model was built, as a problem of the validation set ("or pass --val-every 0").
    (dict(stage="base", dataset="photomat", data_root="d", backgrounds="b"),
     r"^unknown dataset 'photomat' \(choose from synthetic, videomatte, photomatte, aim\)$"),
    (dict(stage="base", lr={"aspp": 0.0}), "--lr-aspp must be a positive, finite rate, not 0.0"),
    (dict(stage="base", lr={"backbone": -1e-4}), "--lr-backbone must be a positive, finite rate, not -0.0001"),
    (dict(stage="base", lr={"decoder": math.nan}), "--lr-decoder must be a positive, finite rate, not nan"),
    # An infinite rate (--lr-backbone inf, or 1e400) trained a step that made every weight NaN, then stopped on 20
    # non-finite losses in a row, advising to lower the rates.
    (dict(stage="refine", lr={"refiner": math.inf}), "--lr-refiner must be a positive, finite rate, not inf"),
    # Beyond what torch's generators take: an "Overflow when unpacking long long" traceback once the model was built.
    (dict(stage="base", seed=2**64), r"^--seed must be a whole number from -2\*\*63 to 2\*\*63 - 1, not 1\d+$"),
    (dict(stage="base", seed=-2**63 - 1), r"^--seed must be a whole number from -2\*\*63 to 2\*\*63 - 1, not -9\d+$"),
])
def test_bad_options_are_refused_with_a_message(changes, message):
    with pytest.raises(BgmatteError, match=message):
        TrainOptions(**{"out": "x", **changes})


def test_a_seed_beyond_what_torch_takes_is_one_line_before_anything_is_made(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "base", "--out", str(out), *TINY, "--steps", "1", "--seed", str(2**70)]) == 2
    assert capsys.readouterr().err == ("bgmatte train: error: --seed must be a whole number from -2**63 to 2**63 - 1, "
                                       f"not {2**70}\n")
    assert not out.exists()
    for seed in (-2**63, 2**63 - 1):  # the ends of the range; seed + epoch, which the sampler seeds with, fits too
        TrainOptions(stage="base", out=out, seed=seed)


def test_one_image_per_process_is_refused_on_the_cpu(tmp_path):
    with pytest.raises(BgmatteError, match="batch norm"):
        loop.train(tiny_options(tmp_path, batch_size=1))


@pytest.mark.parametrize("extra, message", [
    (["--precision", "fp16"], "--precision fp16 needs a GPU"),
    (["--init", "missing.pth"], "missing.pth: checkpoint not found"),
    (["--log", "tensorboard"], "TensorBoard is not installed"),
])
def test_refusals_are_said_by_rank_0_alone(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    command = ["train", "base", "--out", str(tmp_path / "run"), *TINY, "--steps", "1", "--num-workers", "0", *extra]
    monkeypatch.setenv("RANK", "1")  # a helper process of a torchrun group: it exits without a word
    assert main(command) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(command) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bgmatte train: error: ") and message in lines[0], lines


def test_a_refusal_of_one_process_stops_them_all_and_rank_0_says_it(monkeypatch):
    runtime = loop.Runtime(torch.device("cpu"), rank=0, world_size=3)
    loop._refuse_together(loop.Runtime(torch.device("cpu")), None)  # nothing refused: nothing raised
    monkeypatch.setattr(loop.dist, "all_gather_object", lambda gathered, mine: gathered.__setitem__(
        slice(None), [mine, None, "this GPU has no bfloat16"]))
    with pytest.raises(loop.RunRefused, match="^process 2: this GPU has no bfloat16$"):
        loop._refuse_together(runtime, None)
    with pytest.raises(loop.RunRefused, match="^mine$"):
        loop._refuse_together(runtime, "mine")


def test_fp16_needs_a_gpu():
    with pytest.raises(BgmatteError, match="GPU"):
        loop.autocast_dtype("fp16", torch.device("cpu"))
    assert loop.autocast_dtype("auto", torch.device("cpu")) is None


def test_initial_weights_of_another_backbone_are_refused():
    state = {"backbone.layer3.5.conv1.weight": torch.zeros(1)}
    with pytest.raises(BgmatteError, match="resnet50"):
        loop.choose_backbone(TrainOptions(stage="base", out="x", backbone="mobilenetv2", init="w.pth"), state)
    assert loop.choose_backbone(TrainOptions(stage="base", out="x"), state) == "resnet50"


def test_a_base_checkpoint_fills_everything_but_the_refiner():
    base = MattingBase("mobilenetv2").state_dict()
    refine = MattingRefine("mobilenetv2")
    untouched = loop.load_initial_weights(refine, base, Path("base.safetensors"))
    assert untouched and all(key.startswith("refiner.") for key in untouched)
    assert torch.equal(refine.state_dict()["decoder.conv4.weight"], base["decoder.conv4.weight"])
    broken = {**base, "decoder.conv4.weight": torch.zeros(1)}
    with pytest.raises(BgmatteError, match="wrong shape"):
        loop.load_initial_weights(MattingBase("mobilenetv2"), broken, Path("broken.pth"))


@pytest.mark.parametrize("stage", ["base", "refine"])
def test_the_command_line_leaves_the_options_not_given_to_train_options(stage):
    args = build_parser().parse_args(["train", stage, "--out", "x"])
    options, given = training_options(args)
    assert options == TrainOptions(stage=stage, out=Path("x"))  # every default is TrainOptions' own
    assert given == {"stage", "out", "resume"}
    args = build_parser().parse_args(["train", stage, "--out", "x", "--quiet", "--save-every", "15m",
                                      "--lr-decoder", "1e-3", "--seed", "0", "--num-workers", "2"])
    options, given = training_options(args)
    assert not options.progress and (options.save_every, options.save_minutes) == (0, 15.0)
    assert options.lr == {"decoder": 1e-3}
    assert given == {"stage", "out", "resume", "progress", "save_every", "save_minutes", "lr", "seed",
                     "num_workers"}  # given, even at their default values


def test_the_help_says_that_a_train_samples_pool_is_made_once_and_that_the_last_step_validates(capsys):
    # --train-samples keeps the composites of the first N items as made once (one background and augmentation
    # each, for the whole run), and a run validates at its last step too; the help said neither.
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "composited and augmented once" in text
    assert "and at the last step" in text


def test_a_dataset_of_files_needs_its_folders_once_the_options_are_complete():
    with pytest.raises(BgmatteError, match="--dataset aim needs --data-root .* and --backgrounds"):
        TrainOptions(stage="base", out="x", dataset="aim", data_root="d")
    waiting = TrainOptions(stage="base", out="x", dataset="aim", resume=True)  # the run's folders come later
    with pytest.raises(BgmatteError, match="needs --data-root"):
        waiting.check_combinations()
    TrainOptions(stage="base", out="x", dataset="aim", data_root="d", backgrounds="b").check_combinations()


def test_save_every_takes_steps_or_minutes():
    assert parse_save_every("500") == (500, 0.0)
    assert parse_save_every("15m") == (0, 15.0)
    assert parse_save_every("1.5h") == (0, 90.0)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_save_every("often")


def test_tensorboard_logging_needs_tensorboard(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(BgmatteError, match="TensorBoard is not installed"):
        loop.check_logging(tiny_options(tmp_path, log="tensorboard"))


def test_tensorboard_events_are_written_when_it_is_installed(tmp_path):
    pytest.importorskip("tensorboard")
    loop.train(tiny_options(tmp_path, steps=1, train_samples=2, log="tensorboard", val_every=1))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "train.csv").is_file()  # CSV is written as well


def test_a_resumed_run_keeps_the_tensorboard_events_of_the_step_it_resumes_from(tmp_path, monkeypatch):
    # TensorBoard hides the events at and after a writer's purge_step (the step of its session start), so a run
    # resumed from step 2 must purge from step 3: purging from 2 hid the training loss and validation of step 2,
    # which the resumed run does not log again. (A stand-in writer: tensorboard need not be installed.)
    import types

    purges = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            purges.append(purge_step)

        def add_scalar(self, *args):
            pass

        def add_image(self, *args, **kwargs):
            pass

        def close(self):
            pass

    board = types.ModuleType("torch.utils.tensorboard")
    board.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", board)
    loop.train(tiny_options(tmp_path, steps=2, train_samples=2, log="tensorboard", val_every=2))
    loop.train(tiny_options(tmp_path, steps=3, train_samples=2, log="tensorboard", val_every=2, resume=True))
    assert purges == [None, 3]


@pytest.mark.parametrize("refused", [
    (["--batch-size", "1"], "leaves 1 image per process"),  # refused as the model is built
    (["--train-samples", "1"], "--train-samples 1 leaves 1 samples per process"),  # refused as the data is made
    (["--precision", "fp16"], "--precision fp16 needs a GPU"),
])
def test_a_run_whose_options_are_refused_creates_nothing(tmp_path, capsys, refused):
    """A refused run left its folder behind, with an empty samples/ and logs of a header only: nothing to lose, but
    nothing asked for either. Folders it made are removed, and only those: a folder that was there stays."""
    flags, problem = refused
    out = tmp_path / "runs" / "new"
    assert main(["train", "base", "--out", str(out), *TINY, "--steps", "1", "--num-workers", "0", "--val-every", "0",
                 *flags]) == 2
    assert problem in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    mine = tmp_path / "mine"
    (mine / "notes.txt").parent.mkdir()
    (mine / "notes.txt").write_text("kept")
    assert main(["train", "base", "--out", str(mine), *TINY, "--steps", "1", "--num-workers", "0", "--val-every", "0",
                 *flags]) == 2
    assert sorted(path.name for path in mine.iterdir()) == ["notes.txt"]


def test_what_a_refused_run_made_is_removed_unless_it_holds_more(tmp_path):
    out = tmp_path / "run"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"")
    (out / "samples").mkdir()
    (out / "train.csv").write_text("step,loss\n")
    (out / "valid.csv").write_text("step,loss\n4,0.5\n")  # rows: not a refused run's, kept
    loop._remove_made([out, out / "samples", out / "train.csv", out / "valid.csv", out / "tensorboard"])
    assert sorted(path.name for path in out.iterdir()) == ["valid.csv"]
    (out / "valid.csv").unlink()
    loop._remove_made([out])
    assert not out.exists()
