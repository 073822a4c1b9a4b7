"""Per-call plans: checks made once per signature, results the bits of the full path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numbabn as nbn
from numbabn import functional
from numbabn import modules as nbn_modules
from numbabn._layouts import make_layout


def _module(ndim: int, channels: int, dtype: type, **options: object) -> nbn.modules._BatchNorm:
    kind = {2: nbn.BatchNorm1d, 3: nbn.BatchNorm1d, 4: nbn.BatchNorm2d, 5: nbn.BatchNorm3d}[ndim]
    module = kind(channels, dtype=dtype, **options)
    rng = np.random.default_rng(channels)
    if module.weight is not None:
        module.weight[...] = rng.uniform(0.5, 2.0, channels)
        module.bias[...] = rng.uniform(-1.0, 1.0, channels)
    return module


# Small (one compiled call), several tiles, and threaded (the fused passes) shapes.
_SHAPES = st.sampled_from(
    [(2, 3), (64, 32), (5, 7, 11), (2, 16, 8, 8), (300, 400), (4, 3, 131, 131)]
)


@settings(max_examples=8, deadline=None)
@given(
    shape=_SHAPES,
    dtype=st.sampled_from([np.float32, np.float64]),
    layout=st.sampled_from(["contiguous", "channels_last", "batch_slice", "negative"]),
    momentum=st.sampled_from([0.1, None, -0.5]),
    affine=st.booleans(),
    track=st.booleans(),
)
def test_planned_forward_is_the_full_path(shape, dtype, layout, momentum, affine, track):
    """Module forwards without out= (planned) give the bits of forwards with out= (checked
    in full every time): outputs, saved statistics, running statistics, over train and eval."""
    if layout == "channels_last" and len(shape) < 3:
        layout = "contiguous"
    rng = np.random.default_rng(len(shape))
    options = {"momentum": momentum, "affine": affine, "track_running_stats": track}
    planned = _module(len(shape), shape[1], dtype, **options)
    checked = _module(len(shape), shape[1], dtype, **options)
    for step in range(4):
        if step == 3:
            planned.eval()
            checked.eval()
        x = make_layout(lambda s: (rng.standard_normal(s) * 3 + 1).astype(dtype), shape, layout)
        y = planned(x)
        out = np.empty_like(y)
        checked(x, out=out)
        np.testing.assert_array_equal(y, out)
        for name in ("running_mean", "running_var"):
            a, b = getattr(planned, name), getattr(checked, name)
            if a is not None:
                np.testing.assert_array_equal(a, b)
        assert planned._saved is not None and checked._saved is not None
        np.testing.assert_array_equal(planned._saved.stats.mean, checked._saved.stats.mean)
        np.testing.assert_array_equal(planned._saved.stats.invstd, checked._saved.stats.invstd)
        dy = make_layout(lambda s: rng.standard_normal(s).astype(dtype), shape, layout)
        dx, checked_dx = planned.backward(dy), np.empty_like(y)
        checked.backward(dy, out=checked_dx)  # out=: checked in full
        np.testing.assert_array_equal(dx, checked_dx)
        for name in ("weight", "bias"):
            if planned.grads.get(name) is not None:
                np.testing.assert_array_equal(planned.grads[name], checked.grads[name])
    # The functional API's planned backward, against its checked one.
    saved = functional.SavedStats(planned._saved.stats.mean, planned._saved.stats.invstd, True)
    weight = planned.weight
    grads = nbn.functional.batch_norm_backward(dy, x, saved, weight)
    checked_dx = np.empty_like(x)
    checked_grads = nbn.functional.batch_norm_backward(dy, x, saved, weight, out=checked_dx)
    np.testing.assert_array_equal(grads[0], checked_dx)
    for ours, theirs in zip(grads[1:], checked_grads[1:], strict=True):
        if ours is not None:
            np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "negative"])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_threaded_forward_is_planned_with_the_full_paths_bits(training, layout, threads):
    """A forward too large for one thread runs planned, on the threads, in one compiled call:
    the bits of the checked path with out= (output, saved and running statistics), whatever
    the thread count."""
    numba = pytest.importorskip("numba")
    rng = np.random.default_rng(3)
    shape = (4, 3, 131, 131)  # above the threads' threshold, rows of uneven tiles
    planned, checked = (_module(4, 3, np.float32, momentum=None) for _ in range(2))
    for module in (planned, checked):
        module.running_mean[...] = np.linspace(-1.0, 1.0, 3)
        module.running_var[...] = np.linspace(0.5, 2.0, 3)
        module.train(training)
    x = make_layout(lambda s: (rng.standard_normal(s) * 3 + 1).astype(np.float32), shape, layout)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for _ in range(2):
            y = planned(x)
            out = np.empty_like(x)
            checked(x, out=out)
            np.testing.assert_array_equal(y, out)
    finally:
        numba.set_num_threads(before)
    assert planned._plan is not None and planned._plan[1].runner is not None
    for name in ("running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(planned, name), getattr(checked, name))
    assert planned._saved is not None and checked._saved is not None
    np.testing.assert_array_equal(planned._saved.stats.mean, checked._saved.stats.mean)
    np.testing.assert_array_equal(planned._saved.stats.invstd, checked._saved.stats.invstd)


def _counting(monkeypatch, name: str) -> list[int]:
    """Count the calls of ``functional.<name>``, the full checks (modules and the functional
    API alike)."""
    counted: list[int] = []
    prepare = getattr(functional, name)

    def counting(*args, **kwargs):
        counted.append(1)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(functional, name, counting)
    monkeypatch.setattr(nbn_modules, name, counting)
    return counted


@pytest.fixture
def checks(monkeypatch):
    return _counting(monkeypatch, "prepare_forward")


@pytest.fixture
def backward_checks(monkeypatch):
    return _counting(monkeypatch, "prepare_backward")


def test_backwards_are_checked_once_per_signature(backward_checks):
    bn = nbn.BatchNorm1d(3)
    x = np.random.default_rng(4).standard_normal((8, 3)).astype(np.float32)
    for _ in range(3):
        bn(x)
        bn.backward(np.ones_like(x))
    assert len(backward_checks) == 1
    bn.weight = np.full(3, 2.0, np.float32)  # another weight array: checked again
    bn(x)
    bn.backward(np.ones_like(x))
    assert len(backward_checks) == 2
    saved = functional.SavedStats(np.zeros(3), np.ones(3), True)
    for _ in range(3):
        nbn.functional.batch_norm_backward(np.ones_like(x), x, saved)
    assert len(backward_checks) == 3
    with pytest.raises(ValueError, match="grad_output"):  # rechecked for another shape
        bn.backward(np.ones((8, 4), np.float32))


def test_a_module_checks_each_signature_once(checks):
    bn = nbn.BatchNorm2d(4)
    x = np.ones((2, 4, 3, 3), np.float32)
    for _ in range(3):
        bn(x + np.arange(4, dtype=np.float32)[:, None, None])
    assert len(checks) == 1
    bn(np.ones((3, 4, 3, 3), np.float32))  # another shape
    bn(np.ones((3, 4, 3, 3), np.float32).transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2))
    bn.eval()
    bn(x)
    bn(x)
    assert len(checks) == 4


@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (4, 3, 131, 131)], ids=["small", "threaded"])
def test_a_forward_into_out_is_planned_with_the_full_paths_bits(checks, shape):
    """out= is part of a module's signature (its shape, strides, dtype and writability):
    calls into out arrays of one signature are checked once, give the bits of the plain
    forward, and note on every call whether out overlaps the input (an in-place forward
    leaves backward nothing to differentiate)."""
    rng = np.random.default_rng(5)
    into, plain = _module(4, shape[1], np.float32), _module(4, shape[1], np.float32)
    for _ in range(3):
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        out = np.empty_like(x)
        assert into(x, out=out) is out
        np.testing.assert_array_equal(out, plain(x))
        assert into._saved is not None and into._saved.overwritten == ()
        dy = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(into.backward(dy), plain.backward(dy))
    np.testing.assert_array_equal(into.running_var, plain.running_var)
    assert len(checks) == 2  # one a module
    x = rng.standard_normal(shape).astype(np.float32)
    expected = plain(x.copy())
    assert into(x, out=x) is x  # in place: out has the same signature as before
    np.testing.assert_array_equal(x, expected)
    assert into._saved.overwritten == ("input",)
    with pytest.raises(RuntimeError, match="out= wrote the output over"):
        into.backward(np.ones_like(x))
    out = np.empty(shape, np.float32)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):  # another signature: checked again
        into(x, out=out)
    assert len(checks) == 3


def test_functional_checks_each_signature_once(checks):
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    mean, var = np.zeros(3, np.float32), np.ones(3, np.float32)
    for _ in range(3):
        nbn.functional.batch_norm(x, mean, var, training=True)
    assert len(checks) == 1
    nbn.functional.batch_norm(x, mean.copy(), var, training=True)  # another array
    nbn.functional.batch_norm(x, mean, var, training=False)
    nbn.functional.batch_norm(x, mean, var, training=False)
    assert len(checks) == 3


@pytest.mark.parametrize(
    ("change", "error", "text"),
    [
        (lambda bn: setattr(bn, "weight", np.ones(5, np.float32)), RuntimeError, "weight"),
        (lambda bn: setattr(bn, "eps", 0.0), ValueError, "eps must be positive"),
        (lambda bn: setattr(bn, "momentum", "0.1"), TypeError, "momentum"),
        (lambda bn: setattr(bn.running_mean.flags, "writeable", False), ValueError, "read-only"),
        (lambda bn: setattr(bn, "running_var", bn.running_var.astype(np.float64)), RuntimeError,
         "expected"),
    ],
)  # fmt: skip
def test_a_changed_module_is_checked_again(change, error, text):
    """What a plan took as checked is rechecked once it changes; the failed call changes
    nothing."""
    bn = nbn.BatchNorm2d(4)
    x = np.random.default_rng(1).standard_normal((2, 4, 3, 3)).astype(np.float32)
    bn(x)
    change(bn)
    state = {name: np.copy(value) for name, value in bn.state_dict().items()}
    with pytest.raises(error, match=text):
        bn(x)
    for name, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, state[name])


def test_functional_arguments_that_change_are_checked_again():
    x = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    mean, var = np.zeros(3, np.float32), np.ones(3, np.float32)
    nbn.functional.batch_norm(x, mean, var, training=True)
    before = mean.copy()
    with pytest.raises(TypeError, match="argument 'training'"):
        nbn.functional.batch_norm(x, mean, var, training=1)
    with pytest.raises(ValueError, match="eps must be positive"):
        nbn.functional.batch_norm(x, mean, var, training=True, eps=0.0)
    mean.flags.writeable = False
    with pytest.raises(ValueError, match="running_mean is read-only"):
        nbn.functional.batch_norm(x, mean, var, training=True)
    np.testing.assert_array_equal(mean, before)
    # NaN eps never equals itself: such calls are checked every time, and no plan piles up.
    for _ in range(2 * functional.PLANS_KEPT):
        nbn.functional.batch_norm(x, None, None, training=True, eps=float("nan"))
    assert len(functional._PLANS) <= functional.PLANS_KEPT


def test_a_plan_holds_the_arrays_whose_identities_it_checked():
    """A plan keyed by an array's identity keeps the array alive, so that no other array
    can take that identity while the plan lives."""
    x = np.random.default_rng(3).standard_normal((4, 3)).astype(np.float32)
    weight = np.ones(3, np.float32)
    nbn.functional.batch_norm(x, None, None, weight, training=True)
    plans = [plan for plan in functional._PLANS.values() if any(a is weight for a in plan.held)]
    assert plans


def test_sync_batchnorm_checks_each_signature_once(checks, backward_checks):
    """SyncBatchNorm's exchanged calls are planned as the others: checked once per
    signature, with the exchange between their phases, and the bits of BatchNorm2d's."""
    mpi = pytest.importorskip("mpi4py.MPI")
    synced = nbn.SyncBatchNorm(4, comm=mpi.COMM_SELF)
    plain = nbn.BatchNorm2d(4)
    x = np.random.default_rng(5).standard_normal((2, 4, 3, 3)).astype(np.float32)
    dy = np.random.default_rng(6).standard_normal(x.shape).astype(np.float32)
    for _ in range(3):
        np.testing.assert_array_equal(synced(x), plain(x))
        np.testing.assert_array_equal(synced.backward(dy), plain.backward(dy))
    assert (len(checks), len(backward_checks)) == (2, 2)  # one of each per module
    for name, value in plain.state_dict().items():
        np.testing.assert_array_equal(synced.state_dict()[name], value)
    np.testing.assert_array_equal(synced.grads["weight"], plain.grads["weight"])
    synced.eval()  # eval exchanges nothing: another signature, checked again (both modules)
    np.testing.assert_array_equal(synced(x), plain.eval()(x))
    assert len(checks) == 4
    synced.train()
    with pytest.raises(RuntimeError, match="should contain 5 elements"):  # checked again
        synced(np.ones((2, 5, 3, 3), np.float32))


