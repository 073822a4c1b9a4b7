"""Module API beyond the forward pass: dtype errors, conversions, parameters and buffers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import reference as ref
from conftest import assert_same_state, make_input, random_vector, snapshot, tolerances

import numbabn

torch = pytest.importorskip("torch")


# -- dtype mismatch ------------------------------------------------------------------------


def test_float64_input_on_a_default_module_says_what_to_do():
    """The first call many NumPy users make: float64 data, a float32 (default) module."""
    bn = numbabn.BatchNorm2d(3)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
    with pytest.raises(RuntimeError) as caught:
        bn(x)
    message = str(caught.value)
    assert message.startswith("mixed dtype (CPU): all inputs must share same datatype.")
    for part in ("BatchNorm2d", "float32", "float64", "dtype=np.float64", ".double()"):
        assert part in message, part
    assert message.endswith("convert the input to float32")
    # Either remedy works.
    assert numbabn.BatchNorm2d(3, dtype=np.float64)(x).dtype == np.float64
    assert bn(x.astype(np.float32)).dtype == np.float32


def test_float32_input_on_a_float64_module():
    bn = numbabn.BatchNorm1d(3, dtype=np.float64)
    with pytest.raises(
        RuntimeError, match=r"BatchNorm1d has float64 .* input is float32"
    ) as caught:
        bn(np.ones((4, 3), np.float32))
    assert "dtype=np.float32" in str(caught.value) and ".float()" in str(caught.value)


def test_functional_keeps_pytorchs_text_first():
    with pytest.raises(RuntimeError) as caught:
        numbabn.functional.batch_norm(
            np.ones((4, 3)), np.zeros(3, np.float32), np.ones(3, np.float32), training=True
        )
    text = str(caught.value)
    assert text.startswith("mixed dtype (CPU): all inputs must share same datatype. ")
    assert text.endswith(
        "must be float64 for float64 input: convert them with .astype(np.float64), "
        "or convert the input"
    )


# -- conversions -----------------------------------------------------------------------------


def _trained(dtype=np.float32, **kwargs) -> numbabn.BatchNorm1d:
    rng = np.random.default_rng(1)
    bn = numbabn.BatchNorm1d(3, dtype=dtype, **kwargs)
    x = rng.standard_normal((8, 3)).astype(dtype)
    bn(x)
    bn.backward(rng.standard_normal((8, 3)).astype(dtype))
    return bn


@pytest.mark.parametrize(
    ("convert", "dtype"),
    [
        (lambda bn: bn.double(), np.float64),
        (lambda bn: bn.to(dtype=np.float64), np.float64),
        (lambda bn: bn.to(np.float64), np.float64),
        (lambda bn: bn.to("cpu", np.float64), np.float64),
        (lambda bn: bn.to(dtype="float64"), np.float64),
    ],
)
def test_conversion_to_float64(convert, dtype):
    bn = _trained()
    before = snapshot(bn)
    assert convert(bn) is bn
    assert bn.dtype == dtype
    arrays = [*bn.parameters(), bn.running_mean, bn.running_var, *bn.grads.values()]
    assert all(array.dtype == dtype for array in arrays)
    assert bn.num_batches_tracked.dtype == np.int64 and bn.num_batches_tracked == 1
    for key, array in bn.state_dict().items():
        np.testing.assert_array_equal(array, before[key].astype(array.dtype))
    for name, grad in bn.grads.items():
        np.testing.assert_array_equal(grad, before["grads"][name].astype(dtype))
    with pytest.raises(RuntimeError, match="backward called before forward"):
        bn.backward(np.ones((8, 3)))
    y = bn(np.ones((8, 3)))
    assert y.dtype == dtype


def test_float_converts_back_and_matches_torch():
    bn = _trained(np.float64)
    theirs = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in bn.state_dict().items()})
    bn.float()
    theirs.float()
    assert all(array.dtype == np.float32 for array in (*bn.parameters(), *bn.grads.values()))
    x = np.random.default_rng(2).standard_normal((8, 3)).astype(np.float32)
    np.testing.assert_allclose(bn(x), theirs(torch.from_numpy(x)).detach().numpy(), atol=1e-6)


def test_conversion_keeps_a_pending_backward_when_nothing_changes():
    """A conversion to the module's own dtype and device is no conversion: the forward
    before it stays pending, and its backward gives the values the reference gives, the
    parameter gradients accumulating onto the earlier backward's."""
    bn = _trained()
    rng = np.random.default_rng(4)
    bn.weight[...] = random_vector(rng, 3, np.float32)
    bn.bias[...] = random_vector(rng, 3, np.float32, -0.5, 0.5)
    earlier = {name: grad.copy() for name, grad in bn.grads.items()}
    x = make_input(rng, (6, 3), dtype=np.float32)
    dy = make_input(rng, (6, 3), dtype=np.float32)
    y = bn(x)
    assert bn.to(dtype=np.float32).float().to("cpu") is bn
    dx = bn.backward(dy)

    truth = ref.forward(x, bn.weight, bn.bias, training=True)
    grads = ref.backward(dy, x, truth.mean, truth.invstd, bn.weight)
    tol = tolerances(np.float32)
    np.testing.assert_allclose(y, truth.output, **tol)
    np.testing.assert_allclose(dx, grads.grad_input, **tol)
    np.testing.assert_allclose(bn.grads["weight"], earlier["weight"] + grads.grad_weight, **tol)
    np.testing.assert_allclose(bn.grads["bias"], earlier["bias"] + grads.grad_bias, **tol)


