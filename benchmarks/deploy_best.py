"""The best CPU deployment vs unpruned fp32 eager PyTorch: a pruned method in int8 in a deployment runtime, timed at
batch 32 and batch 1 in one run, with its accuracy against the same method in fp32.

    .venv/bin/python benchmarks/deploy_best.py [--method togo --level 1] [--runtime openvino] [--rounds 5]
                                               [--threads 2] [--limit 5000]

The default deployment, ViT-ToGo keep 0.69 (−36% MACs) in OpenVINO int8, was the fastest of the bench's middle
levels in the fastest runtime (DeiT-S, 2 threads, busy machine, 2026-12-01: OpenVINO int8 54–75 img/s at batch 32
against ORT int8 ~58 and ExecuTorch int8 ~16 for ToMe r=13; within OpenVINO int8, ToGo 0.69 75 img/s and 18.7 ms at
batch 1, EViT 0.7 72 and 20.3, PPT r=50 68 and 20.9, ToMe r=13 61 and 25.7: ToMe merges at every block, and at
batch 1 its merge ops cost about what its saved MACs gain).

Speed: deit_small_patch16_224, random init (speed does not depend on the weights for fixed-count methods), on
--threads threads. Four configurations are timed in interleaved rounds (so drift of a shared machine hits them
alike), first at batch 32 (img/s), then at batch 1 (each call timed alone: p50/p90 ms): unpruned fp32 PyTorch (the
reference), pruned fp32 PyTorch, unpruned int8 in the runtime, and pruned int8 in the runtime (the deployment).
One export per runtime configuration serves both batch sizes (dynamic batch axis).

Accuracy: the Fashion-MNIST testbed (shared assets, found as `vitprune bench` finds them), the same method at the
same relative level (--level of the bench's three levels, e.g. ToMe r=13 on DeiT-S's 196 patches is r=4 on the
testbed's 64), in fp32 PyTorch and in int8 in the runtime, calibrated on 256 images of the train split.

Goals checked at the end: ≥ 4× at batch 32 and ≥ 3× at batch 1 over unpruned fp32 eager PyTorch; the int8 top-1
within 0.5 pt of the same method's fp32 top-1.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import vitprune
from vitprune.bench import default_specs
from vitprune.hw.runtimes import CALIBRATION_IMAGES, EXPORTED, build_runners, check_runtimes, parse_runtimes
from vitprune.measure.accuracy import evaluate
from vitprune.measure.speed import interleaved_throughput
from vitprune.models import create_model
from vitprune.specs import parse_method_spec

SPEED_MODEL = "deit_small_patch16_224"
GOALS = {32: 4.0, 1: 3.0}  # speedup of the deployment over unpruned fp32 eager PyTorch, per batch size
ACCURACY_GOAL_PT = 0.5


def method_spec(model: torch.nn.Module, family: str, level: int) -> str:
    """The bench's spec of ``family`` at ``level`` (0, 1, 2: ≈ −25/−35/−45% MACs) for ``model``'s patch count."""
    specs = [s for s in default_specs(model.patch_embed.num_patches, "all") if s.split(":")[0] == family
             and "," not in s.split(":", 1)[1]]  # the three levels, not the ablations
    if not 0 <= level < len(specs):
        raise SystemExit(f"--level must be 0..{len(specs) - 1} for {family}")
    return specs[level]


class Switch:
    """What the timing loop calls: whichever runner the current configuration's setup chose."""

    def __init__(self, target) -> None:
        self.target = target

    def __call__(self, x: torch.Tensor):
        return self.target(x)


