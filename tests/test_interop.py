"""Host arrays of other libraries: used in place, results of the caller's kind.

PyTorch CPU tensors stand for DLPack exporters (JAX CPU arrays behave the
same); small wrapper classes stand for any other library: one exporting only
DLPack, one also offering an array-API namespace to rebuild its arrays from.
"""

from __future__ import annotations

import re
import types

import numpy as np
import pytest

import numbabn
from numbabn import functional as F

torch = pytest.importorskip("torch")


class DLPackOnly:
    """An array of an unknown library: nothing but ``__dlpack__`` and ``__dlpack_device__``."""

    def __init__(self, array: np.ndarray) -> None:
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


class WithNamespace(DLPackOnly):
    """A DLPack array whose library rebuilds arrays through its array-API namespace (as JAX)."""

    def __array_namespace__(self, api_version=None):
        return types.SimpleNamespace(from_dlpack=lambda array: WithNamespace(np.from_dlpack(array)))


def _memory(array) -> np.ndarray:
    """The NumPy view of ``array``'s memory."""
    if isinstance(array, DLPackOnly):
        return array._array
    return np.from_dlpack(array)


def _expected(x: np.ndarray, training: bool = True) -> tuple[np.ndarray, ...]:
    """Output and running statistics of a fresh BatchNorm on plain NumPy input."""
    bn = numbabn.BatchNorm2d(x.shape[1], dtype=x.dtype).train(training)
    y = bn(x.copy())
    return y, bn.running_mean, bn.running_var


def _data(rng, shape=(4, 3, 2, 2), dtype=np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


# -- PyTorch CPU tensors -----------------------------------------------------------------


def test_torch_tensor_in_torch_tensor_out(rng):
    x = _data(rng)
    bn = numbabn.BatchNorm2d(3)
    t = torch.from_numpy(x.copy())
    y = bn(t)
    assert type(y) is torch.Tensor and y.dtype == torch.float32 and y.shape == t.shape
    expected, mean, var = _expected(x)
    np.testing.assert_array_equal(y.numpy(), expected)
    np.testing.assert_array_equal(bn.running_mean, mean)
    np.testing.assert_array_equal(bn.running_var, var)
    # The state stays NumPy.
    assert all(type(array) is np.ndarray for array in (*bn.parameters(), *bn.buffers()))


def test_torch_output_matches_torch_batchnorm(rng):
    x = torch.from_numpy(_data(rng, dtype=np.float64))
    theirs = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    ours = numbabn.BatchNorm2d(3, dtype=np.float64)
    for _ in range(2):
        torch.testing.assert_close(ours(x), theirs(x).detach())
    np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy())


def test_torch_input_is_not_copied(rng):
    x = torch.from_numpy(_data(rng))
    bn = numbabn.BatchNorm2d(3)
    bn(x)
    # backward keeps a reference to the caller's tensor, not a copy of it.
    assert np.shares_memory(bn._backend.adopt(bn._saved.input), x.numpy())


def test_torch_out_is_written_in_place(rng):
    x = _data(rng)
    out = torch.empty(x.shape)
    result = numbabn.BatchNorm2d(3)(torch.from_numpy(x.copy()), out)
    assert result is out
    np.testing.assert_array_equal(out.numpy(), _expected(x)[0])


def test_torch_backward(rng):
    x, dy = _data(rng), _data(rng)
    bn, reference = numbabn.BatchNorm2d(3), numbabn.BatchNorm2d(3)
    bn(torch.from_numpy(x.copy()))
    reference(x.copy())
    dx = bn.backward(torch.from_numpy(dy.copy()))
    assert type(dx) is torch.Tensor
    np.testing.assert_array_equal(dx.numpy(), reference.backward(dy.copy()))
    np.testing.assert_array_equal(bn.grads["weight"], reference.grads["weight"])
    assert type(bn.grads["weight"]) is np.ndarray

    out = torch.empty(x.shape)
    bn(torch.from_numpy(x.copy()))
    assert bn.backward(torch.from_numpy(dy.copy()), out) is out
    np.testing.assert_array_equal(out.numpy(), dx.numpy())


def test_torch_residual_and_its_gradient(rng):
    x, z, dy = _data(rng), _data(rng), _data(rng)
    bn = numbabn.BatchNorm2d(3, activation="relu")
    reference = numbabn.BatchNorm2d(3, activation="relu")
    y = bn(torch.from_numpy(x), residual=torch.from_numpy(z))
    np.testing.assert_array_equal(y.numpy(), reference(x, residual=z))
    dx, dz = bn.backward(torch.from_numpy(dy))
    expected_dx, expected_dz = reference.backward(dy)
    assert type(dx) is torch.Tensor and type(dz) is torch.Tensor
    np.testing.assert_array_equal(dx.numpy(), expected_dx)
    np.testing.assert_array_equal(dz.numpy(), expected_dz)