def test_lazy_module_converts_before_it_materialises():
    bn = numbabn.LazyBatchNorm2d().double()
    y = bn(np.ones((2, 3, 2, 2)))
    assert isinstance(bn, numbabn.BatchNorm2d) and bn.weight.dtype == y.dtype == np.float64


def test_unsupported_dtype_changes_nothing():
    bn = _trained()
    before = snapshot(bn)
    with pytest.raises(TypeError, match="dtype int64 is not supported"):
        bn.to(dtype=np.int64)
    with pytest.raises(TypeError, match="dtype complex64 is not supported"):
        bn.to(np.complex64)
    assert bn.dtype == np.float32
    assert_same_state(before, bn)


# -- parameters and buffers ---------------------------------------------------------------------


def test_named_parameters_are_the_live_arrays_under_pytorchs_names():
    bn = numbabn.BatchNorm2d(4)
    named = list(bn.named_parameters())
    assert [name for name, _ in named] == [n for n, _ in torch.nn.BatchNorm2d(4).named_parameters()]
    assert named[0][1] is bn.weight and named[1][1] is bn.bias
    assert [p for p in bn.parameters()] == [bn.weight, bn.bias]
    assert set(bn.grads) == {name for name, _ in named}
    assert [name for name, _ in bn.named_parameters("block.bn")] == [
        "block.bn.weight",
        "block.bn.bias",
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"bias": False},
        {"affine": False},
        {"track_running_stats": False},
        {"affine": False, "track_running_stats": False},
    ],
)
def test_parameters_and_buffers_are_pytorchs(kwargs):
    ours = numbabn.BatchNorm1d(3, **kwargs)
    theirs = torch.nn.BatchNorm1d(3, **kwargs)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    for array, (name, _) in zip(ours.buffers(), ours.named_buffers(), strict=True):
        assert array is getattr(ours, name)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_hand_written_sgd_on_parameters_matches_torch_optim_sgd(momentum):
    rng = np.random.default_rng(3)
    ours = numbabn.BatchNorm2d(3, dtype=np.float64)
    theirs = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    lr, weight_decay = 0.1, 0.01
    optimizer = torch.optim.SGD(
        theirs.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    velocity = {name: np.zeros_like(p) for name, p in ours.named_parameters()}
    for step in range(4):
        x = rng.standard_normal((4, 3, 2, 2)) + step
        target = rng.standard_normal((4, 3, 2, 2))
        y = ours(x)
        ours.zero_grad()
        ours.backward(y - target)  # gradient of 0.5 * ||y - target||^2
        for name, p in ours.named_parameters():
            g = ours.grads[name] + weight_decay * p
            velocity[name] = momentum * velocity[name] + g if step else g
            p -= lr * velocity[name]

        optimizer.zero_grad()
        out = theirs(torch.from_numpy(x))
        (0.5 * ((out - torch.from_numpy(target)) ** 2).sum()).backward()
        optimizer.step()
    for (name, p), (their_name, q) in zip(
        ours.named_parameters(), theirs.named_parameters(), strict=True
    ):
        assert name == their_name
        np.testing.assert_allclose(p, q.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours.running_mean, theirs.running_mean.numpy(), rtol=1e-12)


def test_quickstart_example_runs():
    """The new user's walk-through: the float64 call, a tensor round trip, SGD on parameters()."""
    script = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("RuntimeError: mixed dtype (CPU)") and "BatchNorm2d" in lines[0]
    assert lines[1:4] == ["float64 float32", "Tensor Tensor ndarray", "True"]
    assert "'weight': array([2. , 0.5, 1. , 3. ]" in lines[4]
