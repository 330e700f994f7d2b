"""Throughput with ``torch.utils.benchmark`` (warm-up, fixed thread count, median of timed blocks).

MACs do not predict speed for token reduction (gathers, sorts and small matmuls cost time the MAC
count ignores), so speed is measured, never derived. The batch's device decides where it runs;
on CUDA the Timer synchronises the device around each timed block.
"""
from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


def _benchmark():
    """``torch.utils.benchmark``, imported on first use. Its import loads ``torch.utils.cpp_extension``, which logs
    "No CUDA runtime is found" on every CPU-only machine: noise for a user who only times a model, so it is
    silenced (and commands that time nothing never import it)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        log.setLevel(level)
    return benchmark


@dataclass
class SpeedResult:
    """One throughput measurement of ``model(batch)``."""

    batch_size: int
    threads: int
    dtype: str  # e.g. "float32"
    device: str  # e.g. "cpu", "cuda:0"
    img_per_s: float  # batch_size / median latency
    latency_ms_median: float  # per forward of the whole batch
    latency_ms_iqr: float
    runs: int  # forward calls timed in total (blocks x calls per block)


def measure_throughput(
    model: nn.Module,
    example_batch: torch.Tensor,
    *,
    threads: int = 2,
    min_run_time: float = 2.0,
    warmup: int = 3,
) -> SpeedResult:
    """Time ``model(example_batch)`` under ``torch.inference_mode()`` with ``threads`` CPU threads.

    ``warmup`` untimed calls run first (allocator, kernel selection, lazy init). The global torch
    thread count is restored afterwards.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if example_batch.ndim < 1 or example_batch.shape[0] == 0:
        raise ValueError("example_batch must be a non-empty batch")
    prior_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            for _ in range(warmup):
                model(example_batch)
            if example_batch.is_cuda:
                torch.cuda.synchronize(example_batch.device)
            timer = _benchmark().Timer(
                stmt="model(x)",
                globals={"model": model, "x": example_batch},
                num_threads=threads,
                label="vitprune throughput",
            )
            m = timer.blocked_autorange(min_run_time=min_run_time)
    finally:
        torch.set_num_threads(prior_threads)
    median = m.median
    if not (median > 0 and math.isfinite(median)):
        raise RuntimeError(f"timer returned a non-positive median ({median}); increase min_run_time")
    bs = int(example_batch.shape[0])
    return SpeedResult(
        batch_size=bs,
        threads=threads,
        dtype=str(example_batch.dtype).removeprefix("torch."),
        device=str(example_batch.device),
        img_per_s=bs / median,
        latency_ms_median=median * 1e3,
        latency_ms_iqr=m.iqr * 1e3,
        runs=len(m.raw_times) * m.number_per_run,
    )


def round_robin(
    configs: list[tuple[Callable[[], None], Callable[[], object]]],
    *,
    threads: int = 2,
    rounds: int = 5,
    min_round_time: float = 0.5,
    warmup: int = 2,
    on_round: Callable[[str], None] | None = None,
) -> tuple[list[list[float]], list[int]]:
    """Seconds per call of each configuration, timed round-robin with ``torch.utils.benchmark``.

    ``configs[i] = (setup, fn)``: ``setup()`` puts the model into configuration i (e.g. patch or unpatch), ``fn()``
    is what is timed (a forward, a training step, …). Each configuration is warmed up and its timed block sized to
    ``min_round_time``; then every round times every configuration once, so slow drift of a shared machine hits
    all of them alike. Returns, per configuration, the per-call times (one per round) and the calls per round.
    ``on_round(message)`` hears where the timing is (warm-up, round k of n): a long timing is not silent.
    """
    say = on_round or (lambda _msg: None)
    if rounds < 1 or threads < 1:
        raise ValueError(f"rounds and threads must be >= 1, got rounds={rounds}, threads={threads}")
    prior_threads = torch.get_num_threads()
    times: list[list[float]] = [[] for _ in configs]
    numbers: list[int] = []
    try:
        torch.set_num_threads(threads)
        for i, (setup, fn) in enumerate(configs):
            say(f"speed: warm-up {i + 1}/{len(configs)}")
            setup()
            for _ in range(warmup):
                fn()
            once = _benchmark().Timer("fn()", globals={"fn": fn}, num_threads=threads).timeit(1).median
            numbers.append(max(1, math.ceil(min_round_time / max(once, 1e-6))))
        for k in range(rounds):
            say(f"speed: round {k + 1}/{rounds}")
            for i, (setup, fn) in enumerate(configs):
                setup()
                timer = _benchmark().Timer("fn()", globals={"fn": fn}, num_threads=threads, label="vitprune")
                times[i].append(timer.timeit(numbers[i]).median)
    finally:
        torch.set_num_threads(prior_threads)
    return times, numbers


def interleaved_throughput(
    model: nn.Module,
    example_batch: torch.Tensor,
    setups: list[Callable[[], None]],
    *,
    threads: int = 2,
    rounds: int = 5,
    min_round_time: float = 0.5,
    warmup: int = 2,
    on_round: Callable[[str], None] | None = None,
) -> list[SpeedResult]:
    """Inference throughput of several configurations of one model, measured with :func:`round_robin`.

    ``setups[i]()`` puts the model into configuration i; the result per configuration is the median over rounds.
    Use this for speedups; ``measure_throughput`` for one model.
    """
    if example_batch.ndim < 1 or example_batch.shape[0] == 0:
        raise ValueError("example_batch must be a non-empty batch")

    def forward() -> object:
        return model(example_batch)

    with torch.inference_mode():
        times, numbers = round_robin([(setup, forward) for setup in setups], threads=threads, rounds=rounds,
                                     min_round_time=min_round_time, warmup=warmup, on_round=on_round)
    bs = int(example_batch.shape[0])
    results = []
    for t, number in zip(times, numbers):
        median = statistics.median(t)
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [median, median, median]
        results.append(SpeedResult(
            batch_size=bs, threads=threads, dtype=str(example_batch.dtype).removeprefix("torch."),
            device=str(example_batch.device), img_per_s=bs / median, latency_ms_median=median * 1e3,
            latency_ms_iqr=(q[2] - q[0]) * 1e3, runs=rounds * number,
        ))
    return results
