"""numbabn's CUDA kernels beside PyTorch's CUDA batch norm (cuDNN) and a streaming roofline.

Run by ``python -m tools.bench --device cuda`` (``make bench-gpu``). Times are
medians of CUDA-event timings on the default stream, which PyTorch's default
stream shares, so every peer is timed the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import cuda

from numbabn._cuda import arrays
from tools.bench.cases import DEFAULT_CASES, Case, module_for

GPU_CASES = [*DEFAULT_CASES, Case((256, 64, 112, 112)), Case((32, 64, 56, 56), "float16")]
QUICK_GPU_CASES = [
    Case((32, 64, 56, 56)),
    Case((32, 64, 56, 56), channels_last=True),
    Case((2, 16, 8, 8)),
]
# Under Numba's CUDA simulator (a smoke test of this command): one tiny case.
SIMULATOR_CASES = [Case((2, 3, 4, 4))]

# Values moved by numbabn's kernels per element, counting each read and write:
# forward reads x twice (statistics, then normalise) and writes y; backward
# reads dy and x twice and writes dx; eval reads x and writes y.
PASSES = {"forward": 3, "backward": 5, "forward_backward": 8, "eval": 2}


@cuda.jit
def _read_pass(x: Any, sink: Any) -> None:
    total = 0.0
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, x.shape[0], stride):
        total += x[i]
    if total == 1.2345e-300:  # never true: keeps the reads from being optimised away
        sink[0] = total


@cuda.jit
def _read_write_pass(x: Any, out: Any) -> None:
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, x.shape[0], stride):
        out[i] = 2 * x[i] + 1


def _streaming_grid(n: int) -> tuple[int, int]:
    return (min(65536, max(1, -(-n // (256 * 8)))), 256)


def device_seconds(func: Callable[[], object], repeat: int) -> float:
    """Median device time of one call of ``func``, from CUDA events around batches of calls."""
    if arrays.SIMULATOR:  # no event timings there: one wall-clock call
        start = time.perf_counter()
        func()
        return time.perf_counter() - start
    func()
    cuda.synchronize()
    start, stop = cuda.event(), cuda.event()
    start.record()
    func()
    stop.record()
    stop.synchronize()
    single = max(start.elapsed_time(stop) / 1e3, 1e-7)
    calls = max(1, min(1000, int(2e-3 / single)))
    samples = []
    for _ in range(repeat):
        start.record()
        for _ in range(calls):
            func()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / 1e3 / calls)
    return float(np.median(samples))


def host_seconds(func: Callable[[], object], repeat: int, calls: int = 200) -> float:
    """Median wall time per call of ``func`` over back-to-back calls (launch overhead)."""
    func()
    cuda.synchronize()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            func()
        cuda.synchronize()
        samples.append((time.perf_counter() - start) / calls)
    return float(np.median(samples))


def host_call_seconds(func: Callable[[], object], calls: int) -> float:
    """Median host time of one call of ``func`` over ``calls`` back-to-back calls.

    The device is synchronised before and after the loop, never inside it, so
    this is the time the host spends issuing one call while the GPU keeps up.
    """
    func()
    cuda.synchronize()
    samples = np.empty(calls)
    for index in range(calls):
        start = time.perf_counter()
        func()
        samples[index] = time.perf_counter() - start
    cuda.synchronize()
    return float(np.median(samples))


class TorchCuda:
    """``torch.nn.functional.batch_norm`` on the GPU (cuDNN for float32), same data."""

    def __init__(self, torch: Any, case: Case) -> None:
        self.torch = torch
        memory_format = torch.channels_last if case.channels_last else torch.contiguous_format
        x = torch.as_tensor(case.make()).cuda()
        if x.ndim == 4:
            x = x.contiguous(memory_format=memory_format)
        self.x = x.requires_grad_(True)
        channels, param_dtype = x.shape[1], torch.float32 if case.dtype == "float16" else x.dtype
        self.running_mean = torch.zeros(channels, device="cuda", dtype=param_dtype)
        self.running_var = torch.ones(channels, device="cuda", dtype=param_dtype)
        self.weight = torch.ones(channels, device="cuda", dtype=param_dtype, requires_grad=True)
        self.bias = torch.zeros(channels, device="cuda", dtype=param_dtype, requires_grad=True)
        self.dy = torch.ones_like(x)
        self.y = self.forward()

    def forward(self, training: bool = True) -> Any:
        return self.torch.nn.functional.batch_norm(
            self.x, self.running_mean, self.running_var, self.weight, self.bias, training
        )

    def eval_forward(self) -> Any:
        with self.torch.no_grad():
            return self.forward(training=False)

    def backward(self) -> Any:
        inputs = (self.x, self.weight, self.bias)
        return self.torch.autograd.grad(self.y, inputs, self.dy, retain_graph=True)

    def forward_backward(self) -> Any:
        y = self.forward()
        return self.torch.autograd.grad(y, (self.x, self.weight, self.bias), self.dy)


def measure_gpu_case(case: Case, repeat: int, torch: Any | None) -> dict[str, Any]:
    """Median seconds for numbabn's passes, the roofline and cuDNN on ``case``."""
    x = arrays.to_device(case.make())
    dy = arrays.to_device(case.make())
    out = arrays.empty_like(x)
    n = math.prod(x.shape)
    flat = arrays.empty((n,), x.dtype)
    flat_out = arrays.empty((n,), x.dtype)
    sink = arrays.empty((1,), np.float64)
    blocks = _streaming_grid(n)
    param_dtype = np.float32 if case.dtype == "float16" else case.dtype
    bn = module_for(x.ndim)(x.shape[1], device="cuda", dtype=param_dtype)

    times = {
        "read": device_seconds(lambda: _read_pass[blocks](flat, sink), repeat),
        "read_write": device_seconds(lambda: _read_write_pass[blocks](flat, flat_out), repeat),
        "numbabn_forward": device_seconds(lambda: bn(x, out=out), repeat),
        "numbabn_backward": device_seconds(lambda: bn.backward(dy, out=out), repeat),
        "numbabn_forward_backward": device_seconds(
            lambda: (bn(x, out=out), bn.backward(dy, out=out)), repeat
        ),
        "numbabn_forward_host": host_seconds(
            lambda: bn(x, out=out), repeat, calls=1 if arrays.SIMULATOR else 200
        ),
    }
    bn.eval()
    times["numbabn_eval"] = device_seconds(lambda: bn(x, out=out), repeat)
    if torch is not None:
        peer = TorchCuda(torch, case)
        times["torch_forward"] = device_seconds(peer.forward, repeat)
        times["torch_backward"] = device_seconds(peer.backward, repeat)
        times["torch_forward_backward"] = device_seconds(peer.forward_backward, repeat)
        times["torch_eval"] = device_seconds(peer.eval_forward, repeat)
    return {"case": case.name, "bytes": case.nbytes, "seconds": times}


