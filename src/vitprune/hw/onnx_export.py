"""ONNX export and ONNX Runtime deployment of a (patched) timm ViT whose token counts are fixed per block.

    export_onnx(model, "m.onnx", batch_size=32)            # patched or not; eval mode; onnx.checker runs
    session = ort_session("m.onnx", threads=2)
    quantize_dynamic_int8("m.onnx", "m.int8.onnx")           # int8 weights of every Linear, activations per batch

Exporter: ``torch.onnx.export(..., dynamo=True)`` (``torch.export``), because it is the one that works for every
method. The TorchScript exporter writes ToMe's and PPT's ``scatter_reduce`` as a ``Concat`` of mismatched ranks
(ONNX Runtime refuses to load the model) and cannot translate ToGo's in-place ``scatter_``. Where both work
(unpatched, EViT) ORT runs their graphs equally fast (DeiT-S, batch 32: within 4%) after its own graph
optimizations, though the dynamo graph has half the nodes. Methods whose per-block token counts depend on the data
(``TokenReducer.static_shapes`` is False) have no static-shape graph and are refused with a ValueError.

Only the batch axis may be dynamic: every block's token count is fixed by the config, so one graph serves any
batch size at the image size it was exported with.
"""
from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

MIN_OPSET = 17
DEFAULT_OPSET = 18  # the opset torch's ONNX translation library emits natively (no version conversion)
INPUT_NAME, OUTPUT_NAME = "images", "logits"
EXTERNAL_DATA_BYTES = 1 << 30  # larger weights go to <path>.data beside the graph (protobuf files stop at 2 GiB)
# Dynamic int8 quantizes the weight matmuls (every nn.Linear: qkv, proj, fc1, fc2, head), where nearly all MACs
# are. Attention's activation×activation matmuls, softmax, LayerNorm, GELU and the patch-embedding Conv stay fp32.
INT8_OP_TYPES = ("MatMul", "Gemm")
INSTALL_HINT = "install the onnx extra: pip install 'vitprune[onnx]' (onnx, onnxruntime, onnxscript)"


def _require(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"{name} is needed for ONNX export and ONNX Runtime; {INSTALL_HINT}") from err


def check_exportable(model: nn.Module) -> None:
    """Raise one ValueError when ``model`` has no static-shape ONNX graph (training mode, data-dependent counts)."""
    if model.training:
        raise ValueError("the model is in training mode; call model.eval() before exporting to ONNX")
    ctx = getattr(model, "_vitprune", None)
    method = getattr(ctx, "method", None)
    if method is not None and not method.static_shapes:
        config = method.describe()
        raise ValueError(
            f"method {method.name!r}{f' ({config})' if config else ''} keeps a data-dependent number of tokens per "
            "block (static_shapes is False), so it has no static-shape ONNX graph; export a fixed-count "
            "configuration instead (e.g. a learned selector with mode='fixed', or tome, evit, ppt, togo)"
        )


