"""Token pictures: patch categories from the engine's source maps, and the `vitprune viz` command."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import vitprune
from vitprune.cli import app
from vitprune.measure.pictures import DROPPED, KEPT, MERGED, PACKED, patch_assignment, render_panel

from conftest import make_vit


def snapshots_of(model, method, **cfg):
    vitprune.patch(model, method, trace_source=True, **cfg)
    with torch.no_grad():
        model(torch.randn(1, 3, *model.patch_embed.img_size))
    return vitprune.last_trace(model).snapshots


def test_evit_picture_categories():
    model = make_vit("deit_tiny_patch16_224", img_size=64)  # 4x4 grid, 16 patches
    (snap,) = snapshots_of(model, "evit", keep=0.25, blocks=(1,))
    holder, category = patch_assignment(snap, 0, num_prefix=1)
    assert (category == KEPT).sum() == 4 and (category == PACKED).sum() == 12
    assert len(set(holder[category == PACKED])) == 1  # one package token holds all pruned patches


def test_tome_picture_categories_cover_every_patch():
    model = make_vit("deit_tiny_patch16_224", img_size=64)
    snaps = snapshots_of(model, "tome", r=[3, 3])
    assert [s.layer for s in snaps] == [0, 1]
    holder, category = patch_assignment(snaps[-1], 0, num_prefix=1)
    assert (category == DROPPED).sum() == 0 and (category == PACKED).sum() == 0
    assert len(set(holder.tolist())) == 16 - 6  # 6 merges → 10 tokens hold the 16 patches
    assert (category == MERGED).sum() == 16 - (category == KEPT).sum()
    panel = render_panel(np.full((64, 64, 3), 0.5), holder, category, (4, 4))
    assert panel.shape == (64, 64, 3) and 0.0 <= panel.min() and panel.max() <= 1.0


def test_viz_cli_writes_one_picture_per_method(tmp_path):
    img = tmp_path / "img.png"
    Image.fromarray((np.random.rand(80, 96, 3) * 255).astype(np.uint8)).save(img)
    out = tmp_path / "viz"
    result = CliRunner().invoke(app, ["viz", "-i", str(img), "--model", "deit_tiny_patch16_224",
                                      "-m", "tome:r=8", "-m", "evit:keep=0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["img_evit_keep=0.5.png", "img_tome_r=8.png"]
    assert all(Image.open(out / p).size[0] > 500 for p in pngs)


@pytest.mark.usefixtures("testbed_assets")
def test_viz_on_real_imagenet_image_with_dinov2(tmp_path):
    from vitprune.assets import imagenet_val_list

    first = imagenet_val_list().read_text().splitlines()[0].split(",")[0]
    image = imagenet_val_list().parent / first
    result = CliRunner().invoke(app, ["viz", "-i", str(image), "-m", "tome:r=16", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (png,) = tmp_path.glob("*.png")
    assert png.stat().st_size > 50_000
