"""Datasets: npz preprocessing formula, list files, image folders, strided limits."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitprune import assets
from vitprune.measure.data import (
    TESTBED_PREPROCESS,
    ArrayPreprocess,
    ListFileDataset,
    NpzDataset,
    image_transform_for,
    load_dataset,
    make_loader,
    strided_indices,
)
from vitprune.models import create_model


def _assets_or_skip() -> Path:
    try:
        return assets.assets_dir()
    except FileNotFoundError as err:
        pytest.skip(f"shared assets unavailable: {err}")


def _jpeg(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (20, 12), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    (img.convert("L") if mode == "L" else img).save(path, quality=95)


# ---------------------------------------------------------------- ArrayPreprocess / NpzDataset


def test_testbed_preprocess_matches_documented_formula() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    x[0, 0, 0], x[1, 5, 7] = 0, 255
    out = TESTBED_PREPROCESS(x)
    assert out.shape == (3, 1, 32, 32) and out.dtype == torch.float32
    pad_value = -0.2860 / 0.3530
    # the 2-pixel border is zero in pixel space
    border = torch.cat([out[..., :2, :].flatten(), out[..., -2:, :].flatten(),
                        out[..., :, :2].flatten(), out[..., :, -2:].flatten()])
    assert torch.allclose(border, torch.full_like(border, pad_value), atol=1e-6)
    # the interior is (x / 255 - 0.2860) / 0.3530, shifted by the pad
    expected = (x.astype(np.float64) / 255.0 - 0.2860) / 0.3530
    assert np.allclose(out[:, 0, 2:30, 2:30].numpy(), expected, atol=1e-5)
    assert out[0, 0, 2, 2].item() == pytest.approx(pad_value, abs=1e-6)  # a black pixel equals the pad
    assert out[1, 0, 7, 9].item() == pytest.approx((1 - 0.2860) / 0.3530, abs=1e-6)


def test_rgb_arrays_use_per_channel_stats() -> None:
    x = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    x[..., 1] = 255
    pre = ArrayPreprocess(mean=(0.5, 0.25, 0.0), std=(0.5, 0.5, 1.0), pad=1)
    out = pre(x)
    assert out.shape == (2, 3, 6, 6)
    assert torch.allclose(out[:, :, 1:-1, 1:-1].mean(dim=(0, 2, 3)), torch.tensor([-1.0, 1.5, 0.0]))
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([-1.0, -0.5, 0.0]).expand(2, 3))  # pad = -mean/std


def test_preprocess_rejects_float_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        TESTBED_PREPROCESS(np.zeros((1, 28, 28), dtype=np.float32))


def test_strided_indices_keep_sorted_classes_balanced() -> None:
    labels = np.repeat(np.arange(10), 50)  # sorted by class, like the testbed split
    idx = strided_indices(len(labels), 100)
    assert len(idx) == 100 and idx == sorted(set(idx))
    assert np.bincount(labels[idx]).tolist() == [10] * 10
    assert strided_indices(5, None) == list(range(5)) and strided_indices(5, 50) == list(range(5))


def test_npz_alternate_keys_and_limit(tmp_path: Path) -> None:
    images = np.arange(6 * 4 * 4, dtype=np.uint8).reshape(6, 4, 4)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 0, 0, 1, 1, 1]))
    ds = NpzDataset(tmp_path / "d.npz", limit=2)
    assert len(ds) == 2
    (_x0, y0), (x1, y1) = ds[0], ds[1]
    assert (y0, y1) == (0, 1)
    assert torch.allclose(x1, torch.from_numpy(images[3]).float().div(255).unsqueeze(0))


def test_npz_without_labels_and_bad_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "nolabel.npz", x=np.zeros((3, 4, 4), np.uint8))
    assert NpzDataset(tmp_path / "nolabel.npz")[2][1] == -1
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="'x' or 'images'"):
        NpzDataset(tmp_path / "bad.npz")


def test_testbed_npz_is_prepared_fast() -> None:
    _assets_or_skip()
    t0 = time.perf_counter()
    ds = load_dataset(assets.testbed_paths().test)  # fmnist_* -> TESTBED_PREPROCESS by default
    elapsed = time.perf_counter() - t0
    assert len(ds) == 5000 and ds.images.shape == (5000, 1, 32, 32)
    assert elapsed < 2.0, f"preparing 5000 images took {elapsed:.2f}s"
    assert torch.bincount(ds.labels).tolist() == [500] * 10
    assert torch.bincount(load_dataset("testbed", limit=500).labels).tolist() == [50] * 10


# ---------------------------------------------------------------- list files and folders


def test_list_file_parsing(tmp_path: Path) -> None:
    _jpeg(tmp_path / "data" / "a.JPEG", (255, 0, 0))
    _jpeg(tmp_path / "data" / "b.JPEG", (0, 0, 255), mode="L")
    lst = tmp_path / "dataset.txt"
    lst.write_text("# comment\n./data/a.JPEG, 3\n\ndata/b.JPEG,7\n")
    ds = ListFileDataset(lst, transform=None)
    assert len(ds) == 2
    (xa, ya), (xb, yb) = ds[0], ds[1]
    assert (ya, yb) == (3, 7)
    assert xa.shape == (3, 12, 20) and xb.shape == (3, 12, 20)  # grayscale JPEG loaded as RGB
    assert xa[0].mean() > 0.9 and xa[2].mean() < 0.1
    assert torch.allclose(xb[0], xb[1]) and torch.allclose(xb[1], xb[2])
    # transform applied; limit keeps an evenly strided subset
    ds1 = ListFileDataset(lst, transform=lambda im: torch.tensor(im.size), limit=1)
    assert len(ds1) == 1 and ds1[0][0].tolist() == [20, 12] and ds1[0][1] == 3


def test_list_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("a.jpg, 1\nb.jpg, notanint\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        ListFileDataset(bad)
    missing = tmp_path / "missing.txt"
    missing.write_text("nothere.jpg, 1\n")
    with pytest.raises(FileNotFoundError, match="nothere.jpg"):
        ListFileDataset(missing)


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    np.savez(tmp_path / "arr.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.arange(4))
    assert isinstance(load_dataset(tmp_path / "arr.npz"), NpzDataset)
    _jpeg(tmp_path / "imgs" / "a.jpg", (1, 2, 3))
    (tmp_path / "list.txt").write_text("imgs/a.jpg, 0\n")
    assert isinstance(load_dataset(tmp_path / "list.txt"), ListFileDataset)
    for cls, color in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
        for i in range(3):
            _jpeg(tmp_path / "folder" / cls / f"{i}.jpg", color)
    folder = load_dataset(tmp_path / "folder", limit=2)
    assert len(folder) == 2 and [folder[i][1] for i in range(2)] == [0, 1]
    x, y = next(iter(make_loader(folder, batch_size=2)))
    assert x.shape == (2, 3, 12, 20) and y.tolist() == [0, 1]
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "absent.npz")


def test_image_transform_uses_built_resolution(tmp_path: Path) -> None:
    model = create_model("dinov2_vits14", shared_weights=False)  # timm's cfg says 518; built at 224
    tf = image_transform_for(model)
    _jpeg(tmp_path / "i.jpg", (10, 20, 30), size=(227, 227))
    with Image.open(tmp_path / "i.jpg") as im:
        out = tf(im.convert("RGB"))
    assert out.shape == (3, 224, 224)
    assert out[0].mean().item() == pytest.approx((10 / 255 - 0.485) / 0.229, abs=0.05)


def test_imagenet_list_from_assets() -> None:
    _assets_or_skip()
    ds = load_dataset(assets.imagenet_val_list(), limit=4)
    x, y = ds[0]
    assert len(ds) == 4 and x.shape == (3, 227, 227) and 0 <= y < 1000
