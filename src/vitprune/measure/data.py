"""Datasets for evaluation: uint8 arrays in ``.npz`` files, ``path, label`` list files, image folders.

Every dataset yields ``(image: FloatTensor[C, H, W], label: int)``. ``limit=n`` always takes the same
*evenly strided* subset (indices ``floor(i * N / n)``), not the first n: files are often sorted by class
(the testbed's test split is 500 images of class 0, then class 1, ...), and a stride keeps classes balanced.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

Transform = Callable[[Image.Image], torch.Tensor]


def strided_indices(n_total: int, limit: int | None) -> list[int]:
    """``limit`` evenly spaced indices out of ``n_total`` (all of them when ``limit`` is None or too big)."""
    if limit is None or limit >= n_total:
        return list(range(n_total))
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return [(i * n_total) // limit for i in range(limit)]


@dataclass(frozen=True)
class ArrayPreprocess:
    """How uint8 arrays become model input: ``(x / 255 - mean) / std``, then pad ``pad`` px on each side.

    The pad value is ``-mean / std`` per channel, i.e. zero (black) in pixel space. ``size``, when set and
    different from the padded size, resizes (bilinear, antialiased) to ``size x size`` afterwards.
    """

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    pad: int = 0
    size: int | None = None

    def __call__(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, H, W]`` or ``[N, H, W, C]`` -> float32 ``[N, C, H', W']``, vectorised over N."""
        t = torch.as_tensor(np.asarray(x))
        if t.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {t.dtype}; scale to 0..255 uint8 first.")
        if t.ndim == 3:
            t = t.unsqueeze(-1)
        if t.ndim != 4:
            raise ValueError(f"expected images shaped [N, H, W] or [N, H, W, C], got {tuple(t.shape)}")
        c = t.shape[-1]
        mean = torch.tensor(_per_channel(self.mean, c, "mean")).view(1, c, 1, 1)
        std = torch.tensor(_per_channel(self.std, c, "std")).view(1, c, 1, 1)
        out = t.permute(0, 3, 1, 2).float().div_(255.0).sub_(mean).div_(std)
        if self.pad:
            p = self.pad
            padded = (-mean / std).expand(out.shape[0], c, out.shape[2] + 2 * p, out.shape[3] + 2 * p).clone()
            padded[:, :, p:-p, p:-p] = out
            out = padded
        if self.size is not None and out.shape[-2:] != (self.size, self.size):
            out = F.interpolate(out, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return out.contiguous()


def _per_channel(values: Sequence[float] | float, c: int, what: str) -> list[float]:
    vals = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(vals) == 1:
        return vals * c
    if len(vals) != c:
        raise ValueError(f"{what} has {len(vals)} values but the images have {c} channels")
    return vals


# The Fashion-MNIST testbed: 28x28 grayscale, normalised, zero-padded (in pixel space) to 32x32.
TESTBED_PREPROCESS = ArrayPreprocess(mean=(0.2860,), std=(0.3530,), pad=2, size=32)


class NpzDataset(Dataset):
    """Images and labels from an ``.npz`` (keys ``x``/``images`` and ``y``/``labels``), preprocessed once.

    The whole array is converted in one vectorised pass at construction (the 5000-image testbed split
    takes ~50 ms), so ``__getitem__`` is a tensor index. Without a label array, labels are -1.
    """

    def __init__(self, path: str | Path, preprocess: ArrayPreprocess | None = None, limit: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"dataset {path} not found")
        with np.load(path) as data:
            xkey = next((k for k in ("x", "images") if k in data.files), None)
            if xkey is None:
                raise ValueError(f"{path} has no image array: expected key 'x' or 'images', found {data.files}")
            ykey = next((k for k in ("y", "labels") if k in data.files), None)
            idx = strided_indices(len(data[xkey]), limit)
            x = data[xkey][idx]
            y = data[ykey][idx].astype(np.int64) if ykey else np.full(len(idx), -1, dtype=np.int64)
        if len(x) != len(y):
            raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
        self.path = path
        self.preprocess = preprocess or ArrayPreprocess()
        self.images = self.preprocess(x)
        self.labels = torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


class ListFileDataset(Dataset):
    """Images listed as ``path, label`` lines (paths relative to the list file's folder), loaded as RGB.

    Blank lines and lines starting with ``#`` are ignored; a whitespace separator also works. Without a
    ``transform`` images become float tensors in [0, 1] at their stored size.
    """

    def __init__(self, path: str | Path, transform: Transform | None = None, limit: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"list file {path} not found")
        entries: list[tuple[Path, int]] = []
        for lineno, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(",", 1) if "," in line else line.rsplit(None, 1)
            try:
                rel, label = parts[0].strip(), int(parts[1])
            except (IndexError, ValueError):
                raise ValueError(f"{path}:{lineno}: expected 'path, label', got {raw!r}") from None
            entries.append((path.parent / rel, label))
        entries = [entries[i] for i in strided_indices(len(entries), limit)]
        missing = [str(p) for p, _ in entries if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images listed in {path} do not exist, e.g. {missing[0]}")
        self.path = path
        self.samples = entries
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        file, label = self.samples[i]
        with Image.open(file) as im:
            img = im.convert("RGB")
        return (self.transform(img) if self.transform else _pil_to_tensor(img)), label


def image_folder(root: str | Path, transform: Transform | None = None, limit: int | None = None) -> Dataset:
    """torchvision ``ImageFolder`` (one sub-folder per class, sorted names -> labels), strided by ``limit``."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root), transform=transform or _pil_to_tensor)
    return ds if limit is None or limit >= len(ds) else Subset(ds, strided_indices(len(ds), limit))


def image_transform_for(model: nn.Module) -> Transform:
    """timm's eval transform (resize, centre crop, normalise) for ``model``, at the size it was built for.

    timm's pretrained cfg can name a different resolution than the model was built with (DINOv2 says
    518 but is built at 224), so a fixed ``patch_embed.img_size`` wins.
    """
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and getattr(model.patch_embed, "strict_img_size", True):
        cfg["input_size"] = (cfg["input_size"][0], *tuple(img_size))
    return create_transform(**cfg, is_training=False)


def load_dataset(
    spec: str | Path,
    *,
    transform: Transform | None = None,
    preprocess: ArrayPreprocess | None = None,
    limit: int | None = None,
) -> Dataset:
    """Open a dataset from a path: ``.npz`` -> ``NpzDataset``, a directory -> ImageFolder, another file -> list file.

    ``"testbed"`` names the shared Fashion-MNIST test split. ``.npz`` files whose name starts with
    ``fmnist`` default to ``TESTBED_PREPROCESS``; other ``.npz`` files to plain ``x / 255``.
    ``limit`` takes an evenly strided, deterministic subset (see the module docstring).
    """
    if str(spec) == "testbed":
        from vitprune.assets import testbed_paths

        spec = testbed_paths().test
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} not found; give an .npz file, a 'path, label' list file or an image folder.")
    if path.is_dir():
        return image_folder(path, transform, limit)
    if path.suffix.lower() == ".npz":
        if preprocess is None and path.name.lower().startswith("fmnist"):
            preprocess = TESTBED_PREPROCESS
        return NpzDataset(path, preprocess, limit)
    return ListFileDataset(path, transform, limit)


def make_loader(dataset: Dataset, batch_size: int, workers: int = 0) -> DataLoader:
    """Deterministic (unshuffled) batches for evaluation."""
    kwargs: dict[str, Any] = {"persistent_workers": False} if workers else {}
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, drop_last=False, **kwargs)
