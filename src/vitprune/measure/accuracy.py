"""Accuracy against labels (top-1/top-5/loss) and label-free fidelity between two models' outputs."""
from __future__ import annotations

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
    from ..progress import progress as progress_display

    with progress_display() as bar:
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


def outputs(model: nn.Module, data: Batches, *, batch_size: int = 64) -> torch.Tensor:
    """Every image's output as float32 ``[N, D]`` on the CPU (labels ignored): a reference to compare many
    variants against (``compare_outputs``) without running the reference model again for each."""
    device, dtype = _device_dtype(model)
    chunks = []
    with torch.inference_mode():
        for batch in _as_loader(data, batch_size):
            x, _ = _split(batch)
            chunks.append(model(x.to(device=device, dtype=dtype)).float().flatten(1).cpu())
    if not chunks:
        raise ValueError("the dataset is empty; nothing to compare.")
    return torch.cat(chunks)


def compare_outputs(a: torch.Tensor, b: torch.Tensor) -> FidelityResult:
    """Image-by-image comparison of two models' outputs ``[N, ...]`` (each image's output flattened)."""
    a = a.float().flatten(1)
    b = b.float().flatten(1).to(a.device)
    if a.shape != b.shape:
        raise ValueError(f"outputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.shape[0] == 0:
        raise ValueError("the dataset is empty; nothing to compare.")
    cos = F.cosine_similarity(a, b, dim=1)
    agree = (a.argmax(1) == b.argmax(1)).float().mean().item() if a.shape[1] > 1 else None
    return FidelityResult(cosine_mean=cos.mean().item(), cosine_min=cos.min().item(), top1_agreement=agree,
                          max_abs_diff=(a - b).abs().max().item(), n=a.shape[0])


def _merge(parts: list[FidelityResult]) -> FidelityResult:
    """One result from per-batch results (means weighted by images)."""
    if not parts:
        raise ValueError("the dataset is empty; nothing to compare.")
    n = sum(r.n for r in parts)
    agree = None if any(r.top1_agreement is None for r in parts) else sum(r.top1_agreement * r.n for r in parts) / n
    return FidelityResult(cosine_mean=sum(r.cosine_mean * r.n for r in parts) / n,
                          cosine_min=min(r.cosine_min for r in parts), top1_agreement=agree,
                          max_abs_diff=max(r.max_abs_diff for r in parts), n=n)


def fidelity(model_a: nn.Module, model_b: nn.Module, loader: Batches, *, batch_size: int = 64,
             progress: bool = False) -> FidelityResult:
    """Compare two models image by image (e.g. unpruned A vs pruned B); labels are ignored. Streams batch by
    batch (``compare_outputs`` on each), so no output is kept."""
    loader = _as_loader(loader, batch_size)
    dev_a, dt_a = _device_dtype(model_a)
    dev_b, dt_b = _device_dtype(model_b)
    parts = []
    with torch.inference_mode(), _progress(progress, _total(loader), "comparing") as advance:
        for batch in loader:
            x, _ = _split(batch)
            parts.append(compare_outputs(model_a(x.to(device=dev_a, dtype=dt_a)),
                                         model_b(x.to(device=dev_b, dtype=dt_b))))
            advance()
    return _merge(parts)
