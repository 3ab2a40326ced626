"""The training engine: one function, ``train(options)``, for both stages, one process or many.

A run is a sequence of optimiser steps over batches that depend only on the seed and the step, so
that a run saved at step k and resumed continues bit for bit as if it had never stopped. Several
processes (``torchrun``) train one model with PyTorch's DistributedDataParallel; on CUDA the
batch-norm statistics are shared with SyncBatchNorm, while on the CPU (gloo, where PyTorch has no
SyncBatchNorm) each process normalises with its own share of the batch. Only rank 0 writes files.

Files in the run's folder: ``last.safetensors`` and ``best.safetensors`` (weights ``load_model``
reads), ``state.pt`` (model, optimiser, loss scaler, step, random states, the log row in progress; read with
``weights_only=True``), ``train.csv`` and ``valid.csv`` (and TensorBoard events on request) and
``samples/step_NNNNNNN.png``. A run refused before its first step (its options, its data) removes the folders and
empty logs it created, leaving none of them behind.
"""
from __future__ import annotations

import csv
import importlib
import math
import os
import random
import re
import signal
import stat
import sys
import threading
import time
import warnings
from collections.abc import Collection, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import timedelta
from itertools import count, islice
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from bgmatte.errors import BgmatteError, Terminated
from bgmatte.io.files import write_through_temporary
from bgmatte.io.images import write_png
from bgmatte.model.build import detect_backbone, read_state_dict, resolve_device, save_weights
from bgmatte.model.matting import BACKBONES, MattingBase, MattingRefine
from bgmatte.train.config import BASE_PARTS, PARTS, STAGES, TrainOptions
from bgmatte.train.losses import BASE_TERMS, REFINE_TERMS, base_loss, refine_loss

STATE_FORMAT = 1
VALIDATION_SEED = 20_210_620
"""Seeds the fixed validation set, apart from the training seed so that every run validates alike."""
MAX_NONFINITE_STEPS = 20
SAMPLE_ROWS = 4


@dataclass(frozen=True)
class TrainResult:
    """What a finished run reports: the steps done, the last training loss, the best validation loss."""

    step: int
    loss: float
    best_valid_loss: float | None
    out: Path


# --------------------------------------------------------------------------------------------
# Processes and devices
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Where this process trains: its device and its place among the processes of the run."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether other processes train with this one."""
        return self.world_size > 1


def start_runtime(device: str) -> tuple[Runtime, bool]:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on GPUs, gloo on
    the CPU), or run alone; returns the runtime and whether this call created the group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Runtime(resolve_device(device)), False
    if not dist.is_available():
        raise BgmatteError("this PyTorch build has no torch.distributed, so it cannot train on several processes")
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise BgmatteError(f"process {rank} wants GPU {local_rank}, but this machine has "
                               f"{torch.cuda.device_count()}: start at most that many processes per node")
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    created = not dist.is_initialized()
    if created:
        if resolved.type == "cuda":
            dist.init_process_group("nccl", device_id=resolved)
        else:
            dist.init_process_group("gloo")
    return Runtime(resolved, dist.get_rank(), local_rank, dist.get_world_size()), created


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast type for a precision setting on a device, or None for plain fp32."""
    if precision == "fp32":
        return None
    if device.type != "cuda":
        if precision == "fp16":
            raise BgmatteError("--precision fp16 needs a GPU; on the CPU use fp32 (or bf16)")
        return torch.bfloat16 if precision == "bf16" else None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise BgmatteError("--precision bf16: this GPU has no bfloat16; use fp16")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's random module."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stream_seed(seed: int, rank: int, index: int) -> int:
    """A 63-bit seed for one item of a random stream, different for every (seed, rank, index)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % 2**64
    mixed ^= mixed >> 31
    return mixed % 2**63


# --------------------------------------------------------------------------------------------
# The model and its optimiser
# --------------------------------------------------------------------------------------------


def choose_backbone(options: TrainOptions, init_state: dict[str, Tensor] | None) -> str:
    """The backbone to train: the one asked for, else the one of the initial weights, else mobilenetv2."""
    detected = detect_backbone(init_state) if init_state is not None else None
    backbone = options.backbone or detected or "mobilenetv2"
    if backbone not in BACKBONES:
        raise BgmatteError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
    if detected is not None and detected != backbone:
        raise BgmatteError(f"{options.init}: holds {detected} weights, but --backbone {backbone} was asked for")
    return backbone


def build_model(options: TrainOptions, backbone: str, refine_kernel_size: int = 3) -> nn.Module:
    """The stage's network with fresh weights. The refine stage refines exactly ``sample_pixels``
    per image (oversampling prevention off), so that the refiner always learns and every process
    of a distributed run uses every parameter."""
    if options.stage == "base":
        return MattingBase(backbone)
    return MattingRefine(backbone, backbone_scale=options.backbone_scale, refine_mode="sampling",
                         refine_sample_pixels=options.refine_sample_pixels, refine_kernel_size=refine_kernel_size,
                         refine_prevent_oversampling=False)


def fit_problem(expected: dict[str, Tensor], state: dict[str, Tensor], optional: tuple[str, ...] = ()) -> str:
    """What keeps tensors ``state`` from loading into a model whose own are ``expected`` (its keys missing, keys it
    lacks, shapes that differ), in a few words; empty if they fit. Missing keys that start with one of ``optional``
    do not count."""
    missing = sorted(k for k in expected.keys() - state.keys() if not k.startswith(optional))
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape)
    return "; ".join(f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
                     ((missing, "missing keys"), (unexpected, "unexpected keys"), (wrong, "keys of the wrong shape"))
                     if keys)


def load_initial_weights(model: nn.Module, state: dict[str, Tensor], source: Path) -> list[str]:
    """Load a checkpoint into the stage's model: refiner weights are dropped for the base stage and may be
    missing for the refine stage (it then starts from random); everything else must fit. Returns what
    was left at its initial value."""
    expected = model.state_dict()
    if not any(k.startswith("refiner.") for k in expected):
        state = {k: v for k, v in state.items() if not k.startswith("refiner.")}
    has_refiner = any(k.startswith("refiner.") for k in state)
    problem = fit_problem(expected, state, optional=() if has_refiner else ("refiner.",))
    if problem:
        raise BgmatteError(f"{source}: does not fit a {type(model).__name__} model: {problem}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)
    return sorted(expected.keys() - state.keys())


def parameter_groups(model: nn.Module, learning_rates: dict[str, float]) -> list[dict]:
    """One Adam parameter group per part of the network (backbone, aspp, decoder, refiner) at its own rate;
    parts whose parameters are all frozen (``requires_grad`` off) get none."""
    groups = []
    for part in PARTS:
        module = getattr(model, part, None)
        if module is not None:
            params = [param for param in module.parameters() if param.requires_grad]
            if params:
                groups.append({"params": params, "lr": learning_rates[part], "name": part})
    covered = sum(len(g["params"]) for g in groups)
    if covered != sum(param.requires_grad for param in model.parameters()):
        raise RuntimeError("some model parameters belong to no learning-rate group")
    return groups


def freeze_base(model: nn.Module) -> None:
    """Hold the base network still: no gradients, and its batch norms in eval mode (see `train_mode`)."""
    for part in BASE_PARTS:
        getattr(model, part).requires_grad_(False)


def train_mode(model: nn.Module) -> None:
    """Training mode, except for parts with nothing to learn, whose batch-norm statistics must not move."""
    model.train()
    for part in BASE_PARTS:
        module = getattr(model, part, None)
        if module is not None and not any(param.requires_grad for param in module.parameters()):
            module.eval()


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class ResumableSampler(Sampler[tuple[int, int]]):
    """(epoch, index) pairs for one process, epoch after epoch without end, starting at sample ``start``.

    Each epoch is PyTorch's ``DistributedSampler`` shuffle and shard for that epoch; a resumed run
    starts in the middle of an epoch and sees the same items as the uninterrupted run. The epoch
    travels with the index because loader workers hold their own copies of the dataset.
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int, seed: int, start: int = 0) -> None:
        self.inner = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                        drop_last=True)
        self.start = start
        if len(self.inner) == 0:
            raise BgmatteError(f"the dataset has {len(dataset)} samples, fewer than the {world_size} processes")

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_epoch = len(self.inner)
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            self.inner.set_epoch(epoch)
            for index in islice(iter(self.inner), offset, None):
                yield epoch, index
            epoch, offset = epoch + 1, 0


class DataError(BgmatteError):
    """A file's problem met while reading a training item (a BgmatteError of the dataset's), stopping the run.

    A loader worker hands it to the training process through PyTorch, which raises it there by calling this
    class with its own report: a header line and the worker's whole traceback, ending with this class's name
    and the message. The message alone is kept from that, so that the user reads one line, not a traceback.
    """

    def __init__(self, message: str) -> None:
        marker = f"\n{DataError.__module__}.{DataError.__qualname__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class EpochItems(Dataset):
    """Reads item ``(epoch, index)`` of a dataset, first telling it the epoch (``set_epoch``) if it cares,
    so that each epoch draws new augmentations; a file it cannot read becomes a `DataError`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Tensor]:
        epoch, index = key
        inner = self.dataset.dataset if isinstance(self.dataset, Subset) else self.dataset
        if hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)
        try:
            return self.dataset[index]
        except BgmatteError as exc:
            raise DataError(str(exc)) from None


