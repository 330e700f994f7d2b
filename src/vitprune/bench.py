"""``vitprune bench``: GMACs, throughput (or latency), peak memory, top-1 and tokens per block for a model under
several methods, in one run, in eager PyTorch and optionally in deployment runtimes (``hw/runtimes.py``).

Speedups are against the unpatched model in eager PyTorch measured in the same run: all configurations, in every
runtime, are timed round-robin (unpatched, method 1, method 2, …, repeated), so drift of a shared machine hits
every row alike. At batch 1 each call is timed on its own, for latency percentiles (p50, p90) over calls.
"""
from __future__ import annotations

import platform
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import patching
from .measure.accuracy import evaluate
from .measure.flops import count_macs
from .measure.report import BenchRow
from .hw.runtimes import CALIBRATION_IMAGES, LABELS, Target, build_runners, check_runtimes, parse_runtimes
from .measure.speed import interleaved_throughput
from .specs import format_method_spec, parse_method_spec

# Three reduction levels per method, scaled to the model's token count (≈ −25/−35/−45% MACs on DeiT-S and on
# the Fashion-MNIST testbed). ToMe: r as a fraction of patch tokens (196 → 8, 13, 16); PPT: r at blocks 3, 6, 9
# (196 → 35, 50, 61; 50 is the paper's default); EViT/ToGo: keep ratios at blocks 3, 6, 9 (0.69: ToGo's regime).
TOME_FRACTIONS = (0.04, 0.066, 0.08)
EVIT_KEEPS = (0.8, 0.7, 0.5)
PPT_FRACTIONS = (0.18, 0.255, 0.31)
TOGO_KEEPS = (0.8, 0.69, 0.5)


SUITES = ("core", "all")


def default_specs(num_patches: int, suite: str = "all") -> list[str]:
    """Method specs of a suite. ``all``: every training-free method at three levels, plus the ablations the papers
    argue about (PPT's policies, ToGo's package token) at the middle level. ``core`` (fits ~3 min on the testbed):
    ToMe and EViT at three levels, PPT and ToGo at their papers' default level."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    tome = [f"tome:r={max(1, round(num_patches * f))}" for f in TOME_FRACTIONS]
    evit = [f"evit:keep={k}" for k in EVIT_KEEPS]
    ppt_r = [max(1, round(num_patches * f)) for f in PPT_FRACTIONS]
    ppt = [f"ppt:r={r}" for r in ppt_r]
    togo = [f"togo:keep={k}" for k in TOGO_KEEPS]
    if suite == "core":
        return tome + evit + [ppt[1], togo[1]]
    ablations = [f"ppt:r={ppt_r[1]},policy=adaptive_invariant", f"ppt:r={ppt_r[1]},policy=pool",
                 f"togo:keep={TOGO_KEEPS[1]},package=True"]
    return tome + evit + ppt + togo + ablations


@dataclass
class BenchSettings:
    batch_size: int = 32
    threads: int = 2
    rounds: int = 5
    measure_speed: bool = True
    eval_batch_size: int = 256
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    # Runtimes besides eager PyTorch (always measured, the reference), comma-separated: "compile", "onnxruntime",
    # "openvino", "executorch" (fp32 and int8 rows each), or "openvino-int8" etc. for one precision.
    runtime: str = "torch"
    peak_memory: bool = True  # each timed row's peak memory (measure.memory)


LATENCY_BATCH = 1  # at this batch size calls are timed one by one: p50/p90 latency instead of img/s


@dataclass
class BenchResult:
    rows: list[BenchRow]
    meta: dict[str, Any] = field(default_factory=dict)


def _tokens_entering_blocks(model: nn.Module) -> list[float]:
    trace = patching.last_trace(model)
    return [float(n) for n in trace.tokens_attn] if trace is not None else []


def _tokens_entering_mlps(model: nn.Module) -> list[float]:
    """Tokens entering each block's MLP (fewer than at its attention when a method reduces in between)."""
    trace = patching.last_trace(model)
    return [float(n) for n in trace.tokens_mlp] if trace is not None else []


