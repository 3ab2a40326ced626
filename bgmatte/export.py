"""Exporting ``MattingRefine`` to TorchScript and ONNX, and running an exported ONNX model with onnxruntime.

Both exports start from ``ExportableMatting``: the plain model's computation written so that
TorchScript can compile it and the ONNX exporter can trace it with any height and width. It uses
the plain model's own layers (nothing is copied or re-derived), and tests hold its outputs to the
plain module's.

- TorchScript keeps the settings as attributes that can be changed after ``torch.jit.load``, under
  the reference's names: ``backbone_scale``, ``refine_mode``, ``refine_sample_pixels``,
  ``refine_threshold``, ``refine_prevent_oversampling``; and ``plate_solve``.
- ONNX fixes the settings at export time (an ONNX graph has no Python branches); they are stored in
  the file's metadata, and ``OnnxMatting`` reads them back.
"""
# No ``from __future__ import annotations`` here: TorchScript reads ExportableMatting's annotations as types.
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bgmatte.errors import BgmatteError
from bgmatte.io.files import check_destination, write_through_temporary
from bgmatte.model.matting import MattingBase, MattingRefine, RefineOptions, check_inputs
from bgmatte.model.plate_solve import solve_alpha

ONNX_OPSET = 18
OUTPUT_NAMES = ("pha", "fgr", "pha_sm", "fgr_sm", "err_sm", "ref_sm")


class BaseNetwork(nn.Module):
    """The base network alone: (src_sm, bgr_sm) to the decoder's raw 37 channels, for tracing."""

    def __init__(self, model: MattingRefine) -> None:
        super().__init__()
        self.backbone, self.aspp, self.decoder = model.backbone, model.aspp, model.decoder

    def forward(self, src: Tensor, bgr: Tensor) -> Tensor:
        return MattingBase.predict(self, src, bgr)  # type: ignore[arg-type]  # it has the same layers


def _cell_pixels(row: Tensor, col: Tensor, size: int, context: int, width: int) -> Tensor:
    """Flat pixel offsets (N, S, S), in a frame ``width`` wide, of the windows of side
    ``S = size + 2*context`` whose corner is at ``(size*row, size*col)``."""
    span = torch.arange(size + 2 * context, device=row.device)
    rows = (row * size).unsqueeze(1) + span
    cols = (col * size).unsqueeze(1) + span
    return rows.unsqueeze(2) * width + cols.unsqueeze(1)


def crop_windows(x: Tensor, index: Tuple[Tensor, Tensor, Tensor], size: int, context: int) -> Tensor:
    """``refiner.crop_patches`` with one-dimensional gathers, which every exporter handles:
    (N, C, S, S) windows around the cells, zero outside the frame."""
    batch, row, col = index
    x = F.pad(x, [context, context, context, context])
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    pixels = _cell_pixels(row, col, size, context, width) + (batch * (height * width)).reshape(-1, 1, 1)
    table = x.permute(0, 2, 3, 1).reshape(-1, channels)
    side = size + 2 * context
    return table.index_select(0, pixels.reshape(-1)).reshape(-1, side, side, channels).permute(0, 3, 1, 2)


