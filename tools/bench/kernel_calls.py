"""One small call of every CUDA pass in every kernel family: a workload for compute-sanitizer.

``python -m tools.bench.kernel_calls [--shape N,C,H,W] [--layout ...]`` runs
through :mod:`numbabn.functional`, once each: the training forward and
backward, the eval forward and backward, and the same with a fused residual
add and ReLU, on float32 data in four layouts, one for each family of
kernels (rows, channels-inner, wide rows, planar), synchronising and printing
a line after each pass. ``make gpu-check`` runs it plainly and under
``compute-sanitizer``, and with ``--repeat 1000`` as a race detector: each pass
runs that many times in a row and every result must have the bits of the first
(a reduction that raced would merge its partials differently some time).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import cuda

from numbabn import functional as F
from numbabn._cuda import arrays

# Several chunks per channel on the real grid (the last-block merge runs), and a
# channel count that is not a multiple of a block's channels.
DEFAULT_SHAPE = (16, 3, 20, 20)
# The layouts, each with the family its reductions run: NCHW (rows), channels-last
# (channels-inner), a cropped view (planar) on DEFAULT_SHAPE; wide rows need 264 rows
# of at least 2048 values (1 of each per block: see numbabn._cuda.backend._grid).
LAYOUTS = {
    "nchw": ("rows", None),
    "channels-last": ("channels_inner", None),
    "wide-rows": ("wide_rows", (88, 3, 32, 64)),
    "planar": ("planar", None),
}


def _data(shape: tuple[int, ...], layout: str, seed: int) -> Any:
    """Device data of ``shape`` in ``layout`` (planar: a crop of a larger array)."""
    rng = np.random.default_rng(seed)
    if layout == "planar":
        full = (*shape[:2], *(size + 2 for size in shape[2:]))
        x = arrays.to_device(rng.standard_normal(full).astype(np.float32))
        crop = (slice(None), slice(None)) + tuple(slice(1, -1) for _ in shape[2:])
        return x[crop]
    x = rng.standard_normal(shape).astype(np.float32)
    if layout == "channels-last":
        order = (0, *range(2, len(shape)), 1)
        x = np.ascontiguousarray(x.transpose(order)).transpose(np.argsort(order))
    return arrays.to_device(x)


def family(x: Any) -> str:
    """The kernel family of ``x``'s reductions."""
    from numbabn._cuda import backend

    grid = backend._grid_for(x)
    return "staged" if grid is None else grid.family.name.lower()


def passes(shape: tuple[int, ...], layout: str) -> dict[str, Callable[[], tuple[Any, ...]]]:
    """Each pass as a call on device data of ``shape`` in ``layout``, in calling order;
    a call returns the device arrays it made."""
    c = shape[1]
    x, dy, z = (_data(shape, layout, seed) for seed in range(3))
    weight = cuda.to_device(np.linspace(0.5, 1.5, c, dtype=np.float32))
    bias = cuda.to_device(np.linspace(-0.5, 0.5, c, dtype=np.float32))
    running_mean = cuda.to_device(np.zeros(c, np.float32))
    running_var = cuda.to_device(np.ones(c, np.float32))
    saved: dict[str, Any] = {}

    def forward(key: str, training: bool, fused: bool) -> Callable[[], tuple[Any, ...]]:
        def call() -> tuple[Any, ...]:
            epilogue = {"residual": z, "activation": "relu"} if fused else {}
            y, saved[key] = F.batch_norm_forward(
                x, running_mean, running_var, weight, bias, training, **epilogue
            )
            return y, saved[key].mean, saved[key].invstd

        return call

    def backward(key: str, fused: bool) -> Callable[[], tuple[Any, ...]]:
        def call() -> tuple[Any, ...]:
            epilogue = {"bias": bias, "residual": z, "activation": "relu"} if fused else {}
            return tuple(F.batch_norm_backward(dy, x, saved[key], weight, **epilogue))

        return call

    calls: dict[str, Callable[[], tuple[Any, ...]]] = {}
    for mode, training in (("train", True), ("eval", False)):
        for suffix, fused in (("", False), (" relu(bn + residual)", True)):
            key = mode + suffix
            calls[f"{key} forward"] = forward(key, training, fused)
            calls[f"{key} backward"] = backward(key, fused)
    return calls


def _bits(results: tuple[Any, ...]) -> list[bytes]:
    return [b"" if result is None else arrays.to_host(result).tobytes() for result in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.kernel_calls",
        description="Run every CUDA pass once on small data, NCHW and channels-last.",
    )
    parser.add_argument(
        "--shape",
        help="N,C,H,W of the data, every layout's (default: "
        f"{','.join(map(str, DEFAULT_SHAPE))}, wide rows {LAYOUTS['wide-rows'][1]})",
    )
    parser.add_argument(
        "--layout",
        default=",".join(LAYOUTS),
        help="the layouts to run, comma-separated (default %(default)s)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each pass, all with the first's bits"
    )
    args = parser.parse_args(argv)
    layouts = args.layout.split(",")
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        parser.error(f"unknown layouts {', '.join(sorted(unknown))}; known: {', '.join(LAYOUTS)}")
    differing = 0
    for layout in layouts:
        wanted, own_shape = LAYOUTS[layout]
        shape: tuple[int, ...] = own_shape or DEFAULT_SHAPE
        if args.shape:
            shape = tuple(int(size) for size in args.shape.split(","))
        found = family(_data(shape, layout, 0))
        print(f"{layout} {shape}: {found} reductions", flush=True)
        if found != wanted:
            print(f"{layout}: {found} reductions, not {wanted}: the family is not covered")
            differing += 1
        for name, call in passes(shape, layout).items():
            first = _bits(call())
            runs = [_bits(call()) for _ in range(args.repeat - 1)]
            cuda.synchronize()
            changed = sum(run != first for run in runs)
            differing += changed
            verdict = "ok" if not changed else f"{changed} of {args.repeat} runs differ"
            print(f"{layout} {name}: {verdict}", flush=True)
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
