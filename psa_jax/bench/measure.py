"""Timing, memory and peak-FLOP/s helpers shared by every contestant.

A contestant is a :class:`Contestant`: ``first()`` runs the first call (compilation, autotuning)
and ``step()`` one more step; both return something to block on. :func:`time_contestant`
reports the first call and compilation separately, runs untimed warm-up steps, then times each
step to completion (JAX ``block_until_ready``, torch ``cuda.synchronize`` on a GPU) and keeps
the median, so a slow outlier cannot move the figure.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name substring, most specific
# first. Used for MFU on a GPU when --peak-tflops is not given.
PEAK_TFLOPS_BF16 = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
    ("L4", 121.0),
)


@dataclasses.dataclass
class Contestant:
    """One competitor, ready to run. ``info`` goes into the result as is (dtype, notes, ...)."""

    name: str
    first: Callable[[], Any]
    step: Callable[[], Any]
    sync: Callable[[Any], None]
    compile_s: float | None = None  # ahead-of-time compilation, when it is a separate phase
    peak_memory: Callable[[], tuple[int | None, str]] = lambda: (None, "n/a")
    flops_xla: float | None = None  # the compiled step's own cost analysis, when there is one
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    close: Callable[[], None] = lambda: None
    loss: Callable[[], float | None] = lambda: None  # the last step's loss (a sanity check)


@dataclasses.dataclass
class Timing:
    first_call_s: float
    step_s: list[float]
    rss_peak_delta: int | None  # bytes above the RSS before the build
    rss_method: str | None = None  # how the peak was taken (:class:`PeakRss`)

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)


def time_contestant(build: Callable[[], Contestant], steps: int, warmup: int):
    """Build, first call, ``warmup`` untimed steps, then ``steps`` timed steps, each run to the
    end. Returns the contestant and its :class:`Timing`; the peak RSS counts from before the
    build, so the contestant's own weights count (as they do on a GPU)."""
    with PeakRss() as rss:
        c = build()
        t0 = time.perf_counter()
        c.sync(c.first())
        first = time.perf_counter() - t0
        for _ in range(warmup):
            c.sync(c.step())
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            c.sync(c.step())
            times.append(time.perf_counter() - t0)
    return c, Timing(first, times, rss.peak_delta, rss.method)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _hwm_bytes() -> int | None:
    """The kernel's peak RSS of this process (``VmHWM``), None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_hwm() -> bool:
    """Resets ``VmHWM`` to the current RSS (Linux >= 4.0: ``5`` to ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return _hwm_bytes() is not None


class PeakRss:
    """Peak resident memory above the level at entry: the host-memory figure of a CPU run, the
    same method for every contestant. Where Linux allows it, the kernel's own high-water mark
    (reset at entry, read at exit): exact, and nothing runs meanwhile. Otherwise a thread
    samples the RSS every few milliseconds, which can miss a short peak and, on a small CPU,
    slows what it measures (the tiny DPO step +5% on 2 cores, BENCHMARKS.md). ``method`` says
    which ran."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.base = self.peak = None
        self.method: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            now = _rss_bytes()
            if now is not None:
                self.peak = max(self.peak or now, now)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.base = self.peak = _rss_bytes()
        if self.base is None:
            return self
        if _reset_hwm():
            self.method = "VmHWM"
        else:
            self.method = f"sampled every {1e3 * self.interval_s:g} ms"
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        elif self.method == "VmHWM":
            hwm = _hwm_bytes()
            self.peak = max(self.peak, hwm) if hwm is not None else self.peak

    @property
    def peak_delta(self) -> int | None:
        return None if self.base is None else max(0, self.peak - self.base)


def peak_tflops(device_name: str, given: float | None) -> float | None:
    """``given`` (``--peak-tflops``), else the table's bf16 dense peak for a known GPU, else None
    (a CPU: MFU is reported as n/a)."""
    if given:
        return float(given)
    for key, value in PEAK_TFLOPS_BF16:
        if key.lower() in device_name.lower():
            return value
    return None


def jax_peak_memory(compiled: Any, device: Any) -> tuple[int | None, str]:
    """``peak_bytes_in_use`` of the device allocator where it keeps statistics (GPU/TPU: the
    process's peak, so psa_jax runs first), else the compiled step's ``memory_analysis()``:
    arguments + outputs + temporaries - donated (aliased) bytes."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    m = compiled.memory_analysis()
    if m is None:
        return None, "n/a"
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return int(total), "compiled memory_analysis (args+out+temp-alias, one device)"


def xla_flops(compiled: Any, devices: int = 1) -> float | None:
    """``flops`` of the compiled computation's cost analysis (a dict, or a list of one) over
    its ``devices``: an SPMD program's analysis counts one device's share."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return devices * float(cost["flops"]) if cost and "flops" in cost else None


def torch_peak_memory(device: str) -> tuple[int | None, str]:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    return None, "n/a (CPU: see rss_peak_delta_bytes)"


def torch_sync(device: str) -> Callable[[Any], None]:
    """Block until the step's work is done: ``cuda.synchronize`` on a GPU; CPU ops are
    synchronous already."""
    import torch

    def sync(_out: Any) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return sync
