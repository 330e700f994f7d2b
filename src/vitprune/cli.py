"""The ``vitprune`` command line (typer + rich)."""
from __future__ import annotations

import os
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import click
import torch
import typer
from typer.core import TyperGroup
from rich.console import Console

from .progress import progress as progress_display

class _CliGroup(TyperGroup):
    """Runs a command; a user error (bad option value, unsupported model, missing file) becomes one line on stderr
    and exit code 2, as click does for usage errors. Tracebacks are for bugs, or with ``--debug``."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as err:
            if ctx.meta.get(DEBUG_KEY) or os.environ.get("VITPRUNE_DEBUG"):
                raise
            typer.echo(f"error: {err}", err=True)
            raise SystemExit(2) from None


USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
DEBUG_KEY = "vitprune_debug"

app = typer.Typer(cls=_CliGroup, add_completion=False, no_args_is_help=True,
                  help="Token reduction for Vision Transformers.", pretty_exceptions_show_locals=False)
console = Console(width=None if Console().is_terminal else 160)  # logs and CI get full tables


class DType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


DTYPES = {DType.fp32: torch.float32, DType.bf16: torch.bfloat16}
SPEED_MODEL = "deit_small_patch16_224"  # where ``vitprune bench`` times the testbed's methods


@app.callback()
def _options(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error (also VITPRUNE_DEBUG=1)."),
) -> None:
    ctx.meta[DEBUG_KEY] = debug


def check_device(device: str) -> str:
    """A device torch can use here, or one clear error: the CUDA driver's own message comes after 100 lines."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise typer.BadParameter(f"{device!r} is not a device ({err}); use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter(f"{device}: torch sees no CUDA GPU on this machine; use --device cpu")
    return device


def patchable_model(name: str, **kwargs) -> torch.nn.Module:
    """``models.create_model`` for the commands: a model vitprune cannot patch is refused up front, with the reason."""
    from .models import create_model
    from .patching import _backend

    net = create_model(name, **kwargs)
    _backend(net)
    return net


@app.command()
def methods() -> None:
    """List the registered token-reduction methods."""
    from . import available_methods

    for name in available_methods():
        console.print(name)


@app.command()
def bench(
    model: str = typer.Option("testbed", help="'testbed' (shared Fashion-MNIST ViT), 'dinov2_vits14', a timm name, "
                              "hf:<...> for Hugging Face transformers: hf:dinov2_vits14, hf:testbed (converted from "
                              "timm), hf:<class> (random init), hf:<config.json or save_pretrained folder>; or "
                              "open_clip:<name> for an OpenCLIP image tower (e.g. open_clip:ViT-B-32)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Local .safetensors/.pth weights, loaded strictly."),
    pretrained: bool = typer.Option(False, help="Download timm pretrained weights (needs a reachable hub)."),
    data: Optional[str] = typer.Option(
        None, help="Labelled data: .npz, 'path, label' list file or image folder. Default: the testbed test split "
        "for the testbed model, none (no accuracy) otherwise."),
    method: Optional[list[str]] = typer.Option(
        None, "--method", "-m", help="Method spec, repeatable, e.g. -m tome:r=13 -m 'evit:keep=0.7,blocks=(3,6,9)'. "
        "Default: the --suite."),
    suite: str = typer.Option("core", help="Default method set when no --method: 'core' (ToMe, EViT at 3 levels; "
                              "PPT, ToGo at their papers' level; ~3 min on the testbed) or 'all' (every training-free "
                              "method at 3 levels + PPT policy and ToGo package ablations; ~7 min)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Evaluate on an evenly strided subset of this many images."),
    batch_size: int = typer.Option(32, min=1, help="Batch for the throughput measurement; 1: latency (p50 and p90 "
                                   "ms per call, each call timed alone) instead of img/s."),
    threads: int = typer.Option(2, min=1, help="CPU threads for the throughput measurement (every runtime)."),
    rounds: int = typer.Option(5, min=1, help="Interleaved timing rounds (each times every configuration once)."),
    speed: bool = typer.Option(True, help="Measure throughput."),
    accuracy: bool = typer.Option(True, help="Measure top-1 (needs labelled data)."),
    dtype: DType = typer.Option(DType.fp32, help="Compute dtype."),
    device: str = typer.Option("cpu", callback=check_device, help="cpu or cuda."),
    out: Optional[Path] = typer.Option(None, help="Folder for bench.csv, bench.json and pareto.png. Default: results/bench/<model>."),
    runtime: Optional[list[str]] = typer.Option(
        None, help="Runtimes besides eager PyTorch (always measured: the reference), repeatable or comma-separated: "
        "'compile' (torch.compile, weights frozen), 'onnxruntime', 'openvino', 'executorch' (each exported per "
        "configuration and run in fp32 and int8 on the CPU with --threads; '-fp32'/'-int8' picks one, e.g. "
        "openvino-int8). Rows in the same table, top-1 per runtime, one round-robin timing."),
    speed_model: str = typer.Option("auto", help="Time the methods on this model instead, in a second table: 'auto' "
                                    f"= {SPEED_MODEL} for the testbed (64 tokens are too few for speed to mean "
                                    "anything), the model itself otherwise; 'none' = time --model itself."),
) -> None:
    """Measure GMACs, img/s or latency (speedup vs unpatched, same run), peak memory, top-1 and tokens per block for
    several methods, in eager PyTorch and optionally in deployment runtimes."""
    from .bench import BenchSettings, check_runtime, default_specs
    from .hw.runtimes import CALIBRATION_IMAGES
    from .measure.data import image_transform_for, load_dataset
    from .models import TESTBED_NAMES

    runtime_spec = ",".join(runtime or ["torch"])
    targets = check_runtime(runtime_spec, device, DTYPES[dtype])  # a ValueError is one "error:" line, exit 2
    net = patchable_model(model, checkpoint=checkpoint, pretrained=pretrained)
    testbed = model.lower().removeprefix("hf:") in TESTBED_NAMES
    if data is None and accuracy and testbed:
        data = "testbed"
    dataset = None
    if data is not None and accuracy:
        dataset = load_dataset(data, transform=image_transform_for(net), limit=limit)
        if len(dataset) == 0:
            raise typer.BadParameter(f"dataset {data} is empty")
    elif accuracy:
        console.print("[yellow]no --data given: top-1 not measured[/]")
    if speed_model == "auto":
        speed_model = SPEED_MODEL if testbed and speed else "none"
    timed_here = speed and speed_model == "none"
    settings = BenchSettings(batch_size=batch_size, threads=threads, rounds=rounds,
                             measure_speed=timed_here, dtype=DTYPES[dtype], device=device, runtime=runtime_spec)
    calibration = None  # int8 calibration: the testbed's train split, not the test images it is scored on
    if dataset is not None and data == "testbed" and any(t.precision == "int8" for t in targets):
        calibration = calibration_images(net, "testbed-train", CALIBRATION_IMAGES)
    out = out or Path("results") / "bench" / model.replace("/", "_")
    specs = list(method) if method else default_specs(net.patch_embed.num_patches, suite)
    speed_what = ("p50/p90 latency per call and speedup" if batch_size == 1 else "img/s and speedup")
    what = ", ".join([f"top-1 on {data}"] * (dataset is not None) + ["MACs from executed ops"]
                     + [f"{speed_what} against the unpatched model in the same run"] * timed_here)
    _bench_table(net, model, specs, dataset, settings, out, what, data_label=data, calibration=calibration)
    if speed_model != "none":
        console.print(f"\n[bold]Speed[/] is timed on {speed_model} (random init): at the testbed's 64 tokens, per-block "
                      "overheads hide what token reduction saves. The same method settings relative to the patch "
                      "count (or your --method specs) run there:")
        fast = patchable_model(speed_model)
        fast_specs = list(method) if method else default_specs(fast.patch_embed.num_patches, suite)
        _bench_table(fast, speed_model, fast_specs, None, replace(settings, measure_speed=True), out / "speed",
                     f"MACs from executed ops, {speed_what} against the unpatched model in the same run")