def run_bench(
    model: nn.Module,
    model_name: str,
    specs: list[str],
    data: Any | None,
    settings: BenchSettings,
    example: torch.Tensor,
    on_step: Callable[[str], None] | None = None,
    on_detail: Callable[[str], None] | None = None,
    calibration: Sequence[torch.Tensor] | None = None,
) -> BenchResult:
    """Measure the unpatched model and every spec. ``example`` is one batch of inputs used for MACs and speed.
    ``on_step(message)`` hears each step; ``on_detail(message)`` where a long step is (the speed rounds).
    ``calibration``: image batches for the int8 rows of OpenVINO and ExecuTorch (default: the first
    ``CALIBRATION_IMAGES`` images of ``data``, else ``example``).

    The same model object is patched and unpatched for each spec, so no weights are copied (``compile`` rows
    compile a copy per configuration).
    """
    step = on_step or (lambda _msg: None)
    targets = check_runtime(settings.runtime, settings.device, settings.dtype)
    model = model.to(device=settings.device, dtype=settings.dtype).eval()
    example = example.to(device=settings.device, dtype=settings.dtype)
    configs = [("none", {})] + [parse_method_spec(s) for s in specs]
    exported = any(t.exported for t in targets)
    for name, config in configs[1:]:  # fail early on a bad spec, before any long measurement
        patching.patch(model, name, **config)
        try:
            if exported:
                from .hw.onnx_export import check_exportable

                check_exportable(model)
        finally:
            patching.unpatch(model)

    rows: list[BenchRow] = []
    for name, config in configs:
        label = format_method_spec(name, config)
        _configure(model, name, config)
        step(f"{label}: MACs")
        macs = count_macs(model, example[:1])
        patched = patching.is_patched(model)
        tokens = _tokens_entering_blocks(model) if patched else [float(_token_count(model))] * _depth(model)
        tokens_mlp = _tokens_entering_mlps(model) if patched else list(tokens)  # same forward as tokens, before eval
        describe = model._vitprune.method.describe() if patched else "unpatched"
        top1 = None
        if data is not None:
            step(f"{label}: accuracy")
            top1 = evaluate(model, data, batch_size=settings.eval_batch_size, progress=False).top1
        rows.append(BenchRow(model=model_name, method=name, config=describe or label, gmacs=macs.gmacs,
                             macs_ratio=1.0, top1=top1, tokens_per_layer=tokens,
                             extra={"spec": label, "tokens_mlp": tokens_mlp}))
    _configure(model, "none", {})
    speed_batch = _speed_batch(example, settings.batch_size)
    latency = settings.batch_size == LATENCY_BATCH
    with tempfile.TemporaryDirectory(prefix="vitprune-runtimes-") as tmp:
        others = []  # (configuration index, row, runner) for every runtime besides eager PyTorch
        if len(targets) > 1:
            if calibration is None and any(t.precision == "int8" and t.runtime in ("openvino", "executorch")
                                           for t in targets):
                calibration = calibration_batches(data, example)
            others = _runtime_rows(model, configs, rows, targets, data, settings, speed_batch, Path(tmp),
                                   calibration, step)

        if settings.measure_speed:
            step("speed (all configurations, interleaved)")
            runner = _Runner(model)
            setups = [runner.setup(model, lambda n=name, c=config: _configure(model, n, c)) for name, config in configs]
            setups += [runner.setup(target) for _, _, target in others]
            speeds = interleaved_throughput(runner, speed_batch, setups, threads=settings.threads,
                                            rounds=settings.rounds, on_round=on_detail, per_call=latency,
                                            peak_memory=settings.peak_memory)
            _configure(model, "none", {})
            for row, sp in zip(rows + [row for _, row, _ in others], speeds):
                row.img_per_s = sp.img_per_s
                row.extra["latency_ms"] = sp.latency_ms_median
                row.extra["latency_iqr_ms"] = sp.latency_ms_iqr
                if sp.latency_ms_p90 is not None:
                    row.extra["latency_p50_ms"] = sp.latency_ms_median
                    row.extra["latency_p90_ms"] = sp.latency_ms_p90
                if sp.peak_mib is not None:
                    row.extra["peak_mib"] = sp.peak_mib
    memory_kind = speeds[0].memory_kind if settings.measure_speed and settings.peak_memory else None
    if others:  # each configuration's rows together, in the order of the targets
        grouped = [[row] for row in rows]
        for i, row, _ in others:
            grouped[i].append(row)
        rows = [row for group in grouped for row in group]
    base = rows[0]
    for row in rows:
        row.macs_ratio = base.gmacs / row.gmacs
        if base.img_per_s and row.img_per_s:
            row.speedup = row.img_per_s / base.img_per_s
        if base.top1 is not None and row.top1 is not None:
            row.top1_delta = row.top1 - base.top1
    timing = "each call timed alone: p50/p90 latency over calls" if latency else "torch.utils.benchmark"
    meta = {
        "model": model_name,
        "batch_size": settings.batch_size if settings.measure_speed else None,
        "threads": settings.threads,
        "dtype": str(settings.dtype).removeprefix("torch."),
        "device": settings.device,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "macs": "multiply-accumulates per image from executed ops (torch.utils.flop_counter FLOPs / 2)",
        "speed": f"{timing}, median of {settings.rounds} interleaved rounds per configuration",
        "latency": latency and settings.measure_speed,
        "peak_memory": memory_kind,
        "runtimes": [t.name for t in targets],
        "noisy_timings": noisy_timings(rows),
        "graph_breaks": [f"{r.extra['spec']} ({r.extra['graph_breaks']['count']}, e.g. "
                         f"{r.extra['graph_breaks']['first'].splitlines()[0][:100]!r})"
                         for r in rows if r.extra.get("graph_breaks")],
    }
    if len(targets) > 1:
        meta["runtime"] = describe_runtimes(targets, settings.threads)
    return BenchResult(rows=rows, meta=meta)


