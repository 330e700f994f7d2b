"""The ``vitprune`` command line (typer + rich)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Token reduction for Vision Transformers.")
console = Console(width=None if Console().is_terminal else 160)  # logs and CI get full tables


class DType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


DTYPES = {DType.fp32: torch.float32, DType.bf16: torch.bfloat16}


@app.command()
def methods() -> None:
    """List the registered token-reduction methods."""
    from . import available_methods

    for name in available_methods():
        console.print(name)


@app.command()
def bench(
    model: str = typer.Option("testbed", help="'testbed' (shared Fashion-MNIST ViT), 'dinov2_vits14', or a timm name."),
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
    limit: Optional[int] = typer.Option(None, help="Evaluate on an evenly strided subset of this many images."),
    batch_size: int = typer.Option(32, help="Batch for the throughput measurement."),
    threads: int = typer.Option(2, help="CPU threads for the throughput measurement."),
    rounds: int = typer.Option(5, help="Interleaved timing rounds (each times every configuration once)."),
    speed: bool = typer.Option(True, help="Measure throughput."),
    accuracy: bool = typer.Option(True, help="Measure top-1 (needs labelled data)."),
    dtype: DType = typer.Option(DType.fp32, help="Compute dtype."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    out: Optional[Path] = typer.Option(None, help="Folder for bench.csv, bench.json and pareto.png. Default: results/bench/<model>."),
) -> None:
    """Measure GMACs, img/s (speedup vs unpatched, same run), top-1 and tokens per block for several methods."""
    from .bench import NOISY_IQR, BenchSettings, accuracy_at_cost, default_specs, run_bench, save_outputs
    from .measure.data import image_transform_for, load_dataset
    from .measure.report import print_table
    from .models import TESTBED_NAMES, create_model

    net = create_model(model, checkpoint=checkpoint, pretrained=pretrained)
    if data is None and accuracy and model.lower() in TESTBED_NAMES:
        data = "testbed"
    dataset = None
    if data is not None and accuracy:
        dataset = load_dataset(data, transform=image_transform_for(net), limit=limit)
        if len(dataset) == 0:
            raise typer.BadParameter(f"dataset {data} is empty")
    elif accuracy:
        console.print("[yellow]no --data given: top-1 not measured[/]")
    in_chans, size = net.patch_embed.proj.in_channels, tuple(net.patch_embed.img_size)
    if dataset is not None:
        example = torch.stack([dataset[i][0] for i in range(min(batch_size, len(dataset)))])
    else:
        example = torch.randn(batch_size, in_chans, *size)
    specs = list(method) if method else default_specs(net.patch_embed.num_patches, suite)
    settings = BenchSettings(batch_size=batch_size, threads=threads, rounds=rounds,
                             measure_speed=speed, dtype=DTYPES[dtype], device=device)
    steps = (len(specs) + 1) * (1 + (dataset is not None)) + speed
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("bench", total=steps)

        def on_step(msg: str) -> None:
            progress.update(task, advance=0 if progress.tasks[0].description == "bench" else 1, description=msg)

        result = run_bench(net, model, specs, dataset, settings, example, on_step=on_step)
    result.meta.update({"data": str(data) if dataset is not None else None,
                        "n_eval": len(dataset) if dataset is not None else None})
    print_table(result.rows, title=f"vitprune bench — {model} (batch {batch_size}, {threads} threads, "
                f"{dtype.value}, {device})", console=console)
    if result.meta.get("noisy_timings"):
        console.print(f"[yellow]timings are noisy (round-to-round spread > {NOISY_IQR:.0%} of the median) for "
                      f"{', '.join(result.meta['noisy_timings'])}: was the machine busy? Re-run with more --rounds "
                      "on an idle machine before trusting the speedups.[/]")
    summary = accuracy_at_cost(result.rows)
    if summary:
        console.print("[bold]accuracy at ≈ −35% MACs[/] (closest row per method):")
        for line in summary:
            console.print("  " + line)
    paths = save_outputs(result, out or Path("results") / "bench" / model.replace("/", "_"))
    for p in paths:
        console.print(f"wrote {p}")


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@app.command()
def viz(
    image: list[Path] = typer.Option(..., "--image", "-i", help="Image file or folder of images (repeatable)."),
    model: str = typer.Option("dinov2_vits14", help="'dinov2_vits14' (shared weights), 'testbed', or a timm name."),
    checkpoint: Optional[Path] = typer.Option(None, help="Local weights, loaded strictly."),
    method: Optional[list[str]] = typer.Option(
        None, "--method", "-m", help="Method spec, repeatable. Default: tome:r=16 and evit:keep=0.5."),
    max_images: int = typer.Option(8, help="At most this many images from folders."),
    out: Path = typer.Option(Path("results/viz"), help="Output folder for the PNGs."),
) -> None:
    """Token pictures: one panel per reducing block showing kept, merged, packed and dropped patches."""
    from PIL import Image

    from . import patching
    from .measure.data import image_transform_for
    from .measure.pictures import token_figure
    from .models import create_model
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
    net = create_model(model, checkpoint=checkpoint)
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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