@app.command()
def tune(
    model: str = typer.Option("testbed", help="As in bench: 'testbed', 'dinov2_vits14', a timm name, hf:<...>, "
                              "open_clip:<name>."),
    checkpoint: Optional[Path] = typer.Option(None, help="Local .safetensors/.pth weights, loaded strictly."),
    data: str = typer.Option(..., help="Calibration images: .npz, 'path, label' list file or image folder "
                             "('testbed': the testbed test split)."),
    macs: Optional[float] = typer.Option(None, help="Budget: at most this fraction of the unpatched MACs, e.g. 0.65."),
    speedup: Optional[float] = typer.Option(None, help="Budget: at least this speedup at --batch-size on this CPU."),
    latency_ms: Optional[float] = typer.Option(None, help="Budget: at most this latency per batch of --batch-size."),
    batch_size: int = typer.Option(32, min=1, help="Batch for speed budgets."),
    threads: int = typer.Option(2, min=1, help="CPU threads for speed budgets."),
    methods: str = typer.Option("tome,evit,ppt,togo", help="Methods to search, comma-separated."),
    calib_limit: int = typer.Option(2000, min=1, help="Calibration images (evenly strided from --data)."),
    holdout_limit: int = typer.Option(2000, min=1, help="Held-out images, never used by the search."),
    holdout_data: Optional[str] = typer.Option(None, help="Held-out images from here instead of the --data images "
                                               "calibration did not take."),
    search_limit: int = typer.Option(500, min=1, help="Calibration images each search step is scored on (the "
                                     "finalists are scored on all of them)."),
    greedy_groups: int = typer.Option(6, min=0, help="Block groups of ToMe's greedy per-block descent (0: shapes only; "
                                      "each descent step evaluates one candidate per group)."),
    fidelity: bool = typer.Option(False, help="Score fidelity to the unpatched model even when the data is labelled "
                                  "(e.g. random-init or feature models)."),
    out: Optional[Path] = typer.Option(None, help="Folder for recipe.json, candidates.csv, pareto.png and the "
                                       "resumable evaluations.jsonl. Default: results/tune/<model>."),
) -> None:
    """Find the best training-free reduction within a budget: MACs, speedup or latency. Writes a recipe that
    vitprune.patch(model, "DIR/recipe.json") and bench -m recipe:DIR/recipe.json apply."""
    from .measure.data import image_transform_for, load_dataset
    from .tune import Budget, make_splits, tune as run_tune, write_outputs

    budget = Budget(macs=macs, speedup=speedup, latency_ms=latency_ms)
    net = patchable_model(model, checkpoint=checkpoint)
    transform = image_transform_for(net)
    dataset = load_dataset(data, transform=transform)
    holdout = load_dataset(holdout_data, transform=transform) if holdout_data else None
    labelled = not fidelity and _all_labelled(dataset, [])
    search, calib, held = make_splits(dataset, holdout, calib_limit, holdout_limit, search_limit, labelled)
    out = out or Path("results") / "tune" / model.replace("/", "_").replace(":", "_")
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"tune {model}: {budget.describe()}; {len(calib[0])} calibration images ({len(search[0])} for the "
                  f"search), {len(held[0])} held out; {'top-1' if labelled else 'fidelity'}")
    with progress_display(console) as bar:
        task = bar.add_task("tuning", total=None)

        def step(message: str) -> None:
            bar.update(task, description=message[:70])
            bar.advance(task)

        result = run_tune(net, budget, search, calib, held, methods=[m.strip() for m in methods.split(",")],
                          batch_size=batch_size, threads=threads, model_name=model, out=out,
                          greedy_groups=greedy_groups, on_step=step)
    paths = write_outputs(result, out)
    r = result.recipe
    cal, hold = r["calibration"], r["holdout"]
    metric = "top1" if "top1" in cal else ("kl" if "kl" in cal else "cosine")
    console.print(f"recipe: {r['spec']} ({r['search']['shape']}), {r['macs_fraction']:.3f} of the MACs "
                  f"({r['gmacs']:.3f} of {r['gmacs_unpatched']:.3f} GMACs)")
    for name, q in (("calibration", cal), ("held-out", hold)):
        ref = q["unpatched"].get(metric)
        ref_text = f" (unpatched {ref:.4f})" if ref is not None and metric == "top1" else ""
        extra = f", cosine {q['cosine']:.4f}" if metric != "cosine" else ""
        console.print(f"  {name:>11}: {metric} {q[metric]:.4f}{ref_text}{extra} on {q['n']} images")
    if "speed" in r:
        sp = r["speed"]
        console.print(f"  measured speedup {sp['measured_speedup']:.2f}x ({sp['latency_ms']:.1f} ms per batch of "
                      f"{sp['batch_size']}; unpatched {sp['latency_ms_unpatched']:.1f} ms)")
    console.print(f"{result.evaluations} evaluations in {result.wall_s:.0f} s; wrote {', '.join(str(p) for p in paths.values())}")