def describe_runtimes(targets: list[Target], threads: int) -> str:
    """One line for the meta and the table: which runtime versions ran, how."""
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"PyTorch {torch.__version__}"]
    names = {"onnxruntime": ("ONNX Runtime", "onnxruntime"), "openvino": ("OpenVINO", "openvino"),
             "executorch": ("ExecuTorch", "executorch")}
    for runtime in dict.fromkeys(t.runtime for t in targets if t.runtime != "torch"):
        if runtime == "compile":
            parts.append("torch.compile (inductor)")
            continue
        title, package = names[runtime]
        try:
            parts.append(f"{title} {version(package)}")
        except PackageNotFoundError:  # pragma: no cover - checked before
            parts.append(title)
    int8 = {"onnxruntime": "ORT dynamic (MatMul/Gemm weights int8, activations per batch)",
            "openvino": "OpenVINO NNCF post-training (calibrated)",
            "executorch": "ExecuTorch PT2E, XNNPACK quantizer (Linear/Conv, calibrated)"}
    quantized = [int8[r] for r in dict.fromkeys(t.runtime for t in targets if t.precision == "int8")]
    precisions = f"; int8: {', '.join(quantized)}" if quantized else ""
    return f"{', '.join(parts)} (CPU, {threads} thread{'s' * (threads != 1)}){precisions}"


def calibration_batches(data: Any | None, example: torch.Tensor, images: int = CALIBRATION_IMAGES,
                        batch: int = 32) -> list[torch.Tensor]:
    """Calibration image batches for int8: the first ``images`` images of ``data`` (a dataset of (image, label)
    pairs or an iterable of batches), else ``example``."""
    from torch.utils.data import Dataset

    if data is None:
        return [example.detach().float().cpu()]
    if isinstance(data, Dataset):
        n = min(images, len(data))
        stacked = torch.stack([data[i][0] for i in range(n)])
        return list(stacked.float().split(batch))
    out, seen = [], 0
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        out.append(x[: images - seen].detach().float().cpu())
        seen += out[-1].shape[0]
        if seen >= images:
            break
    return out or [example.detach().float().cpu()]


NOISY_IQR = 0.15  # interquartile range of the round times, relative to the median, above which timings are suspect


def noisy_timings(rows: list[BenchRow]) -> list[str]:
    """Configurations whose round-to-round spread says the machine was busy while timing them."""
    return [r.extra["spec"] + (f" ({r.extra['runtime']})" if "runtime" in r.extra else "") for r in rows
            if r.extra.get("latency_ms") and r.extra["latency_iqr_ms"] / r.extra["latency_ms"] > NOISY_IQR]


def accuracy_at_cost(rows: list[BenchRow], saving: float = 0.35) -> list[str]:
    """One line per method: its row closest to ``saving`` fewer MACs than unpatched, with the top-1 change."""
    base = rows[0]
    lines = []
    for method in dict.fromkeys(r.method for r in rows[1:]):
        candidates = [r for r in rows if r.method == method and r.top1_delta is not None]
        if not candidates:
            continue
        best = min(candidates, key=lambda r: abs((1 - r.gmacs / base.gmacs) - saving))
        lines.append(f"{method}: {100 * best.top1_delta:+.2f} pt top-1 at {100 * (best.gmacs / base.gmacs - 1):+.1f}% "
                     f"MACs ({best.config})")
    return lines


