"""Measure one case: numbabn beside its peers, side by side in one run."""

from __future__ import annotations

from typing import Any

import numpy as np

from numbabn.bench.cases import Case, module_for
from numbabn.bench.peers import NumpyBatchNorm, Roofline, TorchBatchNorm
from numbabn.bench.timing import median_seconds, peak_bytes


def measure_case(case: Case, repeat: int, threads: int, with_torch: bool) -> dict[str, Any]:
    """Median seconds for every pass and peer, and peak bytes, for ``case``."""
    x = case.make()
    dy = np.ones_like(x)
    out = np.empty_like(x)
    bn = module_for(x.ndim)(x.shape[1], dtype=x.dtype)
    result: dict[str, Any] = {"case": case.name, "bytes": case.nbytes}
    times: dict[str, float] = {}

    roofline = Roofline(x)
    times["read"] = median_seconds(roofline.read, repeat)
    times["read_write"] = median_seconds(roofline.read_write, repeat)

    bn.train()
    times["numbabn_forward_out"] = median_seconds(lambda: bn(x, out=out), repeat)
    times["numbabn_forward"] = median_seconds(lambda: bn(x), repeat)
    times["numbabn_backward_out"] = median_seconds(lambda: bn.backward(dy, out=out), repeat)
    times["numbabn_backward"] = median_seconds(lambda: bn.backward(dy), repeat)
    grad = np.empty_like(x)
    times["numbabn_forward_backward_out"] = median_seconds(
        lambda: (bn(x, out=out), bn.backward(dy, out=grad)), repeat
    )
    times["numbabn_forward_backward"] = median_seconds(lambda: (bn(x), bn.backward(dy)), repeat)
    result["numbabn_forward_peak"] = peak_bytes(lambda: bn(x))
    result["numbabn_forward_out_peak"] = peak_bytes(lambda: bn(x, out=out))
    result["numbabn_backward_peak"] = peak_bytes(lambda: bn.backward(dy))
    bn.eval()
    times["numbabn_eval_out"] = median_seconds(lambda: bn(x, out=out), repeat)
    times["numbabn_eval"] = median_seconds(lambda: bn(x), repeat)

    reference = NumpyBatchNorm(x)
    times["numpy_forward"] = median_seconds(lambda: reference.forward(x), repeat)
    times["numpy_backward"] = median_seconds(lambda: reference.backward(dy), repeat)
    times["numpy_eval"] = median_seconds(lambda: reference.eval_forward(x), repeat)
    result["numpy_forward_peak"] = peak_bytes(lambda: reference.forward(x))

    if with_torch:
        peer = TorchBatchNorm(x, threads)
        times["torch_forward"] = median_seconds(peer.forward, repeat)
        times["torch_eval"] = median_seconds(peer.eval_forward, repeat)
        peer.prepare_backward()
        times["torch_backward"] = median_seconds(peer.backward, repeat)
        times["torch_forward_backward"] = median_seconds(peer.forward_backward, repeat)
    result["seconds"] = times
    return result