def _bench_table(net: torch.nn.Module, model: str, specs: list[str], dataset, settings, out: Path, what: str,
                 data_label: str | None = None, calibration: list[torch.Tensor] | None = None) -> None:
    """One ``vitprune bench`` table: run, print (saying what the figures are), save."""
    from .bench import NOISY_IQR, accuracy_at_cost, run_bench, save_outputs
    from .hw.runtimes import parse_runtimes
    from .measure.report import print_table

    if dataset is not None:
        example = torch.stack([dataset[i][0] for i in range(min(settings.batch_size, len(dataset)))])
    else:
        example = torch.randn(settings.batch_size, net.patch_embed.proj.in_channels, *net.patch_embed.img_size)
    has_data = dataset is not None
    others = parse_runtimes(settings.runtime)[1:]
    # MACs, top-1; per other runtime an export (or compile) step, and per runtime and precision a top-1
    per_config = 1 + has_data + len({t.runtime for t in others}) + has_data * len(others)
    with progress_display(console) as progress:
        task = progress.add_task(f"bench {model}", total=(len(specs) + 1) * per_config + settings.measure_speed)

        def on_step(msg: str) -> None:
            progress.update(task, advance=0 if progress.tasks[0].description.startswith("bench") else 1,
                            description=msg)

        result = run_bench(net, model, specs, dataset, settings, example, on_step=on_step,
                           on_detail=lambda msg: progress.update(task, description=msg), calibration=calibration)
    result.meta.update({"data": str(data_label) if has_data else None,
                        "n_eval": len(dataset) if has_data else None})
    timing = f"batch {settings.batch_size}, {settings.threads} threads, " if settings.measure_speed else ""
    dtype = "bf16" if settings.dtype == torch.bfloat16 else "fp32"
    print_table(result.rows, title=f"vitprune bench — {model} ({timing}{dtype}, {settings.device}): {what}",
                console=console, latency=bool(result.meta.get("latency")))
    if result.meta.get("peak_memory"):
        console.print(f"peak MiB: {result.meta['peak_memory']}; every runtime's model stays loaded during the "
                      "round-robin, so compare rows of one run")
    if result.meta.get("runtime"):
        console.print(f"runtimes: {result.meta['runtime']}")
    if result.meta.get("noisy_timings"):
        console.print(f"[yellow]timings are noisy (round-to-round spread > {NOISY_IQR:.0%} of the median) for "
                      f"{', '.join(result.meta['noisy_timings'])}: was the machine busy? Re-run with more --rounds "
                      "on an idle machine before trusting the speedups.[/]")
    if result.meta.get("graph_breaks"):
        console.print(f"[yellow]torch.compile broke the graph for {'; '.join(result.meta['graph_breaks'])}: those "
                      "rows time a partly compiled model, and its extra compiled frames slow the other compiled rows "
                      "of this run too. Bench them without 'compile', or in a run of their own.[/]")
    summary = accuracy_at_cost(result.rows)
    if summary:
        console.print("[bold]accuracy at ≈ −35% MACs[/] (closest row per method):")
        for line in summary:
            console.print("  " + line)
    for p in save_outputs(result, out):
        console.print(f"wrote {p}")


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@app.command()
def viz(
    image: list[Path] = typer.Option(..., "--image", "-i", help="Image file or folder of images (repeatable)."),
    model: str = typer.Option("dinov2_vits14", help="'dinov2_vits14' (shared weights), 'testbed', a timm name, or "
                              "hf:<...> (as for bench)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Local weights, loaded strictly."),
    method: Optional[list[str]] = typer.Option(
        None, "--method", "-m", help="Method spec, repeatable. Default: tome:r=16 and evit:keep=0.5."),
    max_images: int = typer.Option(8, min=1, help="At most this many images from folders."),
    out: Path = typer.Option(Path("results/viz"), help="Output folder for the PNGs."),
) -> None:
    """Token pictures: one panel per reducing block showing kept, merged, packed and dropped patches."""
    from PIL import Image

    from . import patching
    from .measure.data import image_transform_for
    from .measure.pictures import token_figure
    from .specs import parse_method_spec

    files: list[Path] = []
    for item in image:
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_images]
        elif item.exists():
            files.append(item)
        else:
            raise typer.BadParameter(f"{item} does not exist; give an image file or a folder of images")
    if not files:
        raise typer.BadParameter("no images found; give --image with a .jpg/.png file or a folder holding some")
    net = patchable_model(model, checkpoint=checkpoint)
    transform = image_transform_for(net)
    mode = "L" if net.patch_embed.proj.in_channels == 1 else "RGB"
    specs = list(method) if method else ["tome:r=16", "evit:keep=0.5"]
    for spec in specs:
        name, config = parse_method_spec(spec)
        patching.patch(net, name, trace_source=True, **config)
        for f in files:
            x = transform(Image.open(f).convert(mode))
            tag = "".join(ch if ch.isalnum() or ch in "=._-" else "_" for ch in spec)
            path = token_figure(net, x, f"{f.name} · {spec}", out / f"{f.stem}_{tag}.png")
            console.print(f"wrote {path}")
    patching.unpatch(net)


