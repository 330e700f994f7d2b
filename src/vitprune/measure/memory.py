"""Peak memory of a stretch of work: the process's peak resident set on CPU, the allocator's peak on CUDA.

    probe = PeakMemory("cpu")
    probe.reset()
    run_the_work()
    probe.read_mib()     # MiB at the peak since reset()

CPU: Linux keeps the peak resident set (``VmHWM`` in ``/proc/self/status``) and lets a process reset it to the
current resident set by writing ``5`` to ``/proc/self/clear_refs``, so each stretch gets its own peak. It is the
whole process: weights, every loaded runtime, the Python heap and what the allocator keeps after frees, plus what
the stretch itself allocates. Where the reset is not possible (not Linux, or a kernel that refuses it) the peak is
``resource.getrusage``'s ``ru_maxrss``: the peak of the whole process's life, which only ever grows.
CUDA: ``torch.cuda.max_memory_allocated`` with ``reset_peak_memory_stats``: tensors only, the stretch's own peak.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
MIB = 1 << 20


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmHWM``, ``VmRSS``), or None where there is no such file."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def resident_mib() -> float | None:
    """The process's resident set now (``VmRSS``) in MiB, or None where there is no /proc/self/status."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else None


def _rusage_peak_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Reset and read the peak memory of ``device``'s work (see the module docstring for what is counted)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.resettable = self.cuda or self._try_reset()

    @property
    def kind(self) -> str:
        """What :meth:`read_mib` reports, for tables and JSON."""
        if self.cuda:
            return "torch.cuda.max_memory_allocated (tensors), reset per timed block"
        if self.resettable:
            return "process peak RSS (VmHWM), reset per timed block via /proc/self/clear_refs"
        return "process peak RSS since start (resource.getrusage; no per-block reset on this system)"

    @staticmethod
    def _try_reset() -> bool:
        try:
            CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return _status_kib("VmHWM") is not None

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            try:
                CLEAR_REFS.write_text("5")
            except OSError:
                self.resettable = False

    def read_mib(self) -> float:
        """Peak MiB since the last :meth:`reset`."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / MIB
        peak = _status_kib("VmHWM") if self.resettable else None
        return peak / 1024 if peak is not None else _rusage_peak_mib()
