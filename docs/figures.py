"""Regenerate the pictures in docs/figures from the shared assets: ``make figures``.

Token pictures of ToMe and EViT with the shared DINOv2 ViT-S/14 on one real ImageNet image, and the accuracy-vs-MACs
plot of ``vitprune bench --suite all --no-speed`` on the Fashion-MNIST testbed (speed is measured on
DeiT-S, where it means something: ``benchmarks/speed_deit_small.py``). PNGs are shrunk to a palette image so the
repository stays small.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from vitprune.assets import assets_dir

OUT = Path(__file__).parent / "figures"
IMAGE = "imagenet_val1300/data/ILSVRC2012_val_00000347.JPEG"


def vitprune(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "vitprune", *args], check=True)


def shrink(src: Path, dst: Path, width: int = 1400) -> None:
    img = Image.open(src).convert("RGB")
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    img.quantize(colors=128).save(dst, optimize=True)
    print(f"wrote {dst} ({dst.stat().st_size // 1024} KiB)")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        vitprune("viz", "-i", str(assets_dir() / IMAGE), "-m", "tome:r=16", "-m", "evit:keep=0.5", "--out", tmp)
        stem = Path(IMAGE).stem
        shrink(Path(tmp) / f"{stem}_tome_r=16.png", OUT / "viz_tome.png")
        shrink(Path(tmp) / f"{stem}_evit_keep=0.5.png", OUT / "viz_evit.png")
        vitprune("bench", "--suite", "all", "--no-speed", "--out", tmp)  # accuracy vs MACs: no timing noise
        shrink(Path(tmp) / "pareto.png", OUT / "pareto_testbed.png", width=1000)


if __name__ == "__main__":
    main()