def example_input(model: nn.Module, batch_size: int = 1) -> Tensor:
    """Random images of the size ``model`` was built for: [batch_size, C, H, W]."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pe = model.patch_embed
    weight = pe.proj.weight
    return torch.randn(batch_size, pe.proj.in_channels, *tuple(pe.img_size), device=weight.device, dtype=weight.dtype)


@contextlib.contextmanager
def _export_mode(model: nn.Module) -> Iterator[None]:
    """Export on the plain module path.

    The engine's inference fast path (``kernels.py``: workspace buffers, in-place GELU and residual) runs under
    no-grad; traced, its reused buffer becomes a constant that the graph mutates, which ``torch.export`` rejects.
    So export runs with grad mode on and every parameter frozen: the module path, nothing recorded for autograd,
    and no straight-through factors (they apply only to tensors that require grad).
    """
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    sample: Tensor | None = None,
    batch_size: int = 1,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` (eval mode, patched or not) to ``path`` and check it with ``onnx.checker``; returns the path.

    ``sample``: example images [B, C, H, W] (default: random ones of the model's size, ``batch_size`` of them).
    ``dynamic_batch``: the batch axis is symbolic, so the file runs any batch size; otherwise it is fixed to B.
    """
    onnx = _require("onnx")
    _require("onnxscript")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET}, got {opset!r}; the default is {DEFAULT_OPSET}")
    x = traced_batch(export_sample(model, sample, batch_size), dynamic_batch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        model(x)  # methods fill their lazy caches (e.g. ToGo's group layouts) with real tensors, not exporter fakes
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with _export_mode(model), _quiet():
        torch.onnx.export(
            model, (x,), str(path), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes, verbose=False,
            external_data=weight_bytes > EXTERNAL_DATA_BYTES,
        )
    onnx.checker.check_model(str(path), full_check=True)
    return path


def export_sample(model: nn.Module, sample: Tensor | None, batch_size: int) -> Tensor:
    """The images an exporter traces ``model`` with: ``sample``, or ``batch_size`` random ones of the model's size.
    Refuses models whose token counts depend on the data, and anything but a non-empty [B, C, H, W] batch."""
    check_exportable(model)
    x = example_input(model, batch_size) if sample is None else sample
    if x.dim() != 4 or x.shape[0] < 1:
        raise ValueError(f"sample must be a non-empty [B, C, H, W] batch of images, got shape {tuple(x.shape)}")
    return x


def traced_batch(x: Tensor, dynamic_batch: bool) -> Tensor:
    """``x`` as torch.export should see it: it fixes an axis of size 1, so one image becomes two when the batch
    axis is to stay symbolic."""
    return x.expand(2, *x.shape[1:]).contiguous() if dynamic_batch and x.shape[0] == 1 else x


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter narrates its steps on stdout and warns about things that do not apply here."""
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def onnx_opset(path: str | Path) -> int:
    """The default-domain opset a file was written for."""
    onnx = _require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def file_size(path: str | Path) -> int:
    """Bytes on disk, external weights (``<path>.data``) included."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def ort_session(path: str | Path, threads: int = 2, *, spin: bool = False) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (the same budget PyTorch gets in the bench).

    ``spin=False``: ORT's worker threads otherwise busy-wait after each run and take the cores from whatever runs
    next (the PyTorch rows of a round-robin, other users of a shared machine); on a loaded 2-core VM that made ORT
    itself slower too, not faster.
    """
    ort = _require("onnxruntime")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtModule(nn.Module):
    """An ONNX Runtime session behind a module's call, so accuracy and timing code takes it like a model.

    Images go in as a float32 CPU tensor (zero-copy to numpy) and logits come back as one.
    """

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
        out = self.session.run(None, {self.input_name: x.numpy()})[0]
        return torch.from_numpy(np.asarray(out))


def max_abs_diff(model: nn.Module, runtime: nn.Module, x: Tensor) -> float:
    """Largest |PyTorch − ONNX Runtime| over the outputs for images ``x``."""
    with torch.no_grad():
        ref = model(x).float()
    return float((runtime(x) - ref).abs().max())


def quantize_dynamic_int8(src: str | Path, dst: str | Path, *, per_channel: bool = False) -> Path:
    """ONNX Runtime dynamic int8 quantization of ``src`` into ``dst``; returns ``dst``.

    Weights of ``INT8_OP_TYPES`` become signed int8 (per tensor, or per output channel with ``per_channel``);
    activations are quantized to uint8 per batch at run time (``DynamicQuantizeLinear`` → ``MatMulInteger``).
    """
    _require("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ValueError(f"{src} does not exist; export the model first (export_onnx or `vitprune export`)")
    if src.resolve() == dst.resolve():
        raise ValueError(f"quantizing {src} onto itself would lose the fp32 model; give another output path")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _without_preprocess_advice():
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(INT8_OP_TYPES), weight_type=QuantType.QInt8,
                         per_channel=per_channel)
    _require("onnx").checker.check_model(str(dst), full_check=True)
    return dst


@contextlib.contextmanager
def _without_preprocess_advice() -> Iterator[None]:
    """The quantizer advises ``quant_pre_process`` on every call. Its symbolic shape inference fails on these graphs
    (dynamic batch) and, without it, it gave no measurable int8 speedup here: ORT's session optimizer fuses the
    quantized matmuls when it loads the model anyway."""
    import logging

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

    root, drop = logging.getLogger(), Drop()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
