"""Folding an eval-mode batch norm into the conv or linear layer before it, against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_same_state, random_vector, snapshot

import numbabn
from numbabn import fold_into_conv, fold_into_linear

torch = pytest.importorskip("torch")
fusion = pytest.importorskip("torch.nn.utils.fusion")

BN_CLASSES = {1: numbabn.BatchNorm1d, 2: numbabn.BatchNorm2d, 3: numbabn.BatchNorm3d}
# (affine, bias) module configurations: full affine, weight only, none.
PARAMS = {"affine": (True, True), "no_bias": (True, False), "no_affine": (False, True)}
DTYPES = [np.float32, np.float64]
C_OUT, C_IN = 5, 3
KERNELS = {1: (3,), 2: (3, 2), 3: (2, 3, 2)}


def tol(dtype) -> dict:
    # Same operations in the same order as PyTorch: equal to within an ulp or two.
    if np.dtype(dtype) == np.float32:
        return {"rtol": 1e-6, "atol": 1e-7}
    return {"rtol": 1e-14, "atol": 1e-15}


def trained_bn(dim, dtype, rng, params="affine", num_features=C_OUT):
    """A batch norm with random parameters and running statistics gathered in training."""
    affine, bias = PARAMS[params]
    bn = BN_CLASSES[dim](num_features, affine=affine, bias=bias, dtype=dtype)
    if bn.weight is not None:
        bn.weight[...] = random_vector(rng, num_features, dtype, -1.5, 1.5)
    if bn.bias is not None:
        bn.bias[...] = random_vector(rng, num_features, dtype, -1.0, 1.0)
    shape = (8, num_features) + (3,) * dim
    loc = rng.uniform(-2.0, 2.0, num_features).reshape((1, -1) + (1,) * dim)
    scale = rng.uniform(0.2, 3.0, num_features).reshape((1, -1) + (1,) * dim)
    for _ in range(4):
        bn(((rng.standard_normal(shape) * scale) + loc).astype(dtype))
    assert not np.allclose(bn.running_mean, 0.0)
    assert not np.allclose(bn.running_var, 1.0)
    return bn.eval()


def as_tensor(array):
    return None if array is None else torch.from_numpy(np.array(array))


def torch_fold_conv(weight, bias, bn, transpose=False):
    w, b = fusion.fuse_conv_bn_weights(
        as_tensor(weight), as_tensor(bias), as_tensor(bn.running_mean),
        as_tensor(bn.running_var), bn.eps, as_tensor(bn.weight), as_tensor(bn.bias), transpose,
    )  # fmt: skip
    return w.detach().numpy(), b.detach().numpy()


def torch_fold_linear(weight, bias, bn):
    # PyTorch's linear helper takes the batch norm's weight and bias as tensors.
    bn_w = bn.weight if bn.weight is not None else np.ones_like(bn.running_mean)
    bn_b = bn.bias if bn.bias is not None else np.zeros_like(bn.running_mean)
    w, b = fusion.fuse_linear_bn_weights(
        as_tensor(weight), as_tensor(bias), as_tensor(bn.running_mean),
        as_tensor(bn.running_var), bn.eps, as_tensor(bn_w), as_tensor(bn_b),
    )  # fmt: skip
    return w.detach().numpy(), b.detach().numpy()


def assert_matches(ours, theirs, dtype):
    for name, mine, ref in zip(("weight", "bias"), ours, theirs, strict=True):
        assert isinstance(mine, np.ndarray), name
        assert mine.dtype == ref.dtype, f"{name}: {mine.dtype} vs {ref.dtype}"
        assert mine.shape == ref.shape, f"{name}: {mine.shape} vs {ref.shape}"
        np.testing.assert_allclose(mine, ref, err_msg=name, **tol(dtype))


def conv_weight(rng, dim, dtype, transpose=False):
    shape = (C_IN, C_OUT) if transpose else (C_OUT, C_IN)
    return rng.standard_normal(shape + KERNELS[dim]).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["conv_bias", "no_conv_bias"])
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "transpose"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_fold_into_conv_matches_torch(dim, transpose, params, with_bias, dtype, rng):
    bn = trained_bn(dim, dtype, rng, params)
    weight = conv_weight(rng, dim, dtype, transpose)
    bias = rng.standard_normal(C_OUT).astype(dtype) if with_bias else None
    ours = fold_into_conv(weight, bias, bn, transpose=transpose)
    assert_matches(ours, torch_fold_conv(weight, bias, bn, transpose), dtype)
    assert ours[0].shape == weight.shape
    assert ours[1].shape == (C_OUT,)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["linear_bias", "no_linear_bias"])
@pytest.mark.parametrize("params", PARAMS)
def test_fold_into_linear_matches_torch(params, with_bias, dtype, rng):
    bn = trained_bn(1, dtype, rng, params)
    weight = rng.standard_normal((C_OUT, C_IN)).astype(dtype)
    bias = rng.standard_normal(C_OUT).astype(dtype) if with_bias else None
    ours = fold_into_linear(weight, bias, bn)
    assert_matches(ours, torch_fold_linear(weight, bias, bn), dtype)


@pytest.mark.parametrize(
    ("weight_dtype", "bias_dtype", "bn_dtype"),
    [
        (np.float32, np.float32, np.float64),
        (np.float64, np.float64, np.float32),
        (np.float32, np.float64, np.float32),
        (np.float64, np.float32, np.float64),
        (np.float16, None, np.float32),
    ],
)
def test_mixed_dtypes_follow_torch(weight_dtype, bias_dtype, bn_dtype, rng):
    """Weight keeps its dtype, bias keeps its own (the weight's when absent), as in PyTorch."""
    bn = trained_bn(2, bn_dtype, rng)
    bias = None if bias_dtype is None else rng.standard_normal(C_OUT).astype(bias_dtype)
    conv_w = conv_weight(rng, 2, weight_dtype)
    linear_w = rng.standard_normal((C_OUT, C_IN)).astype(weight_dtype)
    folded = fold_into_conv(conv_w, bias, bn)
    assert folded[0].dtype == weight_dtype
    assert folded[1].dtype == (bias_dtype or weight_dtype)
    assert_matches(folded, torch_fold_conv(conv_w, bias, bn), weight_dtype)
    folded = fold_into_linear(linear_w, bias, bn)
    assert folded[0].dtype == weight_dtype
    assert_matches(folded, torch_fold_linear(linear_w, bias, bn), weight_dtype)


def test_momentum_none_and_assigned_statistics(rng):
    """Running statistics set by assignment (as after loading a checkpoint) are used."""
    bn = numbabn.BatchNorm2d(C_OUT, eps=1e-3, momentum=None, dtype=np.float64)
    bn.running_mean[...] = rng.uniform(-3.0, 3.0, C_OUT)
    bn.running_var[...] = rng.uniform(0.01, 4.0, C_OUT)
    bn.weight[...] = rng.uniform(-2.0, 2.0, C_OUT)
    bn.bias[...] = rng.uniform(-1.0, 1.0, C_OUT)
    weight = conv_weight(rng, 2, np.float64)
    bias = rng.standard_normal(C_OUT)
    assert_matches(fold_into_conv(weight, bias, bn), torch_fold_conv(weight, bias, bn), np.float64)


# -- the folded layer computes what the layer then the batch norm compute ------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "transpose"])
def test_folded_1x1_conv_equals_conv_then_bn(transpose, params, dtype, rng):
    bn = trained_bn(2, np.float64, rng, params)
    weight = rng.standard_normal((C_IN, C_OUT, 1, 1) if transpose else (C_OUT, C_IN, 1, 1))
    bias = rng.standard_normal(C_OUT)
    x = rng.standard_normal((4, C_IN, 6, 7))

    def conv(x, w, b):
        # A 1x1 convolution (or transposed one, stride 1) is a channel-mixing matrix product.
        pattern = "nihw,io->nohw" if transpose else "nihw,oi->nohw"
        return np.einsum(pattern, x, w[:, :, 0, 0]) + b[None, :, None, None]

    expected = bn(conv(x, weight, bias))
    folded_w, folded_b = fold_into_conv(weight, bias, bn, transpose=transpose)
    np.testing.assert_allclose(conv(x, folded_w, folded_b), expected, rtol=1e-12, atol=1e-12)

    # The same in float32, the module's default, against the float64 result.
    bn32 = BN_CLASSES[2](C_OUT, affine=bn.affine, bias=bn.has_bias, dtype=dtype)
    bn32.load_state_dict(bn.state_dict())
    bn32.eval()
    folded_w, folded_b = fold_into_conv(weight.astype(dtype), None, bn32, transpose=transpose)
    got = conv(x.astype(dtype), folded_w, folded_b)
    reference = bn32(conv(x, weight, np.zeros(C_OUT)).astype(dtype))
    atol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-12
    np.testing.assert_allclose(got, reference, rtol=atol, atol=atol)


@pytest.mark.parametrize("params", PARAMS)
def test_folded_linear_equals_linear_then_bn(params, rng):
    bn = trained_bn(1, np.float64, rng, params)
    weight = rng.standard_normal((C_OUT, C_IN))
    bias = rng.standard_normal(C_OUT)
    x = rng.standard_normal((16, C_IN))
    expected = bn(x @ weight.T + bias)
    folded_w, folded_b = fold_into_linear(weight, bias, bn)
    np.testing.assert_allclose(x @ folded_w.T + folded_b, expected, rtol=1e-12, atol=1e-12)


def test_folded_conv_equals_torch_conv_then_bn(rng):
    """A 3x3 convolution with padding, folded, equals PyTorch's conv then our batch norm."""
    bn = trained_bn(2, np.float64, rng)
    weight = rng.standard_normal((C_OUT, C_IN, 3, 3))
    bias = rng.standard_normal(C_OUT)
    x = rng.standard_normal((2, C_IN, 8, 8))

    def conv(w, b):
        tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
        return torch.nn.functional.conv2d(tx, tw, tb, padding=1).numpy()

    folded_w, folded_b = fold_into_conv(weight, bias, bn)
    np.testing.assert_allclose(
        conv(folded_w, folded_b), bn(conv(weight, bias)), rtol=1e-12, atol=1e-12
    )


# -- inputs untouched ----------------------------------------------------------------


@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "transpose"])
def test_inputs_are_not_modified(transpose, rng):
    bn = trained_bn(2, np.float32, rng)
    weight = conv_weight(rng, 2, np.float32, transpose)
    bias = rng.standard_normal(C_OUT).astype(np.float32)
    weight_before, bias_before, state_before = weight.copy(), bias.copy(), snapshot(bn)
    folded_w, folded_b = fold_into_conv(weight, bias, bn, transpose=transpose)
    assert not np.may_share_memory(folded_w, weight)
    assert not np.may_share_memory(folded_b, bias)
    np.testing.assert_array_equal(weight, weight_before)
    np.testing.assert_array_equal(bias, bias_before)
    assert_same_state(state_before, bn)

    linear_w = rng.standard_normal((C_OUT, C_IN)).astype(np.float32)
    linear_before = linear_w.copy()
    folded_w, folded_b = fold_into_linear(linear_w, bias, bn)
    assert not np.may_share_memory(folded_w, linear_w)
    np.testing.assert_array_equal(linear_w, linear_before)
    np.testing.assert_array_equal(bias, bias_before)
    assert_same_state(state_before, bn)