@app.command()
def lut(
    model: str = typer.Option("testbed", help="'testbed', 'dinov2_vits14', or a timm name (as for bench). Weights "
                              "do not change latency, so none are loaded (no assets needed)."),
    batch_size: int = typer.Option(32, min=1, help="Batch the latencies are measured for (the batch you will run)."),
    threads: int = typer.Option(2, min=1, help="CPU threads."),
    dtype: DType = typer.Option(DType.fp32, help="Compute dtype."),
    device: str = typer.Option("cpu", callback=check_device, help="cpu or cuda."),
    counts: str = typer.Option("grid", help="Token counts to time: 'grid' (1, every ~N/16 tokens, N; N = patches + "
                               "prefix tokens), 'all' (1..N; slow on CPU) or a comma list such as 1,16,32,65."),
    per_block: bool = typer.Option(False, "--per-block", help="Time every block (default: block 0 stands for all, "
                                   "as a plain ViT's blocks have identical shapes)."),
    rounds: int = typer.Option(5, min=1, help="Round-robin timing rounds (median per token count)."),
    check: bool = typer.Option(False, "--check", help="Then time real patched forwards and compare measured with "
                               "predicted latency and speedup."),
    method: Optional[list[str]] = typer.Option(
        None, "--method", "-m", help="Method specs for --check, repeatable; the first is the speedup baseline. "
        "Default: tome:r=0 (engine, no reduction) and EViT keep 0.7/0.5 at blocks depth/4, depth/2, 3·depth/4."),
    out: Optional[Path] = typer.Option(None, help="JSON file. Default: results/lut/<model>.json."),
    table_path: Optional[Path] = typer.Option(None, "--table", help="With --check: check this existing LUT (the one "
                                              "a model was trained against) instead of profiling a new one."),
) -> None:
    """Latency look-up table: time each block at token counts 1..N on this device, for latency-aware training."""
    import time

    from rich.table import Table

    from .train.lut import check_lut, default_check_specs, profile_lut

    from .backends.timm import model_info

    net = patchable_model(model, shared_weights=False)
    if counts in ("grid", "all"):
        count_arg: object = counts
    else:
        try:
            count_arg = [int(c) for c in counts.split(",") if c.strip()]
        except ValueError:
            raise typer.BadParameter(f"--counts {counts!r}: use 'grid', 'all' or whole numbers like 1,16,32,65")
    if table_path is not None:
        if not check:
            raise typer.BadParameter("--table is for --check: it checks an existing LUT instead of profiling one")
        from .train.lut import LatencyLUT

        table = LatencyLUT.load(table_path)
        table.check_model(model_info(net))
        depth = table.depth
    else:
        start = time.perf_counter()
        with progress_display(console) as progress:
            task = progress.add_task("lut", total=None)

            def on_step(done: int, total: int, what: str) -> None:
                progress.update(task, completed=done, total=total, description=what)

            from .methods.heatvit import HeatViT
            from .methods.selector import SelectionStep

            # a whole selection step (score, top-k, gather, package) is timed too, so latency-aware selector training
            # and the multi-stage search read its cost
            info = model_info(net)
            step = None
            if info.num_heads >= 2 and info.dim // info.num_heads >= 8 and info.depth >= 2:
                step = SelectionStep(HeatViT(blocks=(1,), keep=0.5), info).eval()
            table = profile_lut(net, batch_size=batch_size, threads=threads, dtype=DTYPES[dtype], device=device,
                                counts=count_arg, per_block=per_block, rounds=rounds, model_name=model,
                                progress=on_step, selector=step)
        elapsed = time.perf_counter() - start
        meta = table.meta
        shown = "mean over blocks" if per_block else "every block"
        view = Table(title=f"vitprune lut — {model} (batch {batch_size}, {threads} threads, {dtype.value}, "
                     f"{meta['device_name']}); ms per batch, {shown}")
        for col in ("tokens", "attention ms", "MLP ms", "block ms", "block ms (raw median)"):
            view.add_column(col, justify="right")
        depth = table.depth
        for j, n in enumerate(table.token_counts):
            attn = sum(r[j] for r in table.attn_ms) / depth
            mlp = sum(r[j] for r in table.mlp_ms) / depth
            raw = sum(a[j] + m[j] for a, m in zip(table.attn_ms_raw or [], table.mlp_ms_raw or [])) / depth
            view.add_row(str(n), f"{attn:.3f}", f"{mlp:.3f}", f"{attn + mlp:.3f}", f"{raw:.3f}")
        console.print(view)
        full = table.full_ms()
        console.print(f"fixed (patch/position embedding, final norm, head): {table.fixed_ms:.2f} ms; "
                      f"predicted unpruned total: {full:.1f} ms per batch = {batch_size / full * 1e3:.1f} img/s "
                      f"({depth} blocks at {table.num_tokens} tokens); profiled in {elapsed:.0f} s")
        if meta.get("noisy"):
            spread = meta["round_spread"]["median"]
            console.print(f"[yellow]timings are noisy (typical round-to-round spread {spread:.0%} of the median): "
                          "was the machine busy? Re-run with more --rounds on an idle machine.[/]")
        path = out or Path("results") / "lut" / f"{model.replace('/', '_')}.json"
        table.save(path)
        console.print(f"wrote {path}")
    if check:
        specs = list(method) if method else default_check_specs(depth)
        with console.status("timing real forwards for --check"):
            rows = check_lut(table, net, specs, rounds=rounds)
        view = Table(title=f"LUT prediction vs measured (speedups vs {specs[0]})")
        for col in ("config", "predicted ms", "measured ms", "predicted speedup", "measured speedup", "error"):
            view.add_column(col, justify="right")
        for r in rows:
            view.add_row(r.spec, f"{r.predicted_ms:.1f}", f"{r.measured_ms:.1f}", f"{r.predicted_speedup:.2f}×",
                         f"{r.measured_speedup:.2f}×", f"{100 * r.speedup_error:+.1f}%")
        console.print(view)


