"""The deployment runtimes a (patched) model can be measured in, by name, and how each turns the model into a runner.

    targets = parse_runtimes("openvino,executorch-int8")   # [openvino fp32, openvino int8, executorch int8]
    check_runtimes(targets, device="cpu", dtype=torch.float32)   # one ValueError for what cannot run here
    runners = build_runners(model, "openvino", ("fp32", "int8"), folder, sample, threads=2, calibration=batches)

A runner is an ``nn.Module`` that takes images and returns logits, so accuracy and timing code take every runtime
alike. Names: ``torch`` (eager PyTorch, the reference every speedup is against; ``pytorch`` is the same),
``compile`` (``torch.compile`` of the patched model, weights frozen for inference), and the exported runtimes
``onnxruntime``, ``openvino`` and ``executorch``, each in fp32 and int8 unless a ``-fp32`` / ``-int8`` suffix picks
one:

- onnxruntime: ONNX (``torch.export``) in ONNX Runtime; int8 = dynamic quantization of the MatMul/Gemm weights.
- openvino: OpenVINO IR converted from that ONNX file; int8 = NNCF post-training quantization on calibration images.
- executorch: ``.pte`` lowered to XNNPACK, run by ExecuTorch's Python runtime; int8 = PT2E with the XNNPACK
  quantizer on calibration images.

Each exported runtime runs on the CPU from the fp32 model, with the thread count the bench gives PyTorch.
"""
from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

RUNTIMES = ("torch", "compile", "onnxruntime", "openvino", "executorch")
EXPORTED = ("onnxruntime", "openvino", "executorch")
PRECISIONS = ("fp32", "int8")
ALIASES = {"pytorch": "torch"}
LABELS = {"torch": "PyTorch", "compile": "torch.compile", "onnxruntime": "ORT", "openvino": "OpenVINO",
          "executorch": "ExecuTorch"}
MODULES = {  # what each runtime imports, and the extra that installs it
    "compile": ((), None),
    "onnxruntime": (("onnx", "onnxscript", "onnxruntime"), "onnx"),
    "openvino": (("onnx", "onnxscript", "openvino", "nncf"), "openvino"),
    "executorch": (("executorch",), "executorch"),
}
CALIBRATION_IMAGES = 256  # int8 calibration images for OpenVINO (NNCF) and ExecuTorch (PT2E)


@dataclass(frozen=True)
class Target:
    """One runtime at one precision: a row per configuration in the bench."""

    runtime: str
    precision: str = "fp32"

    @property
    def name(self) -> str:
        """As written on the command line: ``openvino-int8``; ``torch`` and ``compile`` have no precision."""
        return self.runtime if self.runtime in ("torch", "compile") else f"{self.runtime}-{self.precision}"

    @property
    def label(self) -> str:
        """As shown in tables: ``OpenVINO int8``."""
        base = LABELS[self.runtime]
        return base if self.runtime in ("torch", "compile") else f"{base} {self.precision}"

    @property
    def exported(self) -> bool:
        return self.runtime in EXPORTED


def parse_runtimes(spec: str | Sequence[str]) -> list[Target]:
    """Targets from names, comma-separated and/or as a list: ``torch``, ``compile``, ``onnxruntime[-fp32|-int8]``,
    ``openvino[-fp32|-int8]``, ``executorch[-fp32|-int8]``; an exported runtime without a suffix is both. Eager
    PyTorch is always the first target (the reference). Raises one ValueError naming the choices."""
    names = [spec] if isinstance(spec, str) else list(spec)
    words = [w.strip().lower() for name in names for w in str(name).split(",") if w.strip()]
    targets = [Target("torch")]
    for word in words:
        base, _, precision = word.partition("-")
        base = ALIASES.get(base, base)
        if base not in RUNTIMES or (precision and (base not in EXPORTED or precision not in PRECISIONS)):
            choices = ", ".join(["torch", "compile"] + [f"{r}[-fp32|-int8]" for r in EXPORTED])
            raise ValueError(f"unknown runtime {word!r}; choose from {choices} (comma-separated or repeated)")
        for p in ((precision,) if precision else PRECISIONS if base in EXPORTED else ("fp32",)):
            if Target(base, p) not in targets:
                targets.append(Target(base, p))
    return targets


