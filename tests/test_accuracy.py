"""float32 data with |mean| >> std: numbabn stays within 1e-6 of the exact answer.

Measured on the 2-core developer machine (numbabn at commit a22b844), input
``N(1e4, 1)`` of shape (32, 16, 28, 28), float32, training forward, compared
with the float64 two-pass reference on the same float32 values:

* numbabn NCHW: max |error| 2.32e-7, channels-last 2.29e-7: half an ulp of
  the output, i.e. the float64 result rounded once to float32;
* PyTorch 2.13 CPU: 6.8e-4 NCHW, 1.8e-2 channels-last (earlier measurements
  on another machine gave 8e-4 and 9e-3).

docs/design.md (Accuracy arithmetic) explains the numbers.

The test prints the measured errors (``pytest -s`` shows them).
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from conftest import make_layout

import numbabn

SHAPE = (32, 16, 28, 28)
LIMIT = 1e-6


def far_from_zero(layout: str, mean: float = 1e4, std: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(7)
    return make_layout(lambda shape: rng.normal(mean, std, shape).astype(np.float32), SHAPE, layout)


@pytest.fixture(scope="module", params=["contiguous", "channels_last"])
def case(request):
    layout = request.param
    x = far_from_zero(layout)
    exact = ref.forward(x, training=True, momentum=0.1, running_mean=np.zeros(16),
                        running_var=np.ones(16))  # fmt: skip
    return layout, x, exact


def test_forward_error(case, capsys):
    layout, x, exact = case
    module = numbabn.BatchNorm2d(16)
    y = module(x)
    error = np.max(np.abs(y.astype(np.float64) - exact.output))
    with capsys.disabled():
        print(f"\nnumbabn max |error| at mean 1e4, {layout}: {error:.3g}")
    assert error < LIMIT
    # The running statistics are right to float32 rounding too.
    np.testing.assert_allclose(module.running_mean, exact.running_mean, rtol=1e-7)
    np.testing.assert_allclose(module.running_var, exact.running_var, rtol=1e-6)


def test_eval_error(case):
    """Evaluation with float32 running statistics far from zero."""
    _, x, _ = case
    rm = np.full(16, 1e4, np.float32) + np.arange(16, dtype=np.float32) / 8
    rv = np.linspace(0.5, 2.0, 16).astype(np.float32)
    module = numbabn.BatchNorm2d(16).eval()
    module.running_mean[...] = rm
    module.running_var[...] = rv
    exact = ref.forward(x, running_mean=rm, running_var=rv, training=False)
    error = np.max(np.abs(module(x).astype(np.float64) - exact.output))
    assert error < LIMIT


def test_backward_error(case):
    _, x, exact = case
    rng = np.random.default_rng(3)
    dy = rng.standard_normal(SHAPE).astype(np.float32)
    module = numbabn.BatchNorm2d(16)
    module(x)
    dx = module.backward(dy)
    truth = ref.backward(dy, x, exact.mean, exact.invstd, np.ones(16), batch_stats=True)
    assert np.max(np.abs(dx - truth.grad_input)) < LIMIT
    np.testing.assert_allclose(module.grads["weight"], truth.grad_weight, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(module.grads["bias"], truth.grad_bias, rtol=1e-6, atol=1e-3)


def test_torch_is_less_accurate(case, capsys):
    """PyTorch's own float32 kernel is measurably worse on the same data."""
    torch = pytest.importorskip("torch")
    layout, x, exact = case
    tx = torch.from_numpy(x)
    if layout == "channels_last":
        # Tell PyTorch about the layout it is given, so it takes its channels-last kernel.
        assert tx.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ty = torch.nn.BatchNorm2d(16)(tx).numpy()
    torch_error = np.max(np.abs(ty.astype(np.float64) - exact.output))
    ours = numbabn.BatchNorm2d(16)(x)
    our_error = np.max(np.abs(ours.astype(np.float64) - exact.output))
    with capsys.disabled():
        print(
            f"\ntorch max |error| at mean 1e4, {layout}: {torch_error:.3g} (ours {our_error:.3g})"
        )
    assert torch_error > our_error
