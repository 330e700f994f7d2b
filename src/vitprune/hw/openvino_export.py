"""OpenVINO IR export (fp32, and NNCF post-training int8) and an OpenVINO CPU runner for a (patched) ViT.

    export_openvino(model, "m.xml", batch_size=32)               # m.xml + m.bin; patched or not; eval mode
    quantize_int8("m.xml", "m.int8.xml", calibration_images)      # NNCF post-training quantization
    runner = OpenVINOModule(ov_compiled("m.int8.xml", threads=2))  # call it like a model: logits = runner(images)

Route: PyTorch → ONNX (``onnx_export.export_onnx``) → OpenVINO IR, because it is the one that works for every
fixed-count method. OpenVINO's own PyTorch frontend fails on patched models either way it takes them: from an
``nn.Module`` it traces with TorchScript, whose sanity check finds the traced graphs differ between calls (the
engine's token bookkeeping) and which cannot trace ToGo's in-place ``scatter_``; from a ``torch.export`` program it
has no conversion rule for ``aten.scatter_reduce`` (ToMe's and PPT's merges). The ONNX route reuses the tested
exporter, refuses data-dependent methods with the same ValueError, and keeps the batch axis dynamic.

fp32 means fp32: OpenVINO's CPU plugin otherwise runs in bf16 on CPUs with AMX or AVX512-BF16 (its default
``INFERENCE_PRECISION_HINT``), which moves logits by ~1e-2 and can flip a token choice. The IR is saved without
fp16 weight compression for the same reason.

int8: NNCF post-training quantization of the fp32 IR with calibration images (``ModelType.TRANSFORMER``: int8
weights per output channel and int8 activations around the matmuls; softmax and LayerNorm stay float, SmoothQuant
balances the activation outliers of the MLP inputs). OpenVINO then runs those matmuls on the CPU's int8 units
(VNNI, AMX).
"""
from __future__ import annotations

import contextlib
import importlib
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .onnx_export import export_onnx

INSTALL_HINT = "install the openvino extra: pip install 'vitprune[openvino]' (openvino, nncf, and the ONNX exporter)"
DEFAULT_SUBSET = 300  # calibration images NNCF uses at most (its own default)


def _require(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"{name} is needed for OpenVINO export and inference; {INSTALL_HINT}") from err


def _xml(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".xml":
        raise ValueError(f"an OpenVINO IR path ends in .xml (its weights go to .bin beside it), got {path}")
    return path


def export_openvino(
    model: nn.Module,
    path: str | Path,
    *,
    sample: Tensor | None = None,
    batch_size: int = 1,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` (eval mode, patched with a fixed-count method or not) to OpenVINO IR ``path`` (.xml, weights
    in .bin beside it); returns the path. Arguments as for :func:`~vitprune.hw.onnx_export.export_onnx`."""
    ov = _require("openvino")
    path = _xml(path)
    with tempfile.TemporaryDirectory(prefix="vitprune-ov-") as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "m.onnx", sample=sample, batch_size=batch_size,
                                dynamic_batch=dynamic_batch)
        ir = ov.convert_model(str(onnx_path))
        path.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(ir, str(path), compress_to_fp16=False)
    return path


def file_size(path: str | Path) -> int:
    """Bytes on disk of an IR: the graph (.xml) and its weights (.bin)."""
    path = _xml(path)
    weights = path.with_suffix(".bin")
    return path.stat().st_size + (weights.stat().st_size if weights.exists() else 0)


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    calibration: Iterable[Tensor],
    *,
    subset_size: int = DEFAULT_SUBSET,
) -> Path:
    """NNCF post-training int8 quantization of the IR ``src`` into ``dst`` (.xml); returns ``dst``.

    ``calibration``: batches of images [B, C, H, W] as the model takes them (preprocessed), e.g. a few hundred
    images of the data the model will see; NNCF collects activation ranges on up to ``subset_size`` of the batches.
    """
    ov = _require("openvino")
    nncf = _require("nncf")
    src, dst = _xml(src), _xml(dst)
    if not src.is_file():
        raise ValueError(f"{src} does not exist; export the model first (export_openvino or `vitprune export`)")
    if src.resolve() == dst.resolve():
        raise ValueError(f"quantizing {src} onto itself would lose the fp32 model; give another output path")
    batches = [np.ascontiguousarray(b.detach().to("cpu", torch.float32).numpy()) for b in calibration]
    if not batches:
        raise ValueError("int8 quantization needs calibration images; got none")
    model = ov.Core().read_model(str(src))
    with _quiet_nncf(nncf):
        quantized = nncf.quantize(model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=min(subset_size, len(batches)))
    dst.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
    return dst


@contextlib.contextmanager
def _quiet_nncf(nncf: ModuleType) -> Iterator[None]:
    """NNCF draws progress bars and logs each algorithm at INFO; a command's own progress display says what runs."""
    import io
    import logging

    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def ov_compiled(path: str | Path, threads: int = 2) -> Any:
    """The IR compiled for OpenVINO's CPU plugin: ``threads`` inference threads (the budget PyTorch gets in the
    bench), one stream (one request at a time, as the bench and a latency-bound deployment call it), fp32
    arithmetic where the IR is fp32, no CPU pinning (a shared machine's other processes move between cores)."""
    ov = _require("openvino")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    path = _xml(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist; export the model first (export_openvino or `vitprune export`)")
    config = {
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
        "ENABLE_CPU_PINNING": False,
    }
    return ov.Core().compile_model(str(path), "CPU", config)


class OpenVINOModule(nn.Module):
    """An OpenVINO compiled model behind a module's call, so accuracy and timing code takes it like a model.

    Images go in as a float32 CPU tensor and logits come back as one. One infer request is reused: OpenVINO keeps
    its buffers between calls, as a deployment would.
    """

    def __init__(self, compiled: Any) -> None:
        super().__init__()
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def forward(self, x: Tensor) -> Tensor:
        x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
        self.request.infer({0: x.numpy()})
        return torch.from_numpy(np.array(self.request.get_output_tensor(0).data))
