"""Every error has PyTorch's text (where PyTorch has one) and leaves no trace in the state."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import assert_same_state, make_input, snapshot

import numbabn
from numbabn import functional as F

EAGER = {1: numbabn.BatchNorm1d, 2: numbabn.BatchNorm2d, 3: numbabn.BatchNorm3d}
LAZY = {1: numbabn.LazyBatchNorm1d, 2: numbabn.LazyBatchNorm2d, 3: numbabn.LazyBatchNorm3d}
GOOD_SHAPE = {1: (4, 3, 5), 2: (4, 3, 2, 2), 3: (2, 3, 2, 2, 2)}


def trained(dim: int, rng, **kwargs):
    """An eager module with non-default state everywhere: stats, counter, params, grads."""
    module = EAGER[dim](3, **kwargs)
    shape = GOOD_SHAPE[dim]
    dtype = module.dtype
    if module.weight is not None:
        module.weight[...] = [0.5, 1.5, 2.0]
    if module.bias is not None:
        module.bias[...] = [0.1, -0.2, 0.3]
    for _ in range(2):
        module(make_input(rng, shape, dtype=dtype, loc=1.0))
        module.backward(rng.standard_normal(shape).astype(dtype))
    return module


def module_variants(dim: int, rng):
    """(id, module) pairs: trained train/eval modules, no affine, no tracking, lazy."""
    return [
        ("train", trained(dim, rng)),
        ("eval", trained(dim, rng).eval()),
        ("no_affine", trained(dim, rng, affine=False)),
        ("no_track", trained(dim, rng, track_running_stats=False)),
        ("lazy", LAZY[dim]()),
        ("lazy_eval", LAZY[dim]().eval()),
    ]


def expect_error(module, exc, match, call):
    """``call()`` raises ``exc`` matching ``match``; the module is exactly as it was."""
    before = snapshot(module)
    with pytest.raises(exc, match=match):
        call()
    assert_same_state(before, module)


def _lazy_stays_lazy(module, lazy_class):
    assert type(module) is lazy_class
    assert module.num_features == 0
    if module.weight is not None:
        assert module.weight.shape == (0,)


# -- wrong number of dimensions ---------------------------------------------------


@pytest.mark.parametrize(
    ("dim", "shape", "message"),
    [
        (1, (2, 3, 4, 5), "expected 2D or 3D input (got 4D input)"),
        (1, (6,), "expected 2D or 3D input (got 1D input)"),
        (1, (2, 3, 4, 5, 6), "expected 2D or 3D input (got 5D input)"),
        (2, (4, 3, 5), "expected 4D input (got 3D input)"),
        (2, (4, 3), "expected 4D input (got 2D input)"),
        (2, (2, 3, 2, 2, 2), "expected 4D input (got 5D input)"),
        (3, (4, 3, 5, 5), "expected 5D input (got 4D input)"),
        (3, (4, 3), "expected 5D input (got 2D input)"),
    ],
)
def test_wrong_ndim(dim, shape, message, rng):
    x = np.ones(shape, np.float32)
    for name, module in module_variants(dim, rng):
        expect_error(module, ValueError, re.escape(message), lambda m=module: m(x))
        if name.startswith("lazy"):
            _lazy_stays_lazy(module, LAZY[dim])


def test_wrong_ndim_matches_torch():
    torch = pytest.importorskip("torch")
    for ours, theirs, shape in [
        (numbabn.BatchNorm2d(3), torch.nn.BatchNorm2d(3), (4, 3, 5)),
        (numbabn.BatchNorm1d(3), torch.nn.BatchNorm1d(3), (2, 3, 4, 5)),
        (numbabn.BatchNorm3d(3), torch.nn.BatchNorm3d(3), (2, 3, 4, 5)),
    ]:
        with pytest.raises(ValueError) as theirs_error:
            theirs(torch.ones(shape))
        with pytest.raises(ValueError) as ours_error:
            ours(np.ones(shape, np.float32))
        assert str(ours_error.value) == str(theirs_error.value)


# -- channel count ------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_channel_mismatch(dim, training, rng):
    module = trained(dim, rng).train(training)
    shape = (4, 4, *GOOD_SHAPE[dim][2:])
    x = np.ones(shape, np.float32)
    expect_error(
        module, RuntimeError, re.escape("running_mean should contain 4 elements not 3"),
        lambda: module(x),
    )  # fmt: skip


def test_channel_mismatch_without_running_stats(rng):
    module = trained(2, rng, track_running_stats=False)
    x = np.ones((4, 4, 2, 2), np.float32)
    expect_error(
        module, RuntimeError, re.escape("weight should contain 4 elements not 3"), lambda: module(x)
    )


def test_channel_mismatch_functional(rng):
    x = make_input(rng, (4, 3, 5))
    rm, rv = np.zeros(4), np.ones(4)
    with pytest.raises(
        RuntimeError, match=re.escape("running_mean should contain 3 elements not 4")
    ):
        F.batch_norm(x, rm, rv, training=True)
    assert np.all(rm == 0) and np.all(rv == 1)
    with pytest.raises(RuntimeError, match=re.escape("bias should contain 3 elements not 2")):
        F.batch_norm(x, np.zeros(3), np.ones(3), np.ones(3), np.zeros(2))
    # As in PyTorch, the count is of elements: a (3, 1) weight is a weight of 3.
    F.batch_norm(x, np.zeros(3), np.ones(3), np.ones((3, 1)))


# -- one value per channel ------------------------------------------------------------


@pytest.mark.parametrize(
    ("dim", "shape"),
    [(2, (1, 512, 1, 1)), (1, (1, 512)), (1, (1, 512, 1)), (3, (1, 512, 1, 1, 1))],
    ids=str,
)
def test_one_value_per_channel(dim, shape, rng):
    message = f"Expected more than 1 value per channel when training, got input size {shape}"
    x = np.ones(shape, np.float32)
    lazy = LAZY[dim]()
    for module in (EAGER[dim](512), EAGER[dim](512, track_running_stats=False).eval(), lazy):
        expect_error(module, ValueError, re.escape(message), lambda m=module: m(x))
    _lazy_stays_lazy(lazy, LAZY[dim])
    # Evaluation with running statistics accepts a single value.
    module = EAGER[dim](512).eval()
    assert module(x).shape == shape


def test_one_value_per_channel_functional():
    x = np.ones((1, 3), np.float64)
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match=re.escape("got input size (1, 3)")):
        F.batch_norm(x, rm, rv, training=True)
    assert np.all(rm == 0) and np.all(rv == 1)


# -- backward -----------------------------------------------------------------------


@pytest.mark.parametrize("lazy", [False, True])
def test_backward_before_forward(lazy):
    module = numbabn.LazyBatchNorm2d() if lazy else numbabn.BatchNorm2d(3)
    expect_error(
        module, RuntimeError, "backward called before forward",
        lambda: module.backward(np.ones((2, 3, 2, 2), np.float32)),
    )  # fmt: skip


def test_backward_after_failed_forward_uses_last_good_forward(rng):
    """A failed forward does not replace the input that backward differentiates."""
    module = numbabn.BatchNorm2d(3, dtype=np.float64)
    x = make_input(rng, (4, 3, 2, 2))
    dy = rng.standard_normal(x.shape)
    module(x)
    expected = module.backward(dy)
    module.zero_grad()
    with pytest.raises(ValueError):
        module(np.ones((1, 3, 1, 1)))
    with pytest.raises(RuntimeError):
        module(np.ones((4, 5, 2, 2)))
    np.testing.assert_array_equal(module.backward(dy), expected)


@pytest.mark.parametrize(
    ("dy_shape", "dy_dtype", "exc", "match"),
    [
        ((4, 3, 2, 3), np.float32, ValueError, r"grad_output has shape \(4, 3, 2, 3\)"),
        ((4, 3, 2), np.float32, ValueError, "grad_output has shape"),
        ((4, 3, 2, 2), np.float64, TypeError, "grad_output has dtype float64"),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_grad_output_mismatch(dy_shape, dy_dtype, exc, match, training, rng):
    module = trained(2, rng).train(training)
    x = make_input(rng, (4, 3, 2, 2), dtype=np.float32)
    module(x)
    dy = np.ones(dy_shape, dy_dtype)
    expect_error(module, exc, match, lambda: module.backward(dy))
    # The module still works with a good gradient afterwards.
    module.backward(np.ones(x.shape, np.float32))


def test_grad_output_not_an_array(rng):
    module = trained(1, rng)
    module(make_input(rng, (4, 3), dtype=np.float32))
    expect_error(
        module, TypeError, "expected a NumPy array", lambda: module.backward([[1.0] * 3] * 4)
    )


def test_backward_functional_errors(rng):
    x = make_input(rng, (4, 3, 5))
    _, saved = F.batch_norm_forward(x, None, None, training=True)
    with pytest.raises(ValueError, match="grad_output has shape"):
        F.batch_norm_backward(np.ones((4, 3)), x, saved)
    with pytest.raises(TypeError, match="grad_output has dtype float32"):
        F.batch_norm_backward(np.ones(x.shape, np.float32), x, saved)
    with pytest.raises(ValueError, match="saved statistics are for 3 channels"):
        F.batch_norm_backward(np.ones((4, 2, 5)), np.ones((4, 2, 5)), saved)


# -- state_dict ------------------------------------------------------------------------


def _state(n=3, dtype=np.float32):
    return {
        "weight": np.full(n, 2.0, dtype),
        "bias": np.full(n, 0.5, dtype),
        "running_mean": np.full(n, 0.25, dtype),
        "running_var": np.full(n, 4.0, dtype),
        "num_batches_tracked": np.array(5, np.int64),
    }


@pytest.mark.parametrize("lazy", [False, True])
def test_load_state_dict_missing_key(lazy, rng):
    module = numbabn.LazyBatchNorm2d() if lazy else trained(2, rng)
    state = _state()
    del state["running_var"]
    expect_error(
        module, RuntimeError,
        r'Error\(s\) in loading state_dict for .*BatchNorm2d:\n\tMissing key\(s\) in state_dict: '
        r'"running_var"\.',
        lambda: module.load_state_dict(state),
    )  # fmt: skip
    if lazy:
        _lazy_stays_lazy(module, numbabn.LazyBatchNorm2d)


@pytest.mark.parametrize("lazy", [False, True])
def test_load_state_dict_unexpected_key(lazy, rng):
    module = numbabn.LazyBatchNorm2d() if lazy else trained(2, rng)
    state = _state()
    state["running_std"] = np.ones(3, np.float32)
    expect_error(
        module, RuntimeError, r'Unexpected key\(s\) in state_dict: "running_std"\.',
        lambda: module.load_state_dict(state),
    )  # fmt: skip
    if lazy:
        _lazy_stays_lazy(module, numbabn.LazyBatchNorm2d)


def test_load_state_dict_non_strict(rng):
    module = trained(2, rng)
    state = _state()
    del state["bias"]
    state["extra"] = np.ones(1)
    result = module.load_state_dict(state, strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(module.weight, 2.0)
    assert int(module.num_batches_tracked) == 5


@pytest.mark.parametrize("key", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("lazy", [False, True])
def test_load_state_dict_wrong_shape(key, lazy, rng):
    module = numbabn.LazyBatchNorm2d() if lazy else trained(2, rng)
    state = _state()
    state[key] = np.ones(4, np.float32)
    if lazy and key == "running_mean":
        # The lazy module sizes itself from running_mean, so the others are wrong.
        message = "size mismatch for weight: copying a param with shape (3,)"
    else:
        message = (
            f"size mismatch for {key}: copying a param with shape (4,) from checkpoint, "
            "the shape in current model is (3,)."
        )
    expect_error(module, RuntimeError, re.escape(message), lambda: module.load_state_dict(state))
    if lazy:
        _lazy_stays_lazy(module, numbabn.LazyBatchNorm2d)


def test_load_state_dict_wrong_counter_shape(rng):
    module = trained(1, rng)
    state = _state()
    state["num_batches_tracked"] = np.array([5])
    expect_error(
        module, RuntimeError, re.escape("size mismatch for num_batches_tracked"),
        lambda: module.load_state_dict(state),
    )  # fmt: skip


def test_load_state_dict_several_errors_changes_nothing(rng):
    """One bad entry among good ones: the good ones are not loaded either."""
    module = trained(2, rng)
    state = _state()
    state["running_var"] = np.ones(2, np.float32)
    expect_error(module, RuntimeError, "size mismatch", lambda: module.load_state_dict(state))


def test_load_state_dict_message_matches_torch():
    torch = pytest.importorskip("torch")
    theirs = torch.nn.BatchNorm2d(3)
    ours = numbabn.BatchNorm2d(3)
    state = {k: torch.from_numpy(v) for k, v in _state().items()}
    state["foo"] = torch.ones(1)
    del state["bias"]
    with pytest.raises(RuntimeError) as theirs_error:
        theirs.load_state_dict(state)
    with pytest.raises(RuntimeError) as ours_error:
        ours.load_state_dict({k: v.numpy() for k, v in state.items()})
    assert str(ours_error.value) == str(theirs_error.value)


# -- dtypes and non-arrays ----------------------------------------------------------


# PyTorch's NotImplementedError with its names of the dtypes; float16 is numbabn's own refusal.
UNSUPPORTED = [
    (np.int64, NotImplementedError, "\"batch_norm\" not implemented for 'Long'"),
    (np.int32, NotImplementedError, "\"batch_norm\" not implemented for 'Int'"),
    (np.complex128, NotImplementedError, "\"batch_norm\" not implemented for 'ComplexDouble'"),
    (np.complex64, NotImplementedError, "\"batch_norm\" not implemented for 'ComplexFloat'"),
    (bool, NotImplementedError, "\"batch_norm\" not implemented for 'Bool'"),
]


@pytest.mark.parametrize(("dtype", "exc", "message"), UNSUPPORTED)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_unsupported_dtype(dim, dtype, exc, message, rng):
    x = np.ones(GOOD_SHAPE[dim], dtype)
    for variant, module in module_variants(dim, rng):
        expect_error(module, exc, re.escape(message), lambda m=module: m(x))
        if variant.startswith("lazy"):
            _lazy_stays_lazy(module, LAZY[dim])


@pytest.mark.parametrize(("dtype", "exc", "message"), UNSUPPORTED)
def test_unsupported_dtype_functional(dtype, exc, message):
    x = np.ones((4, 3), dtype)
    with pytest.raises(exc, match=re.escape(message)):
        F.batch_norm(x, None, None, training=True)


def test_dtype_mismatch_with_state(rng):
    module = trained(2, rng)  # float32 state
    x = make_input(rng, (4, 3, 2, 2))  # float64 input
    message = "mixed dtype (CPU): all inputs must share same datatype."
    expect_error(module, RuntimeError, re.escape(message), lambda: module(x))


@pytest.mark.parametrize(
    "value",
    [[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], 3.0, None, "abc"],
    ids=["list", "float", "None", "str"],
)
@pytest.mark.parametrize("dim", [1, 2])
def test_not_an_array(dim, value, rng):
    for _name, module in module_variants(dim, rng):
        expect_error(module, TypeError, "NumPy array", lambda m=module: m(value))


def test_torch_tensor_that_requires_grad_is_rejected(rng):
    torch = pytest.importorskip("torch")
    module = trained(1, rng)
    tensor = torch.ones(4, 3, requires_grad=True)
    expect_error(module, TypeError, r"pass tensor\.detach\(\)", lambda: module(tensor))


def test_functional_not_an_array():
    with pytest.raises(
        TypeError, match="input: expected a NumPy array, another CPU array .* got builtins.list"
    ):
        F.batch_norm([[1.0, 2.0], [3.0, 4.0]], None, None, training=True)
    with pytest.raises(TypeError, match="running_mean"):
        F.batch_norm(np.ones((2, 2)), [0.0, 0.0], np.ones(2))


# -- out= ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("out_shape", "out_dtype", "exc", "match"),
    [
        ((4, 3, 2, 3), np.float32, ValueError, "out has shape"),
        ((4, 3, 2, 2), np.float64, TypeError, "out has dtype float64"),
    ],
)
@pytest.mark.parametrize("variant", ["train", "eval", "lazy"])
def test_bad_out(variant, out_shape, out_dtype, exc, match, rng):
    module = dict(module_variants(2, rng))[variant]
    x = make_input(rng, (4, 3, 2, 2), dtype=np.float32)
    out = np.zeros(out_shape, out_dtype)
    expect_error(module, exc, match, lambda: module(x, out=out))
    assert np.all(out == 0)


def test_read_only_out(rng):
    module = trained(2, rng)
    x = make_input(rng, (4, 3, 2, 2), dtype=np.float32)
    out = np.zeros_like(x)
    out.flags.writeable = False
    expect_error(module, ValueError, "read-only", lambda: module(x, out=out))


@pytest.mark.parametrize("frozen", ["running_mean", "running_var"])
def test_read_only_running_statistics_in_training(frozen, rng):
    """Training updates the running statistics in place: read-only ones are refused first."""
    x = make_input(rng, (4, 3, 2, 2), dtype=np.float64)
    running = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
    running[frozen].flags.writeable = False
    before = {name: array.copy() for name, array in running.items()}
    with pytest.raises(ValueError, match=f"{frozen} is read-only: training updates it in place"):
        F.batch_norm(x, running["running_mean"], running["running_var"], training=True)
    for name, array in running.items():
        np.testing.assert_array_equal(array, before[name])
    # Evaluation only reads them.
    F.batch_norm(x, running["running_mean"], running["running_var"], training=False)


@pytest.mark.parametrize("variant", ["train", "no_affine", "lazy"])
def test_backward_after_out_overwrote_the_input(variant, rng):
    module = dict(module_variants(2, rng))[variant]
    x = make_input(rng, (4, 3, 2, 2), dtype=np.float32)
    module(x, out=x)
    expect_error(module, RuntimeError, "out=", lambda: module.backward(np.ones_like(x)))


def test_backward_bad_out(rng):
    module = trained(2, rng)
    x = make_input(rng, (4, 3, 2, 2), dtype=np.float32)
    module(x)
    dy = np.ones_like(x)
    expect_error(module, ValueError, "out has shape", lambda: module.backward(dy, out=np.ones(3)))


def test_eval_without_running_stats_functional(rng):
    x = make_input(rng, (4, 3))
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        F.batch_norm(x, None, None, training=False)


# -- constructor -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"dtype": np.int32}, TypeError, "int32"),
        ({"dtype": np.complex64}, TypeError, "complex64"),
        ({"device": "tpu"}, ValueError, "tpu"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        numbabn.BatchNorm2d(3, **kwargs)
    with pytest.raises(exc, match=match):
        numbabn.LazyBatchNorm2d(**kwargs)


@pytest.mark.parametrize(
    ("num_features", "exc", "message"),
    [
        (-1, RuntimeError, "Trying to create tensor with negative dimension -1: [-1]"),
        (2.5, TypeError, "empty(): argument 'size' (position 1) must be tuple of ints, not float"),
    ],
)
def test_bad_num_features(num_features, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        numbabn.BatchNorm1d(num_features)


def test_load_state_dict_with_a_value_that_cannot_be_converted_changes_nothing(rng):
    module = numbabn.BatchNorm1d(3)
    module(make_input(rng, (4, 3), "contiguous", np.float32))
    before = snapshot(module)
    state = module.state_dict()
    state["weight"] = np.full(3, 2.0, np.float32)  # loaded before running_var, if loaded at all
    state["running_var"] = np.array(["a", "b", "c"])
    with pytest.raises(ValueError):
        module.load_state_dict(state)
    assert_same_state(before, module)


@pytest.mark.parametrize("track", [True, False])
def test_resets_of_a_lazy_module_before_its_first_input_are_pytorchs(track):
    """reset_running_stats raises (PyTorch's statistics do not exist yet); reset_parameters
    does nothing. Found by the generated call sequences."""
    torch = pytest.importorskip("torch")
    ours = numbabn.LazyBatchNorm2d(track_running_stats=track)
    theirs = torch.nn.LazyBatchNorm2d(track_running_stats=track)
    theirs.reset_parameters()
    ours.reset_parameters()
    before = snapshot(ours)
    if track:
        with pytest.raises(ValueError, match="Attempted to use an uninitialized parameter"):
            theirs.reset_running_stats()
        with pytest.raises(ValueError, match="Attempted to use an uninitialized parameter"):
            ours.reset_running_stats()
    else:
        theirs.reset_running_stats()
        ours.reset_running_stats()
    assert_same_state(before, ours)
    assert ours.num_features == 0