def test_functional_with_torch_state(rng):
    """Running statistics of PyTorch's kind are updated in place, through their memory."""
    x = _data(rng)
    mean, var = torch.zeros(3), torch.ones(3)
    y = F.batch_norm(torch.from_numpy(x), mean, var, torch.ones(3), torch.zeros(3), True)
    assert type(y) is torch.Tensor
    expected, expected_mean, expected_var = _expected(x)
    np.testing.assert_array_equal(y.numpy(), expected)
    np.testing.assert_array_equal(mean.numpy(), expected_mean)
    np.testing.assert_array_equal(var.numpy(), expected_var)


def test_functional_backward_with_torch(rng):
    x, dy = _data(rng), _data(rng)
    weight = np.full(3, 2.0, np.float32)
    _, saved = F.batch_norm_forward(x, None, None, weight, training=True)
    expected = F.batch_norm_backward(dy, x, saved, weight)
    grads = F.batch_norm_backward(
        torch.from_numpy(dy), torch.from_numpy(x), saved, torch.from_numpy(weight)
    )
    assert all(type(grad) is torch.Tensor for grad in grads)
    for ours, theirs in zip(grads, expected, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs)


def test_torch_tensor_that_requires_grad_says_detach():
    bn = numbabn.BatchNorm1d(3)
    with pytest.raises(TypeError, match=r"requires grad.*tensor\.detach\(\)"):
        bn(torch.ones(4, 3, requires_grad=True))
    bn(torch.ones(4, 3, requires_grad=True).detach())


def test_torch_dtype_mismatch_is_the_module_error():
    with pytest.raises(RuntimeError, match="BatchNorm1d has float32 parameters"):
        numbabn.BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.float64))


# -- SyncBatchNorm (one rank) ----------------------------------------------------------------


def _one_rank_sync(**kwargs) -> numbabn.SyncBatchNorm:
    mpi = pytest.importorskip("mpi4py.MPI")
    return numbabn.SyncBatchNorm(3, comm=mpi.COMM_SELF, **kwargs)


