"""Accuracy against labels (top-1/top-5/loss) and label-free fidelity between two models' outputs."""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vitprune.measure.data import make_loader

Batches = Dataset | DataLoader | Iterable


@dataclass
class EvalResult:
    """Accuracy of one model on one labelled dataset; fractions in [0, 1]."""

    top1: float
    top5: float | None  # None when the model has fewer than 5 classes
    n: int
    loss: float  # mean cross-entropy


@dataclass
class FidelityResult:
    """How closely model B reproduces model A's outputs (no labels needed)."""

    cosine_mean: float  # mean over images of cos(out_a, out_b)
    cosine_min: float
    top1_agreement: float | None  # fraction with equal argmax; None for 1-wide outputs
    max_abs_diff: float
    n: int


def _as_loader(data: Batches, batch_size: int) -> Iterable:
    """Datasets are batched here; loaders and other iterables of batches are used as given."""
    if isinstance(data, Dataset):
        if hasattr(data, "__len__") and len(data) == 0:  # type: ignore[arg-type]
            raise ValueError("the dataset is empty; nothing to evaluate (check the path and limit).")
        return make_loader(data, batch_size)
    return data


def _split(batch: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 else None
        return batch[0], (torch.as_tensor(y) if y is not None else None)
    raise TypeError(f"batches must be tensors or (images, labels) pairs, got {type(batch).__name__}")


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _total(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


@contextmanager
def _progress(enabled: bool, total: int | None, description: str) -> Iterator:
    """Yield an ``advance()`` callable driving a rich progress bar (or doing nothing)."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def evaluate(model: nn.Module, dataset_or_loader: Batches, *, batch_size: int = 256,
             progress: bool = True) -> EvalResult:
    """Top-1/top-5 accuracy and mean cross-entropy of ``model`` (used as-is; call ``.eval()`` first)."""
    loader = _as_loader(dataset_or_loader, batch_size)
    device, dtype = _device_dtype(model)
    n = correct1 = correct5 = 0
    loss_sum = 0.0
    top5_possible = True
    with torch.inference_mode(), _progress(progress, _total(loader), "evaluating") as advance:
        for batch in loader:
            x, y = _split(batch)
            if y is None:
                raise ValueError("evaluate needs labels; use fidelity() to compare models without labels.")
            if (y < 0).any():
                raise ValueError("the dataset has no labels (label -1); use fidelity() instead.")
            logits = model(x.to(device=device, dtype=dtype)).float()
            y = y.to(logits.device).long()
            if logits.ndim != 2:
                raise ValueError(f"expected logits [batch, classes], got {tuple(logits.shape)}")
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct1 += (logits.argmax(1) == y).sum().item()
            if logits.shape[1] >= 5:
                correct5 += (logits.topk(5, dim=1).indices == y[:, None]).any(1).sum().item()
            else:
                top5_possible = False
            n += len(y)
            advance()
    if n == 0:
        raise ValueError("the dataset is empty; nothing to evaluate (check the path and limit).")
    return EvalResult(top1=correct1 / n, top5=correct5 / n if top5_possible else None, n=n, loss=loss_sum / n)


def fidelity(model_a: nn.Module, model_b: nn.Module, loader: Batches, *, batch_size: int = 64,
             progress: bool = False) -> FidelityResult:
    """Compare two models image by image (e.g. unpruned A vs pruned B); labels are ignored."""
    loader = _as_loader(loader, batch_size)
    dev_a, dt_a = _device_dtype(model_a)
    dev_b, dt_b = _device_dtype(model_b)
    n = agree = 0
    cos_sum, cos_min, max_diff = 0.0, math.inf, 0.0
    argmax_ok = True
    with torch.inference_mode(), _progress(progress, _total(loader), "comparing") as advance:
        for batch in loader:
            x, _ = _split(batch)
            a = model_a(x.to(device=dev_a, dtype=dt_a)).float().flatten(1)
            b = model_b(x.to(device=dev_b, dtype=dt_b)).float().flatten(1).to(a.device)
            if a.shape != b.shape:
                raise ValueError(f"outputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
            cos = F.cosine_similarity(a, b, dim=1)
            cos_sum += cos.sum().item()
            cos_min = min(cos_min, cos.min().item())
            max_diff = max(max_diff, (a - b).abs().max().item())
            if a.shape[1] > 1:
                agree += (a.argmax(1) == b.argmax(1)).sum().item()
            else:
                argmax_ok = False
            n += a.shape[0]
            advance()
    if n == 0:
        raise ValueError("the dataset is empty; nothing to compare.")
    return FidelityResult(cosine_mean=cos_sum / n, cosine_min=cos_min,
                          top1_agreement=agree / n if argmax_ok else None, max_abs_diff=max_diff, n=n)