def open_dataset(options: TrainOptions, split: str, seed: int, length: int | None = None,
                 used: int | None = None, check: bool = True) -> Dataset:
    """The run's dataset (``bgmatte.train.data.build_dataset``) for a split, items at the crop size; `used`, the
    number of its first items read, if no others are (only their files are checked); `check` False, files unchecked."""
    from bgmatte.train.data import build_dataset, default_augment

    changes = {name: value for name, value in (("plate_color_probability", options.plate_color),
                                               ("plate_affine_probability", options.plate_misalign))
               if value is not None}
    augment = replace(default_augment(options.dataset), **changes) if changes else None
    return build_dataset(options.dataset, options.data_root, split=split, size=options.crop_size,
                         backgrounds=options.backgrounds, seed=seed, length=length, augment=augment, used=used,
                         check=check)


CHECK_WAIT = timedelta(hours=6)
"""How long processes wait for each other's set-up: rank 0's check of the headers of a few hundred thousand files on
a slow disk, or a large --train-samples pool, may take longer than the run's collectives wait (10 minutes, NCCL)."""


@contextmanager
def _long_wait(runtime: Runtime) -> Iterator[None]:
    """Set-up work (some processes', or rank 0's alone) that the others wait for up to `CHECK_WAIT`, in a gloo group
    of their own, not in a collective that would give up sooner. Every process must enter it, and leaves it even when
    its work raises."""
    waiting = dist.new_group(backend="gloo", timeout=CHECK_WAIT) if runtime.distributed else None
    try:
        yield
    finally:
        if waiting is not None:
            dist.barrier(group=waiting)
            dist.destroy_process_group(waiting)


def open_training_dataset(options: TrainOptions, runtime: Runtime) -> Dataset:
    """The training dataset, its files' headers checked before step 1 by rank 0 alone, not once per process.

    The others open it unchecked and wait for rank 0 to finish (`_long_wait`); then every process stops on
    rank 0's refusal (or on its own, if it could not even open the dataset), said once by rank 0, or goes on
    compositing over the backgrounds rank 0 kept (the check leaves out those too small).
    """
    dataset, refusal = None, None
    with _long_wait(runtime):
        try:
            dataset = open_dataset(options, "train", options.seed, options.train_samples, check=runtime.is_main)
        except BgmatteError as exc:
            refusal = str(exc)
    _refuse_together(runtime, refusal)
    backgrounds = getattr(dataset, "backgrounds", None)  # the same in every process: the dataset's kind is an option
    if runtime.distributed and backgrounds is not None:
        kept = [backgrounds.paths if runtime.is_main else None]
        dist.broadcast_object_list(kept, src=0)
        backgrounds.paths = kept[0]
    return dataset


def _to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in ("src", "bgr", "pha", "fgr")}


def training_batches(options: TrainOptions, runtime: Runtime, per_process: int, start_step: int
                     ) -> Iterator[dict[str, Tensor]]:
    """This process's batches from batch ``start_step`` on, on its device (the run's step, plus the batches that
    non-finite losses skipped).

    With ``train_samples``, a fixed pool of items is made once and kept in memory (the process's share
    of it under torchrun). Otherwise synthetic data on a GPU is generated there, a whole batch at a
    time from a generator seeded by (seed, rank, step), so no step waits on the CPU; and any other
    case reads the dataset's items, each a function of (seed, epoch, index), through a DataLoader,
    in an order fixed by the seed. Every process calls it at once: rank 0 checks the files for all
    (`open_training_dataset`), and a dataset too small for the processes or their batches is refused by all.
    """
    dataset = open_training_dataset(options, runtime)
    refusal, sampler = None, None
    try:
        if options.train_samples is not None:
            share = _pool_share(dataset, options, runtime, per_process)
        elif runtime.device.type != "cuda" or not hasattr(dataset, "make_batch"):
            sampler = ResumableSampler(dataset, runtime.rank, runtime.world_size, options.seed,
                                       start_step * per_process)
    except BgmatteError as exc:
        refusal = str(exc)
    _refuse_together(runtime, refusal)
    if options.train_samples is not None:
        pool = _shared_pool(dataset, share, options, runtime, per_process)
        return _pooled_batches(pool, len(share), options, runtime, per_process, start_step)
    if sampler is None:
        return generated_batches(dataset, options.seed, runtime, per_process, start_step)
    # Worker seeds come from this generator, not from the global one, whose state a resumed run restores.
    generator = torch.Generator().manual_seed(stream_seed(options.seed, runtime.rank, start_step))
    loader = DataLoader(EpochItems(dataset), batch_size=per_process, sampler=sampler,
                        num_workers=options.num_workers, pin_memory=runtime.device.type == "cuda", drop_last=True,
                        generator=generator, worker_init_fn=_ignore_stop_signals if options.num_workers else None)
    return _loaded_batches(loader, runtime.device)


def _loaded_batches(loader: DataLoader, device: torch.device) -> Iterator[dict[str, Tensor]]:
    """A DataLoader's batches on the device; its workers are shut down however the iteration ends."""
    iterator = iter(loader)
    try:
        for batch in iterator:
            yield _to_device(batch, device)
    finally:
        _shut_down(iterator)


def _shut_down(iterator: Iterator) -> None:
    """Stop a DataLoader iterator's workers now and wait for them. Left to garbage collection, they may
    outlive the run: the exception PyTorch re-raises from a worker holds the iterator in a reference cycle,
    and at exit Python's multiprocessing then waits for the workers, which ignore SIGTERM, forever."""
    shutdown = getattr(iterator, "_shutdown_workers", None)  # PyTorch's own clean-up; absent without workers
    if shutdown is not None:
        shutdown()
    elif getattr(iterator, "_workers", None):  # PyTorch renamed it: say so, rather than hang at exit unexplained
        warnings.warn("cannot shut down the data loader's workers (this PyTorch's loader has no _shutdown_workers); "
                      "after an error the run may not exit until they are stopped", stacklevel=2)


def generated_batches(dataset, seed: int, runtime: Runtime, per_process: int, start_step: int
                      ) -> Iterator[dict[str, Tensor]]:
    """Whole batches made on the device by ``dataset.make_batch``, each from a generator seeded by
    (seed, rank, step): nothing crosses from the CPU, and a resumed run makes the same batches."""
    generator = torch.Generator(device=runtime.device)
    for step in count(start_step):
        generator.manual_seed(stream_seed(seed, runtime.rank, step))
        yield _to_device(dataset.make_batch(per_process, runtime.device, generator), runtime.device)


POOL_KEYS = ("src", "bgr", "pha", "fgr")


def make_pool(dataset: Dataset, indices: list[int], runtime: Runtime, num_workers: int, chunk: int
              ) -> dict[str, Tensor]:
    """Items ``indices`` of a dataset stacked into fp16 tensors on the device (half the memory of fp32 and
    finer than 8-bit images), made once by a DataLoader's workers; the global random state is untouched."""
    parts: dict[str, list[Tensor]] = {key: [] for key in POOL_KEYS}
    with preserved_random_state():
        loader = DataLoader(EpochItems(Subset(dataset, indices)), batch_size=chunk,
                            sampler=[(0, position) for position in range(len(indices))], num_workers=num_workers,
                            worker_init_fn=_ignore_stop_signals if num_workers else None)
        for batch in _loaded_batches(loader, torch.device("cpu")):
            for key in POOL_KEYS:
                parts[key].append(batch[key].to(runtime.device, torch.float16))
    return {key: torch.cat(values) for key, values in parts.items()}