@app.command()
def hw(
    bench_json: Optional[Path] = typer.Option(
        None, "--bench-json", help="Rows written by `vitprune bench` (results/bench/<model>/bench.json): their token "
        "counts per block and measured CPU speedups."),
    model: Optional[str] = typer.Option(
        None, help="Instead of --bench-json: run one forward of this model ('testbed', 'dinov2_vits14' or a timm name) "
        "under each -m spec to get the token counts."),
    method: Optional[list[str]] = typer.Option(
        None, "--method", "-m", help="Method spec for --model, repeatable. Default: the bench 'core' suite."),
    checkpoint: Optional[Path] = typer.Option(None, help="Local weights for --model (data-dependent counts use them)."),
    data: Optional[str] = typer.Option(None, help="Images for the --model forward (.npz, list file, image folder or "
                                       "'testbed'). Default: random inputs."),
    batch_size: int = typer.Option(8, min=1, help="Images in the --model forward (token counts are per forward)."),
    preset: str = typer.Option("zcu102", help="Accelerator defaults: 'zcu102' or 'zcu104' (numbers and sources in "
                               "vitprune.hw.accel); the options below override them."),
    pe_rows: Optional[int] = typer.Option(None, help="PE array rows (input channels of a weight tile). zcu102: 32."),
    pe_cols: Optional[int] = typer.Option(None, help="PE array columns (output channels of a tile). zcu102: 64."),
    clock_mhz: Optional[float] = typer.Option(None, help="Clock in MHz. zcu102: 150."),
    dram_gbps: Optional[float] = typer.Option(None, help="Sustained DRAM bandwidth in GB/s. zcu102: 9.6."),
    buffer_kib: Optional[int] = typer.Option(None, help="On-chip buffer in KiB. zcu102: ~3906 (4.0 MB)."),
    vector_lanes: Optional[int] = typer.Option(None, help="Lanes of the softmax/GELU/LayerNorm unit. zcu102: 64."),
    sorter_width: Optional[int] = typer.Option(None, help="Comparators of the top-k sorting network. zcu102: 4."),
    calibration: bool = typer.Option(False, "--calibration", help="Only the HeatViT-like DeiT-T check: selectors "
                                     "before blocks 4, 7, 10; HeatViT reports 1.8–2.6× (pruning only, ZCU102)."),
) -> None:
    """Predicted latency on an int8 ViT accelerator (HeatViT-like FPGA) from each method's tokens per block."""
    from dataclasses import replace

    from rich.table import Table

    from . import patching
    from .backends.timm import model_info
    from .hw.accel import (HEATVIT_BLOCKS, HEATVIT_SPEEDUP_RANGE, PRESETS, calibration_check, options_from_config,
                           predict)
    from .measure.report import MISSING, BenchRow, compact_tokens, read_json
    from .specs import parse_method_spec

    if preset not in PRESETS:
        raise typer.BadParameter(f"--preset {preset!r}: use one of {', '.join(PRESETS)}")
    overrides = dict(pe_rows=pe_rows, pe_cols=pe_cols, clock_mhz=clock_mhz, dram_gbps=dram_gbps,
                     vector_lanes=vector_lanes, sorter_width=sorter_width,
                     buffer_bytes=None if buffer_kib is None else buffer_kib * 1024)
    try:
        cfg = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as e:
        raise typer.BadParameter(str(e))
    title = (f"vitprune hw — {cfg.name}: {cfg.pe_rows}×{cfg.pe_cols} int8 MACs @ {cfg.clock_mhz:g} MHz, "
             f"{cfg.buffer_bytes / 1e6:.1f} MB SRAM, {cfg.dram_gbps:g} GB/s DRAM; batch 1")
    view = Table(title=title, header_style="bold")
    for col in ("model", "method", "config", "GMACs", "tokens per layer", "accel ms", "accel speedup",
                "selection overhead", "CPU speedup"):
        text = col in ("model", "method", "config", "tokens per layer")
        view.add_column(col, justify="left" if text else "right", overflow="fold" if text else "ellipsis")

    if calibration:
        lo, hi = HEATVIT_SPEEDUP_RANGE
        for res in calibration_check(cfg):
            keeps = [b.tokens_attn for b in res.blocks]
            ok = lo <= res.speedup <= hi
            view.add_row("deit_tiny (shape)", "heatvit-like", f"selectors @{','.join(map(str, HEATVIT_BLOCKS))}",
                         f"{res.macs / 1e9:.3f}", compact_tokens(keeps), f"{res.latency_ms:.2f}",
                         f"[{'green' if ok else 'red'}]{res.speedup:.2f}×[/]", f"{100 * res.overhead:.1f}%", MISSING)
        console.print(view)
        console.print(f"unpruned DeiT-T: {res.baseline_ms:.2f} ms. HeatViT (DeiT-T, ZCU102, token pruning only): "
                      f"{lo}–{hi}×")
        return

    if (bench_json is None) == (model is None):
        raise typer.BadParameter("give either --bench-json results/bench/<model>/bench.json or --model NAME "
                                 "(with -m specs)")
    if bench_json is not None:
        if not bench_json.exists():
            raise typer.BadParameter(f"{bench_json} does not exist; run `vitprune bench` first (it writes "
                                     "results/bench/<model>/bench.json)")
        rows, _meta = read_json(bench_json)
        if not rows:
            raise typer.BadParameter(f"{bench_json} holds no rows; re-run `vitprune bench`")
    else:
        from .bench import default_specs
        from .measure.data import image_transform_for, load_dataset
        from .measure.flops import count_macs

        net = patchable_model(model, checkpoint=checkpoint)
        in_chans, size = net.patch_embed.proj.in_channels, tuple(net.patch_embed.img_size)
        if data is not None:
            dataset = load_dataset(data, transform=image_transform_for(net), limit=batch_size)
            x = torch.stack([dataset[i][0] for i in range(len(dataset))])
        else:
            x = torch.randn(batch_size, in_chans, *size)
        rows = []
        n0, depth = net.patch_embed.num_patches + net.num_prefix_tokens, len(net.blocks)
        for spec in ["none"] + (list(method) if method else default_specs(net.patch_embed.num_patches, "core")):
            name, config = parse_method_spec(spec)
            if name != "none":
                patching.patch(net, name, **config)
            elif patching.is_patched(net):
                patching.unpatch(net)
            macs = count_macs(net, x)
            trace = patching.last_trace(net) if name != "none" else None
            attn = [float(t) for t in trace.tokens_attn] if trace else [float(n0)] * depth
            mlp = [float(t) for t in trace.tokens_mlp] if trace else list(attn)
            describe = net._vitprune.method.describe() if name != "none" else "unpatched"
            rows.append(BenchRow(model=model, method=name, config=describe or spec, gmacs=macs.gmacs, macs_ratio=1.0,
                                 tokens_per_layer=attn, extra={"spec": spec, "tokens_mlp": mlp}))
        if patching.is_patched(net):
            patching.unpatch(net)

    infos: dict = {model: model_info(net)} if bench_json is None else {}
    inferred = False
    for row in rows:
        if row.model not in infos:
            infos[row.model] = model_info(patchable_model(row.model, shared_weights=False))
        spec = row.extra.get("spec") or row.method
        try:
            config = parse_method_spec(spec)[1]
        except (ValueError, OSError, KeyError):  # e.g. a ckpt: folder that is not here: no blocks/group hints
            config = {}
        mlp = row.extra.get("tokens_mlp")
        inferred |= not mlp and not row.is_baseline
        try:
            res = predict(infos[row.model], row.tokens_per_layer, mlp, row.method, cfg, **options_from_config(config))
        except ValueError as e:
            raise typer.BadParameter(f"{spec}: {e}")
        view.add_row(row.model, row.method, row.config, f"{row.gmacs:.3f}", compact_tokens(row.tokens_per_layer),
                     f"{res.latency_ms:.2f}", f"{res.speedup:.2f}×", f"{100 * res.overhead:.1f}%",
                     MISSING if row.speedup is None else f"{row.speedup:.2f}×")
    console.print(view)
    if inferred:
        console.print("[yellow]these rows have no tokens_mlp (bench.json from before it was recorded): tokens entering "
                      "each MLP were taken as the next block's count, so the last block's reduction is not seen. "
                      "Re-run `vitprune bench` for exact counts.[/]")