def time_configs(model, runners: dict[str, torch.nn.Module], spec: tuple[str, dict], batch: int, threads: int,
                 rounds: int) -> dict[str, object]:
    """Speed of the four configurations at ``batch``, interleaved; per-call latency at batch 1."""
    name, config = spec
    switch = Switch(model)

    def eager(patched: bool):
        def setup() -> None:
            if patched:
                vitprune.patch(model, name, **config)
            elif vitprune.is_patched(model):
                vitprune.unpatch(model)
            switch.target = model
        return setup

    def runtime(key: str):
        def setup() -> None:
            switch.target = runners[key]
        return setup

    labels = ["unpruned fp32 PyTorch", "pruned fp32 PyTorch", "unpruned int8 runtime", "pruned int8 runtime"]
    setups = [eager(False), eager(True), runtime("unpruned"), runtime("pruned")]
    images = torch.randn(batch, 3, *model.patch_embed.img_size)
    speeds = interleaved_throughput(switch, images, setups, threads=threads, rounds=rounds, per_call=batch == 1,
                                    peak_memory=True, on_round=lambda m: print(f"  batch {batch}: {m}", flush=True))
    if vitprune.is_patched(model):
        vitprune.unpatch(model)
    return dict(zip(labels, speeds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="togo", help="method family: tome, evit, ppt, togo")
    ap.add_argument("--level", type=int, default=1, help="0, 1, 2: the bench's ≈ −25/−35/−45%% MACs levels")
    ap.add_argument("--runtime", default="openvino", choices=EXPORTED)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--limit", type=int, default=None, help="testbed test images (default: all 5000)")
    ap.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args()
    start = time.time()
    targets = parse_runtimes(f"{args.runtime}-int8")
    check_runtimes(targets)
    torch.set_num_threads(args.threads)

    model = create_model(SPEED_MODEL)
    spec = method_spec(model, args.method, args.level)
    parsed = parse_method_spec(spec)
    print(f"speed: {SPEED_MODEL} (random init), {spec}, {args.runtime} int8, {args.threads} threads, "
          f"{args.rounds} interleaved rounds", flush=True)
    with tempfile.TemporaryDirectory(prefix="deploy-best-") as tmp:
        sample = torch.randn(32, 3, *model.patch_embed.img_size)
        calibration = list(torch.randn(64, 3, *model.patch_embed.img_size).split(16))  # random init: timing only
        runners = {}
        for key, patched in (("unpruned", False), ("pruned", True)):
            if patched:
                vitprune.patch(model, parsed[0], **parsed[1])
            t = time.time()
            runners[key] = build_runners(model, args.runtime, ["int8"], Path(tmp) / key, sample,
                                         threads=args.threads, calibration=calibration)["int8"]
            print(f"  {key}: exported and quantized in {time.time() - t:.0f} s", flush=True)
            if patched:
                vitprune.unpatch(model)
        results = {batch: time_configs(model, runners, parsed, batch, args.threads, args.rounds) for batch in GOALS}

    accuracy = None if args.no_accuracy else testbed_accuracy(args)
    print(f"\nDeiT-S, {args.threads} threads, {args.rounds} interleaved rounds; deployment = {spec} in "
          f"{args.runtime} int8")
    for batch, speeds in results.items():
        base = speeds["unpruned fp32 PyTorch"]
        print(f"batch {batch}:")
        for label, sp in speeds.items():
            timing = (f"p50 {sp.latency_ms_median:7.2f} ms  p90 {sp.latency_ms_p90:7.2f} ms" if batch == 1
                      else f"{sp.img_per_s:7.1f} img/s")
            print(f"  {label:>22}: {timing}  speedup {sp.img_per_s / base.img_per_s:5.2f}x  "
                  f"peak {sp.peak_mib:6.0f} MiB")
    verdicts = []
    for batch, goal in GOALS.items():
        speeds = results[batch]
        speedup = speeds["pruned int8 runtime"].img_per_s / speeds["unpruned fp32 PyTorch"].img_per_s
        verdicts.append(f"batch {batch}: {speedup:.2f}x (goal >= {goal:.0f}x) -> {'ok' if speedup >= goal else 'MISSED'}")
    if accuracy is not None:
        delta = accuracy["int8"] - accuracy["fp32"]
        print(f"testbed top-1 ({accuracy['n']} images, {accuracy['spec']}): unpruned fp32 {accuracy['unpruned']:.2f}, "
              f"pruned fp32 {accuracy['fp32']:.2f}, pruned {args.runtime} int8 {accuracy['int8']:.2f}")
        ok = abs(delta) <= ACCURACY_GOAL_PT
        verdicts.append(f"int8 vs fp32 top-1: {delta:+.2f} pt (goal within {ACCURACY_GOAL_PT} pt) -> "
                        f"{'ok' if ok else 'MISSED'}")
    for line in verdicts:
        print("goal " + line)
    print(f"total {time.time() - start:.0f} s")


def testbed_accuracy(args) -> dict[str, float]:
    """Top-1 (%) on the testbed: unpruned fp32, the method in fp32 PyTorch and in int8 in the runtime."""
    from vitprune.cli import calibration_images
    from vitprune.measure.data import image_transform_for, load_dataset

    net = create_model("testbed")
    spec = method_spec(net, args.method, args.level)
    name, config = parse_method_spec(spec)
    data = load_dataset("testbed", transform=image_transform_for(net), limit=args.limit)
    print(f"accuracy: testbed, {spec}, {len(data)} test images; int8 calibrated on {CALIBRATION_IMAGES} train images",
          flush=True)
    unpruned = evaluate(net, data, progress=False).top1
    vitprune.patch(net, name, **config)
    fp32 = evaluate(net, data, progress=False).top1
    with tempfile.TemporaryDirectory(prefix="deploy-best-acc-") as tmp:
        calibration = calibration_images(net, "testbed-train", CALIBRATION_IMAGES)
        sample = torch.stack([data[i][0] for i in range(32)])
        runner = build_runners(net, args.runtime, ["int8"], Path(tmp), sample, threads=args.threads,
                               calibration=calibration)["int8"]
        int8 = evaluate(runner, data, batch_size=256, progress=False).top1
    return {"unpruned": 100 * unpruned, "fp32": 100 * fp32, "int8": 100 * int8, "n": len(data), "spec": spec}


if __name__ == "__main__":
    main()
