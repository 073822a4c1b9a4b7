"""Measure one case: numbabn beside its peers, side by side in one run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tools.bench.cases import Case, module_dtype, module_for
from tools.bench.peers import NumpyBatchNorm, Roofline, TorchBatchNorm
from tools.bench.timing import interleaved_medians, peak_bytes


def measure_case(case: Case, repeat: int, threads: int, with_torch: bool) -> dict[str, Any]:
    """Median seconds for every pass and peer, and peak bytes, for ``case``.

    Every timing is sampled in the same rounds (see
    :func:`~tools.bench.timing.interleaved_medians`), so the ratios compare
    measurements taken under the same conditions.
    """
    x = case.make()
    dy = np.ones_like(x)
    out = np.empty_like(x)
    grad = np.empty_like(x)
    module = module_for(x.ndim)
    bn = module(x.shape[1], dtype=module_dtype(x.dtype))
    bn(x)  # backward needs a forward first
    bn_eval = module(x.shape[1], dtype=module_dtype(x.dtype)).eval()
    roofline = Roofline(x)
    funcs: dict[str, Callable[[], object]] = {
        "read": roofline.read,
        "read_write": roofline.read_write,
        "numbabn_forward_out": lambda: bn(x, out=out),
        "numbabn_forward": lambda: bn(x),
        "numbabn_backward_out": lambda: bn.backward(dy, out=grad),
        "numbabn_backward": lambda: bn.backward(dy),
        "numbabn_forward_backward_out": lambda: (bn(x, out=out), bn.backward(dy, out=grad)),
        "numbabn_forward_backward": lambda: (bn(x), bn.backward(dy)),
        "numbabn_eval_out": lambda: bn_eval(x, out=out),
        "numbabn_eval": lambda: bn_eval(x),
    }
    # NumPy has no fast 16-bit arithmetic (float16 is of kind "f" too): no NumPy peer there.
    if x.dtype.kind == "f" and x.itemsize > 2:
        reference = NumpyBatchNorm(x)
        reference.forward(x)
        funcs.update(
            numpy_forward=lambda: reference.forward(x),
            numpy_backward=lambda: reference.backward(dy),
            numpy_eval=lambda: reference.eval_forward(x),
        )
    if with_torch:
        peer = TorchBatchNorm(x, threads)
        peer.prepare_backward()
        funcs.update(
            torch_forward=peer.forward,
            torch_eval=peer.eval_forward,
            torch_backward=peer.backward,
            torch_forward_backward=peer.forward_backward,
        )
    result: dict[str, Any] = {"case": case.name, "bytes": case.nbytes}
    result["seconds"] = interleaved_medians(funcs, repeat)
    result["numbabn_forward_peak"] = peak_bytes(lambda: bn(x))
    result["numbabn_forward_out_peak"] = peak_bytes(lambda: bn(x, out=out))
    result["numbabn_backward_peak"] = peak_bytes(lambda: bn.backward(dy))
    if "numpy_forward" in funcs:
        result["numpy_forward_peak"] = peak_bytes(funcs["numpy_forward"])
    return result