def gpu_markdown(results: list[dict[str, Any]], header: str) -> str:
    """The GPU results as Markdown: times, bandwidth and ratios to cuDNN."""
    lines = [
        header,
        "",
        "Device times in milliseconds (medians of CUDA-event timings; numbabn writes into",
        "preallocated arrays with `out=`). `GB/s` counts the bytes numbabn's kernels move",
        f"(forward {PASSES['forward']}, backward {PASSES['backward']}, eval {PASSES['eval']}",
        "reads and writes per element); `% stream` is that over the faster of the streaming",
        "read and read+write kernels measured in the same run; `× cuDNN` is how many times",
        "faster numbabn is than PyTorch. `host us` is the wall time per back-to-back forward.",
        "",
        "| case | MB | stream GB/s | pass | numbabn | GB/s | % stream | PyTorch | × cuDNN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        seconds, size = result["seconds"], result["bytes"]
        stream = max(size / seconds["read"], 2 * size / seconds["read_write"])
        for key, passes in PASSES.items():
            mine = seconds[f"numbabn_{key}"]
            rate = passes * size / mine
            theirs = seconds.get(f"torch_{key}")
            speedup = "n/a" if theirs is None else f"{theirs / mine:.2f}"
            torch_ms = "n/a" if theirs is None else f"{theirs * 1e3:.3f}"
            lines.append(
                f"| {result['case']} | {size / 1e6:.1f} | {stream / 1e9:.0f} | {key} | "
                f"{mine * 1e3:.3f} | {rate / 1e9:.0f} | {100 * rate / stream:.0f}% | "
                f"{torch_ms} | {speedup} |"
            )
    lines += ["", "| case | host us per forward |", "|---|---|"]
    for result in results:
        host_us = result["seconds"]["numbabn_forward_host"] * 1e6
        lines.append(f"| {result['case']} | {host_us:.1f} |")
    return "\n".join(lines)


def gpu_name() -> str:
    """The current GPU's name (the simulator says so)."""
    if arrays.SIMULATOR:
        return "Numba CUDA simulator (no GPU; a smoke test, not a measurement)"
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)