@app.command()
def train(
    method: str = typer.Option("heatvit", "--method", "-m", help="Method spec: heatvit / spvit (learned selectors, "
                               "e.g. 'heatvit:keep=(0.6,0.4,0.25)') or a training-free one to fine-tune under "
                               "(e.g. 'ppt:r=50,threshold=6e-5')."),
    model: str = typer.Option("testbed", help="Base model, as for bench."),
    checkpoint: Optional[Path] = typer.Option(None, help="Base weights, loaded strictly."),
    data: str = typer.Option("testbed-train", help="Training data: 'testbed-train' (Fashion-MNIST train split), "
                             ".npz, list file or image folder."),
    limit: Optional[int] = typer.Option(None, min=1, help="Train on an evenly strided subset of this many images."),
    steps: int = typer.Option(300, min=1, help="Optimizer steps."),
    batch_size: int = typer.Option(64, min=1, help="Batch per process."),
    lr: float = typer.Option(1e-3, help="Learning rate of the selectors."),
    backbone_lr: float = typer.Option(2e-5, help="Learning rate of the backbone (full fine-tune)."),
    freeze_backbone: Optional[bool] = typer.Option(
        None, "--freeze-backbone/--full", help="Train the selectors only, or fine-tune everything. Default: "
        "selectors only for learned methods, full for training-free ones."),
    label_free: bool = typer.Option(False, help="No labels: distillation (KL + token MSE) and the budget only."),
    lut_path: Optional[Path] = typer.Option(None, "--lut", help="Latency LUT (`vitprune lut`) for a latency budget."),
    target_latency_ms: Optional[float] = typer.Option(None, help="Latency budget in ms per batch (needs --lut)."),
    target_speedup: Optional[float] = typer.Option(None, help="Latency budget as a speedup over unpruned (--lut)."),
    init: Optional[Path] = typer.Option(None, help="Start the selectors from a trained folder (e.g. a frozen-backbone "
                                        "run before a full fine-tune)."),
    multi_stage: bool = typer.Option(False, help="Insert selectors stage by stage, choosing each stage's block and "
                                     "keep rate against the budget by validation fidelity (HeatViT)."),
    lambda_ratio: float = typer.Option(2.0, help="Weight of the keep-ratio loss."),
    lambda_kl: float = typer.Option(0.5, help="Weight of KL(student ‖ teacher)."),
    lambda_tokens: float = typer.Option(0.5, help="Weight of the kept-token MSE."),
    lambda_latency: float = typer.Option(2.0, help="Weight of the latency-sparsity loss."),
    quantize: Optional[str] = typer.Option(None, help="Quantization-aware training: 'int8' or 'int8+poly' "
                                           "(HeatViT's 8-bit fixed point, + polynomial GELU/softmax)."),
    per_channel: bool = typer.Option(False, help="Per-channel weight scales with --quantize."),
    val_data: Optional[str] = typer.Option("testbed", help="Labelled data to evaluate on after training ('' = none)."),
    val_limit: Optional[int] = typer.Option(None, min=1, help="Evaluate on a strided subset."),
    out: Optional[Path] = typer.Option(None, help="Output folder. Default: results/train/<method>."),
    save_every: int = typer.Option(100, help="Checkpoint every N steps (and at the end)."),
    log_every: int = typer.Option(10, help="Write a log.jsonl line every N steps (and at the end)."),
    resume: bool = typer.Option(False, help="Continue from <out>/resume.pt after an interruption."),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", callback=check_device, help="cpu or cuda (torchrun: one GPU per process)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads per process."),
) -> None:
    """Train learned token selectors (or fine-tune under a method), distilled from the unpatched model."""
    from .specs import format_method_spec, parse_method_spec
    from .train.losses import LossWeights
    from .train.loop import TrainConfig
    from .train.run import run_training

    if threads:
        torch.set_num_threads(threads)
    name, config = parse_method_spec(method)
    if freeze_backbone is None:
        freeze_backbone = name in ("heatvit", "spvit")
    cfg = TrainConfig(
        method=name, method_config=config, model=model, checkpoint=None if checkpoint is None else str(checkpoint),
        data=data, limit=limit, steps=steps, batch_size=batch_size, lr=lr, backbone_lr=backbone_lr,
        freeze_backbone=freeze_backbone, label_free=label_free,
        loss=LossWeights(ratio=lambda_ratio, kl=lambda_kl, tokens=lambda_tokens, latency=lambda_latency),
        lut=None if lut_path is None else str(lut_path), target_latency_ms=target_latency_ms,
        target_speedup=target_speedup, out=str(out or Path("results") / "train" / name), save_every=save_every,
        resume=resume, seed=seed, device=device, log_every=log_every, init_selectors=None if init is None else str(init),
        quantize=quantize, per_channel=per_channel,
    )
    run_training(cfg, console=console, multi_stage=multi_stage, val_data=val_data or None, val_limit=val_limit,
                 label=format_method_spec(name, config))


EXPORT_FORMATS = {"onnx": ".onnx", "openvino": ".xml", "executorch": ".pte"}