def test_bias_none_gives_new_arrays(rng):
    bn = trained_bn(1, np.float64, rng, "no_affine")
    state_before = snapshot(bn)
    _, folded_b = fold_into_linear(rng.standard_normal((C_OUT, C_IN)), None, bn)
    assert not np.may_share_memory(folded_b, bn.running_mean)
    folded_b[...] = 0.0
    assert_same_state(state_before, bn)


# -- errors --------------------------------------------------------------------------


def test_no_running_statistics():
    bn = numbabn.BatchNorm2d(C_OUT, track_running_stats=False)
    weight = np.ones((C_OUT, C_IN, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"track_running_stats=False.*running mean and variance"):
        fold_into_conv(weight, None, bn)
    with pytest.raises(ValueError, match="no running statistics"):
        fold_into_linear(
            weight[:, :, 0, 0], None, numbabn.BatchNorm1d(C_OUT, track_running_stats=False)
        )


def test_channel_count_mismatch():
    bn = numbabn.BatchNorm2d(4)
    with pytest.raises(ValueError, match=r"has 5 output channels .*num_features=4"):
        fold_into_conv(np.ones((5, 3, 1, 1), np.float32), None, bn)
    # A transposed convolution's output channels are on axis 1.
    with pytest.raises(ValueError, match=r"has 3 output channels .*num_features=4.*groups=1"):
        fold_into_conv(np.ones((4, 3, 1, 1), np.float32), None, bn, transpose=True)
    with pytest.raises(ValueError, match=r"has 5 output channels .*num_features=4"):
        fold_into_linear(np.ones((5, 4), np.float32), None, numbabn.BatchNorm1d(4))
    # An un-materialised lazy module has no channels yet.
    with pytest.raises(ValueError, match=r"has 4 output channels .*num_features=0"):
        fold_into_linear(np.ones((4, 4), np.float32), None, numbabn.LazyBatchNorm1d())


@pytest.mark.parametrize(
    ("bias", "match"),
    [
        (np.ones(4, np.float32), r"shape \(5,\).*got \(4,\)"),
        (np.ones((5, 1), np.float32), r"shape \(5,\).*got \(5, 1\)"),
        (np.ones(5, np.int64), "floating-point dtype, got int64"),
        ([1.0] * 5, "bias must be a NumPy array, got list"),
    ],
    ids=["short", "2d", "int", "list"],
)
def test_bad_bias(bias, match):
    with pytest.raises(ValueError, match=match):
        fold_into_conv(np.ones((5, 3, 1, 1), np.float32), bias, numbabn.BatchNorm2d(5))
    with pytest.raises(ValueError, match=match):
        fold_into_linear(np.ones((5, 3), np.float32), bias, numbabn.BatchNorm1d(5))


@pytest.mark.parametrize(
    ("weight", "match"),
    [
        (np.ones((5, 3, 1, 1), np.int32), "floating-point dtype, got int32"),
        (np.ones((5, 3, 1, 1), np.complex128), "floating-point dtype, got complex128"),
        ([[[[1.0]]]] * 5, "weight must be a NumPy array, got list"),
    ],
    ids=["int", "complex", "list"],
)
def test_bad_weight(weight, match):
    with pytest.raises(ValueError, match=match):
        fold_into_conv(weight, None, numbabn.BatchNorm2d(5))
    with pytest.raises(ValueError, match=match):
        fold_into_linear(weight, None, numbabn.BatchNorm1d(5))


def test_weight_rank():
    with pytest.raises(ValueError, match=r"at least 3 axes; got shape \(5, 3\)"):
        fold_into_conv(np.ones((5, 3), np.float32), None, numbabn.BatchNorm1d(5))
    with pytest.raises(ValueError, match=r"shape \(out, in\), got shape \(5, 3, 1\)"):
        fold_into_linear(np.ones((5, 3, 1), np.float32), None, numbabn.BatchNorm1d(5))


def test_exported():
    assert numbabn.fold_into_conv is fold_into_conv
    assert {"fold_into_conv", "fold_into_linear"} <= set(numbabn.__all__)


def test_a_fused_activation_does_not_fold():
    bn = numbabn.BatchNorm2d(4, activation="relu").eval()
    with pytest.raises(ValueError, match="activation='relu'"):
        numbabn.fold_into_conv(np.ones((4, 2, 3, 3), np.float32), None, bn)
