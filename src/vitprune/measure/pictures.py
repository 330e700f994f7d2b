"""Token pictures: which patches each reduction kept, merged together, packed or dropped, over the image.

Reads the per-block ``Snapshot``s a patched model records with ``trace_source=True`` (the engine's source maps),
so it works for every method without knowing any of them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..methods.base import Snapshot
from ..tokens import PACKAGE_INDEX

KEPT, MERGED, PACKED, DROPPED = 0, 1, 2, 3


def patch_assignment(snapshot: Snapshot, image: int, num_prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """For one image: (token id holding each input patch, or −1 if dropped; category of each patch)."""
    source = snapshot.source[image, :, num_prefix:].float()  # [N, P] tokens × input patches
    holder = source.argmax(dim=0)
    held = source.sum(dim=0) > 0
    size = snapshot.size[image, :, 0]
    index = snapshot.index[image]
    category = torch.full_like(holder, DROPPED)
    category[held & (size[holder] <= 1)] = KEPT
    category[held & (size[holder] > 1)] = MERGED
    category[held & (index[holder] == PACKAGE_INDEX)] = PACKED
    holder = torch.where(held, holder, torch.full_like(holder, -1))
    return holder.cpu().numpy(), category.cpu().numpy()


def render_panel(image: np.ndarray, holder: np.ndarray, category: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """RGB float image: kept patches as they are, merged groups tinted one colour per group with borders, the
    package token's patches hatched grey, dropped patches dark."""
    h, w = image.shape[:2]
    rows, cols = grid
    ph, pw = h // rows, w // cols
    out = image[: rows * ph, : cols * pw].copy()
    rng = np.random.default_rng(0)
    palette = rng.uniform(0.15, 1.0, size=(max(int(holder.max()) + 1, 1), 3))
    holder_grid = holder.reshape(rows, cols)
    for p, (tok, cat) in enumerate(zip(holder, category)):
        r, c = divmod(p, cols)
        tile = out[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw]
        if cat == MERGED:
            tile[:] = 0.45 * tile + 0.55 * palette[tok]
        elif cat == PACKED:
            yy, xx = np.mgrid[0:ph, 0:pw]
            stripes = ((yy + xx) // max(1, ph // 4)) % 2 == 0
            tile[:] = 0.35 * tile + 0.35
            tile[stripes] = 0.25
        elif cat == DROPPED:
            tile[:] = 0.12 * tile
    # borders between patches held by different tokens
    for r in range(rows):
        for c in range(cols):
            t = holder_grid[r, c]
            if c + 1 < cols and holder_grid[r, c + 1] != t:
                out[r * ph:(r + 1) * ph, (c + 1) * pw - 1] = 1.0
            if r + 1 < rows and holder_grid[r + 1, c] != t:
                out[(r + 1) * ph - 1, c * pw:(c + 1) * pw] = 1.0
    return out


def display_image(x: Tensor, model: nn.Module) -> np.ndarray:
    """Undo the model's normalisation of one [C, H, W] input for display (RGB in [0, 1])."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    c = x.shape[0]
    mean = torch.tensor(cfg.get("mean", (0.0,) * c)[:c]).view(c, 1, 1)
    std = torch.tensor(cfg.get("std", (1.0,) * c)[:c]).view(c, 1, 1)
    img = (x.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return np.repeat(img, 3, axis=2) if c == 1 else img


def token_figure(model: nn.Module, x: Tensor, title: str, path: Path) -> Path:
    """Run the patched model (``trace_source=True``) on one image [C, H, W] and save one panel per reduction."""
    from matplotlib.figure import Figure

    from ..patching import is_patched, last_trace

    if not is_patched(model) or not model._vitprune.trace_source:
        raise ValueError("token pictures need a model patched with trace_source=True")
    with torch.no_grad():
        model(x.unsqueeze(0))
    trace = last_trace(model)
    snapshots = trace.snapshots
    if not snapshots:
        raise ValueError(f"{title}: the method reduced no tokens on this image, nothing to draw")
    grid = model._vitprune.last_state.grid
    num_prefix = model._vitprune.info.num_prefix
    image = display_image(x, model)
    n = len(snapshots) + 1
    cols = min(n, 7)
    rows = -(-n // cols)
    fig = Figure(figsize=(2.4 * cols, 2.6 * rows + 0.4), dpi=110)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=9)
    for ax, snap in zip(axes[1:], snapshots):
        holder, category = patch_assignment(snap, 0, num_prefix)
        ax.imshow(render_panel(image, holder, category, grid))
        n_tokens = snap.size.shape[1]
        ax.set_title(f"after block {snap.layer}: {n_tokens} tokens", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"{title} — tinted: merged (one colour per token), hatched: packed, dark: dropped", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