def _configure(model: nn.Module, name: str, config: dict[str, Any]) -> None:
    """Put the one model object into a configuration: unpatched ("none") or patched with a method."""
    if name == "none":
        if patching.is_patched(model):
            patching.unpatch(model)
    else:
        patching.patch(model, name, **config)


def check_runtime(runtime: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[Target]:
    """The targets of ``runtime`` (see ``hw.runtimes.parse_runtimes``), or one ValueError for what cannot run
    here (unknown name, an exported runtime off the CPU or from bf16, a runtime whose package is missing)."""
    targets = parse_runtimes(runtime)
    check_runtimes(targets, device, dtype)
    return targets


class _Runner:
    """What the speed loop calls: the PyTorch model (patched per configuration) or an ONNX Runtime session."""

    def __init__(self, target: Callable[[torch.Tensor], Any]) -> None:
        self.target = target

    def __call__(self, x: torch.Tensor) -> Any:
        return self.target(x)

    def setup(self, target: Callable[[torch.Tensor], Any], configure: Callable[[], None] = lambda: None):
        def apply() -> None:
            configure()
            self.target = target

        return apply


def _runtime_rows(
    model: nn.Module, configs: list[tuple[str, dict[str, Any]]], rows: list[BenchRow], targets: list[Target],
    data: Any | None, settings: BenchSettings, sample: torch.Tensor, folder: Path,
    calibration: Sequence[torch.Tensor] | None, step: Callable[[str], None],
) -> list[tuple[int, BenchRow, nn.Module]]:
    """(configuration index, row, runner) for every configuration in every target besides eager PyTorch, with
    its top-1 when there is data. Also labels the PyTorch rows, so the runtimes of a configuration read apart."""
    runtimes = list(dict.fromkeys(t.runtime for t in targets if t.runtime != "torch"))
    out = []
    for i, ((name, config), row) in enumerate(zip(configs, rows)):
        label = row.extra["spec"]
        _configure(model, name, config)
        for runtime in runtimes:
            precisions = [t.precision for t in targets if t.runtime == runtime]
            step(f"{label}: " + ("torch.compile" if runtime == "compile" else f"{LABELS[runtime]} export"))
            runners = build_runners(model, runtime, precisions, folder / f"{i}-{runtime}", sample,
                                    threads=settings.threads, calibration=calibration)
            for precision in precisions:
                target = Target(runtime, precision)
                top1 = None
                if data is not None:
                    step(f"{label}: {target.label} accuracy")
                    top1 = evaluate(runners[precision], data, batch_size=settings.eval_batch_size,
                                    progress=False).top1
                extra = {**row.extra, "runtime": _runtime_label(target)}
                breaks = getattr(runners[precision], "graph_breaks", None)
                if breaks:
                    extra["graph_breaks"] = {"count": sum(breaks.values()), "first": next(iter(breaks))}
                other = replace(row, config=f"{row.config} · {target.label}", top1=top1,
                                tokens_per_layer=list(row.tokens_per_layer), extra=extra)
                out.append((i, other, runners[precision]))
        row.config += " · PyTorch"
        row.extra["runtime"] = "pytorch"
    _configure(model, "none", {})
    return out


def _runtime_label(target: Target) -> str:
    """``extra["runtime"]`` of a row: "pytorch", "torch.compile", "onnxruntime fp32", "openvino int8", …"""
    if target.runtime == "torch":
        return "pytorch"
    return "torch.compile" if target.runtime == "compile" else f"{target.runtime} {target.precision}"


def _speed_batch(example: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``batch_size`` inputs, repeating the example images when there are fewer."""
    reps = -(-batch_size // example.shape[0])
    return example.repeat(reps, *([1] * (example.dim() - 1)))[:batch_size]


def _token_count(model: nn.Module) -> int:
    return model.patch_embed.num_patches + model.num_prefix_tokens


def _depth(model: nn.Module) -> int:
    return len(model.blocks)


def save_outputs(result: BenchResult, out_dir: Path) -> list[Path]:
    from .measure.report import pareto_plot, write_csv, write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_csv(result.rows, out_dir / "bench.csv"), write_json(result.rows, out_dir / "bench.json", result.meta)]
    written += pareto_plot(result.rows, out_dir / "pareto.png", title=f"{result.meta.get('model')} — vitprune bench")
    return written
