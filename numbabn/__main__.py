"""``python -m numbabn``: normalise a batch, check it against NumPy, train a few steps.

``python -m numbabn warmup [--dtype float32 float64]`` compiles every CPU kernel
into Numba's cache instead (see :mod:`numbabn.warmup`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numba
import numpy as np

import numbabn as nbn

_T = TypeVar("_T")


def _numpy_batch_norm(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float
) -> np.ndarray:
    """Training-mode batch norm written the way a NumPy user would, in float64."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2, 3), keepdims=True)
    var = x64.var(axis=(0, 2, 3), keepdims=True)
    return (x64 - mean) / np.sqrt(var + eps) * weight[:, None, None] + bias[:, None, None]


def _timed(func: Callable[..., _T], *args: Any, repeat: int = 1) -> tuple[_T, float]:
    """Result of the last call and the median milliseconds over ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = func(*args)
        times.append((time.perf_counter() - start) * 1e3)
    return result, float(np.median(times))


def main() -> None:
    rng = np.random.default_rng(0)
    shape = (32, 64, 56, 56)  # the first batch-norm layer of ResNet-50 at batch 32
    # Activations with a different offset and spread per channel, as after a convolution.
    offsets = rng.normal(0.0, 5.0, size=(1, shape[1], 1, 1))
    spreads = rng.uniform(0.5, 3.0, size=(1, shape[1], 1, 1))
    x = (rng.standard_normal(shape) * spreads + offsets).astype(np.float32)

    print(f"numbabn {nbn.__version__}: backend cpu, {numba.get_num_threads()} Numba threads")
    print(f"input {shape} float32, {x.nbytes / 1e6:.1f} MB")

    bn = nbn.BatchNorm2d(shape[1])
    # Affine and tracking running statistics: the module has all of its arrays.
    weight, bias, running_mean = bn.weight, bn.bias, bn.running_mean
    running_var, batches_tracked = bn.running_var, bn.num_batches_tracked
    assert weight is not None and bias is not None and batches_tracked is not None
    assert running_mean is not None and running_var is not None
    weight[...] = rng.uniform(0.5, 1.5, shape[1])
    bias[...] = rng.normal(0.0, 0.1, shape[1])

    dy = rng.standard_normal(shape).astype(np.float32)
    _, compile_ms = _timed(lambda: (bn(x), bn.backward(dy)))
    print(f"first forward + backward (compiles, or loads Numba's cache): {compile_ms:.0f} ms")
    # Timed into preallocated outputs, as a training loop should run (see the README's
    # Speed section): a fresh 25.7 MB output each call costs its first writes page faults.
    out, grad = np.empty_like(x), np.empty_like(x)
    bn(x, out)  # the buffers' own first writes
    bn.backward(dy, grad)
    bn.reset_running_stats()
    bn.zero_grad()

    _, fresh_ms = _timed(bn, x, repeat=5)
    y, forward_ms = _timed(bn, x, out, repeat=5)
    error = np.abs(y - _numpy_batch_norm(x, weight, bias, bn.eps)).max()
    print(
        f"train forward: {forward_ms:.1f} ms with out= (median of 5); {fresh_ms:.1f} ms "
        "allocating a new output each call"
    )
    print(f"max |numbabn - NumPy float64 computation| = {error:.2e}")
    if error > 1e-5:
        raise SystemExit("the output does not match the NumPy computation")
    means = y.mean(axis=(0, 2, 3)) - bias
    print(f"output per-channel mean minus bias: max {np.abs(means).max():.1e} (expected ~0)")

    bn.zero_grad()
    _, backward_ms = _timed(bn.backward, dy, grad, repeat=5)
    print(f"backward: {backward_ms:.1f} ms with out= (median of 5), grads accumulated over 5 calls")

    bn.reset_running_stats()
    print("training steps: fit weight and bias so y matches 2 * xhat + 0.5 (SGD, lr 0.5)")
    xhat = _numpy_batch_norm(x, np.ones(shape[1]), np.zeros(shape[1]), bn.eps)
    target = (2.0 * xhat + 0.5).astype(np.float32)
    per_channel = x.size // shape[1]
    for step in range(1, 6):
        bn.zero_grad()
        y = bn(x)
        residual = y - target
        loss = 0.5 * float(np.mean(residual * residual))
        bn.backward(residual / per_channel)  # gradient of the per-channel mean loss
        grad_weight, grad_bias = bn.grads["weight"], bn.grads["bias"]
        assert grad_weight is not None and grad_bias is not None  # backward set them
        weight -= 0.5 * grad_weight  # in place: the module's own arrays
        bias -= 0.5 * grad_bias
        print(
            f"  step {step}: loss {loss:.4f}, weight[0] {weight[0]:.3f}, "
            f"bias[0] {bias[0]:+.3f}, batches tracked {int(batches_tracked)}, "
            f"running_mean[0] {running_mean[0]:+.3f} (batch mean {x[:, 0].mean():+.3f})"
        )

    bn.eval()
    y_eval, eval_ms = _timed(bn, x, out, repeat=5)
    expected = (x[:, :1] - running_mean[0]) / np.sqrt(running_var[0] + bn.eps)
    expected = expected * weight[0] + bias[0]
    print(
        f"eval forward (running statistics): {eval_ms:.1f} ms with out=, channel 0 max error "
        f"{np.abs(y_eval[:, :1] - expected).max():.1e}"
    )
    print("state_dict:", {key: value.shape for key, value in bn.state_dict().items()})
    print("ok")


def cli(argv: list[str] | None = None) -> None:
    """Parse the command line: no subcommand runs the demo, ``warmup`` the warm-up."""
    parser = argparse.ArgumentParser(
        prog="python -m numbabn", description="Without a command: run the demo."
    )
    commands = parser.add_subparsers(dest="command", metavar="{warmup}")
    warm = commands.add_parser(
        "warmup",
        help="compile every CPU kernel into Numba's on-disk cache",
        description="Compile every CPU kernel into Numba's on-disk cache (NUMBA_CACHE_DIR "
        "to put it elsewhere), for container builds and job prologues.",
    )
    from numbabn import warmup

    warmup.add_arguments(warm)
    args = parser.parse_args(argv)
    if args.command == "warmup":
        warmup.main(args)
    else:
        main()


if __name__ == "__main__":
    cli()