@app.command()
def export(
    out: Path = typer.Option(..., "--out", "-o", help="Output file: .onnx (onnx), .xml (openvino; weights in .bin "
                             "beside it) or .pte (executorch)."),
    format: str = typer.Option("onnx", "--format", "-f", help="onnx (ONNX Runtime), openvino (OpenVINO IR, via "
                               "ONNX) or executorch (.pte lowered to XNNPACK)."),
    model: str = typer.Option("testbed", help="'testbed' (shared Fashion-MNIST ViT), 'dinov2_vits14' or a timm name."),
    checkpoint: Optional[Path] = typer.Option(None, help="Local .safetensors/.pth weights, loaded strictly."),
    method: str = typer.Option("none", "--method", "-m", help="Method spec with fixed token counts per block, e.g. "
                               "tome:r=13 or 'evit:keep=0.7,blocks=(3,6,9)'; 'none' exports the unpatched model."),
    int8: bool = typer.Option(False, "--int8", help="Also write the int8 model beside it (<out stem>.int8.<suffix>): "
                              "onnx: ONNX Runtime dynamic int8 (MatMul/Gemm weights int8, activations uint8 per "
                              "batch); openvino: NNCF post-training quantization; executorch: PT2E with the XNNPACK "
                              "quantizer (Linear/Conv). The last two calibrate on --data."),
    data: Optional[str] = typer.Option(None, help="Calibration images for --int8 with openvino/executorch (.npz, list "
                                       "file, image folder, 'testbed-train'). Default: the testbed's train split for "
                                       "the testbed model, random images otherwise (fine for timing, not accuracy)."),
    calib_images: int = typer.Option(256, min=1, help="Calibration images (evenly strided from --data)."),
    batch_size: int = typer.Option(2, min=1, help="Images in the example batch (compared runtime vs PyTorch)."),
    dynamic_batch: bool = typer.Option(True, "--dynamic-batch/--static-batch", help="Symbolic batch axis, or fixed "
                                       "to --batch-size (executorch: batches up to max(--batch-size, 64))."),
    opset: int = typer.Option(18, help="ONNX opset (>= 17; onnx format)."),
    threads: int = typer.Option(2, min=1, help="Runtime threads for the check."),
) -> None:
    """Export a model (patched with a fixed-count method, or not) to ONNX, OpenVINO or ExecuTorch; check it and
    compare the runtime's outputs with PyTorch's."""
    from . import patching
    from .hw.onnx_export import check_exportable, example_input, file_size, max_abs_diff
    from .hw.openvino_export import file_size as ov_file_size
    from .specs import parse_method_spec

    suffix = EXPORT_FORMATS.get(format)
    if suffix is None:
        raise ValueError(f"unknown --format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if out.suffix != suffix:
        raise ValueError(f"--format {format} writes a {suffix} file; got --out {out} (use e.g. {out.with_suffix(suffix)})")
    name, config = parse_method_spec(method)
    net = patchable_model(model, checkpoint=checkpoint)
    if name != "none":
        patching.patch(net, name, **config)
    check_exportable(net)  # before the progress display: a refusal is the only line
    x = example_input(net, batch_size)
    int8_path = out.with_name(out.stem + ".int8" + suffix)
    calibration = _export_calibration(net, model, data, calib_images) if int8 and format != "onnx" else None
    with progress_display(console) as progress:
        task = progress.add_task(f"exporting {model} to {format}", total=2 + 2 * int8)
        files = _export_files(net, format, out, int8_path if int8 else None, x, dynamic_batch, opset, calibration,
                              lambda msg: progress.update(task, advance=1, description=msg), progress.console.print)
        for precision, file in files:
            progress.update(task, advance=1, description=f"{precision}: comparing {format} with PyTorch")
            diff = max_abs_diff(net, _export_runner(format, file, threads), x)
            size = ov_file_size(file) if format == "openvino" else file_size(file)
            progress.console.print(f"{precision}: {file}  {size / 2**20:.1f} MiB  PyTorch vs "
                                   f"{RUNTIME_TITLES[format]} max |diff| {diff:.2e} on {x.shape[0]} images")


RUNTIME_TITLES = {"onnx": "ONNX Runtime", "openvino": "OpenVINO", "executorch": "ExecuTorch"}


def _export_calibration(net: torch.nn.Module, model: str, data: Optional[str], images: int) -> list[torch.Tensor]:
    """Calibration batches for OpenVINO/ExecuTorch int8: --data, the testbed's train split, or random images."""
    from .hw.onnx_export import example_input
    from .models import TESTBED_NAMES

    if data is None and model.lower().removeprefix("hf:") in TESTBED_NAMES:
        data = "testbed-train"
    if data is None:
        console.print("[yellow]no --data: int8 calibrates on random images (fine for timing; for accuracy give "
                      "--data with images like the ones it will see)[/]")
        return list(example_input(net, images).split(32))
    return calibration_images(net, data, images)


def calibration_images(net: torch.nn.Module, data: str, images: int, batch: int = 32) -> list[torch.Tensor]:
    """``images`` images (evenly strided) of ``data`` ('testbed-train': the testbed's train split, or anything
    ``load_dataset`` opens), preprocessed for ``net``, in batches: int8 calibration."""
    from .measure.data import image_transform_for, load_dataset

    if data == "testbed-train":
        from .assets import testbed_paths

        data = str(testbed_paths().train)
    dataset = load_dataset(data, transform=image_transform_for(net), limit=images)
    if len(dataset) == 0:
        raise ValueError(f"calibration data {data} is empty")
    return list(torch.stack([dataset[i][0] for i in range(len(dataset))]).split(batch))


def _export_files(net: torch.nn.Module, format: str, out: Path, int8_path: Optional[Path], x: torch.Tensor,
                  dynamic_batch: bool, opset: int, calibration: Optional[list[torch.Tensor]],
                  advance: Callable[[str], None], say: Callable[[str], None]) -> list[tuple[str, Path]]:
    """Write the fp32 (and, given ``int8_path``, the int8) file of ``format``: [(precision, path)]."""
    if format == "onnx":
        from .hw.onnx_export import export_onnx, onnx_opset, quantize_dynamic_int8

        path = export_onnx(net, out, sample=x, opset=opset, dynamic_batch=dynamic_batch)
        say(f"onnx.checker: passed (opset {onnx_opset(path)}, batch {'dynamic' if dynamic_batch else x.shape[0]})")
        quantize = quantize_dynamic_int8
    elif format == "openvino":
        from .hw.openvino_export import export_openvino, quantize_int8

        path = export_openvino(net, out, sample=x, dynamic_batch=dynamic_batch)

        def quantize(src: Path, dst: Path) -> Path:
            return quantize_int8(src, dst, calibration)
    else:
        from .hw.executorch_export import export_executorch

        path = export_executorch(net, out, sample=x, dynamic_batch=dynamic_batch)

        def quantize(src: Path, dst: Path) -> Path:  # PT2E quantizes the PyTorch model, not the fp32 file
            return export_executorch(net, dst, sample=x, dynamic_batch=dynamic_batch, calibration=calibration)
    files = [("fp32", path)]
    if int8_path is not None:
        advance(f"int8: quantizing {int8_path.name}")
        files.append(("int8", quantize(path, int8_path)))
    return files


def _export_runner(format: str, path: Path, threads: int) -> torch.nn.Module:
    """The runtime of ``format`` running ``path`` on ``threads`` threads, called like a model."""
    if format == "onnx":
        from .hw.onnx_export import OrtModule, ort_session

        return OrtModule(ort_session(path, threads))
    if format == "openvino":
        from .hw.openvino_export import OpenVINOModule, ov_compiled

        return OpenVINOModule(ov_compiled(path, threads))
    from .hw.executorch_export import ExecuTorchModule

    return ExecuTorchModule(path, threads)


@app.command()
def quantize(
    model: str = typer.Option("testbed", help="Model, as for bench."),
    checkpoint: Optional[Path] = typer.Option(None, help="Local weights, loaded strictly."),
    data: str = typer.Option("testbed", help="Data (as for bench); labels are needed only for --labels."),
    method: Optional[list[str]] = typer.Option(None, "--method", "-m", help="Method specs, repeatable. Default: "
                                               "tome:r=4 and ppt:r=16 (≈ −30/−35% MACs on the testbed)."),
    limit: Optional[int] = typer.Option(1000, min=1, help="Evaluate on a strided subset (None: all)."),
    calib_batches: int = typer.Option(4, help="Calibration batches of 32 images (from the start of the data)."),
    per_channel: bool = typer.Option(False, help="Per-channel power-of-two weight scales."),
    out: Optional[Path] = typer.Option(None, help="Folder for quantize.json. Default: results/quantize/<model>."),
    fidelity: Optional[bool] = typer.Option(
        None, "--fidelity/--labels", help="Score rows by cosine and top-1 agreement with the fp32 unpatched outputs, "
        "or by top-1 against labels. Default: --labels (e.g. the testbed), but --fidelity when the data has no labels "
        "(label -1) or the model has no classifier head (num_classes 0, e.g. dinov2_vits14)."),
) -> None:
    """HeatViT-style 8-bit fixed point: fp32 vs int8 vs int8 + polynomial GELU/softmax, ± token methods, one table."""
    from .hw.precision import precision_rows
    from .measure.data import image_transform_for, load_dataset
    from .measure.report import print_table, write_json

    net = patchable_model(model, checkpoint=checkpoint)
    dataset = load_dataset(data, transform=image_transform_for(net), limit=limit)
    n_cal = min(len(dataset), 32 * calib_batches)
    samples = [dataset[i] for i in range(n_cal)]
    calibration = list(torch.stack([x for x, _ in samples]).split(32))
    labelled = _all_labelled(dataset, [int(y) for _, y in samples])
    headless = getattr(net, "num_classes", None) == 0
    if fidelity is False and (headless or not labelled):
        why = "the model has no classifier head" if headless else "the data has no labels (-1)"
        raise typer.BadParameter(f"--labels needs labelled data and a classifier, but {why}; use --fidelity.")
    reference = "labels" if fidelity is False or (fidelity is None and labelled and not headless) else "fidelity"
    specs = list(method) if method else ["tome:r=4", "ppt:r=16"]
    with progress_display(console) as progress:
        task = progress.add_task("quantize", total=3 * (len(specs) + 1) + (reference == "fidelity"))
        rows = precision_rows(net, model, specs, dataset, calibration, per_channel=per_channel, reference=reference,
                              on_step=lambda m: progress.update(task, advance=1, description=m))
    title = (f"vitprune quantize — {model} ({len(dataset)} images, {n_cal} calibration images, "
             f"{'per-channel' if per_channel else 'per-tensor'} weights)")
    if reference == "fidelity":
        _print_fidelity_table(rows, title + " — fidelity to fp32 unpatched")
    else:
        print_table(rows, title=title, console=console)
    path = write_json(rows, (out or Path("results") / "quantize" / model.replace("/", "_").replace(":", "_"))
                      / "quantize.json", {"model": model, "per_channel": per_channel, "n_eval": len(dataset),
                                          "reference": reference})
    console.print(f"wrote {path}")


def _all_labelled(dataset: torch.utils.data.Dataset, seen: list[int]) -> bool:
    """No label is −1 (unlabelled). Read without loading images for load_dataset's kinds; else trust ``seen``."""
    from torch.utils.data import Subset

    indices = None
    if isinstance(dataset, Subset):  # a strided ImageFolder
        indices, dataset = dataset.indices, dataset.dataset
    if hasattr(dataset, "labels"):  # NpzDataset
        labels = [int(y) for y in dataset.labels]
    elif hasattr(dataset, "samples"):  # list file, ImageFolder
        labels = [int(y) for _, y in dataset.samples]
    else:
        return all(y >= 0 for y in seen)
    return all(labels[i] >= 0 for i in (range(len(labels)) if indices is None else indices))


def _print_fidelity_table(rows: list, title: str) -> None:
    """measure.report.print_table shows top-1 only, not ``extra``; fidelity rows get their own columns."""
    from rich.table import Table

    from .measure.report import MISSING

    view = Table(title=title, header_style="bold")
    for col in ("precision", "method", "GMACs", "cosine vs fp32", "top-1 agreement vs fp32"):
        view.add_column(col, justify="left" if col in ("precision", "method") else "right")
    for r in rows:
        cos, agree = r.extra.get("cosine"), r.extra.get("agreement")
        view.add_row(r.extra["precision"], r.extra["spec"], f"{r.gmacs:.3f}",
                     MISSING if cos is None else f"{cos:.4f}", MISSING if agree is None else f"{100 * agree:.1f}%",
                     style="bold" if r.extra["spec"] in ("none", "tome:r=0") else None)
    console.print(view)


def main() -> None:  # pragma: no cover
    """The ``vitprune`` console script: ``--debug`` may stand anywhere on the line."""
    import sys

    if "--debug" in sys.argv[1:]:
        sys.argv.remove("--debug")
        os.environ["VITPRUNE_DEBUG"] = "1"
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