def check_runtimes(targets: Iterable[Target], device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """One ValueError for a target that cannot run here: an exported runtime off the CPU or from a non-fp32 model
    (they run on the CPU, exported from fp32), or one whose package is not installed (with the extra to install)."""
    for target in targets:
        if target.exported and (device != "cpu" or dtype != torch.float32):
            raise ValueError(f"the {target.runtime} rows run on the CPU from an fp32 export; use --device cpu "
                             "--dtype fp32 (or only --runtime torch,compile)")
        modules, extra = MODULES.get(target.runtime, ((), None))
        for module in modules:
            if importlib.util.find_spec(module) is None:
                raise ValueError(f"runtime {target.runtime} needs the Python package {module!r}, which is not "
                                 f"installed; pip install 'vitprune[{extra}]'")


def build_runners(
    model: nn.Module,
    runtime: str,
    precisions: Sequence[str],
    folder: str | Path,
    sample: Tensor,
    *,
    threads: int = 2,
    calibration: Sequence[Tensor] | None = None,
) -> dict[str, nn.Module]:
    """A runner per precision of ``runtime`` for ``model`` as it is now (patched or not), files written to
    ``folder``. ``sample``: images at the batch the runner will be timed at. ``calibration``: image batches for
    int8 in OpenVINO and ExecuTorch (default: ``sample``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    calibration = list(calibration) if calibration is not None else [sample]
    if runtime == "torch":
        return {"fp32": model}
    if runtime == "compile":
        return {"fp32": compiled(model, sample)}
    if runtime == "onnxruntime":
        from .onnx_export import OrtModule, export_onnx, ort_session, quantize_dynamic_int8

        fp32 = export_onnx(model, folder / "m.onnx", sample=sample)
        files = {"fp32": fp32}
        if "int8" in precisions:
            files["int8"] = quantize_dynamic_int8(fp32, folder / "m.int8.onnx")
        return {p: OrtModule(ort_session(files[p], threads)) for p in precisions}
    if runtime == "openvino":
        from .openvino_export import OpenVINOModule, export_openvino, ov_compiled, quantize_int8

        fp32 = export_openvino(model, folder / "m.xml", sample=sample)
        files = {"fp32": fp32}
        if "int8" in precisions:
            files["int8"] = quantize_int8(fp32, folder / "m.int8.xml", calibration)
        return {p: OpenVINOModule(ov_compiled(files[p], threads)) for p in precisions}
    if runtime == "executorch":
        from .executorch_export import ExecuTorchModule, export_executorch

        out = {}
        for p in precisions:
            # memory is planned for the largest batch; the timed batch is the one that matters (larger inputs,
            # e.g. an accuracy evaluation, run in chunks of it)
            path = export_executorch(model, folder / f"m.{p}.pte", sample=sample, max_batch=sample.shape[0],
                                     calibration=calibration if p == "int8" else None)
            out[p] = ExecuTorchModule(path, threads)
        return out
    raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")


class FrozenCompiled(nn.Module):
    """``torch.compile`` of a model for inference, every (re)compilation run with Inductor's ``freezing`` on.

    Freezing turns the weights into constants that Inductor pre-packs for the CPU GEMM library: the fastest compiled
    path for inference (DeiT-S at batch 1 on a 2-core Xeon: 33.1 ms against 42.7 eager; plain ``torch.compile`` was
    slower than eager there). It must be on while a graph compiles, and a new input shape (an accuracy pass's last,
    smaller batch) compiles again later, so each call turns it on rather than only the first; it never stays on in
    the caller's process."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(model)
        self.graph_breaks: dict[str, int] = {}  # reason → count, from the compiling call (see ``compiled``)

    def forward(self, x: Tensor) -> Tensor:
        with torch._inductor.config.patch(freezing=True):
            return self.compiled(x)


def compiled(model: nn.Module, sample: Tensor) -> nn.Module:
    """:class:`FrozenCompiled` of a copy of ``model`` as it is now (the bench patches one model object per
    configuration; a copy keeps each compiled configuration apart), compiled by one warm-up call at ``sample``'s
    shape under inference mode, as it is then timed. A failure is one ValueError naming the error, not a compiler
    traceback."""
    from torch._dynamo.utils import counters  # graph breaks, counted by Dynamo per reason

    copied = copy.deepcopy(model).eval()
    # every configuration's copy shares timm's forward code object, and Dynamo counts recompilations per code
    # object: past its limit it would run the rest eagerly, and those rows would time eager PyTorch
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    before = dict(counters["graph_break"])
    try:
        runner = FrozenCompiled(copied)
        with torch.inference_mode():
            runner(sample)
    except Exception as err:  # noqa: BLE001 - any compiler failure becomes one clear line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"torch.compile failed on this configuration ({type(err).__name__}: {first[:300]}); "
                         "leave 'compile' out of --runtime, or run with --debug for the compiler's trace") from err
    # A graph break is not an error, but such a row times a partly compiled model, and its extra frames (timm's
    # forward, shared by every configuration) make the others' calls slower too: the bench says so.
    runner.graph_breaks = {k: n - before.get(k, 0) for k, n in counters["graph_break"].items() if n > before.get(k, 0)}
    return runner