def _pool_share(dataset: Dataset, options: TrainOptions, runtime: Runtime, per_process: int) -> list[int]:
    """The items of the `--train-samples` pool that this process keeps; refused if they do not fill its batch."""
    total = min(options.train_samples, len(dataset))
    indices = list(range(runtime.rank, total, runtime.world_size))
    if len(indices) < per_process:
        raise BgmatteError(f"--train-samples {options.train_samples} leaves {len(indices)} samples per process, "
                           f"fewer than its batch of {per_process}")
    return indices


def _shared_pool(dataset: Dataset, indices: list[int], options: TrainOptions, runtime: Runtime, per_process: int
                 ) -> dict[str, Tensor]:
    """This process's `--train-samples` pool (`make_pool`), made by every process before step 1; a file that one of
    them cannot read stops them all, said once, rather than leaving the others waiting for its batches."""
    started = time.monotonic()
    pool, refusal = None, None
    with _long_wait(runtime):  # a large pool may take longer to make than a collective waits
        try:
            pool = make_pool(dataset, indices, runtime, options.num_workers, per_process)
        except DataError as exc:
            refusal = f"{exc} (repair or remove that file)"
    _refuse_together(runtime, refusal, DataRefused)
    if runtime.is_main and options.progress:
        megabytes = sum(t.numel() * t.element_size() for t in pool.values()) / 2**20
        print(f"bgmatte train: made a pool of {len(indices)} samples per process ({megabytes:.0f} MiB) in "
              f"{time.monotonic() - started:.1f} s", file=sys.stderr)
    return pool


def _pooled_batches(pool: dict[str, Tensor], size: int, options: TrainOptions, runtime: Runtime, per_process: int,
                    start_step: int) -> Iterator[dict[str, Tensor]]:
    """Batches drawn from a pool of `size` items, in an order fixed by the seed and the rank."""
    sampler = ResumableSampler(range(size), 0, 1, stream_seed(options.seed, runtime.rank, 0), start_step * per_process)
    positions = (index for _, index in sampler)
    while True:
        chosen = torch.tensor(list(islice(positions, per_process)), device=runtime.device)
        yield {key: pool[key][chosen].float() for key in POOL_KEYS}


def validation_batches(options: TrainOptions, runtime: Runtime, batch_size: int) -> list[dict[str, Tensor]]:
    """The fixed validation set, in batches on the device: the same samples at every validation and in every
    run with the same dataset and crop (whatever the training seed). The global random state is left as it was."""
    if options.val_samples == 0 or options.val_every == 0:
        return []
    with preserved_random_state():
        try:
            dataset = open_dataset(options, "valid", VALIDATION_SEED, options.val_samples, used=options.val_samples)
        except BgmatteError as exc:
            try:  # the training data's own problem (an empty data root, say) is said as such: --val-every 0 won't help
                open_dataset(options, "train", options.seed, options.train_samples, check=False)
            except BgmatteError as training:
                raise BgmatteError(str(training)) from None
            raise BgmatteError(f"{exc} (for the validation set; or pass --val-every 0)") from None
        total = min(options.val_samples, len(dataset))
        items = [dataset[i] for i in range(total)]
    batches = []
    for first in range(0, total, batch_size):
        chunk = items[first:first + batch_size]
        batches.append(_to_device({k: torch.stack([item[k] for item in chunk])
                                   for k in ("src", "bgr", "pha", "fgr")}, runtime.device))
    return batches


# --------------------------------------------------------------------------------------------
# Random state
# --------------------------------------------------------------------------------------------


def capture_random_state() -> dict[str, object]:
    """Torch (CPU and CUDA), numpy and Python random states as tensors and plain values, so that
    ``torch.load(weights_only=True)`` reads them back."""
    version, mt_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, object] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's GPU only: no context on the others
    return state


def restore_random_state(state: dict[str, object]) -> None:
    """Undo ``capture_random_state``."""
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextmanager
def preserved_random_state():
    """Run a block without changing the global random states."""
    saved = capture_random_state()
    try:
        yield
    finally:
        restore_random_state(saved)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


CHECKPOINT_FILES = ("last.safetensors", "best.safetensors", "state.pt")
"""The files a run rewrites as it goes, each through a temporary ``.NAME.PID.tmp`` beside it."""
LOG_FILES = ("train.csv", "valid.csv")
"""The CSV logs, rewritten the same way when a run starts or resumes (and appended to as it goes)."""
_OUR_TEMPORARY = re.compile(r"\.(" + "|".join(re.escape(name) for name in CHECKPOINT_FILES + LOG_FILES)
                            + r")\.(\d+)\.tmp")
_SAFETENSORS_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")
"""The name safetensors gave its own temporary file when it wrote our weights straight to their path."""


def _own_temporary(path: Path) -> Path:
    """The temporary name this process writes ``path`` under (`CHECKPOINT_FILES`, `LOG_FILES`,
    `remove_stale_temporaries`)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_model_weights(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Write ``load_model``-ready safetensors weights atomically, under this process's own temporary name."""
    save_weights(model, path, metadata=metadata, temporary=_own_temporary(path))


def save_training_state(path: Path, state: dict[str, object]) -> None:
    """Write the resumable state atomically."""
    write_through_temporary(path, lambda file: torch.save(state, file), "the training state",
                            temporary=_own_temporary(path))


def _process_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (this process excepted: it is not saving yet)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # there, but someone else's
        return True
    return True


def _holds_bgmatte_weights(path: Path) -> bool:
    """Whether a file starts like the safetensors weights a run writes (a header naming the bgmatte format)."""
    with path.open("rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = file.read(min(size, 1 << 20))
    return header.startswith(b"{") and b'"__metadata__"' in header and b'"format":"bgmatte"' in header


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files that interrupted saves left in a run's folder, and return them.

    Only two kinds are touched: ``.NAME.PID.tmp`` for a checkpoint or log file whose process no longer runs here,
    and ``.tmpXXXXXX`` files holding bgmatte weights, which safetensors itself made for earlier versions.
    Anything else, links included, is left alone; a file that cannot be removed stays too.
    """
    removed = []
    for path in sorted(folder.iterdir()):
        try:
            if not stat.S_ISREG(path.lstat().st_mode):
                continue
            ours = _OUR_TEMPORARY.fullmatch(path.name)
            if ours is not None:
                stale = not _process_alive(int(ours.group(2)))
            else:
                stale = _SAFETENSORS_TEMPORARY.fullmatch(path.name) is not None and _holds_bgmatte_weights(path)
            if stale:
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed


def best_weights_loss(path: Path, stage: str, backbone: str) -> float | None:
    """The validation loss that a run's ``best.safetensors`` records in its metadata, or None where there is no such
    file, it cannot be read, or it is not the weights of a ``stage`` run of ``backbone``. A run killed after writing
    it and before saving its state leaves a state whose best loss is older than the file's."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as weights:
            metadata = weights.metadata() or {}
        loss = float(metadata["valid_loss"])
    except Exception:  # noqa: BLE001 - damaged, or not ours: it records no best to keep
        return None
    if metadata.get("format") != "bgmatte" or metadata.get("stage") != stage or metadata.get("backbone") != backbone:
        return None
    return loss if math.isfinite(loss) else None


def load_training_state(path: Path) -> dict[str, object]:
    """Read a state written by ``save_training_state``, refusing anything but tensors and plain containers."""
    if not path.is_file():
        raise BgmatteError(f"{path}: no training state to resume (start without --resume)")
    try:
        with path.open("rb") as file:
            head = file.read(4)
    except OSError as exc:
        raise BgmatteError(f"{path}: cannot read the training state ({exc.strerror or exc})") from None
    if not head:
        raise BgmatteError(f"{path}: not a readable bgmatte training state: is empty")
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or its older pickle
        raise BgmatteError(f"{path}: not a readable bgmatte training state: not a file that torch.save writes")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the file's problem, reported as such
        text = str(exc).strip()
        first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(exc).__name__  # not a paragraph
        if "weights only load failed" in text.lower():
            problem = f"holds objects other than tensors and plain data, which are not loaded ({first})"
        elif head.startswith(b"PK"):
            problem = f"cut short or damaged ({first})"
        else:
            problem = first
        raise BgmatteError(f"{path}: not a readable bgmatte training state: {problem}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise BgmatteError(f"{path}: not a bgmatte training state of format {STATE_FORMAT}")
    if state.get("stage") not in STAGES:
        raise BgmatteError(f"{path}: is the state of neither a base nor a refine run ({_entry('stage', state)})")
    if state.get("backbone") not in BACKBONES:
        raise BgmatteError(f"{path}: names none of the backbones {', '.join(BACKBONES)} "
                           f"({_entry('backbone', state)})")
    return state


def _entry(key: str, state: dict[str, object]) -> str:
    """A state's entry in words, for messages: ``its step is 'one'``, or ``it has no step``."""
    if key not in state:
        return f"it has no {key}"
    value = state[key]
    if value is None or isinstance(value, (str, int, float)):
        return f"its {key} is {value!r}"[:120]
    return f"its {key} is a {type(value).__name__}"  # a container's whole text would run on for pages


def _is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def state_entries_problem(state: dict[str, object]) -> str | None:
    """What in a training state is missing or of the wrong kind for a run to resume from it (before anything is
    built from it), in a few words; None if nothing. Whether its tensors fit the model is `_Run._restore`'s check."""
    wanted = (("refine_kernel_size", lambda v: v in (1, 3), "1 or 3"),
              ("step", lambda v: _is_whole(v) and v >= 0, "a whole number of steps"),
              ("best", lambda v: _is_number(v) and not math.isnan(v), "a validation loss"),
              ("world_size", lambda v: _is_whole(v) and v >= 1, "a number of processes"),
              ("model", lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, Tensor)
                                                              for k, t in v.items()), "tensors by name"),
              ("optimizer", lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
               and isinstance(v.get("param_groups"), list)
               and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in v["param_groups"]),
               "an optimiser's state and parameter groups"),
              ("random", lambda v: isinstance(v, list) and len(v) == state.get("world_size")
               and all(isinstance(r, dict) for r in v), "a random state per process"))
    for key, fits, what in wanted:
        if key not in state or not fits(state[key]):
            if key not in state:
                return f"it has no {key} ({what})"
            if key == "model" and isinstance(state[key], dict):
                name = next(k for k, t in state[key].items() if not (isinstance(k, str) and isinstance(t, Tensor)))
                return f"its model's {name!r} is a {type(state[key][name]).__name__}, not a tensor"[:200]
            if key == "optimizer" and isinstance(state[key], dict):
                return "its optimizer lacks a dict of per-parameter state or a list of param_groups"
            return f"{_entry(key, state)}, not {what}"
    optional = (("batches", lambda v: _is_whole(v) and v >= state["step"], "a number of batches"),
                ("scaler", lambda v: isinstance(v, dict), "a loss scaler's state"),
                ("log_window", lambda v: isinstance(v, dict) and _is_whole(v.get("steps", 0))
                 and isinstance(v.get("sums", {}), dict) and _is_number(v.get("seconds", 0.0))
                 and all(isinstance(k, str) and _is_number(x) for k, x in v.get("sums", {}).items()),
                 "the steps, loss sums and seconds of a log row"))
    for key, fits, what in optional:  # states of earlier versions may lack them
        if key in state and not fits(state[key]):
            return f"{_entry(key, state)}, not {what}"
    return None


