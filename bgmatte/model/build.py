"""Loading models: the only place that knows checkpoint formats, backbone detection and the default weights.

Checkpoints are either the released ``.pth`` files (plain PyTorch state_dicts, read with
``weights_only=True`` so that a file can never run code) or ``.safetensors`` files.
"""
from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path

import torch
from torch import Tensor

from bgmatte.errors import BgmatteError
from bgmatte.model.matting import BACKBONES, MattingRefine, RefineOptions, switch_problem

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "default.safetensors"

# A key that only one backbone has, checked in this order (resnet101 has every resnet50 key).
_BACKBONE_MARKERS = (
    ("mobilenetv2", "backbone.features.0.0.weight"),
    ("resnet101", "backbone.layer3.22.conv1.weight"),
    ("resnet50", "backbone.layer3.5.conv1.weight"),
)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state_dict from ``.safetensors`` or a pickled ``.pth``, refusing anything that would run code."""
    path = Path(path)
    if path.is_dir():
        raise BgmatteError(f"{path}: a folder, not a checkpoint file (.pth or .safetensors)")
    if not path.is_file():
        raise BgmatteError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BgmatteError(f"{path}: not a readable safetensors file ({exc})") from None
    elif path.suffix.lower() == ".onnx":  # `bgmatte export onnx` makes them; said, not "neither a zip nor a pickle"
        raise BgmatteError(f"{path}: an ONNX model, not a checkpoint of weights: run it from Python with "
                           f"bgmatte.load_model(path, backend=\"onnxruntime\"), or give the .pth or .safetensors "
                           "file it was exported from")
    else:
        state = _load_pickled(path)
    if isinstance(state, dict) and not any(isinstance(v, Tensor) for v in state.values()):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if (not isinstance(state, dict) or not state or not all(isinstance(k, str) for k in state)
            or not all(isinstance(v, Tensor) for v in state.values())):
        raise BgmatteError(f"{path}: not a state_dict of tensors")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _looks_pickled(path: Path) -> bool:
    """Whether the file starts like one of `torch.save`'s formats (a zip archive, or a pickle from protocol 2 on), so
    that a refusal by the weights-only reader means it held objects, not that it is some other kind of file."""
    with open(path, "rb") as handle:
        start = handle.read(4)
    return start.startswith(b"\x80") or start == b"PK\x03\x04"


def _load_pickled(path: Path) -> object:
    """`torch.load` with ``weights_only=True``, every failure turned into one line that says which kind it is."""
    try:
        with warnings.catch_warnings():  # said below, in the error's one line
            warnings.filterwarnings("ignore", message="'torch.load' received a zip file that looks like a TorchScript")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the reader raises UnpicklingError, KeyError, EOFError, RuntimeError ...
        if "TorchScript archives" in str(exc):  # `bgmatte export torchscript` makes them: a program, not weights
            raise BgmatteError(f"{path}: a TorchScript model, not a checkpoint of weights: give the .pth or "
                               ".safetensors file it was exported from, or run it with torch.jit.load") from None
        if path.stat().st_size == 0:
            raise BgmatteError(f"{path}: empty file, not a checkpoint") from None
        if not _looks_pickled(path):
            raise BgmatteError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)") from None
        if isinstance(exc, pickle.UnpicklingError):
            lines = [line.strip() for line in str(exc).splitlines()]
            named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
            detail = f" ({named[0]})" if named else ""
            raise BgmatteError(f"{path}: refused to load: the file holds Python objects that could run code, "
                               f"not plain weights{detail}") from None
        reason = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise BgmatteError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None

def weights_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a ``.safetensors`` file's header ({} for other files)."""
    if Path(path).suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def detect_backbone(state: dict[str, Tensor]) -> str | None:
    """The backbone whose keys the state_dict has, or None."""
    for name, key in _BACKBONE_MARKERS:
        if key in state:
            return name
    return None


