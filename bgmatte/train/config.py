"""The options of a training run, in one frozen dataclass, with the paper's defaults per stage.

The learning rates are those of BackgroundMattingV2's ``train_base.py`` and ``train_refine.py``
(Adam, constant rate, one rate per part of the network: the refiner learns fastest).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from bgmatte.errors import BgmatteError

STAGES = ("base", "refine")
PARTS = ("backbone", "aspp", "decoder", "refiner")
BASE_PARTS = PARTS[:3]  # the base network; --freeze-base holds these still
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
LOGGERS = ("csv", "tensorboard")
DATASETS = ("synthetic", "videomatte", "photomatte", "aim")
"""The training datasets `bgmatte.train.data.build_dataset` reads, by name (in any case)."""

PAPER_LEARNING_RATES: dict[str, dict[str, float]] = {
    "base": {"backbone": 1e-4, "aspp": 5e-4, "decoder": 5e-4},
    "refine": {"backbone": 5e-5, "aspp": 5e-5, "decoder": 1e-4, "refiner": 3e-4},
}
"""Adam learning rates per part and stage, as in the reference training scripts."""

DEFAULT_CROP = {"base": 256, "refine": 512}
"""Square crop side per stage when none is given (the reference used 256-512 and 1024-2048)."""

DEFAULT_BATCH = {"base": 8, "refine": 4}
"""Global batch per stage when none is given (the refine stage's crops are larger)."""

PAPER_SAMPLE_PIXELS = 80_000
PAPER_REFINE_CROP = 1536
"""The reference refined 80,000 pixels of crops 1024 to 2048 pixels wide (1536 on average); smaller
crops refine the same share of their pixels."""


def scaled_sample_pixels(crop: int) -> int:
    """The refiner's pixel budget for a square crop: the paper's 80,000 scaled by area, at least one 4x4 patch."""
    return max(16, round(PAPER_SAMPLE_PIXELS * (crop / PAPER_REFINE_CROP) ** 2))


@dataclass(frozen=True)
class TrainOptions:
    """Everything a training run needs; ``None`` means "the stage's default".

    Arguments:
        stage: ``base`` trains MattingBase on whole crops; ``refine`` trains MattingRefine
            (base network at ``backbone_scale``, refiner sampling ``sample_pixels``).
        out: the run's folder: ``last.safetensors``, ``best.safetensors``, ``state.pt``, logs, samples.
        dataset: a name ``bgmatte.train.data.build_dataset`` knows (``synthetic`` needs no files).
        data_root: the dataset's folder (for ``synthetic``, optional photographs used as textures).
        backgrounds: background images the real datasets are composited over (for ``synthetic``,
            photographs used as textures, like ``data_root``).
        backbone: ``mobilenetv2``, ``resnet50`` or ``resnet101``; None takes it from ``init`` or
            uses ``mobilenetv2``.
        steps: total optimiser steps of the run (a resumed run continues up to this).
        batch_size: the global batch, split evenly over the processes of a distributed run (None: the
            stage's, ``DEFAULT_BATCH``; the options hold the number once made).
        train_samples: train on the dataset's first this many items only (None: all), for example a
            fixed pool of synthetic samples, or one batch to overfit: each is composited and augmented once
            (epoch 0) and kept in memory, where a run over all items draws new ones every epoch.
        crop: square training crop side (a multiple of 4 for refine).
        init: weights to start from (``.pth`` or ``.safetensors``; a base checkpoint for refine is fine).
        resume: continue the run saved in ``out/state.pt`` exactly where it stopped. Options that must fit
            together are then checked by ``check_combinations`` once the run's own have filled the gaps.
        lr: learning rates per part (``backbone``, ``aspp``, ``decoder``, ``refiner``) overriding the paper's.
        freeze_base: refine stage: train the refiner alone, the base network (backbone, ASPP, decoder)
            kept as initialised, batch-norm statistics included, so that short refine runs on small
            crops cannot undo a longer base run.
        backbone_scale, sample_pixels: the refine stage's model settings (``sample_pixels`` None:
            the paper's 80,000 scaled to the crop).
        plate_color, plate_misalign: the share of samples whose plate (the background the model is given)
            differs in colour from the true background, and the share where it is slightly rotated and
            shifted (None: the paper's 0.8 and 0.3), in training and validation batches alike. Less teaches
            sharper edges against clean plates, more tolerance of drifting ones.
        precision: ``auto`` is bf16 on GPUs that have it, else fp16 with loss scaling, and fp32 on the CPU.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (under torchrun, each process takes its local GPU).
        num_workers: data loading processes per training process.
        seed: seeds the model's initialisation, the data stream and every random augmentation (from -2**63 to
            2**63 - 1, which torch's generators take, epochs added).
        val_every, val_samples: validate every so many steps, and at the last, on a fixed set of this many
            samples (0: never).
        save_every, save_minutes: write weights and state every so many steps and/or minutes (0: off);
            a run always saves at its end and when interrupted.
        log: ``csv`` (always written) or ``tensorboard`` (CSV plus TensorBoard, if it is installed).
        log_every: steps between training-loss log rows and progress lines.
        progress: print progress lines on stderr.
    """

    stage: str
    out: Path
    dataset: str = "synthetic"
    data_root: Path | None = None
    backgrounds: Path | None = None
    backbone: str | None = None
    steps: int = 10_000
    batch_size: int | None = None
    train_samples: int | None = None
    crop: int | None = None
    init: Path | None = None
    resume: bool = False
    lr: dict[str, float] = field(default_factory=dict)
    freeze_base: bool = False
    backbone_scale: float = 0.25
    sample_pixels: int | None = None
    plate_color: float | None = None
    plate_misalign: float | None = None
    precision: str = "auto"
    device: str = "auto"
    num_workers: int = 2
    seed: int = 0
    val_every: int = 500
    val_samples: int = 16
    save_every: int = 500
    save_minutes: float = 0.0
    log: str = "csv"
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        for name in ("data_root", "backgrounds", "init"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "lr", dict(self.lr))
        if self.stage not in STAGES:
            raise BgmatteError(f"unknown training stage {self.stage!r}: choose one of {', '.join(STAGES)}")
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", DEFAULT_BATCH[self.stage])
        if self.precision not in PRECISIONS:
            raise BgmatteError(f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.dataset.lower() not in DATASETS:  # before a model is built, not as the validation set's problem
            raise BgmatteError(f"unknown dataset {self.dataset!r} (choose from {', '.join(DATASETS)})")
        if self.log not in LOGGERS:
            raise BgmatteError(f"unknown log format {self.log!r}: choose one of {', '.join(LOGGERS)}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise BgmatteError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        for name in ("num_workers", "val_every", "val_samples", "save_every", "save_minutes"):
            if getattr(self, name) < 0:
                raise BgmatteError(f"--{name.replace('_', '-')} must not be negative, not {getattr(self, name)}")
        if not -2**63 <= self.seed < 2**63:  # torch's generators take 64 bits; the sampler seeds with seed + epoch
            raise BgmatteError(f"--seed must be a whole number from -2**63 to 2**63 - 1, not {self.seed}")
        if self.log_every < 1:
            raise BgmatteError(f"--log-every must be at least 1, not {self.log_every}")
        crop = self.crop_size
        if crop < 32:
            raise BgmatteError(f"--crop {crop} is too small: at least 32")
        if self.stage == "refine" and crop % 4:
            raise BgmatteError(f"--crop {crop}: the refine stage needs a multiple of 4")
        if self.stage == "refine" and not 0 < self.backbone_scale <= 0.5:
            raise BgmatteError(f"--backbone-scale must be in (0, 0.5], not {self.backbone_scale}")
        unknown = sorted(set(self.lr) - set(PARTS))
        if unknown:
            raise BgmatteError(f"unknown network parts in learning rates: {', '.join(unknown)} "
                               f"(parts: {', '.join(PARTS)})")
        if self.stage == "base" and "refiner" in self.lr:
            raise BgmatteError("the base stage has no refiner: --lr-refiner applies to the refine stage only")
        if self.freeze_base and self.stage != "refine":
            raise BgmatteError("--freeze-base applies to the refine stage only")
        for part, rate in self.lr.items():  # an infinite rate would turn every weight to NaN at the first step
            if not 0 < rate < math.inf:
                raise BgmatteError(f"--lr-{part} must be a positive, finite rate, not {rate}")
        if self.train_samples is not None and self.train_samples < 1:
            raise BgmatteError(f"--train-samples must be at least 1, not {self.train_samples}")
        for name in ("plate_color", "plate_misalign"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise BgmatteError(f"--{name.replace('_', '-')} is a share of samples, from 0 to 1, not {value}")
        if self.sample_pixels is not None and self.sample_pixels < 16:
            raise BgmatteError(f"--sample-pixels must be at least 16 (one 4x4 patch), not {self.sample_pixels}")
        if not self.resume:
            self.check_combinations()

    def check_combinations(self) -> None:
        """Refuse options that are fine one by one but not together. A resumed run checks them only once the
        options left out are the run's own, since the defaults standing in for them until then may not fit."""
        if self.stage == "refine" and self.crop_size * self.backbone_scale < 16:
            raise BgmatteError(f"--crop {self.crop_size} at backbone scale {self.backbone_scale} leaves the base "
                               "network less than 16 pixels; use a larger crop")
        if self.freeze_base and set(self.lr) - {"refiner"}:
            raise BgmatteError("with --freeze-base only the refiner learns: give --lr-refiner alone")
        if self.freeze_base and self.init is None:
            raise BgmatteError("--freeze-base keeps the base network as --init gives it: give --init (a base "
                               "checkpoint), else the refiner would learn on a base network of random weights")
        if self.dataset.lower() != "synthetic" and (self.data_root is None or self.backgrounds is None):
            raise BgmatteError(f"--dataset {self.dataset} needs --data-root (the dataset's folder) and "
                               "--backgrounds (a folder of background images)")

    @property
    def crop_size(self) -> int:
        """The crop side in use: the given one or the stage's default."""
        return self.crop if self.crop is not None else DEFAULT_CROP[self.stage]

    @property
    def learning_rates(self) -> dict[str, float]:
        """Learning rate per part of this stage's network: the paper's, overridden by ``lr``."""
        return {**PAPER_LEARNING_RATES[self.stage], **self.lr}

    @property
    def refine_sample_pixels(self) -> int:
        """The refiner's pixel budget per image during training."""
        return self.sample_pixels if self.sample_pixels is not None else scaled_sample_pixels(self.crop_size)

    def to_record(self) -> dict[str, object]:
        """The options as plain values (str, int, float, bool, None, dict), for logs and the saved state."""
        record: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            record[f.name] = str(value) if isinstance(value, Path) else value
        return record