# --------------------------------------------------------------------------------------------
# Steps, validation, images
# --------------------------------------------------------------------------------------------


def stage_loss(stage: str, outputs: tuple[Tensor, ...], batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """The paper's loss of one stage from the model's outputs (cast to fp32) and the batch."""
    outputs = tuple(o.float() for o in outputs)
    if stage == "base":
        pha, fgr, err = outputs[:3]
        return base_loss(pha, fgr, err, batch["pha"], batch["fgr"])
    return refine_loss(*outputs[:5], batch["pha"], batch["fgr"])


def loss_terms(stage: str) -> tuple[str, ...]:
    """The names of a stage's loss terms, in log order."""
    return BASE_TERMS if stage == "base" else REFINE_TERMS


@torch.no_grad()
def validate(model: nn.Module, batches: list[dict[str, Tensor]], stage: str, amp: torch.dtype | None
             ) -> tuple[dict[str, float], tuple[Tensor, ...] | None]:
    """Mean loss, loss terms, alpha SAD (per image, in thousands) and alpha MSE over the validation batches,
    in eval mode; returns them and the outputs of the first batch (for the sample images)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    totals: dict[str, float] = {}
    images = 0
    first = None
    try:
        for batch in batches:
            with torch.autocast(batch["src"].device.type, dtype=amp or torch.float32, enabled=amp is not None):
                outputs = model(batch["src"], batch["bgr"])
            outputs = tuple(o.float() for o in outputs)
            loss, terms = stage_loss(stage, outputs, batch)
            n = batch["src"].shape[0]
            difference = outputs[0] - batch["pha"]
            metrics = {"loss": float(loss), **terms,
                       "sad": float(difference.abs().flatten(1).sum(1).mean()) / 1000.0,
                       "mse": float(difference.pow(2).mean())}
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value * n
            images += n
            if first is None:
                first = outputs
    finally:
        for module, mode in modes:  # each as it was: frozen parts stay in eval mode
            module.training = mode
    return {key: value / max(images, 1) for key, value in totals.items()}, first


def sample_grid(batch: dict[str, Tensor], outputs: tuple[Tensor, ...], rows: int = SAMPLE_ROWS) -> np.ndarray:
    """An (H*rows, W*6, 3) uint8 RGB image: per sample src, bgr, true alpha, predicted alpha, the
    prediction composited over green, and the predicted error."""
    n = min(rows, batch["src"].shape[0])
    pha, fgr = outputs[0][:n].float(), outputs[1][:n].float()
    err = outputs[2] if len(outputs) == 4 else outputs[4]
    err = nn.functional.interpolate(err[:n].float(), size=pha.shape[2:], mode="bilinear", align_corners=False)
    green = torch.tensor([0.47, 1.0, 0.6], device=pha.device).view(1, 3, 1, 1)
    columns = [batch["src"][:n], batch["bgr"][:n], batch["pha"][:n].expand(-1, 3, -1, -1), pha.expand(-1, 3, -1, -1),
               fgr * pha + green * (1 - pha), err.clamp(0, 1).expand(-1, 3, -1, -1)]
    grid = torch.cat([torch.cat(list(column.float()), dim=1) for column in columns], dim=2)  # (3, H*n, W*6)
    return (grid.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())


# --------------------------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------------------------


class CsvLog:
    """A CSV file of rows keyed by step; reopening it for a resumed run drops rows after that step."""

    def __init__(self, path: Path, columns: list[str], resume_step: int | None) -> None:
        self.path, self.columns = path, columns
        kept = self._rows_up_to(resume_step) if resume_step is not None and path.is_file() else []
        self._rewrite(kept)

    def _rows_up_to(self, step: int) -> list[dict[str, str]]:
        """The log's whole rows up to ``step``; a row cut short (a crash while it was appended) or whose step is
        not a number is dropped with a warning, and a file that is not a CSV log is refused."""
        kept, dropped = [], 0
        try:
            with self.path.open(newline="", encoding="utf-8") as file:
                for row in csv.DictReader(file):
                    try:
                        row_step = int(row.get("step") or "")
                    except ValueError:
                        row_step = None
                    if row_step is None or None in row.values() or None in row:
                        dropped += 1
                    elif row_step <= step:
                        kept.append(row)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise BgmatteError(f"{self.path}: cannot read this log ({exc}); move it away to resume") from None
        if dropped:
            print(f"bgmatte train: {self.path}: dropped {dropped} damaged row(s) (cut short, or without a step)",
                  file=sys.stderr)
        return kept

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        """Write the header and ``rows`` through a temporary file, so that a crash meanwhile leaves the earlier
        log whole (rows are then appended in place: a crash loses at most the row being written)."""
        def write(temporary: Path) -> None:
            with temporary.open("w", newline="") as file:
                writer = csv.DictWriter(file, self.columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

        write_through_temporary(self.path, write, "the log", temporary=_own_temporary(self.path))

    def write(self, row: dict[str, object]) -> None:
        """Append one row (floats to 6 significant digits)."""
        with self.path.open("a", newline="") as file:
            csv.DictWriter(file, self.columns, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


class Logger:
    """CSV logs for training and validation, plus TensorBoard scalars and images when asked for."""

    def __init__(self, options: TrainOptions, resume_step: int | None) -> None:
        terms = list(loss_terms(options.stage))
        self.train = CsvLog(options.out / "train.csv", ["step", "loss", *terms, "sec_per_step", "time"], resume_step)
        self.valid = CsvLog(options.out / "valid.csv", ["step", "loss", *terms, "sad", "mse", "time"], resume_step)
        self.board = None
        if options.log == "tensorboard":
            check_logging(options)
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides an earlier session's events from purge_step on; those of the step resumed from
            # stay, as that step is not logged again.
            self.board = SummaryWriter(str(options.out / "tensorboard"),
                                       purge_step=resume_step + 1 if resume_step is not None else None)

    def scalars(self, kind: str, step: int, values: dict[str, float]) -> None:
        """Log a row of ``train`` or ``valid`` values for a step."""
        (self.train if kind == "train" else self.valid).write({"step": step, **values, "time": f"{time.time():.3f}"})
        if self.board is not None:
            for key, value in values.items():
                self.board.add_scalar(f"{kind}/{key}", value, step)

    def image(self, step: int, rgb: np.ndarray) -> None:
        """Log a sample grid to TensorBoard (the PNG is written by the caller)."""
        if self.board is not None:
            self.board.add_image("valid/samples", rgb, step, dataformats="HWC")

    def close(self) -> None:
        """Flush and close TensorBoard's writer."""
        if self.board is not None:
            self.board.close()


def check_logging(options: TrainOptions) -> None:
    """Fail early when the log format asked for cannot be written (rank 0 checks, as it is the one that logs)."""
    if options.log == "tensorboard":
        try:
            importlib.import_module("tensorboard")
        except ImportError:
            raise BgmatteError("--log tensorboard: TensorBoard is not installed (pip install tensorboard); "
                               "or use --log csv") from None


# --------------------------------------------------------------------------------------------
# Stopping on a signal
# --------------------------------------------------------------------------------------------


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
"""The signals that stop a run after its current step, saved: Ctrl-C, a job scheduler's or `kill`'s SIGTERM, and
the SIGHUP of a closed terminal or SSH session (which the command line would otherwise raise mid-step, unsaved)."""


def _heeded_stop_signals() -> list[int]:
    """The `STOP_SIGNALS` this process does not ignore: `nohup` ignores SIGHUP so that a run outlives its terminal,
    and a script's background job ignores SIGINT, which a run must leave ignored rather than stop on."""
    return [number for number in STOP_SIGNALS if signal.getsignal(number) is not signal.SIG_IGN]


class StopRequest:
    """Turns a SIGINT, SIGTERM or SIGHUP (`STOP_SIGNALS`) into a request to stop after the current step; a second
    signal of the same kind acts at once, or during a save as soon as the save is done (`held_stop_signals`).
    Handlers are only installed in the main thread, and not for a signal the process ignores."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the signal that asked
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for number in _heeded_stop_signals():
                self._previous[number] = signal.getsignal(number)
                signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


@contextmanager
def held_stop_signals():
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends, then deliver them to the handlers they would have met:
    a save must not stop between last.safetensors and state.pt, or the weights would be a save newer than the
    state a resume continues from. Only in the main thread, where handlers can be set; ignored signals stay so."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {number: signal.signal(number, lambda signum, frame: held.append(signum))
                for number in _heeded_stop_signals()}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        for number in held:  # in order, so that a second Ctrl-C still acts at once after StopRequest's first
            signal.raise_signal(number)


def _ignore_stop_signals(worker_id: int) -> None:
    """Data workers leave Ctrl-C, SIGTERM and SIGHUP to the training process, which stops between steps, saves, and
    shuts them down (`_shut_down`): killed at once by a signal sent to the whole process group (Ctrl-C, a job
    scheduler's SIGTERM, a closed terminal's SIGHUP), they would make PyTorch raise in the training process wherever
    it is, a save included."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class RunRefused(BgmatteError):
    """A refusal that every process of the run raises alike (rank 0 decided it and told the others, or the
    processes told each other theirs), so that only rank 0 need print it."""


class DataRefused(RunRefused, DataError):
    """A `DataError` met by one process of a distributed run during training, which every process raises alike."""


def _refuse_together(runtime: Runtime, refusal: str | None, kind: type[RunRefused] = RunRefused) -> None:
    """Raise ``kind`` in every process if any of them refused to go on (``refusal`` is this one's reason, or
    None): rank 0's reason, else that of the lowest rank with one, naming it. So a refusal that only some
    processes reach (a GPU without bfloat16, a file another node lacks) is neither left unsaid, since rank 0
    alone speaks, nor leaves the other processes waiting for it."""
    refusals = [refusal]
    if runtime.distributed:
        refusals = [None] * runtime.world_size
        dist.all_gather_object(refusals, refusal)
    for rank, reason in enumerate(refusals):
        if reason is not None:
            raise kind(reason if rank == 0 else f"process {rank}: {reason}")


def train(options: TrainOptions, given: Collection[str] | None = None) -> TrainResult:
    """Train one stage as ``options`` say, in this process or in each process ``torchrun`` started.

    ``given`` names the options the user set (the command line's); when resuming, the others are those
    the run was started with, as ``resumed_options`` explains. None counts every option as given.
    Returns when ``options.steps`` steps are done, with weights and state saved. On SIGINT, SIGTERM or SIGHUP it
    finishes the current step (under torchrun, the step in which the processes agree on it: at most one more), saves
    weights and state, and raises KeyboardInterrupt (`Terminated` for the last two; a process that another one's
    signal stopped raises KeyboardInterrupt). A data file that cannot be read raises
    `DataError` (its message in one line), after saving what was trained so that it can resume; under torchrun
    every process stops at that step and raises it alike, as a `DataRefused`.
    """
    runtime, created_group = start_runtime(options.device)
    try:
        run = _Run(options, runtime, given)  # refused, it removes what it made itself
        try:
            return run.run()
        except BgmatteError:
            if run.step == run.first_step:  # refused before a step (a pool too small, ...): nothing trained or saved
                _remove_made(run.made)
            raise
    finally:
        if created_group and dist.is_initialized():
            dist.destroy_process_group()


RUN_OPTIONS = ("dataset", "data_root", "backgrounds", "batch_size", "train_samples", "crop", "init", "freeze_base",
               "backbone_scale", "sample_pixels", "plate_color", "plate_misalign", "seed", "val_samples")
"""Options that make a run what it is (its data, model and random streams, with ``backbone`` and ``stage``):
a resumed run keeps the values it was started with and refuses others."""
ADJUSTABLE_OPTIONS = ("steps", "precision", "val_every", "save_every", "save_minutes", "log", "log_every")
"""Options a resumed run keeps unless given anew, like the learning rates: its length, numerics and bookkeeping.
The rest (``device``, ``num_workers``, ``progress``) belong to each session and are never taken from the run."""
_PATH_OPTIONS = ("data_root", "backgrounds", "init")


def _real(path: Path | str) -> Path:
    """A path made absolute with its links followed, as far as they exist (never an error: loops stay as they are)."""
    return Path(os.path.realpath(path))


def absolute_paths(options: TrainOptions) -> TrainOptions:
    """The options with --data-root, --backgrounds and --init made absolute and resolved, as a run starts:
    its saved record then names the same files whichever folder the run is resumed from."""
    changes = {name: _real(getattr(options, name)) for name in _PATH_OPTIONS if getattr(options, name) is not None}
    return replace(options, **changes) if changes else options


def _same_path(a: Path | str, b: Path | str) -> bool:
    """Whether two spellings name one file or folder: equal once resolved, or (both existing) the same file."""
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _recorded_path(text: str, out: Path) -> Path | None:
    """A path of a saved run's options, absolute. Older versions saved paths as typed, relative to a folder they
    did not write down: the current folder or else the run folder's parent is taken if the path is there; None if
    it is in neither."""
    path = Path(text)
    if path.is_absolute():
        return path
    for folder in (Path.cwd(), _real(out).parent):
        if (folder / path).exists():
            return _real(folder / path)
    return None


def _as_flag(name: str, value: object) -> str:
    """An option and its value in the command line's words, for messages."""
    flag = "--" + name.replace("_", "-")
    if value is None or value is False:
        return f"no {flag}"
    return flag if value is True else f"{flag} {value}"


def resumed_options(options: TrainOptions, saved: dict[str, object], given: Collection[str] | None,
                    state_path: Path) -> TrainOptions:
    """The options a resumed run continues with: those not ``given`` are the run's own, from its saved
    options (learning rates from its saved optimiser); a given one of ``RUN_OPTIONS`` that differs from
    the run's is refused, since the run would silently become another. ``given`` None counts all as given.
    Paths count as the same when they name the same file, however spelled. Options that must fit together
    are checked here, on the merged result, since until now defaults stood in for the run's own."""
    record = saved.get("options")
    if not isinstance(record, dict):
        raise BgmatteError(f"{state_path}: holds no record of the run's options")
    current = options.to_record()
    changes: dict[str, object] = {}
    for name in RUN_OPTIONS + ADJUSTABLE_OPTIONS:
        if name not in record:  # saved before the option existed: what is given now stands
            continue
        was, now = record[name], current[name]
        flag = "--" + name.replace("_", "-")
        if name in _PATH_OPTIONS and isinstance(was, str):
            was = _recorded_path(was, options.out)
            if was is None and (given is None or name in given):
                continue  # an older run's relative path found nowhere: the one given now stands
            if was is None:
                raise BgmatteError(f"{state_path}: the run was started with {flag} {record[name]}, a relative "
                                   f"path that names nothing here nor beside the run's folder; give {flag} again")
        if given is not None and name not in given:
            changes[name] = was
        elif name in RUN_OPTIONS:
            same = _same_path(was, now) if name in _PATH_OPTIONS and was is not None and now is not None \
                else was == now
            if not same:
                raise BgmatteError(f"{state_path}: the run was started with {_as_flag(name, was)}; it cannot go on "
                                   f"with {_as_flag(name, now)} (leave {flag} out to keep the run's setting, "
                                   "or start a new run in another --out)")
    if options.backbone is None:
        changes["backbone"] = str(saved["backbone"])
    if given is not None:  # the rates not given now are the ones the run was training with
        try:
            rates = {str(group["name"]): float(group["lr"]) for group in saved["optimizer"]["param_groups"]
                     if group.get("name") in PARTS}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise BgmatteError(f"{state_path}: the saved optimiser has no learning rates per part") from None
        changes["lr"] = {**rates, **options.lr}
    try:
        resumed = replace(options, **changes)
    except BgmatteError as exc:
        raise BgmatteError(f"{state_path}: the run's saved options do not work here: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise BgmatteError(f"{state_path}: holds saved options this version cannot read ({exc})") from None
    try:
        resumed.check_combinations()
    except BgmatteError as exc:
        raise BgmatteError(f"{state_path}: the options given do not fit the run's: {exc}") from None
    return resumed


RUN_FILES = (*CHECKPOINT_FILES, *LOG_FILES, "samples", "tensorboard")
"""What a run writes in its folder; a new run refuses a folder that holds any of them."""


def _has_rows(path: Path) -> bool:
    """Whether a CSV log holds more than its header line (one that cannot be read counts as holding some)."""
    try:
        with path.open(newline="") as file:
            return len(list(islice(file, 2))) > 1
    except (OSError, UnicodeDecodeError):
        return True


def earlier_run_files(folder: Path) -> list[str]:
    """The files of an earlier run in a folder. A log with no rows and an empty folder do not count: a run
    killed before its first step leaves them (a refused one removes them), and they hold nothing to lose."""
    found = []
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            if any(path.iterdir()):
                found.append(f"{name}/")
        elif path.suffix == ".csv" and path.is_file() and not path.is_symlink():
            if _has_rows(path):
                found.append(name)
        elif path.exists() or path.is_symlink():
            found.append(name)
    return found


def _open_run_folder(options: TrainOptions, given: Collection[str] | None
                     ) -> tuple[TrainOptions, dict[str, object] | None]:
    """Rank 0's part of `_prepare_run_folder`."""
    options = absolute_paths(options)
    out = options.out
    state_path = out / "state.pt"
    saved = None
    if out.exists() and not out.is_dir():
        raise BgmatteError(f"{out}: is a file, not a folder (--out names the run's folder)")
    if options.resume:
        saved = load_training_state(state_path)
        if saved["stage"] != options.stage:
            raise BgmatteError(f"{state_path}: is a {saved['stage']} run, not a {options.stage} run")
        if options.backbone is not None and options.backbone != saved["backbone"]:
            raise BgmatteError(f"{state_path}: is a {saved['backbone']} run, not {options.backbone}")
        options = resumed_options(options, saved, given, state_path)
        problem = state_entries_problem(saved)
        if problem is not None:
            raise BgmatteError(f"{state_path}: cannot be resumed from: {problem}")
        if saved["step"] > options.steps:  # it would end at once, past the length asked for, with nothing trained
            raise BgmatteError(f"{state_path}: the run is already at step {saved['step']}, past --steps "
                               f"{options.steps}, so there is nothing to train (--steps is the run's total, not a "
                               f"number to add: give more than {saved['step']} to go on)")
        # The better of the state's best and best.safetensors' own: a crash between the two writes leaves the file
        # better than the state says, and the resumed run must not replace it with a worse model.
        recorded = best_weights_loss(out / "best.safetensors", options.stage, str(saved["backbone"]))
        if recorded is not None and recorded < float(saved["best"]):
            saved["best"] = recorded
    check_logging(options)  # only rank 0 logs; and a resumed run's --log may be the run's own
    if not options.resume:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BgmatteError(f"{out}: cannot create the run's folder ({exc.strerror or exc})") from None
        if state_path.exists():
            raise BgmatteError(f"{out}: already holds a training run (state.pt); pass --resume to "
                               "continue it, or choose another --out")
        earlier = earlier_run_files(out)
        if earlier:
            raise BgmatteError(f"{out}: holds an earlier run's files ({', '.join(earlier)}) but no state.pt to "
                               "resume it with; choose another --out, or move them away first")
    samples = out / "samples"
    try:
        samples.mkdir(exist_ok=True)
    except OSError as exc:
        raise BgmatteError(f"{samples}: cannot create the folder for sample images ({exc.strerror or exc})") from None
    removed = remove_stale_temporaries(out)
    if removed and options.progress:
        print(f"bgmatte train: removed {len(removed)} temporary file(s) that interrupted saves left in {out} "
              f"(such as {removed[0].name})", file=sys.stderr)
    return options, saved


def _prepare_run_folder(options: TrainOptions, runtime: Runtime, given: Collection[str] | None
                        ) -> tuple[TrainOptions, dict[str, object] | None, list[Path]]:
    """Before anything is built, rank 0 readies the run's folder: it creates it for a new run (refusing
    one that holds an earlier run), or reads the state of the run to resume and settles its options (its
    paths made absolute, to be saved so) and its best loss (`best_weights_loss`); it checks that the logs asked for can be written, and removes what
    interrupted saves left. The options and state, or the refusal, go to every process. Also returns the
    folders rank 0 created (none in the other processes), for `_remove_made` if the run is refused later."""
    message, saved, made = None, None, []
    if runtime.is_main:
        out = Path(options.out)
        missing = [path for path in (out / "samples", out, *out.parents) if not os.path.lexists(path)]
        try:
            options, saved = _open_run_folder(options, given)
        except BgmatteError as exc:
            message = str(exc)
        except OSError as exc:  # the folder could not even be looked at
            message = f"{options.out}: cannot use this folder ({exc.strerror or exc})"
        made = [path for path in reversed(missing) if os.path.lexists(path)]  # in the order they were made
        if message is not None:
            _remove_made(made)
    if runtime.distributed:
        holder = [(message, saved, options)]
        dist.broadcast_object_list(holder, src=0)
        message, saved, options = holder[0]
    if message is not None:
        raise RunRefused(message)
    return options, saved, made


def _remove_made(made: list[Path]) -> None:
    """Undo the set-up of a run refused before its first step: remove what it created (`made`, in the order it made
    them), the folders if they are empty, the logs, which hold only their header then, and TensorBoard's event files,
    so that a refused run leaves nothing behind. Anything else found there is kept, and with it its folder."""
    for path in reversed(made):
        try:
            if path.name == "tensorboard" and path.is_dir() and not path.is_symlink():
                for event in path.glob("events.out.tfevents.*"):
                    event.unlink()
            if path.is_dir() and not path.is_symlink():
                path.rmdir()  # only when empty
            elif path.suffix == ".csv" and not _has_rows(path):
                path.unlink()
        except OSError:  # not empty, or not ours to remove any more: left as it is
            pass


class _Run:
    """One training run: the model, optimiser, data and logs of this process; ``run`` is the loop."""

    def __init__(self, options: TrainOptions, runtime: Runtime, given: Collection[str] | None = None) -> None:
        options, saved, self.made = _prepare_run_folder(options, runtime, given)
        self.options, self.runtime = options, runtime
        self.logger: Logger | None = None
        self.valid_batches: list[dict[str, Tensor]] = []
        refusal = None
        try:
            self._build(saved)
        except BgmatteError as exc:
            refusal = str(exc)
        with _long_wait(runtime):  # making the validation set may take longer than a collective waits
            try:
                if runtime.is_main and refusal is None:  # the logs and the validation set are rank 0's alone
                    logs = [options.out / name for name in ("train.csv", "valid.csv", "tensorboard")]
                    self.made += [path for path in logs if not os.path.lexists(path)]
                    self.logger = Logger(options, self.step if saved is not None else None)
                    self.valid_batches = validation_batches(options, runtime, self.per_process)
            except BgmatteError as exc:
                refusal = str(exc)
        try:
            _refuse_together(runtime, refusal)
        except BgmatteError:
            if self.logger is not None:
                self.logger.close()
            _remove_made(self.made)
            raise
        self.first_step = self.step
        self.model: nn.Module = self.network
        if runtime.distributed:
            device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.network, device_ids=device_ids)

    def _build(self, saved: dict[str, object] | None) -> None:
        """Set up this process's model, optimiser and loss scaler, from the initial weights or the saved state.
        What it refuses (the batch size, the precision on this device, the --init file, a saved optimiser that
        does not fit) is a BgmatteError, on which the processes then agree (`_refuse_together`)."""
        options, runtime = self.options, self.runtime
        self.per_process, remainder = divmod(options.batch_size, runtime.world_size)
        if remainder:
            raise BgmatteError(f"--batch-size {options.batch_size} does not split evenly over "
                               f"{runtime.world_size} processes")
        self.sync_bn = runtime.distributed and runtime.device.type == "cuda"
        if self.per_process < 2 and not self.sync_bn:
            raise BgmatteError(f"--batch-size {options.batch_size} leaves {self.per_process} image per process, "
                               "and batch norm needs at least 2 (only SyncBatchNorm, on GPUs, pools processes)")
        self.amp = autocast_dtype(options.precision, runtime.device)

        init_state = None
        if saved is not None:
            self.backbone, self.kernel_size = str(saved["backbone"]), int(saved["refine_kernel_size"])
        else:
            init_state = read_state_dict(options.init) if options.init is not None else None
            self.backbone = choose_backbone(options, init_state)
            conv = init_state.get("refiner.conv1.weight") if init_state is not None else None
            self.kernel_size = int(conv.shape[-1]) if conv is not None else 3

        # Every process builds the same initial weights; then each draws its own random numbers.
        seed_everything(options.seed)
        network = build_model(options, self.backbone, self.kernel_size)
        if init_state is not None:
            untouched = load_initial_weights(network, init_state, options.init)
            if untouched and runtime.is_main and options.progress:
                print(f"bgmatte train: {options.init}: has no weights for {len(untouched)} tensors "
                      f"(such as {untouched[0]}); they start from random values", file=sys.stderr)
        seed_everything(stream_seed(options.seed, runtime.rank, -1))
        network = network.to(runtime.device)
        if options.freeze_base:
            freeze_base(network)
        if self.sync_bn:
            network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
        train_mode(network)
        self.network = network
        self.optimizer = torch.optim.Adam(parameter_groups(network, options.learning_rates))
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=self.amp == torch.float16)
        self.step, self.best, self.saved_step = 0, math.inf, -1
        self.batches = 0  # batches drawn: more than the steps once a non-finite loss has skipped one
        # The steps since the last training log row: their summed loss terms, and the seconds they took.
        self.window: dict[str, float] = {}
        self.window_steps, self.window_seconds = 0, 0.0
        if saved is not None:
            self._restore(saved)

    # -- saved state --------------------------------------------------------------------------

    def _restore(self, saved: dict[str, object]) -> None:
        """Load a saved state (its entries checked by `state_entries_problem`) into this run, refusing in one line,
        naming the file, tensors or optimiser entries that do not fit the model built for it."""
        path = self.options.out / "state.pt"
        problem = fit_problem(self.network.state_dict(), saved["model"])
        if problem:
            raise BgmatteError(f"{path}: its model does not fit a {self.options.stage} run of {self.backbone}: "
                               f"{problem}")
        self.network.load_state_dict(saved["model"])
        defaults = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        saved_ids = {i for group in saved["optimizer"]["param_groups"] for i in group["params"] if _is_whole(i)}
        strays = [key for key in saved["optimizer"]["state"] if key not in saved_ids]
        if strays:
            raise BgmatteError(f"{path}: the saved optimiser holds the state of {len(strays)} parameter(s) that "
                               f"its groups do not list (such as {strays[0]!r})")
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
        except ValueError as exc:  # other parameter groups: --freeze-base given on one run and not the other
            raise BgmatteError(f"{path}: the saved optimiser does not fit this run "
                               f"({exc}); resume with the options the run started with (--freeze-base?)") from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise BgmatteError(f"{path}: the saved optimiser cannot be read ({type(exc).__name__}: {exc})") from None
        problem = self._optimizer_problem(defaults)
        if problem:
            raise BgmatteError(f"{path}: the saved optimiser does not fit this run: {problem}")
        for group in self.optimizer.param_groups:  # the rates given now win over the saved ones
            group["lr"] = self.options.learning_rates[group["name"]]
        if self.scaler.is_enabled() and saved.get("scaler"):
            try:
                self.scaler.load_state_dict(saved["scaler"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise BgmatteError(f"{path}: the saved loss scaler cannot be restored ({type(exc).__name__}: "
                                   f"{exc})") from None
        self.step = self.saved_step = int(saved["step"])
        self.batches = int(saved.get("batches", self.step))  # states saved before it was counted: none skipped
        self.best = float(saved["best"])
        window = saved.get("log_window")  # states saved before it was kept: the next row starts afresh
        if isinstance(window, dict) and int(window.get("steps", 0)) > 0:
            self.window = {str(key): float(value) for key, value in window["sums"].items()}
            self.window_steps, self.window_seconds = int(window["steps"]), float(window["seconds"])
        if int(saved["world_size"]) == self.runtime.world_size:
            try:
                restore_random_state(saved["random"][self.runtime.rank])
            except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise BgmatteError(f"{path}: its random state cannot be restored ({first})") from None
        else:  # another number of processes: the random streams go on, but differently
            seed_everything(stream_seed(self.options.seed, self.runtime.rank, self.step))
            if self.runtime.is_main:
                saved_by = int(saved["world_size"])
                warnings.warn(f"{path}: saved by {saved_by} process{'es' if saved_by > 1 else ''} and resumed by "
                              f"{self.runtime.world_size}, so the run goes on with other batches and random numbers "
                              f"than it would have with {saved_by} (not exactly as if it had not stopped)",
                              stacklevel=2)

    def _optimizer_problem(self, defaults: list[dict[str, object]]) -> str | None:
        """What in the optimiser just loaded would fail at its first step, or None: a parameter group without a
        setting that a fresh one has (``defaults``) or with one of another kind, or a parameter's Adam moments
        missing or shaped unlike the parameter (Adam only notices them as it steps, in a traceback)."""
        names = {id(param): name for name, param in self.network.named_parameters()}
        for group, fresh in zip(self.optimizer.param_groups, defaults):
            for key, default in fresh.items():
                if key not in group:
                    return f"its {fresh.get('name')} group has no {key}"
                value = group[key]
                if default is None:  # foreach, fused: None leaves the choice to PyTorch
                    fits = value is None or isinstance(value, bool)
                elif isinstance(default, bool):
                    fits = isinstance(value, bool)
                elif _is_number(default):
                    fits = _is_number(value)
                elif isinstance(default, (tuple, list)):
                    fits = isinstance(value, (tuple, list)) and len(value) == len(default) and all(map(_is_number,
                                                                                                       value))
                else:
                    fits = isinstance(value, type(default))
                if not fits:
                    return f"its {fresh.get('name')} group's {key} is {value!r}"[:200]
            moments = ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if group.get("amsgrad") else ()))
            for param in group["params"]:
                entry = self.optimizer.state.get(param)
                if entry is None or (isinstance(entry, dict) and not entry):  # not stepped yet: Adam starts it afresh
                    continue
                name = names.get(id(param), "a parameter")
                if not isinstance(entry, dict):
                    return f"the state of {name} is a {type(entry).__name__}, not Adam's"
                step = entry.get("step")
                if not isinstance(step, Tensor) or step.numel() != 1:
                    return f"the state of {name} has no step count"
                for key in moments:
                    moment = entry.get(key)
                    if not isinstance(moment, Tensor):
                        return f"the state of {name} has no {key}"
                    if moment.shape != param.shape:
                        return (f"the {key} of {name} is of shape {tuple(moment.shape)}, the parameter of "
                                f"{tuple(param.shape)}")
        return None

    def _metadata(self) -> dict[str, str]:
        return {"format": "bgmatte", "stage": self.options.stage, "backbone": self.backbone, "step": str(self.step)}

    def save(self) -> None:
        """Write last.safetensors and state.pt (rank 0 only); every process contributes its random state."""
        mine = capture_random_state()
        window_seconds = time.monotonic() - self.window_start if self.window_steps else 0.0  # before the writing
        states: list = [mine]
        if self.runtime.distributed:
            states = [None] * self.runtime.world_size
            dist.all_gather_object(states, mine)
        self.saved_step = self.step
        if not self.runtime.is_main:
            return
        with held_stop_signals():  # the pair is written whole, whatever signal comes meanwhile
            save_model_weights(self.network, self.options.out / "last.safetensors", self._metadata())
            save_training_state(self.options.out / "state.pt", {
                "format": STATE_FORMAT,
                "stage": self.options.stage,
                "backbone": self.backbone,
                "refine_kernel_size": self.kernel_size,
                "step": self.step,
                "batches": self.batches,
                "best": self.best,
                "world_size": self.runtime.world_size,
                "model": self.network.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "random": states,
                # A run stopped between log rows goes on with the same row: the steps already in it count.
                "log_window": {"steps": self.window_steps, "sums": dict(self.window), "seconds": window_seconds},
                "options": {k: v for k, v in self.options.to_record().items()
                            if isinstance(v, (str, int, float, bool, type(None)))},
            })

    # -- steps --------------------------------------------------------------------------------

    def _autocast(self):
        if self.amp is None:
            return nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.amp)

    def _agree(self, stop: bool, bad_loss: bool, save: bool) -> tuple[bool, bool, bool]:
        """The same decisions in every process: stop or skip if any process must, save when rank 0's clock says."""
        if not self.runtime.distributed:
            return stop, bad_loss, save
        flags = torch.tensor([float(stop), float(bad_loss), float(save and self.runtime.is_main)],
                             device=self.runtime.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1]), bool(flags[2])

    def _validate(self) -> None:
        if not self.valid_batches:
            return
        metrics, outputs = validate(self.network, self.valid_batches, self.options.stage, self.amp)
        self.logger.scalars("valid", self.step, metrics)
        grid = sample_grid(self.valid_batches[0], outputs)
        write_png(self.options.out / "samples" / f"step_{self.step:07d}.png", grid, overwrite=True)
        self.logger.image(self.step, grid)
        if metrics["loss"] < self.best:
            self.best = metrics["loss"]
            save_model_weights(self.network, self.options.out / "best.safetensors",
                               {**self._metadata(), "valid_loss": repr(float(self.best))})  # in full: a resume reads it back
        if self.options.progress:
            print(f"bgmatte train: step {self.step}: validation loss {metrics['loss']:.4f}, "
                  f"SAD {metrics['sad']:.3f}, MSE {metrics['mse']:.5f}", file=sys.stderr)

    def run(self) -> TrainResult:
        """Train up to ``options.steps``, validating, logging and saving on the way."""
        options = self.options
        self.last_loss = math.nan
        self.window_start = time.monotonic() - self.window_seconds  # a resumed row's earlier steps took these
        self.bad_in_a_row = 0
        last_save, interrupted, failure, failed = time.monotonic(), False, None, False
        batches: Iterator[dict[str, Tensor]] = iter(())
        try:
            if self.step < options.steps:
                batches = training_batches(options, self.runtime, self.per_process, self.batches)
            stop = StopRequest()
            with stop:
                while self.step < options.steps:
                    if stop.requested and not self.runtime.distributed:
                        # A signal met during the last step (or its validation or save): stop now, not after
                        # another. The processes of a distributed run agree on it within the next step instead.
                        interrupted = True
                        break
                    try:
                        batch = next(batches)
                    except DataError as exc:
                        failure = exc
                    except Exception:
                        if stop.requested and not self.runtime.distributed:  # workers died of the same Ctrl-C
                            interrupted = True
                            break
                        raise
                    failed = self._data_failed(failure is not None)
                    if failed:
                        break
                    clock_due = 0 < options.save_minutes * 60 <= time.monotonic() - last_save
                    halt, save_now = self._step(batch, stop.requested, clock_due)
                    if halt:
                        interrupted = True
                        break
                    if save_now or (options.save_every and self.step % options.save_every == 0
                                    and self.step != self.saved_step):
                        with self._paused():
                            self.save()
                        last_save = time.monotonic()
            if failed:  # what was trained is kept, as on Ctrl-C, unless nothing was
                if self.step > 0 and self.step != self.saved_step:
                    self.save()
            elif self.step != self.saved_step or interrupted:
                self.save()
        finally:
            if hasattr(batches, "close"):
                batches.close()
            if self.logger is not None:
                self.logger.close()
        if failed:
            self._stop_on_data_error(failure)
        if interrupted:
            if self.runtime.is_main and options.progress:
                print(f"bgmatte train: stopped at step {self.step}; saved {options.out / 'state.pt'} "
                      "(continue with --resume)", file=sys.stderr)
            raise KeyboardInterrupt if stop.signum in (None, signal.SIGINT) else Terminated(stop.signum)
        best = self.best if math.isfinite(self.best) else None
        return TrainResult(self.step, self.last_loss, best, options.out)

    def _data_failed(self, mine: bool) -> bool:
        """Whether this process's loader (``mine``) or another's met a file it cannot read instead of a batch. The
        processes agree on it before the forward pass, whose collectives would leave the others waiting for the one
        without a batch, so that all stop together with the state of the last step they all completed."""
        if not self.runtime.distributed:
            return mine
        flag = torch.tensor([float(mine)], device=self.runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def _stop_on_data_error(self, failure: DataError | None) -> NoReturn:
        """Raise the data error the run stopped on (``failure``, or None in a process whose own batch was fine),
        saying where the run was saved if it got past step 0; said once, by rank 0, when several processes train."""
        message = None
        if failure is not None:
            message = str(failure) if self.step == 0 else (
                f"{failure}; stopped at step {self.step} with the run saved in {self.options.out} (repair or remove "
                "that file, then continue with --resume)")
        if self.runtime.distributed:
            _refuse_together(self.runtime, message, DataRefused)
        raise failure if self.step == 0 else DataError(message)

    def _step(self, batch: dict[str, Tensor], stop: bool, clock_due: bool) -> tuple[bool, bool]:
        """One optimiser step (skipped by every process if any saw a non-finite loss, its forward pass's update of the
        batch-norm statistics undone), then its logs and validation; returns whether to stop and whether to save now,
        as all processes agreed."""
        options = self.options
        statistics = [(buffer, buffer.clone()) for buffer in self.network.buffers()]  # batch norms' running ones
        with self._autocast():
            outputs = self.model(batch["src"], batch["bgr"])
        loss, terms = stage_loss(options.stage, outputs, batch)
        self.batches += 1  # used, or skipped below: a resumed run starts with the next batch either way
        halt, bad_loss, save_now = self._agree(stop, not math.isfinite(sum(terms.values())), clock_due)
        self.optimizer.zero_grad(set_to_none=True)
        if bad_loss:  # no process runs backward, so no gradient exchange is left waiting
            with torch.no_grad():  # nor does the skipped batch count in the statistics (inf or NaN after an overflow)
                for buffer, before in statistics:
                    buffer.copy_(before)
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= MAX_NONFINITE_STEPS:
                raise BgmatteError(f"the loss was not finite for {self.bad_in_a_row} batches in a row at step "
                                   f"{self.step}; lower the learning rates or use --precision fp32")
            return halt, save_now
        self.bad_in_a_row = 0
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.last_loss = sum(terms.values())
        for key, value in {"loss": self.last_loss, **terms}.items():
            self.window[key] = self.window.get(key, 0.0) + value
        self.window_steps += 1
        if self.runtime.is_main:
            finished = self.step == options.steps
            if self.step % options.log_every == 0 or finished:
                seconds = (time.monotonic() - self.window_start) / self.window_steps
                self._log_training({k: v / self.window_steps for k, v in self.window.items()}, seconds)
                self.window, self.window_steps, self.window_start = {}, 0, time.monotonic()
            if options.val_every and (self.step % options.val_every == 0 or finished):
                with self._paused():
                    self._validate()
        return halt, save_now

    @contextmanager
    def _paused(self):
        """Leave the time of a block (validation, saving) out of the seconds per step."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.window_start += time.monotonic() - started

    def _log_training(self, means: dict[str, float], seconds_per_step: float) -> None:
        self.logger.scalars("train", self.step, {**means, "sec_per_step": seconds_per_step})
        if self.options.progress:
            print(f"bgmatte train: step {self.step}/{self.options.steps}: loss {means['loss']:.4f} "
                  f"({seconds_per_step:.2f} s/step)", file=sys.stderr)
