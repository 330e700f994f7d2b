"""ExecuTorch export (``.pte`` lowered to XNNPACK; fp32, or int8 by PT2E quantization) and a runner on ExecuTorch's
Python runtime, for a (patched) ViT whose token counts are fixed per block.

    export_executorch(model, "m.pte", batch_size=32)                          # fp32
    export_executorch(model, "m.int8.pte", batch_size=32, calibration=images)  # int8 (XNNPACK quantizer)
    runner = ExecuTorchModule("m.int8.pte", threads=2)                         # logits = runner(images)

The graph is ``torch.export``'s, as for ONNX (the same refusal of data-dependent methods), lowered with
``to_edge_transform_and_lower`` and the XNNPACK partitioner: XNNPACK runs the matmuls, convolution, softmax,
LayerNorm and GELU; what it does not take (the methods' gathers and top-k) runs on ExecuTorch's portable kernels.
The runtime in the ``executorch`` wheel lacks or miscomputes a few ops the methods use, so they are rewritten before
lowering (each checked exact in ``tests/test_runtimes.py``):

- ``sort``/``argsort`` (no kernel; EViT, PPT and ToMe order tokens by score) → a full-length sorted ``topk`` (ties
  may break differently, which exact float scores almost never have);
- ``scatter_reduce`` (no kernel; merges written with it) → ``scatter_add``;
- ``add``/``sub`` with ``alpha`` (the kernel scales the wrong operand when the first one is broadcast: ToMe's row
  positions) → a multiply and a plain ``add``/``sub``.

int8 (``calibration`` given): PT2E post-training quantization with ExecuTorch's ``XNNPACKQuantizer`` (symmetric
int8, weights per output channel, activations per tensor from histogram observers over the calibration images),
``prepare_pt2e`` → calibration forwards → ``convert_pt2e``, then the same lowering: XNNPACK runs the quantized
Linears and the patch Conv in int8 (only those: see ``QUANTIZED_OPS``).

Batch: programs are memory-planned ahead of time for their largest shapes, so a dynamic batch axis has an upper
bound (``max_batch``); the runner splits larger inputs into chunks of at most that many images.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import io
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from .onnx_export import _export_mode, export_sample, traced_batch

INSTALL_HINT = "install the executorch extra: pip install 'vitprune[executorch]'"
DEFAULT_MAX_BATCH = 64
aten = torch.ops.aten
# int8 where nearly all MACs are (every Linear: qkv, proj, fc1, fc2, head; the patch-embedding Conv), as the ONNX
# Runtime int8 rows do. The quantizer's global setting would also quantize the residual adds and the token
# concatenation per tensor: the residual stream's outliers then cost most of the accuracy (cosine to fp32 fell
# to ~0.8 on a random-init ViT), and its histogram observers fail on the methods' integer index arithmetic.
QUANTIZED_OPS = (aten.linear.default, aten.conv2d.default)


def _require(name: str) -> ModuleType:
    try:
        with _quiet():
            return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"{name} is needed for ExecuTorch export and inference; {INSTALL_HINT}") from err


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ExecuTorch's import and lowering warn about deprecations and fallbacks that do not apply here."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torch.utils.cpp_extension", "torch._export", "torch.export")]
    levels = [log.level for log in loggers]
    try:
        for log in loggers:
            log.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


# ---- the rewrites that keep every op on a kernel the runtime has ------------------------------------------------
def _sort(x: Tensor, dim: int = -1, descending: bool = False) -> tuple[Tensor, Tensor]:
    return aten.topk.default(x, x.shape[dim], dim, descending, True)


def _sort_stable(x: Tensor, *, stable: bool | None = None, dim: int = -1,
                 descending: bool = False) -> tuple[Tensor, Tensor]:
    return _sort(x, dim, descending)


def _argsort(x: Tensor, dim: int = -1, descending: bool = False) -> Tensor:
    return _sort(x, dim, descending)[1]


def _argsort_stable(x: Tensor, *, stable: bool, dim: int = -1, descending: bool = False) -> Tensor:
    return _sort(x, dim, descending)[1]


def _scatter_reduce(self: Tensor, dim: int, index: Tensor, src: Tensor, reduce: str,
                    include_self: bool = True) -> Tensor:
    if reduce != "sum":
        raise ValueError(f"ExecuTorch export: scatter_reduce with reduce={reduce!r} has no kernel in the runtime; "
                         "only 'sum' is rewritten (to scatter_add)")
    base = self if include_self else aten.scatter.value(self, dim, index, 0)
    return aten.scatter_add.default(base, dim, index, src)


REWRITES: dict[Any, Callable[..., Any]] = {
    aten.sort.default: _sort,
    aten.sort.stable: _sort_stable,
    aten.argsort.default: _argsort,
    aten.argsort.stable: _argsort_stable,
    aten.scatter_reduce.two: _scatter_reduce,
}


def _fold_alpha(program: Any) -> Any:
    """``add``/``sub`` with ``alpha`` ≠ 1 become a multiply and a plain ``add``/``sub``, in place.

    The runtime's ``add`` kernel scales the wrong operand when the first one is broadcast (``torch.add(2, idx,
    alpha=2)`` gives ``4 + idx``, not ``2 + 2·idx``): token positions computed that way (ToMe's merge plan) went
    to the wrong rows. A decomposition cannot do this (it would call ``add`` again and recurse), so it is a graph
    edit before the decompositions run.
    """
    for module in program.graph_module.modules():  # also the no-grad regions, which are submodules until inlined
        if not isinstance(module, torch.fx.GraphModule):
            continue
        graph = module.graph
        for node in list(graph.nodes):
            alpha = node.kwargs.get("alpha", 1) if node.op == "call_function" else 1
            if node.target not in (aten.add.Tensor, aten.sub.Tensor) or alpha == 1:
                continue
            other = node.args[1]
            if isinstance(other, torch.fx.Node):
                with graph.inserting_before(node):
                    other = graph.call_function(aten.mul.Tensor, (other, alpha))
            else:
                other = other * alpha
            node.args = (node.args[0], other)
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "alpha"}
        module.recompile()
    return program


# ---- export -----------------------------------------------------------------------------------------------------
def export_executorch(
    model: nn.Module,
    path: str | Path,
    *,
    sample: Tensor | None = None,
    batch_size: int = 1,
    dynamic_batch: bool = True,
    max_batch: int | None = None,
    calibration: Iterable[Tensor] | None = None,
) -> Path:
    """Export ``model`` (eval mode, patched with a fixed-count method or not) to an ExecuTorch program ``path``
    (.pte) lowered to XNNPACK; returns the path.

    ``sample``: example images [B, C, H, W] (default: random ones of the model's size, ``batch_size`` of them).
    ``dynamic_batch``: batches of 1 to ``max_batch`` images (default: max(B, 64)) run; else exactly B.
    ``calibration``: batches of images [b, C, H, W]; given, the program is int8 (PT2E, XNNPACK quantizer).
    """
    _require("executorch")
    path = Path(path)
    if path.suffix != ".pte":
        raise ValueError(f"an ExecuTorch program's path ends in .pte, got {path}")
    x = export_sample(model, sample, batch_size).detach().to("cpu", torch.float32)
    upper = max(x.shape[0], DEFAULT_MAX_BATCH) if max_batch is None else max_batch
    if upper < x.shape[0]:
        raise ValueError(f"max_batch ({upper}) is smaller than the sample's batch ({x.shape[0]})")
    x = traced_batch(x, dynamic_batch)
    shapes = ({0: torch.export.Dim("batch", min=1, max=max(upper, 2))},) if dynamic_batch else None
    batches = None if calibration is None else [b.detach().to("cpu", torch.float32) for b in calibration]
    if batches is not None and not batches:
        raise ValueError("int8 quantization needs calibration images; got none")
    with torch.no_grad():
        model(x)  # methods fill their lazy caches (e.g. ToGo's group layouts) with real tensors, not exporter fakes
    with _export_mode(model), _quiet():
        program = torch.export.export(model, (x,), dynamic_shapes=shapes)
        if batches is not None:
            program = _quantized(program, x, shapes, batches)
        program = _fold_alpha(program).run_decompositions(REWRITES)
        buffer = _lower(program)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer)
    return path


def _quantized(program: Any, x: Tensor, shapes: Any, batches: list[Tensor]) -> Any:
    """PT2E: observers inserted by the XNNPACK quantizer, calibration forwards, quantize/dequantize pairs."""
    _require("torchao")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                          get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    class LinearQuantizer(XNNPACKQuantizer):
        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            """The base class turns every scalar operand of add/mul into a float tensor so that it could quantize
            them; that breaks integer index arithmetic (``index + offset`` becomes a float index). Only linears and
            convolutions are quantized here, which have no scalar operands, so the graph is left as it is."""
            return model

    config = get_symmetric_quantization_config(is_per_channel=True)
    quantizer = LinearQuantizer()
    for op in QUANTIZED_OPS:
        quantizer.set_operator_type(op, config)
    prepared = prepare_pt2e(program.module(), quantizer)
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    converted = convert_pt2e(prepared)
    return torch.export.export(converted, (x,), dynamic_shapes=shapes)


def _lower(program: Any) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    return edge.to_executorch().buffer


# ---- running ----------------------------------------------------------------------------------------------------
_executed = False  # whether any ExecuTorch program has run in this process (the threadpool is then in use)


def set_threads(threads: int) -> None:
    """Size ExecuTorch's threadpool (which XNNPACK runs on) to ``threads``.

    The pool is one per process and its resize is marked unsafe: resizing it after programs had run hung a test
    run inside XNNPACK's parallel loop. So it is resized only before the first program runs, and a later request
    for another size is one ValueError: every ExecuTorch runner of a process shares one thread count (the bench
    gives every runtime the same one anyway).
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    current = _threads()
    if current == threads:
        return
    if _executed:
        raise ValueError(f"ExecuTorch's threadpool is one per process and already runs programs with {current} "
                         f"threads; resizing it to {threads} under running programs is unsafe, so give every "
                         "ExecuTorch runner of a process the same thread count")
    with _runtime_log():
        _portable()._unsafe_reset_threadpool(threads)


@functools.lru_cache(maxsize=1)
def _portable() -> ModuleType:
    return _require("executorch.extension.pybindings.portable_lib")


def _threads() -> int:
    return _portable()._threadpool_get_thread_count()


@contextlib.contextmanager
def _runtime_log() -> Iterator[Callable[[], str]]:
    """The runtime's C++ side logs to the process's stderr (file descriptor 2) as it loads a program and resizes its
    threadpool: CPU probing and the threadpool size at every load, the missing kernels when a load fails. That goes
    to a temporary file instead, which the caller may read (``log()``) to explain a failure."""
    import os
    import sys
    import tempfile

    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: (sink.flush(), sink.seek(0), sink.read())[2]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class ExecuTorchModule(nn.Module):
    """An ExecuTorch program on the Python runtime behind a module's call, so accuracy and timing code takes it
    like a model. Images go in as a float32 CPU tensor, logits come back as one. ``threads``: the threadpool size
    (see :func:`set_threads`: one per process)."""

    def __init__(self, path: str | Path, threads: int = 2) -> None:
        super().__init__()
        runtime = _require("executorch.runtime")
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path} does not exist; export the model first (export_executorch or `vitprune export`)")
        self.threads = threads
        set_threads(threads)
        with _runtime_log() as log:
            try:
                self.method = runtime.Runtime.get().load_program(path).load_method("forward")
            except RuntimeError as err:
                missing = sorted({line.split("Missing operator:")[1].strip() for line in log().splitlines()
                                  if "Missing operator:" in line})
                hint = f"; the runtime has no kernel for {', '.join(missing)}" if missing else ""
                raise RuntimeError(f"ExecuTorch could not load {path}: {err}{hint}") from None
        shape = self.method.metadata.input_tensor_meta(0).sizes()
        self.max_batch = int(shape[0])  # the upper bound memory was planned for (or the static batch)

    def forward(self, x: Tensor) -> Tensor:
        global _executed
        set_threads(self.threads)  # another runner may have sized the pool differently before anything ran
        _executed = True
        x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
        outs = [self.method.execute([chunk.contiguous()])[0] for chunk in x.split(self.max_batch)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