def backbone_mismatch(source: str | Path, detected: str | None, backbone: str) -> str | None:
    """The one-line error for weights of the backbone `detected` asked to load as another `backbone`, or None."""
    if detected is None or detected == backbone:
        return None
    return f"{source}: holds {detected} weights, not {backbone}: leave backbone out (or pass {detected!r}) to load them"


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def load_weights(model: MattingRefine, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly; a base-only checkpoint (no ``refiner.*``) loads with a warning."""
    expected = model.state_dict()
    base_only = not any(k.startswith("refiner.") for k in state)
    wanted = {k for k in expected if not (base_only and k.startswith("refiner."))}
    missing = sorted(wanted - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = sorted(k for k in wanted & state.keys() if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_describe(unexpected)}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} keys of the wrong shape: {_describe(wrong_shape)}")
        raise BgmatteError(f"{source}: does not fit a MattingRefine({model.backbone_name}) model: "
                           + "; ".join(parts))
    model.load_state_dict(state, strict=not base_only)
    if base_only:
        warnings.warn(f"{source}: a base-only checkpoint (no refiner weights): the refiner is untrained, "
                      "so refined patches are noise until it is trained", UserWarning, stacklevel=3)


def usable_devices() -> str:
    """The devices this PyTorch build can run on here, worded for an error message."""
    names = ["auto", "cpu"]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        names += ["cuda", "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"]
    if torch.backends.mps.is_available():
        names.append("mps")
    return ", ".join(names[:-1]) + " or " + names[-1]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) picks CUDA when present, else the CPU. ``cpu``, ``cuda``, ``cuda:N`` and, where this
    PyTorch has it, ``mps`` are checked here, so that a device that cannot run is one line rather than a failure
    deep inside the model; other device types (meta, xpu ...) are refused."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(device)
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise BgmatteError(f"unknown device {name!r}: use {usable_devices()}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BgmatteError(f"device {name!r} was asked for, but PyTorch sees no CUDA GPU here: use {usable_devices()}")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise BgmatteError(f"device {name!r} was asked for, but PyTorch sees {torch.cuda.device_count()} CUDA GPU(s) "
                           f"here: use {usable_devices()}")
    if resolved.type == "mps" and not (torch.backends.mps.is_available() and (resolved.index or 0) == 0):
        raise BgmatteError(f"device {name!r} was asked for, but this PyTorch has no such Apple GPU (MPS) here: "
                           f"use {usable_devices()}")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise BgmatteError(f"device {name!r} cannot run the model: use {usable_devices()}")
    return resolved


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("torch", "onnxruntime")


def load_model(checkpoint: str | Path | None = None, *, backbone: str | None = None,
               backbone_scale: float | None = None, refine_mode: str | None = None,
               refine_sample_pixels: int | None = None, refine_threshold: float | None = None,
               refine_kernel_size: int | None = None, device: str | torch.device | None = "auto",
               optimize: bool = True, precision: str = "fp32", backend: str = "torch",
               plate_solve: bool | None = None) -> torch.nn.Module:
    """A ready ``MattingRefine`` in eval mode, from a checkpoint path or (None) the embedded default model.

    The refine settings left None are ``RefineOptions``' defaults (0.25, sampling, 80,000, 0.1), or, for an
    ``.onnx`` file, what it was exported with; one given that differs from the file's is refused. (``bgmatte video``
    and ``image`` pass a threshold of 0.7, the reference inference scripts' value, instead of 0.1.)
    The backbone and the refiner's kernel size are read from the weights unless given (a backbone the weights are
    not for is refused). ``device``: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or
    ``mps``, checked before the weights are read. ``optimize``
    asks for the fast inference path where one is available; it computes the same outputs.
    ``precision`` (fp32, fp16, bf16) sets the weights' dtype; inputs must match it on the plain
    module and are cast by the fast one. ``backend="onnxruntime"`` runs an exported ``.onnx`` file
    (or exports the checkpoint first) with onnxruntime, the ``[onnx]`` extra.
    ``plate_solve`` (see ``MattingRefine``) defaults to what a ``.safetensors`` file's metadata says
    (``plate_solve: on`` in the embedded default model, which was scored with it); off for other weights.
    """
    if precision not in PRECISIONS:
        raise BgmatteError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if backend not in BACKENDS:
        raise BgmatteError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    for problem in (switch_problem("optimize", optimize), switch_problem("plate_solve", plate_solve, optional=True)):
        if problem is not None:
            raise BgmatteError(problem)
    given = {name: value for name, value in (("backbone_scale", backbone_scale), ("refine_mode", refine_mode),
                                             ("refine_sample_pixels", refine_sample_pixels),
                                             ("refine_threshold", refine_threshold)) if value is not None}
    if backend == "onnxruntime":
        from bgmatte.export import load_onnx_backend

        try:
            options = RefineOptions(**given)
        except ValueError as exc:
            raise BgmatteError(str(exc)) from None
        return load_onnx_backend(checkpoint, backbone=backbone, options=options, refine_kernel_size=refine_kernel_size,
                                 device=device, precision=precision, plate_solve=plate_solve, given=given.keys())
    target = resolve_device(device)  # a device that cannot run is refused before the weights are read
    source = Path(checkpoint) if checkpoint is not None else DEFAULT_WEIGHTS
    if checkpoint is None and not DEFAULT_WEIGHTS.is_file():
        raise BgmatteError("no embedded default model is shipped in this build of bgmatte yet: "
                           "pass a checkpoint (for example a released pytorch_mobilenetv2.pth)")
    state = read_state_dict(source)
    metadata = weights_metadata(source)
    if plate_solve is None:
        plate_solve = metadata.get("plate_solve") == "on"
    if metadata.get("status") == "interim":  # also when the embedded file is named, as the card's examples do
        what = "the embedded default model" if checkpoint is None else str(source)
        warnings.warn(f"{what} is an interim checkpoint, short of its quality target "
                      f"(see {WEIGHTS_DIR / 'MODEL_CARD.md'}); pass a released checkpoint for real work",
                      UserWarning, stacklevel=2)
    detected = detect_backbone(state)
    if backbone is None:
        if detected is None:
            raise BgmatteError(f"{source}: the keys fit no known backbone ({', '.join(BACKBONES)}); "
                               f"first keys: {_describe(sorted(state), 3)}")
        backbone = detected
    if backbone not in BACKBONES:
        raise BgmatteError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
    if (problem := backbone_mismatch(source, detected, backbone)) is not None:
        raise BgmatteError(problem)
    if refine_kernel_size is None:
        conv = state.get("refiner.conv1.weight")
        refine_kernel_size = int(conv.shape[-1]) if conv is not None else 3
    try:
        options = RefineOptions(**given, refine_kernel_size=refine_kernel_size)
    except ValueError as exc:
        raise BgmatteError(str(exc)) from None
    # Ordinary tensors even when called inside torch.inference_mode(): inference tensors there would keep the fast
    # path from seeing when the weights change, and could not be trained or changed in place afterwards.
    with torch.inference_mode(False):
        model = MattingRefine(backbone, **vars(options), plate_solve=plate_solve)
        load_weights(model, state, str(source))
        model = model.eval().to(target, PRECISIONS[precision])
    if optimize:
        model = _optimized(model)
    return model


def _optimized(model: MattingRefine) -> torch.nn.Module:
    """The fast inference path, where one is available; otherwise the plain module."""
    try:
        from bgmatte.model.fast import optimize_model
    except ModuleNotFoundError:
        return model
    return optimize_model(model)


def save_weights(model: torch.nn.Module, path: str | Path, *, half: bool = False,
                 metadata: dict[str, str] | None = None, temporary: Path | None = None) -> None:
    """Write a model's state_dict as safetensors (``half`` stores floating tensors as fp16), through a temporary
    name (`write_through_temporary`; ``temporary`` names it). The bytes are made in memory: safetensors'
    own ``save_file`` would add a randomly named temporary file that a killed process leaves behind."""
    from safetensors.torch import save

    from bgmatte.io.files import write_through_temporary

    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if half and value.is_floating_point():
            value = value.half()
        state[key] = value.contiguous()
    data = save(state, metadata=metadata or {})
    write_through_temporary(Path(path), lambda file: file.write_bytes(data), "the weights", temporary=temporary)
