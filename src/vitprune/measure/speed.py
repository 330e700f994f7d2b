"""Throughput with ``torch.utils.benchmark`` (warm-up, fixed thread count, median of timed blocks), latency
percentiles over single calls, and peak memory per configuration.

MACs do not predict speed for token reduction (gathers, sorts and small matmuls cost time the MAC
count ignores), so speed is measured, never derived. The batch's device decides where it runs;
on CUDA the Timer synchronises the device around each timed block (and after each call when calls are timed
one by one).
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .memory import PeakMemory


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
    latency_ms_p90: float | None = None  # 90th percentile per call (per-call timing only)
    peak_mib: float | None = None  # peak memory over the timed blocks (see measure.memory)
    memory_kind: str | None = None  # what peak_mib counts


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


@dataclass
class RoundRobin:
    """What :func:`round_robin` measured, per configuration."""

    times: list[list[float]]  # seconds per call: one per round (mean of the block), or every call with per_call
    numbers: list[int]  # calls per round
    peak_mib: list[float | None]  # peak memory over the configuration's timed blocks (None: not measured)
    memory_kind: str | None = None  # what peak_mib counts (PeakMemory.kind)


def round_robin(
    configs: list[tuple[Callable[[], None], Callable[[], object]]],
    *,
    threads: int = 2,
    rounds: int = 5,
    min_round_time: float = 0.5,
    warmup: int = 2,
    on_round: Callable[[str], None] | None = None,
    per_call: bool = False,
    memory: PeakMemory | None = None,
    sync: Callable[[], None] = lambda: None,
) -> RoundRobin:
    """Seconds per call of each configuration, timed round-robin with ``torch.utils.benchmark``.

    ``configs[i] = (setup, fn)``: ``setup()`` puts the model into configuration i (e.g. patch or unpatch), ``fn()``
    is what is timed (a forward, a training step, …). Each configuration is warmed up and its timed block sized to
    ``min_round_time``; then every round times every configuration once, so slow drift of a shared machine hits
    all of them alike. ``on_round(message)`` hears where the timing is (warm-up, round k of n): a long timing is
    not silent.

    ``per_call``: each call of a block is timed on its own (``time.perf_counter`` around the call and ``sync()``,
    e.g. a CUDA synchronize), so latency percentiles are over calls, not over block means; for latency-bound
    settings (batch 1), where one call is milliseconds and the clock's overhead is not. ``memory``: reset before
    each timed block and read after it (outside the timed region); a configuration's peak is the largest read.
    """
    say = on_round or (lambda _msg: None)
    if rounds < 1 or threads < 1:
        raise ValueError(f"rounds and threads must be >= 1, got rounds={rounds}, threads={threads}")
    prior_threads = torch.get_num_threads()
    times: list[list[float]] = [[] for _ in configs]
    peaks: list[float | None] = [None for _ in configs]
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
                if memory is not None:
                    memory.reset()
                if per_call:
                    times[i].extend(_time_calls(fn, numbers[i], sync))
                else:
                    timer = _benchmark().Timer("fn()", globals={"fn": fn}, num_threads=threads, label="vitprune")
                    times[i].append(timer.timeit(numbers[i]).median)
                if memory is not None:
                    peak = memory.read_mib()
                    peaks[i] = peak if peaks[i] is None else max(peaks[i], peak)
    finally:
        torch.set_num_threads(prior_threads)
    return RoundRobin(times=times, numbers=numbers, peak_mib=peaks, memory_kind=memory.kind if memory else None)


def _time_calls(fn: Callable[[], object], number: int, sync: Callable[[], None]) -> list[float]:
    out = []
    for _ in range(number):
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


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
    per_call: bool = False,
    peak_memory: bool = False,
) -> list[SpeedResult]:
    """Inference throughput of several configurations of one model, measured with :func:`round_robin`.

    ``setups[i]()`` puts the model into configuration i; the result per configuration is the median over rounds
    (over calls with ``per_call``, which also gives the 90th percentile: use it at batch 1, for latency).
    ``peak_memory``: each configuration's peak memory over its timed blocks (``measure.memory.PeakMemory`` on the
    batch's device). Use this for speedups; ``measure_throughput`` for one model.
    """
    if example_batch.ndim < 1 or example_batch.shape[0] == 0:
        raise ValueError("example_batch must be a non-empty batch")

    def forward() -> object:
        return model(example_batch)

    cuda = example_batch.is_cuda
    memory = PeakMemory(example_batch.device) if peak_memory else None
    with torch.inference_mode():
        result = round_robin(
            [(setup, forward) for setup in setups], threads=threads, rounds=rounds, min_round_time=min_round_time,
            warmup=warmup, on_round=on_round, per_call=per_call, memory=memory,
            sync=(lambda: torch.cuda.synchronize(example_batch.device)) if cuda else (lambda: None))
    bs = int(example_batch.shape[0])
    results = []
    for t, number, peak in zip(result.times, result.numbers, result.peak_mib):
        median = statistics.median(t)
        # the spread is round to round (a busy machine), also when calls were timed one by one
        per_round = [statistics.median(t[k:k + number]) for k in range(0, len(t), number)] if per_call else t
        q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else [median, median, median]
        p90 = statistics.quantiles(t, n=10)[8] if per_call and len(t) > 1 else (median if per_call else None)
        results.append(SpeedResult(
            batch_size=bs, threads=threads, dtype=str(example_batch.dtype).removeprefix("torch."),
            device=str(example_batch.device), img_per_s=bs / median, latency_ms_median=median * 1e3,
            latency_ms_iqr=(q[2] - q[0]) * 1e3, runs=rounds * number,
            latency_ms_p90=None if p90 is None else p90 * 1e3, peak_mib=peak, memory_kind=result.memory_kind,
        ))
    return results