def test_sync_batchnorm_takes_torch_tensors_in_training(rng):
    x, dy = _data(rng), _data(rng)
    synced, reference = _one_rank_sync(), numbabn.BatchNorm2d(3)
    t = torch.from_numpy(x.copy())
    y = synced(t)
    assert type(y) is torch.Tensor and y.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), reference(x.copy()), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(synced.running_var, reference.running_var, rtol=1e-6)
    # backward keeps a reference to the caller's tensor, not a copy of it.
    assert np.shares_memory(synced._backend.adopt(synced._saved.input), t.numpy())
    dx = synced.backward(torch.from_numpy(dy.copy()))
    assert type(dx) is torch.Tensor
    np.testing.assert_allclose(dx.numpy(), reference.backward(dy.copy()), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(synced.grads["weight"], reference.grads["weight"], rtol=1e-5)
    assert type(synced.grads["weight"]) is np.ndarray


def test_sync_batchnorm_writes_torch_out_in_place(rng):
    x, dy = torch.from_numpy(_data(rng)), torch.from_numpy(_data(rng))
    synced = _one_rank_sync()
    out = torch.empty(x.shape)
    assert synced(x, out) is out
    np.testing.assert_array_equal(out.numpy(), synced(x).numpy())
    grad_out = torch.empty(x.shape)
    assert synced.backward(dy, grad_out) is grad_out
    synced(x)
    np.testing.assert_array_equal(grad_out.numpy(), synced.backward(dy).numpy())


def test_sync_batchnorm_with_other_host_arrays(rng):
    x = _data(rng)
    synced = _one_rank_sync()
    y = synced(DLPackOnly(x))
    assert type(y) is np.ndarray
    np.testing.assert_allclose(y, _expected(x)[0], rtol=1e-6, atol=1e-6)
    assert type(synced.backward(DLPackOnly(np.ones_like(x)))) is np.ndarray
    assert type(synced(WithNamespace(x))) is WithNamespace


def test_sync_batchnorm_refuses_non_arrays_and_tensors_that_require_grad():
    synced = _one_rank_sync()
    with pytest.raises(TypeError, match="got builtins.list"):
        synced([[1.0, 2.0, 3.0]] * 4)
    with pytest.raises(TypeError, match=r"tensor\.detach\(\)"):
        synced(torch.ones(4, 3, requires_grad=True))
    synced(torch.ones(4, 3))
    with pytest.raises(TypeError, match="got builtins.str"):
        synced.backward("abc")


def test_sync_batchnorm_to_converts_the_dtype(rng):
    synced = _one_rank_sync()
    assert synced.to(np.float64) is synced and synced.running_var.dtype == np.float64
    assert synced.to(dtype=np.float32).weight.dtype == np.float32
    assert synced.to("cpu", np.float64).dtype == np.float64
    assert synced.to() is synced and synced.to("cpu") is synced
    y = synced(torch.from_numpy(_data(rng, dtype=np.float64)))
    assert y.dtype == torch.float64
    with pytest.raises(ValueError, match="'tpu' is not available"):
        synced.to("tpu", np.float32)
    assert synced.dtype == np.float64


# -- other host arrays --------------------------------------------------------------------


def test_dlpack_only_array(rng):
    """An array of a library numbabn knows nothing of: used in place, NumPy results."""
    x = _data(rng)
    bn = numbabn.BatchNorm2d(3)
    y = bn(DLPackOnly(x))
    assert type(y) is np.ndarray
    np.testing.assert_array_equal(y, _expected(x)[0])
    dx = bn.backward(DLPackOnly(np.ones_like(x)))
    assert type(dx) is np.ndarray and dx.shape == x.shape

    out = DLPackOnly(np.empty_like(x))
    assert bn(DLPackOnly(x), out) is out
    np.testing.assert_array_equal(out._array, y)


def test_array_namespace_rebuilds_the_callers_kind(rng):
    x = _data(rng)
    y = numbabn.BatchNorm2d(3)(WithNamespace(x))
    assert type(y) is WithNamespace
    np.testing.assert_array_equal(y._array, _expected(x)[0])


def test_read_only_dlpack_export_is_an_input_not_an_out(rng):
    """Immutable arrays (JAX's) export read-only memory: fine to read, refused as out=."""
    x = _data(rng)
    x.flags.writeable = False
    bn = numbabn.BatchNorm2d(3)
    np.testing.assert_array_equal(bn(DLPackOnly(x)), _expected(x)[0])
    with pytest.raises(ValueError, match="out is read-only"):
        bn(DLPackOnly(x.copy()), out=DLPackOnly(x))
    with pytest.raises(ValueError, match="running_mean is read-only"):
        F.batch_norm(x.copy(), DLPackOnly(x[0, :, 0, 0]), np.ones(3, np.float32), training=True)


def test_memmap_is_used_in_place_and_gives_ndarrays(rng, tmp_path):
    x = _data(rng)
    mapped = np.memmap(tmp_path / "x.bin", dtype=x.dtype, mode="w+", shape=x.shape)
    mapped[...] = x
    out = np.memmap(tmp_path / "out.bin", dtype=x.dtype, mode="w+", shape=x.shape)
    bn = numbabn.BatchNorm2d(3)
    y = bn(mapped)
    assert type(y) is np.ndarray  # subclasses give plain ndarrays
    np.testing.assert_array_equal(y, _expected(x)[0])
    assert bn(mapped, out) is out
    np.testing.assert_array_equal(np.asarray(out), y)
    assert np.shares_memory(bn._backend.adopt(bn._saved.input), mapped)


def test_ndarray_subclass(rng):
    class Tagged(np.ndarray):
        pass

    x = _data(rng)
    y = numbabn.BatchNorm2d(3)(x.copy().view(Tagged))
    assert type(y) is np.ndarray
    np.testing.assert_array_equal(y, _expected(x)[0])


def test_masked_array_is_refused(rng):
    x = np.ma.masked_array(_data(rng), mask=False)
    with pytest.raises(TypeError, match="masked arrays are not supported"):
        numbabn.BatchNorm2d(3)(x)


def test_adoption_never_copies(rng):
    x = _data(rng)
    adopt = numbabn.BatchNorm2d(3)._backend.adopt
    for array in (torch.from_numpy(x), DLPackOnly(x), x.view(np.memmap)):
        assert np.shares_memory(adopt(array), x)
    assert adopt(x) is x  # the plain-ndarray fast path


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ([[1.0, 2.0, 3.0]] * 4, "builtins.list"),
        (((1.0, 2.0, 3.0),) * 4, "builtins.tuple"),
        ("abc", "builtins.str"),
        (object(), "builtins.object"),
    ],
)
def test_non_arrays_get_a_type_error_naming_what_is_accepted(value, name):
    accepted = re.escape(
        "a NumPy array, another CPU array (one exporting DLPack or the NumPy array"
    )
    bn = numbabn.BatchNorm1d(3)
    with pytest.raises(TypeError, match=f"expected {accepted}.*got {name}"):
        bn(value)
    with pytest.raises(TypeError, match=f"input: expected {accepted}.*got {name}"):
        F.batch_norm(value, None, None, training=True)
    bn(np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match=f"expected {accepted}.*got {name}"):
        bn.backward(value)
