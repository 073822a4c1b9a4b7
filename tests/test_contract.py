"""The backend contract: the phases, composed, are the fused passes, on every backend.

SyncBatchNorm and numbabn.dask run batch norm as its phases with an exchange
between them (moments, a merge, coefficients, an elementwise pass; gradient
sums, the gradient). Each backend offers those phases; here they are composed
by hand, with the statistics split in two and merged as another rank's would
be, and checked against the backend's own fused passes and the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from conftest import make_input, random_vector, tolerances

from numbabn import ChannelStats
from numbabn._dispatch import Backend, backend_for, host_backend

# Planar, channels-last and (N, C) operands.
CASES = [((4, 3, 5), "contiguous"), ((3, 5, 4, 3), "channels_last"), ((9, 4), "contiguous")]


def _backend(device) -> Backend:
    return host_backend() if device.name == "cpu" else backend_for(x=device.put(np.zeros((1, 1))))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "layout"), CASES)
def test_training_phases_are_the_fused_passes(rng, device, shape, layout, dtype):
    backend = _backend(device)
    put, get = device.put, device.get
    x = make_input(rng, shape, layout, dtype, loc=50.0)
    dy = make_input(rng, shape, layout, dtype)
    n_channels = shape[1]
    weight, bias = random_vector(rng, n_channels, dtype), random_vector(rng, n_channels, dtype)
    running = [np.zeros(n_channels, dtype), np.ones(n_channels, dtype)]
    fused_running = [put(vector) for vector in running]
    phased_running = [put(vector) for vector in running]
    d_x, d_dy, d_w, d_b = put(x), put(dy), put(weight), put(bias)

    y, mean, invstd = backend.train_forward(d_x, d_w, d_b, *fused_running, 0.3, 1e-5, None)
    dx, dw, db = backend.train_backward(d_dy, d_x, mean, invstd, d_w, None)

    # The statistics of two halves of the batch, merged as two ranks' would be.
    half = shape[0] // 2
    stats = ChannelStats(n_channels)
    for part in (x[:half], x[half:]):
        row = ChannelStats.row(part.size // n_channels, *backend.moments(put(part)))
        stats.merge(ChannelStats.from_rows(row[None]))
    truth = ref.forward(x, weight, bias, *running, training=True, momentum=0.3)
    np.testing.assert_allclose(stats.mean, truth.mean, rtol=1e-12)
    inv, scale, shift = backend.train_coefficients(
        stats.mean, stats.m2, stats.count, d_w, d_b, 1e-5, *phased_running, 0.3
    )
    phased_y = backend.affine(d_x, stats.mean, scale, shift, None)
    sums = backend.grad_sums(d_dy, d_x, stats.mean)
    phased_dx = backend.grad_input_from_sums(
        d_dy, d_x, stats.mean, inv, d_w, sums, stats.count, None
    )

    tol = tolerances(dtype)
    np.testing.assert_allclose(inv, get(invstd), rtol=1e-10)
    np.testing.assert_allclose(get(phased_y), get(y), **tol)
    np.testing.assert_allclose(get(phased_y), truth.output, **tol)
    for phased, fused in zip(phased_running, fused_running, strict=True):
        np.testing.assert_allclose(get(phased), get(fused), **tol)
    np.testing.assert_allclose(get(phased_dx), get(dx), **tol)
    np.testing.assert_allclose(sums[0], get(db), rtol=1e-5)
    np.testing.assert_allclose(sums[1] * inv, get(dw), rtol=1e-5, atol=1e-6)


def test_eval_coefficients_and_affine_are_eval_forward(rng, device):
    backend = _backend(device)
    put, get = device.put, device.get
    x = make_input(rng, (4, 3, 6), dtype=np.float32)
    vectors = [random_vector(rng, 3, np.float32) for _ in range(4)]
    d_x, *d_vectors = put(x), *(put(vector) for vector in vectors)
    y, _, invstd = backend.eval_forward(d_x, *d_vectors, 1e-3, None)
    mean, inv, scale, shift = backend.eval_coefficients(*d_vectors, 1e-3)
    np.testing.assert_array_equal(inv, get(invstd))
    np.testing.assert_array_equal(mean, vectors[0].astype(np.float64))
    np.testing.assert_allclose(get(backend.affine(d_x, mean, scale, shift, None)), get(y))


def test_coefficients_without_running_statistics_change_nothing(device):
    backend = _backend(device)
    weight = device.put(np.ones(2, np.float32))
    inv, scale, shift = backend.train_coefficients(
        np.array([1.0, 2.0]), np.array([8.0, 0.0]), 2, weight, weight, 0.0, None, None, 0.5
    )
    np.testing.assert_allclose(inv, [0.5, np.inf])
    np.testing.assert_allclose(shift, [1.0, 1.0])
