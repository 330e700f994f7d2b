"""What each deployment runtime adds to the process's memory: why `vitprune bench --runtime …` peaks where it does.

    .venv/bin/python benchmarks/runtime_memory.py [--method togo:keep=0.69] [--runtimes onnxruntime openvino executorch]
                                                  [--batch-size 32] [--threads 2]

The bench keeps every runtime's runner of every configuration loaded through its interleaved rounds, so its peak
memory column is the whole process. This builds one configuration's runners (fp32 and int8) runtime by runtime, as
the bench does, and prints the resident set (VmRSS) after each build, after one call at the bench's batch (runtimes
allocate their activation buffers then), and after handing freed heap back to the OS (``malloc_trim``), which says
whether the growth is held memory or allocator slack. Linux only (it reads /proc/self/status).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import tempfile
import time
from pathlib import Path

import torch

import vitprune
from vitprune.hw.runtimes import build_runners, parse_runtimes
from vitprune.measure import memory
from vitprune.models import create_model
from vitprune.specs import parse_method_spec


def resident_mib() -> float:
    mib = memory.resident_mib()
    if mib is None:
        raise SystemExit("runtime_memory.py reads /proc/self/status: run it on Linux")
    return mib


def trimmed_mib() -> float:
    """The resident set after garbage collection and glibc's ``malloc_trim``: memory really held, not slack."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return resident_mib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--method", default="togo:keep=0.69", help="a method spec as `vitprune bench -m` takes it")
    parser.add_argument("--runtimes", nargs="+", default=["onnxruntime", "openvino", "executorch"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    parse_runtimes(",".join(args.runtimes))  # one clear error for a runtime name that does not exist

    torch.manual_seed(0)
    model = create_model(args.model).eval()
    name, config = parse_method_spec(args.method)
    if name != "none":
        vitprune.patch(model, name, **config)
    sample = torch.randn(args.batch_size, 3, 224, 224)
    runners = []  # kept alive, as the bench keeps them
    before = trimmed_mib()
    print(f"{args.model} · {args.method}, batch {args.batch_size}: {before:.0f} MiB resident before any runtime")
    with tempfile.TemporaryDirectory(prefix="runtime-memory-") as tmp:  # the exported files (~100 MB per runtime)
        for runtime in args.runtimes:
            start, held = time.perf_counter(), trimmed_mib()
            built = build_runners(model, runtime, ["fp32", "int8"], Path(tmp) / runtime, sample,
                                  threads=args.threads, calibration=[sample[:8]])
            after_build, trimmed = resident_mib(), trimmed_mib()
            with torch.inference_mode():
                for runner in built.values():
                    runner(sample)
            after_call = trimmed_mib()
            runners.append(built)
            print(f"{runtime:12s} fp32+int8: +{after_build - held:.0f} MiB built ({trimmed - held:+.0f} after trim), "
                  f"+{after_call - held:.0f} MiB held after one batch-{args.batch_size} call "
                  f"({time.perf_counter() - start:.0f} s)")
        print(f"all runtimes: +{trimmed_mib() - before:.0f} MiB for this one configuration")


if __name__ == "__main__":
    main()