@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (4, 3, 131, 131)], ids=["small", "threaded"])
def test_functional_forward_into_out_is_planned_with_the_full_paths_bits(checks, shape):
    """The functional API plans calls with out= as the modules do: out's signature (kind,
    shape, strides, dtype, writability) joins the call's; its identity does not."""
    rng = np.random.default_rng(7)
    mean, var = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
    plain_mean, plain_var = mean.copy(), var.copy()
    for _ in range(3):
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        out = np.empty_like(x)
        got = nbn.functional.batch_norm(x, mean, var, training=True, momentum=0.3, out=out)
        assert got is out
        want = nbn.functional.batch_norm(x, plain_mean, plain_var, training=True, momentum=0.3)
        np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(mean, plain_mean)
    np.testing.assert_array_equal(var, plain_var)
    assert len(checks) == 2  # one into out=, one without
    expected = nbn.functional.batch_norm(x.copy(), plain_mean, plain_var, training=True)
    nbn.functional.batch_norm(x, mean, var, training=True, out=x)  # in place: same signature
    np.testing.assert_array_equal(x, expected)
    out = np.empty(shape, np.float32)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):  # another signature: checked again
        nbn.functional.batch_norm(x, mean, var, training=True, out=out)
    with pytest.raises(ValueError, match="out"):  # another shape: checked again
        nbn.functional.batch_norm(
            x, mean, var, training=True, out=np.empty((1, *shape[1:]), np.float32)
        )
    assert len(checks) == 4


def test_functional_backward_into_out_is_planned_with_the_full_paths_bits(backward_checks):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    weight = np.full(3, 1.5, np.float32)
    _, saved = nbn.functional.batch_norm_forward(x, None, None, weight, training=True)
    for _ in range(3):
        dy = rng.standard_normal(x.shape).astype(np.float32)
        out = np.empty_like(x)
        got = nbn.functional.batch_norm_backward(dy, x, saved, weight, out=out)
        want = nbn.functional.batch_norm_backward(dy, x, saved, weight)
        assert got[0] is out
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    assert len(backward_checks) == 2  # one into out=, one without
    out = np.empty_like(x)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):  # another signature: checked again
        nbn.functional.batch_norm_backward(dy, x, saved, weight, out=out)
    assert len(backward_checks) == 3
