"""Locate the shared, read-only assets (testbed weights and data, DINOv2, ImageNet images).

The assets are never copied into the project; they are found by path so tests and benchmarks run
offline. Resolution order: ``$VITPRUNE_ASSETS``, then ``<cwd>/../shared/assets``,
``<repo root>/../shared/assets`` and ``<cwd>/shared/assets``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

ENV_VAR = "VITPRUNE_ASSETS"

# src/vitprune/assets.py -> parents[2] is the repository root for an editable (src layout) install.
_REPO_ROOT = Path(__file__).resolve().parents[2]


class TestbedPaths(NamedTuple):
    """Files of the Fashion-MNIST ViT testbed."""

    __test__ = False  # not a pytest test class, despite the name

    weights: Path  # fmnist_vit_tiny_p4.safetensors
    json: Path  # fmnist_vit_tiny_p4.json (architecture, preprocessing, stated top-1)
    train: Path  # fmnist_train.npz
    test: Path  # fmnist_test.npz


def _candidates() -> list[Path]:
    cwd = Path.cwd()
    return [cwd.parent / "shared" / "assets", _REPO_ROOT.parent / "shared" / "assets", cwd / "shared" / "assets"]


def assets_dir() -> Path:
    """Return the shared assets folder, or raise ``FileNotFoundError`` saying how to point at it."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"${ENV_VAR} is set to {env!r}, which is not a directory; "
                f"set {ENV_VAR} to the folder that holds fmnist/, dinov2/ and imagenet_val1300/."
            )
        return path.resolve()
    tried = _candidates()
    for path in tried:
        if path.is_dir():
            return path.resolve()
    listing = ", ".join(str(p) for p in tried)
    raise FileNotFoundError(
        f"shared assets not found (looked in {listing}); "
        f"set the environment variable {ENV_VAR} to the folder that holds fmnist/, dinov2/ and imagenet_val1300/."
    )


def _asset(*parts: str) -> Path:
    path = assets_dir().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"asset {path} is missing; check that {ENV_VAR} points at a complete assets folder.")
    return path


def testbed_paths() -> TestbedPaths:
    """Paths of the testbed files (weights, json, train, test); each is checked to exist."""
    return TestbedPaths(
        weights=_asset("fmnist", "fmnist_vit_tiny_p4.safetensors"),
        json=_asset("fmnist", "fmnist_vit_tiny_p4.json"),
        train=_asset("fmnist", "fmnist_train.npz"),
        test=_asset("fmnist", "fmnist_test.npz"),
    )


def testbed_stated_top1() -> float:
    """Top-1 on ``fmnist_test.npz`` as stated by the JSON next to the weights (never hard-code it)."""
    meta = json.loads(testbed_paths().json.read_text())
    return float(meta["top1_fmnist_test"])


def dinov2_weights_path() -> Path:
    """fp16 safetensors for timm ``vit_small_patch14_dinov2`` (img_size=224, num_classes=0)."""
    return _asset("dinov2", "dinov2_vits14_imgfocus.fp16.safetensors")


def imagenet_val_list() -> Path:
    """``dataset.txt`` of the 1300 ImageNet validation images (``./data/<file>, <label>`` lines)."""
    return _asset("imagenet_val1300", "dataset.txt")