def write_windows(x: Tensor, patches: Tensor, index: Tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """``refiner.replace_patches`` with a one-dimensional scatter: ``x`` with (N, C, S, S) ``patches``
    written at the cells (of side S), as a new tensor."""
    batch, row, col = index
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    size = patches.shape[3]
    pixels = _cell_pixels(row, col, size, 0, width) + (batch * (height * width)).reshape(-1, 1, 1)
    table = x.permute(0, 2, 3, 1).reshape(-1, channels).clone()
    table[pixels.reshape(-1)] = patches.permute(0, 2, 3, 1).reshape(-1, channels).to(x.dtype)
    return table.reshape(x.shape[0], height, width, channels).permute(0, 3, 1, 2)


class ExportableMatting(nn.Module):
    """``MattingRefine``'s computation in a form TorchScript compiles and the ONNX exporter traces.

    ``base`` runs the base network (``BaseNetwork``, or a traced copy of it for TorchScript); the
    refiner's layers are the plain model's. Returns ``(pha, fgr, pha_sm, fgr_sm, err_sm, ref_sm)``.
    """

    backbone_scale: float
    refine_mode: str
    refine_sample_pixels: int
    refine_threshold: float
    refine_prevent_oversampling: bool
    refine_kernel_size: int
    plate_solve: bool

    def __init__(self, model: MattingRefine, base: nn.Module) -> None:
        super().__init__()
        options = model.options
        self.backbone_scale = options.backbone_scale
        self.refine_mode = options.refine_mode
        self.refine_sample_pixels = options.refine_sample_pixels
        self.refine_threshold = options.refine_threshold
        self.refine_prevent_oversampling = options.refine_prevent_oversampling
        self.refine_kernel_size = options.refine_kernel_size
        self.plate_solve = model.plate_solve
        self.base = base
        r = model.refiner
        self.conv1, self.bn1, self.conv2, self.bn2 = r.conv1, r.bn1, r.conv2, r.bn2
        self.conv3, self.bn3, self.conv4 = r.conv3, r.bn3, r.conv4

    def forward(self, src: Tensor, bgr: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        height, width = src.shape[2], src.shape[3]
        # Padding to a multiple of 4 is always applied (often by 0) so that a traced graph has no branch.
        pad_h, pad_w = (4 - height % 4) % 4, (4 - width % 4) % 4
        src = F.pad(src, [0, pad_w, 0, pad_h], mode="replicate")
        bgr = F.pad(bgr, [0, pad_w, 0, pad_h], mode="replicate")
        full_h, full_w = height + pad_h, width + pad_w
        small = [math.floor(full_h * self.backbone_scale), math.floor(full_w * self.backbone_scale)]
        src_sm = F.interpolate(src, size=small, mode="bilinear", align_corners=False)
        bgr_sm = F.interpolate(bgr, size=small, mode="bilinear", align_corners=False)
        x = self.base(src_sm, bgr_sm)
        pha_sm = x[:, 0:1].clamp(0.0, 1.0)
        fgr_residual_sm = x[:, 1:4]
        err_sm = x[:, 4:5].clamp(0.0, 1.0)
        hid_sm = x[:, 5:].relu()
        pha, fgr_residual, ref_sm = self._refine(src, bgr, pha_sm, fgr_residual_sm, err_sm, hid_sm)
        pha = pha.clamp(0.0, 1.0)
        fgr = (fgr_residual + src).clamp(0.0, 1.0)
        if self.plate_solve:
            pha = solve_alpha(src, bgr, pha, fgr)
        pha, fgr = pha[:, :, :height, :width], fgr[:, :, :height, :width]
        fgr_sm = (fgr_residual_sm + src_sm).clamp(0.0, 1.0)
        return pha, fgr, pha_sm, fgr_sm, err_sm, ref_sm

    def _half_stage(self, x: Tensor, y: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(torch.cat([x, y], dim=1))))
        return torch.relu(self.bn2(self.conv2(x)))

    def _full_stage(self, x: Tensor, y: Tensor) -> Tensor:
        x = torch.relu(self.bn3(self.conv3(torch.cat([x, y], dim=1))))
        return self.conv4(x)

    def _select(self, err: Tensor) -> Tensor:
        """The cells to refine, as the plain refiner's ``select``; the top-k runs over the error map
        followed by ``count`` entries of -1, so that k never exceeds the map and needs no shape."""
        if self.refine_mode == "thresholding":
            return err.gt(self.refine_threshold).to(err.dtype)
        batch, cells = err.shape[0], err.shape[2] * err.shape[3]
        flat = err.reshape(batch, cells)
        count = self.refine_sample_pixels // 16
        padded = torch.cat([flat, torch.full([batch, count], -1.0, dtype=flat.dtype, device=flat.device)], dim=1)
        chosen = torch.zeros_like(padded).scatter(1, padded.topk(count, dim=1, sorted=False).indices, 1.0)
        ref = chosen[:, :cells]
        if self.refine_prevent_oversampling:
            ref = ref * flat.gt(0).to(flat.dtype)
        return ref.reshape(err.shape)

    def _refine(self, src: Tensor, bgr: Tensor, pha: Tensor, fgr: Tensor, err: Tensor,
                hid: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        full_h, full_w = src.shape[2], src.shape[3]
        half = [full_h // 2, full_w // 2]
        quarter = [full_h // 4, full_w // 4]
        src_bgr = torch.cat([src, bgr], dim=1)
        x = F.interpolate(torch.cat([hid, pha, fgr], dim=1), size=half, mode="bilinear", align_corners=False)
        y = F.interpolate(src_bgr, size=half, mode="bilinear", align_corners=False)
        if self.refine_mode == "full":
            if self.refine_kernel_size == 3:
                x, y = F.pad(x, [3, 3, 3, 3]), F.pad(y, [3, 3, 3, 3])
                target = [full_h + 4, full_w + 4]
                full = F.pad(src_bgr, [2, 2, 2, 2])
            else:
                target, full = [full_h, full_w], src_bgr
            x = F.interpolate(self._half_stage(x, y), size=target, mode="nearest")
            x = self._full_stage(x, full)
            ref = torch.ones([src.shape[0], 1, quarter[0], quarter[1]], dtype=src.dtype, device=src.device)
            return x[:, :1], x[:, 1:], ref

        err = F.interpolate(err, size=quarter, mode="bilinear", align_corners=False)
        ref = self._select(err)
        coarse = F.interpolate(torch.cat([pha, fgr], dim=1), size=[full_h, full_w], mode="bilinear",
                               align_corners=False)
        cells = torch.nonzero(ref.squeeze(1))
        if not torch.jit.is_scripting():
            if torch.compiler.is_compiling():
                # For the ONNX exporter, which otherwise stops at the data-dependent patch count: this
                # only tells the tracer that no shape depends on the count being zero (the exported
                # graph runs frames without patches; see tests/test_export.py).
                torch._check(cells.shape[0] != 0)
        index = (cells[:, 0], cells[:, 1], cells[:, 2])
        if self.refine_kernel_size == 3:
            context_half, context_full, upsampled = 3, 2, 8
        else:
            context_half, context_full, upsampled = 0, 0, 4
        x = self._half_stage(crop_windows(x, index, 2, context_half), crop_windows(y, index, 2, context_half))
        x = F.interpolate(x, size=[upsampled, upsampled], mode="nearest")
        x = self._full_stage(x, crop_windows(src_bgr, index, 4, context_full))
        out = write_windows(coarse, x, index)
        return out[:, :1], out[:, 1:], ref


@contextmanager
def _modes_kept(model: nn.Module) -> Iterator[None]:
    """Leave every layer of ``model`` in the mode it was in, whatever the block does. The exports share the model's
    own layers and put them in eval mode to trace and compile them; a model exported in the middle of its training
    would otherwise go on training with its batch norms frozen, while ``model.training`` still says True."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def to_torchscript(model: MattingRefine) -> torch.jit.ScriptModule:
    """A TorchScript module computing ``model`` (in eval mode); its settings can be changed after ``torch.jit.load``.
    The model itself, and each of its layers, stays in the mode it was in."""
    _check_model(model)
    parameter = next(model.parameters())
    # The base network is traced (plain convolutions; the sizes inside stay symbolic), the refinement
    # logic around it, with its settings, compiled.
    example = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0)).to(parameter)
    with _modes_kept(model), torch.no_grad():
        base = torch.jit.trace(BaseNetwork(model).eval(), (example, example.flip(-1)), check_trace=False)
        return torch.jit.script(ExportableMatting(model, base).eval())


def export_torchscript(model: MattingRefine, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` as TorchScript (in its current dtype and device) to ``path``; returns the path.

    An existing file is refused unless ``overwrite``; the model is written under a temporary name and renamed.
    """
    path = Path(path)
    check_destination(path, overwrite)
    scripted = to_torchscript(model)
    # torch.jit.save reports a file it cannot write as a RuntimeError, not an OSError.
    write_through_temporary(path, lambda temporary: torch.jit.save(scripted, str(temporary)),
                            "the TorchScript model", (OSError, RuntimeError))
    return path


def check_onnx_export(opset: int = ONNX_OPSET) -> Any:
    """The onnx module, once it is known to be installed and to make `opset`: checked before the model loads and the
    minute-long trace. Outside 18 to the newest it knows, the exporter spends its minute, fails to convert its graph
    (its operators start at 18; 17 has no Pad adapter) and writes another opset than asked, with only a logged
    traceback to say so."""
    onnx = _import_onnx("onnx")
    if opset < 18:
        raise BgmatteError(f"ONNX opset {opset} is too old: use 18 or later")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise BgmatteError(f"ONNX opset {opset} is newer than this onnx package knows ({newest}): use 18 to {newest}")
    return onnx


def export_onnx(model: MattingRefine, path: str | Path, *, opset: int = ONNX_OPSET, overwrite: bool = False) -> Path:
    """Write ``model`` as ONNX (fp32, dynamic batch, height and width) to ``path``; returns the path.

    Uses ``torch.onnx.export``'s dynamo exporter (the default since torch 2.9), which keeps the
    sizes symbolic; it takes about a minute on two CPU cores. The settings are fixed in the graph and
    stored in the file's metadata. An existing file is refused unless ``overwrite``, before that minute
    is spent; the model is written under a temporary name and renamed. The model, and each of its layers, stays
    in the mode and on the device it was in.
    """
    _check_model(model)
    path = Path(path)
    check_destination(path, overwrite)
    onnx = check_onnx_export(opset)
    parameter = next(model.parameters())
    if parameter.dtype != torch.float32:
        raise BgmatteError("ONNX export is fp32 only; the model is " + str(parameter.dtype).replace("torch.", ""))
    generator = torch.Generator().manual_seed(0)
    # A batch of 2 at 256x320, so that nothing is specialised to a batch of 1 or to tiny maps.
    example = (torch.rand(2, 3, 256, 320, generator=generator), torch.rand(2, 3, 256, 320, generator=generator))
    batch = torch.export.Dim("batch", min=1, max=256)
    height, width = torch.export.Dim("height", min=16, max=16384), torch.export.Dim("width", min=16, max=16384)
    sizes = {0: batch, 2: height, 3: width}
    # The exporter logs one "torchvision is not installed. Skipping torchvision::..." line per torchvision
    # operator it could register; bgmatte uses none of them, so those records (only those) are dropped.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    registration.addFilter(_no_torchvision_notice)
    # onnx_ir warns of an empty attribute list in torch's own graph, which it types as it should (INTS).
    attributes = logging.getLogger("onnx_ir._convenience")
    attributes.addFilter(_no_empty_attribute_notice)
    # The opset conversion logs its failures (with a traceback) and goes on; the opset made is checked below.
    conversion = logging.getLogger("onnxscript.version_converter")
    conversion.addFilter(_nothing)
    try:
        with _modes_kept(model), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            exportable = ExportableMatting(model, BaseNetwork(model)).eval().cpu()  # the model's layers, see above
            program = torch.onnx.export(exportable, example, None, dynamo=True, opset_version=opset,
                                        input_names=["src", "bgr"], output_names=list(OUTPUT_NAMES),
                                        dynamic_shapes={"src": sizes, "bgr": sizes}, verbose=False)
        proto = program.model_proto
    finally:
        registration.removeFilter(_no_torchvision_notice)
        attributes.removeFilter(_no_empty_attribute_notice)
        conversion.removeFilter(_nothing)
        model.to(parameter.device)
    made = next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), None)
    if made != opset:
        raise BgmatteError(f"{path}: the exporter could not make ONNX opset {opset} (it made opset {made}); "
                           f"use opset {made}")
    metadata = {"producer": "bgmatte", "backbone": model.backbone_name, **_settings_metadata(model.options),
                "plate_solve": "on" if model.plate_solve else "off"}
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    write_through_temporary(path, lambda temporary: onnx.save_model(proto, str(temporary)), "the ONNX model",
                            (OSError, ValueError))
    return path


def _nothing(record: logging.LogRecord) -> bool:
    return False


def _no_torchvision_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("torchvision is not installed")


def _no_empty_attribute_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Attribute type is ambiguous because it is an empty sequence")


def _settings_metadata(options: RefineOptions) -> dict[str, str]:
    return {"backbone_scale": repr(options.backbone_scale), "refine_mode": options.refine_mode,
            "refine_sample_pixels": str(options.refine_sample_pixels),
            "refine_threshold": repr(options.refine_threshold),
            "refine_kernel_size": str(options.refine_kernel_size),
            "refine_prevent_oversampling": str(options.refine_prevent_oversampling)}


def _options_from_metadata(metadata: dict[str, str], source: str) -> RefineOptions:
    try:
        return RefineOptions(float(metadata["backbone_scale"]), metadata["refine_mode"],
                             int(metadata["refine_sample_pixels"]), float(metadata["refine_threshold"]),
                             int(metadata["refine_kernel_size"]), metadata["refine_prevent_oversampling"] == "True")
    except (KeyError, ValueError) as exc:
        raise BgmatteError(f"{source}: not an ONNX model exported by bgmatte (its settings are missing: {exc})") from None


def _import_onnx(name: str):
    """``onnx`` or ``onnxruntime``, which are the optional ``[onnx]`` extra."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise BgmatteError(f"{name} is not installed: install the extra with `pip install bgmatte[onnx]`") from None


def export_checkpoint(checkpoint: str | Path | None, output: str | Path, *, format: str,
                      backbone: str | None = None, options: RefineOptions = RefineOptions(),
                      refine_kernel_size: int | None = None, precision: str = "fp32",
                      device: str = "cpu", opset: int = ONNX_OPSET, plate_solve: bool | None = None,
                      overwrite: bool = False) -> Path:
    """Load a checkpoint (None: the embedded default model) and export it as ``torchscript`` or ``onnx``;
    ``plate_solve`` as for ``load_model`` (None: as the weights say). An existing ``output`` is refused,
    before the checkpoint is read, unless ``overwrite``."""
    from bgmatte.model.build import DEFAULT_WEIGHTS, load_model, resolve_device

    if format not in ("torchscript", "onnx"):
        raise BgmatteError(f"unknown export format {format!r}: choose torchscript or onnx")
    if format == "onnx" and precision != "fp32":
        raise BgmatteError("ONNX export is fp32 only (onnxruntime converts at load time if it needs to)")
    resolve_device(device)  # an unusable device first, before the output and the checkpoint are looked at
    check_destination(Path(output), overwrite)
    _refuse_replacing_source(Path(output), Path(checkpoint) if checkpoint is not None else DEFAULT_WEIGHTS)
    if format == "onnx":
        check_onnx_export(opset)  # onnx installed, and the opset one it makes: before the weights are read
    model = load_model(checkpoint, backbone=backbone, backbone_scale=options.backbone_scale,
                       refine_mode=options.refine_mode, refine_sample_pixels=options.refine_sample_pixels,
                       refine_threshold=options.refine_threshold, refine_kernel_size=refine_kernel_size,
                       device=device, optimize=False, precision=precision, plate_solve=plate_solve)
    model.refiner.prevent_oversampling = options.refine_prevent_oversampling
    if format == "torchscript":
        return export_torchscript(model, output, overwrite=overwrite)
    return export_onnx(model, output, opset=opset, overwrite=overwrite)


def _refuse_replacing_source(output: Path, checkpoint: Path) -> None:
    """Refuse an output that is the checkpoint being exported (the embedded weights when none is given), under
    its own name or another (a link), even with ``overwrite``: the export would destroy what it reads."""
    try:
        same = output.exists() and checkpoint.exists() and os.path.samefile(output, checkpoint)
    except OSError:
        same = False
    if same:
        raise BgmatteError(f"{output}: is the checkpoint being exported ({checkpoint}); choose another output")


def onnx_providers(device: str | torch.device | None) -> list:
    """onnxruntime's execution providers for ``auto`` (or None), ``cpu``, ``cuda`` or ``cuda:N``, checked before
    anything is exported or loaded; ``auto`` takes CUDA only where both onnxruntime and PyTorch have it."""
    ort = _import_onnx("onnxruntime")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    name = "auto" if device is None else str(device)
    if name == "auto":
        name = "cuda" if has_cuda and torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(name)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise BgmatteError(f"the onnxruntime backend cannot run on device {name!r}: use auto, cpu, cuda or cuda:N")
    if resolved.type == "cpu":
        return ["CPUExecutionProvider"]
    if not has_cuda:
        raise BgmatteError(f"device {name!r} was asked for, but this onnxruntime has no CUDA provider "
                           "(install onnxruntime-gpu)")
    return [("CUDAExecutionProvider", {"device_id": resolved.index or 0}), "CPUExecutionProvider"]


class OnnxMatting:
    """An exported ONNX model run by onnxruntime, called as ``MattingRefine`` is.

    ``model(src, bgr)`` takes float tensors (B, 3, H, W) in [0, 1] and returns the six outputs on
    ``device``, the torch device of the provider the session runs on (it has no parameters to tell it).
    The settings were fixed at export; ``options`` and ``backbone_name`` tell them. A failed allocation raises
    MemoryError; any other failure of onnxruntime, a one-line BgmatteError.
    """

    def __init__(self, path: str | Path, *, device: str | torch.device | None = "cpu",
                 threads: int | None = None) -> None:
        ort = _import_onnx("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise BgmatteError(f"{self.path}: ONNX model not found")
        session_options = ort.SessionOptions()
        if threads:
            session_options.intra_op_num_threads = threads
            session_options.inter_op_num_threads = 1
        providers = onnx_providers(device)
        try:
            self.session = ort.InferenceSession(str(self.path), session_options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BgmatteError(f"{self.path}: onnxruntime cannot load it ({first})") from None
        self.device = _session_device(self.session, providers)
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.options = _options_from_metadata(metadata, str(self.path))
        self.backbone_name = metadata.get("backbone", "unknown")
        self.plate_solve = metadata.get("plate_solve") == "on"
        self.training = False

    def eval(self) -> "OnnxMatting":
        """For symmetry with torch modules: an ONNX model is always in inference mode."""
        return self

    def __call__(self, src: Tensor, bgr: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        check_inputs(src, bgr)  # as the torch model: uint8 frames must be scaled to [0, 1] first, not cast
        feed = {"src": src.detach().float().cpu().contiguous().numpy(),
                "bgr": bgr.detach().float().cpu().contiguous().numpy()}
        try:
            outputs = self.session.run(list(OUTPUT_NAMES), feed)
        except Exception as exc:  # onnxruntime's own types, none of them a RuntimeError or MemoryError
            raise _run_failure(exc, self.path, tuple(src.shape)) from None
        return tuple(torch.from_numpy(output).to(self.device) for output in outputs)  # type: ignore[return-value]


def _run_failure(exc: Exception, path: Path, shape: tuple) -> Exception:
    """onnxruntime's failure to run as Python's exceptions: a failed allocation as a MemoryError (which `Predictor`
    words as NotEnoughMemory, as for the torch model), anything else as one line naming the model and the input."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if "allocate memory" in text.lower() or "out of memory" in text.lower():
        return MemoryError(first)
    return BgmatteError(f"{path}: onnxruntime failed on a batch of {shape[0]} at {shape[3]}x{shape[2]} ({first})")


def _session_device(session, providers: list) -> torch.device:
    """The torch device an onnxruntime session computes on: CUDA only if its CUDA provider really loaded (it
    falls back to the CPU with a warning when the CUDA libraries are missing)."""
    for provider in providers:
        if isinstance(provider, tuple) and provider[0] == "CUDAExecutionProvider":
            if "CUDAExecutionProvider" in session.get_providers():
                return torch.device("cuda", provider[1]["device_id"])
    return torch.device("cpu")


def load_onnx_backend(checkpoint: str | Path | None, *, backbone: str | None, options: RefineOptions,
                      refine_kernel_size: int | None, device: str | torch.device | None, precision: str,
                      threads: int | None = None, plate_solve: bool | None = None,
                      given: Collection[str] = ()) -> OnnxMatting:
    """``load_model(..., backend="onnxruntime")``: an ``.onnx`` file runs as it is, refusing the settings of
    ``options`` named in ``given`` (those the caller asked for) that differ from its own; a checkpoint is
    exported to ONNX with ``options`` first (about a minute), into a temporary file."""
    if precision != "fp32":
        raise BgmatteError("the onnxruntime backend runs fp32 models only")
    onnx_providers(device)  # an unusable device is refused before a checkpoint spends a minute exporting
    if checkpoint is not None and Path(checkpoint).suffix == ".onnx":
        model = OnnxMatting(checkpoint, device=device, threads=threads)
        _check_fixed_settings(model, backbone, options, refine_kernel_size, given)
        if plate_solve is not None and plate_solve != model.plate_solve:
            raise BgmatteError(f"{checkpoint}: exported with the plate solve {'on' if model.plate_solve else 'off'}; "
                               f"an ONNX model's settings are fixed, so export again with --plate-solve "
                               f"{'on' if plate_solve else 'off'}")
        return model
    with tempfile.TemporaryDirectory(prefix="bgmatte-onnx-") as folder:
        path = export_checkpoint(checkpoint, Path(folder) / "model.onnx", format="onnx", backbone=backbone,
                                 options=options, refine_kernel_size=refine_kernel_size, plate_solve=plate_solve)
        return OnnxMatting(path, device=device, threads=threads)  # the session holds the model in memory


def _check_fixed_settings(model: OnnxMatting, backbone: str | None, options: RefineOptions,
                          refine_kernel_size: int | None, given: Collection[str]) -> None:
    """An ONNX file's settings are fixed: refuse those asked for (``given``; a default value asked for counts)
    that differ."""
    source = str(model.path)
    if backbone is not None and backbone != model.backbone_name:
        raise BgmatteError(f"{source}: exported with backbone {model.backbone_name}, not {backbone}")
    if refine_kernel_size is not None and refine_kernel_size != model.options.refine_kernel_size:
        raise BgmatteError(f"{source}: exported with refine kernel size {model.options.refine_kernel_size}")
    for name in ("backbone_scale", "refine_mode", "refine_sample_pixels", "refine_threshold"):
        asked, fixed = getattr(options, name), getattr(model.options, name)
        if name in given and asked != fixed:
            raise BgmatteError(f"{source}: exported with {name}={fixed!r}; an ONNX model's settings are fixed, "
                               f"so export again with {name}={asked!r}")


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, MattingRefine):
        raise BgmatteError(f"can only export a MattingRefine model, not {type(model).__name__}")
