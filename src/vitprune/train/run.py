"""What ``vitprune train`` does around the loop: a progress bar, then (rank 0) an evaluation and ``summary.json``."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from ..progress import progress as progress_display
from .loop import TrainConfig, TrainResult, train


def run_training(cfg: TrainConfig, *, console: Console, multi_stage: bool = False, val_data: str | None = "testbed",
                 val_limit: int | None = None, label: str = "") -> dict[str, Any] | None:
    main = int(os.environ.get("RANK", "0")) == 0
    start = time.perf_counter()
    with progress_display(console, info=True, enabled=main) as progress:
        task = progress.add_task(f"train {label}", total=cfg.steps, info="")

        def on_step(step: int, total: int, last: dict[str, float]) -> None:
            keeps = " ".join(f"{k}={v:.2f}" for k, v in last.items() if k.startswith("keep@"))
            progress.update(task, completed=step, total=total, info=f"loss {last.get('loss', 0):.3f} {keeps}")

        if multi_stage:
            from .multistage import train_multistage

            val = _val_dataset(val_data or "testbed", val_limit or 1000)
            result = train_multistage(cfg, val, log=lambda m: progress.console.print(m), on_step=on_step)
        else:
            result = train(cfg, on_step=on_step)
    if not main:
        return None
    summary = evaluate_trained(cfg, result, val_data, val_limit, time.perf_counter() - start)
    _print(summary, console)
    return summary


def _val_dataset(spec: str, limit: int | None):
    from ..measure.data import load_dataset

    return load_dataset(spec, limit=limit)


def evaluate_trained(cfg: TrainConfig, result: TrainResult, val_data: str | None, val_limit: int | None,
                     seconds: float) -> dict[str, Any]:
    """Top-1 and GMACs of the unpatched and the trained model; written to ``<out>/summary.json``."""
    from ..measure.accuracy import evaluate
    from ..measure.flops import count_macs
    from ..models import create_model
    from .checkpoint import load

    summary: dict[str, Any] = {"out": str(result.out), "steps": result.steps, "train_seconds": round(seconds, 1),
                               "world_size": result.world_size, "replicas_in_sync": result.replicas_in_sync,
                               "last": result.last}
    teacher = create_model(cfg.model, checkpoint=cfg.checkpoint)
    student = load(create_model(cfg.model, checkpoint=cfg.checkpoint), result.out)
    size = tuple(teacher.patch_embed.img_size)
    example = torch.zeros(1, teacher.patch_embed.proj.in_channels, *size)
    summary["gmacs_unpatched"] = count_macs(teacher, example).gmacs
    summary["gmacs"] = count_macs(student, example).gmacs
    summary["method"] = student._vitprune.method.name
    summary["config"] = student._vitprune.method.describe()
    if val_data:
        data = _val_dataset(val_data, val_limit)
        summary["top1_unpatched"] = evaluate(teacher, data, progress=False).top1
        summary["top1"] = evaluate(student, data, progress=False).top1
        if cfg.quantize is not None:  # what deploys: the trained weights quantized and calibrated as in training
            from .loop import quantize_student, training_data

            quantize_student(student, training_data(cfg.data, cfg.limit), cfg, torch.device("cpu"))
            summary["quantized"] = cfg.quantize
            summary["top1_quantized"] = evaluate(student, data, progress=False).top1
        summary["n_val"] = len(data)
    Path(result.out, "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _print(summary: dict[str, Any], console: Console) -> None:
    table = Table(title=f"vitprune train → {summary['out']} ({summary['steps']} steps, {summary['train_seconds']} s)")
    for col in ("model", "GMACs", "top-1"):
        table.add_column(col)
    top = summary.get("top1_unpatched")
    table.add_row("unpatched", f"{summary['gmacs_unpatched']:.4f}", "-" if top is None else f"{100 * top:.2f}%")
    top = summary.get("top1")
    table.add_row(f"{summary['method']} {summary['config']}", f"{summary['gmacs']:.4f}",
                  "-" if top is None else f"{100 * top:.2f}%")
    if summary.get("top1_quantized") is not None:
        table.add_row(f"  {summary['quantized']}", f"{summary['gmacs']:.4f}", f"{100 * summary['top1_quantized']:.2f}%")
    console.print(table)
