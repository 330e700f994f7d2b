"""Dense fidelity: how close a patched model's full-grid patch features stay to the unpatched model's.

    .venv/bin/python benchmarks/dense_fidelity.py [--images 256] [--targets 0.8 0.65] [--out docs/figures/dense.md]

The shared DINOv2 ViT-S/14 (224×224, 256 patches) on real ImageNet validation images (the shared assets). For each
training-free method, the config at each MACs target (a fraction of the unpatched MACs, found by bisection on the
method's one-knob schedule, ``vitprune.tune``) is applied, and ``forward_intermediates`` gives the last block's
normalised patch features on the full 16×16 grid, under each fill rule for positions no token holds any more:

* cosine: mean over images and patches of the cosine between patched and unpatched features;
* k-means agreement: a simple dense task — per image, k-means (k=8) part segmentation of the *unpatched* features;
  each patched feature is assigned to the nearest of those centroids; the share of patches that land in the same
  part as without reduction (1.0: the segmentation is unchanged).

The MACs column is counted from the executed ops (``vitprune.count_macs``) for the config found. Learned selectors
(spvit, heatvit) need trained selectors to mean anything: pass ``--method spvit:checkpoint=DIR`` to add one.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import vitprune
from vitprune.assets import imagenet_val_list
from vitprune.measure.data import ListFileDataset, image_transform_for
from vitprune.models import create_model
from vitprune.specs import format_method_spec, parse_method_spec
from vitprune.tune import CostModel, bisect_level, shaped_config

METHOD_SHAPES = {"tome": "constant", "evit": "anchors", "ppt": "anchors", "togo": "anchors"}
FILLS = ("similar", "last", "package")


def kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Per-image k-means: x [B, N, C] → centroids [B, k, C] (k-means++ seeding, Lloyd iterations, deterministic)."""
    g = torch.Generator().manual_seed(seed)
    b, n, _ = x.shape
    rows = torch.arange(b)
    centroids = [x[rows, torch.randint(n, (b,), generator=g)]]
    for _ in range(k - 1):  # k-means++: the next seed far from the chosen ones
        d = torch.cdist(x, torch.stack(centroids, 1)).amin(-1).square()
        centroids.append(x[rows, torch.multinomial(d + 1e-12, 1, generator=g).squeeze(1)])
    c = torch.stack(centroids, 1)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(-1)  # [B, N]
        onehot = F.one_hot(assign, k).to(x.dtype)  # [B, N, k]
        counts = onehot.sum(1).unsqueeze(-1)
        c = torch.where(counts > 0, onehot.transpose(1, 2) @ x / counts.clamp_min(1), c)
    return c


def last_layer_grid(model: torch.nn.Module, images: torch.Tensor, batch: int, **kwargs) -> torch.Tensor:
    """[B, N, C] normalised last-block patch features on the full grid."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            g = model.forward_intermediates(images[i:i + batch], indices=[len(model.blocks) - 1], norm=True,
                                            intermediates_only=True, **kwargs)[0]
            out.append(g.flatten(2).transpose(1, 2).float())
    return torch.cat(out)


def config_at(cost: CostModel, method: str, target: float, depth: int, patches: int) -> dict | None:
    shape = METHOD_SHAPES[method]
    level = bisect_level(lambda t: cost.fraction(method, shaped_config(method, shape, t, depth, patches)), target)
    return None if level is None else shaped_config(method, shape, level, depth, patches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.65], help="MACs fractions of the unpatched")
    ap.add_argument("--methods", nargs="+", default=list(METHOD_SHAPES))
    ap.add_argument("--method", action="append", default=[], help="an extra method spec, e.g. spvit:checkpoint=DIR")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()

    model = create_model("dinov2_vits14").eval()
    data = ListFileDataset(imagenet_val_list(), image_transform_for(model), limit=args.images)
    images = torch.stack([data[i][0] for i in range(len(data))])
    info_patches, depth = model.patch_embed.num_patches, len(model.blocks)
    base_macs = vitprune.count_macs(model, images[:1]).macs

    ref = last_layer_grid(model, images, args.batch_size)  # the unpatched model: timm's own code
    centroids = kmeans(ref, args.k)
    parts = torch.cdist(ref, centroids).argmin(-1)

    cost = CostModel(model, images[:1])
    runs: list[tuple[str, dict, str]] = []
    for target in args.targets:
        for method in args.methods:
            config = config_at(cost, method, target, depth, info_patches)
            if config is not None:
                runs.append((method, config, f"{1 - target:.0%}"))
    runs += [(*parse_method_spec(spec), "given") for spec in args.method]

    header = "| method | target | config | MACs (executed ops) | " + " | ".join(
        f"cosine ({f}) | k-means agreement ({f})" for f in FILLS) + " |"
    lines = [header, "|" + "---|" * (4 + 2 * len(FILLS))]
    for method, config, target in runs:
        vitprune.patch(model, method, **config)
        macs = vitprune.count_macs(model, images[:1]).macs
        cells = []
        for fill in FILLS:
            feats = last_layer_grid(model, images, args.batch_size, fill=fill)
            cos = F.cosine_similarity(feats, ref, dim=-1).mean().item()
            agree = (torch.cdist(feats, centroids).argmin(-1) == parts).float().mean().item()
            cells += [f"{cos:.4f}", f"{agree:.3f}"]
        vitprune.unpatch(model)
        spec = format_method_spec(method, config)
        lines.append(f"| {method} | −{target} | `{spec}` | {macs / 1e9:.2f} G ({macs / base_macs:.2f}) | "
                     + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(f"\nDINOv2 ViT-S/14, {len(images)} ImageNet val images, unpatched {base_macs / 1e9:.2f} GMACs, k={args.k}, "
          f"{time.time() - start:.0f} s\n\n{table}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
