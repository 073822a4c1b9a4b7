"""numbabn modules and functions against PyTorch, the oracle of the semantics."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import from_torch, make_input, random_vector, to_torch

import numbabn
from numbabn import functional as F

torch = pytest.importorskip("torch")

CLASSES = {
    1: (numbabn.BatchNorm1d, torch.nn.BatchNorm1d),
    2: (numbabn.BatchNorm2d, torch.nn.BatchNorm2d),
    3: (numbabn.BatchNorm3d, torch.nn.BatchNorm3d),
}
LAZY_CLASSES = {
    1: (numbabn.LazyBatchNorm1d, torch.nn.LazyBatchNorm1d),
    2: (numbabn.LazyBatchNorm2d, torch.nn.LazyBatchNorm2d),
    3: (numbabn.LazyBatchNorm3d, torch.nn.LazyBatchNorm3d),
}
# (id, dimensionality of the module, input shape)
CASES = [
    ("1d-NC", 1, (6, 4)),
    ("1d-NCL", 1, (5, 4, 7)),
    ("2d", 2, (3, 4, 5, 6)),
    ("3d", 3, (2, 4, 3, 4, 5)),
]
CASE_IDS = [case[0] for case in CASES]
# (affine, bias) combinations: full affine, weight only, none.
PARAMS = {"affine": (True, True), "no_bias": (True, False), "no_affine": (False, True)}
DTYPES = [np.float32, np.float64]
# Tolerances of results in each dtype; the half types' allow PyTorch's rounding and ours
# to differ by a unit in the last place or two.
TOLERANCES = {"float32": 1e-5, "float64": 1e-10, "bfloat16": 2e-2, "float16": 3e-3}


def tol(dtype) -> dict:
    return {"rtol": TOLERANCES[np.dtype(dtype).name], "atol": TOLERANCES[np.dtype(dtype).name]}


def torch_dtype(dtype):
    """PyTorch's dtype of the same name: float32, float64, bfloat16 or float16."""
    return getattr(torch, np.dtype(dtype).name)


def close(ours, theirs, dtype, what=""):
    """Compare a numbabn array with a torch tensor (or None with None)."""
    if theirs is None:
        assert ours is None, what
        return
    assert ours is not None, what
    theirs = from_torch(theirs.detach())
    assert ours.shape == theirs.shape, what
    assert ours.dtype == theirs.dtype, what
    np.testing.assert_allclose(
        ours.astype(np.float64), theirs.astype(np.float64), err_msg=what, **tol(dtype)
    )


def compare_state(ours, theirs, dtype):
    close(ours.weight, theirs.weight, dtype, "weight")
    close(ours.bias, theirs.bias, dtype, "bias")
    close(ours.running_mean, theirs.running_mean, dtype, "running_mean")
    close(ours.running_var, theirs.running_var, dtype, "running_var")
    if theirs.num_batches_tracked is None:
        assert ours.num_batches_tracked is None
    else:
        assert ours.num_batches_tracked.dtype == np.int64
        assert ours.num_batches_tracked.shape == ()
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)
    if theirs.weight is not None:
        close(ours.grads["weight"], theirs.weight.grad, dtype, "grad weight")
    if theirs.bias is not None:
        close(ours.grads["bias"], theirs.bias.grad, dtype, "grad bias")


def make_pair(dim, n_features, dtype, rng, lazy=False, **kwargs):
    """A numbabn module and a torch module with the same configuration and parameters."""
    ours_cls, theirs_cls = (LAZY_CLASSES if lazy else CLASSES)[dim]
    args = () if lazy else (n_features,)
    ours = ours_cls(*args, dtype=dtype, **kwargs)
    theirs = theirs_cls(*args, dtype=torch_dtype(dtype), **kwargs)
    if not lazy and ours.weight is not None:
        weight = random_vector(rng, n_features, dtype)
        ours.weight[...] = weight
        with torch.no_grad():
            theirs.weight.copy_(to_torch(weight))
    if not lazy and ours.bias is not None:
        bias = random_vector(rng, n_features, dtype, -1.0, 1.0)
        ours.bias[...] = bias
        with torch.no_grad():
            theirs.bias.copy_(to_torch(bias))
    return ours, theirs


class Step:
    """One forward of both modules; backward may be called several times on it."""

    def __init__(self, ours, theirs, x, dtype):
        self.ours, self.theirs, self.dtype = ours, theirs, dtype
        self.tx = to_torch(x.copy()).requires_grad_()
        self.y = ours(x)
        self.ty = theirs(self.tx)
        close(self.y, self.ty, dtype, "output")

    def backward(self, dy):
        dx = self.ours.backward(dy)
        self.tx.grad = None
        self.ty.backward(to_torch(dy.copy()), retain_graph=True)
        close(dx, self.tx.grad, self.dtype, "grad input")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("track", [True, False], ids=["track", "no_track"])
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize(("name", "dim", "shape"), CASES, ids=CASE_IDS)
def test_train_eval_sequence(name, dim, shape, momentum, params, track, dtype, rng):
    """train -> eval -> train ... with outputs, dx, accumulated grads, stats compared each step."""
    affine, bias = PARAMS[params]
    n_features = shape[1]
    ours, theirs = make_pair(
        dim, n_features, dtype, rng, momentum=momentum, affine=affine,
        track_running_stats=track, bias=bias,
    )  # fmt: skip
    compare_state(ours, theirs, dtype)
    for index, training in enumerate([True, True, False, True, False, False, True]):
        ours.train(training)
        theirs.train(training)
        x = make_input(rng, shape, dtype=dtype, loc=0.5 * index, scale=1.0 + index)
        step = Step(ours, theirs, x, dtype)
        # Two backward calls on one forward, then more on later steps: grads accumulate.
        step.backward(rng.standard_normal(shape).astype(dtype))
        if index % 2 == 0:
            step.backward(rng.standard_normal(shape).astype(dtype))
        compare_state(ours, theirs, dtype)
    if track:
        assert int(ours.num_batches_tracked) == 4


@pytest.mark.parametrize("module_dtype", ["float32", "its own"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize(("name", "dim", "shape"), CASES, ids=CASE_IDS)
def test_half_train_eval_sequence(name, dim, shape, dtype, module_dtype, rng):
    """bfloat16 and float16 data into float32 modules (mixed precision) and into modules of
    their own dtype, as PyTorch's, step after step: outputs, dx, grads and statistics."""
    dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16 if dtype == "bfloat16" else dtype)
    ours, theirs = make_pair(dim, shape[1], np.float32 if module_dtype == "float32" else dtype, rng)
    for index, training in enumerate([True, False, True, False]):
        ours.train(training)
        theirs.train(training)
        x = make_input(rng, shape, dtype=dtype, loc=0.5 * index, scale=1.0 + index)
        step = Step(ours, theirs, x, dtype)
        step.backward(rng.standard_normal(shape).astype(dtype))
        compare_state(ours, theirs, dtype)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none, rng):
    ours, theirs = make_pair(2, 3, np.float32, rng)
    shape = (4, 3, 2, 3)
    for _ in range(2):
        step = Step(ours, theirs, make_input(rng, shape, dtype=np.float32), np.float32)
        step.backward(rng.standard_normal(shape).astype(np.float32))
    compare_state(ours, theirs, np.float32)
    ours.zero_grad(set_to_none=set_to_none)
    theirs.zero_grad(set_to_none=set_to_none)
    if set_to_none:
        assert ours.grads == {"weight": None, "bias": None}
    else:
        assert np.all(ours.grads["weight"] == 0) and np.all(ours.grads["bias"] == 0)
    compare_state(ours, theirs, np.float32)
    step = Step(ours, theirs, make_input(rng, shape, dtype=np.float32), np.float32)
    step.backward(rng.standard_normal(shape).astype(np.float32))
    compare_state(ours, theirs, np.float32)


def test_grads_are_not_aliased(rng):
    """Accumulating into grads must not write through to arrays handed out earlier."""
    module = numbabn.BatchNorm1d(3, dtype=np.float64)
    x = make_input(rng, (5, 3))
    module(x)
    module.backward(np.ones((5, 3)))
    first = module.grads["bias"].copy()
    module.backward(np.ones((5, 3)))
    np.testing.assert_allclose(module.grads["bias"], 2 * first)


@pytest.mark.parametrize("momentum", [0.1, 0.5])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4)], ids=str)
def test_functional_batch_norm(shape, dtype, training, affine, momentum, rng):
    """``functional.batch_norm`` is ``torch.nn.functional.batch_norm``, in-place updates too."""
    n_channels = shape[1]
    x = make_input(rng, shape, dtype=dtype, loc=2.0)
    rm = rng.standard_normal(n_channels).astype(dtype)
    rv = rng.uniform(0.5, 2.0, n_channels).astype(dtype)
    weight = random_vector(rng, n_channels, dtype) if affine else None
    bias = random_vector(rng, n_channels, dtype, -1.0, 1.0) if affine else None
    rm_before, rv_before = rm.copy(), rv.copy()
    t_rm, t_rv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())

    def t(a):
        return None if a is None else torch.from_numpy(a.copy())

    y = F.batch_norm(x, rm, rv, weight, bias, training, momentum, 1e-3)
    ty = torch.nn.functional.batch_norm(
        torch.from_numpy(x.copy()), t_rm, t_rv, t(weight), t(bias), training, momentum, 1e-3
    )
    close(y, ty, dtype, "output")
    close(rm, t_rm, dtype, "running_mean (in place)")
    close(rv, t_rv, dtype, "running_var (in place)")
    # Training updates them in place; evaluation leaves them alone.
    assert np.array_equal(rm, rm_before) != training
    assert np.array_equal(rv, rv_before) != training


@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_training_without_running_stats(dtype, rng):
    x = make_input(rng, (5, 3, 4), dtype=dtype)
    y = F.batch_norm(x, None, None, training=True)
    ty = torch.nn.functional.batch_norm(torch.from_numpy(x.copy()), None, None, training=True)
    close(y, ty, dtype, "output")


def _train_some(module, rng, shape, dtype, steps=3):
    for index in range(steps):
        module.train(True)
        x = make_input(rng, shape, dtype=dtype, loc=index)
        module(torch.from_numpy(x) if isinstance(module, torch.nn.Module) else x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("track", [True, False], ids=["track", "no_track"])
def test_state_dict_numbabn_to_torch(track, params, dtype, rng):
    affine, bias = PARAMS[params]
    ours, theirs = make_pair(2, 3, dtype, rng, affine=affine, bias=bias, track_running_stats=track)
    _train_some(ours, rng, (4, 3, 3, 3), dtype)
    state = ours.state_dict()
    assert list(state) == list(theirs.state_dict())
    # Copies: changing them does not change the module.
    for value in state.values():
        value[...] = 7
    state = ours.state_dict()
    result = theirs.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    assert result.missing_keys == [] and result.unexpected_keys == []
    compare_state(ours, theirs, dtype)
    x = make_input(rng, (4, 3, 3, 3), dtype=dtype)
    ours.eval()
    theirs.eval()
    close(ours(x), theirs(torch.from_numpy(x.copy())), dtype, "eval output")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("track", [True, False], ids=["track", "no_track"])
def test_state_dict_torch_to_numbabn(track, params, dtype, rng):
    affine, bias = PARAMS[params]
    ours, theirs = make_pair(2, 3, dtype, rng, affine=affine, bias=bias, track_running_stats=track)
    _train_some(theirs, rng, (4, 3, 3, 3), dtype)
    with torch.no_grad():
        for p in theirs.parameters():
            p.mul_(1.5)
    result = ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    assert result == numbabn.IncompatibleKeys([], [])
    compare_state(ours, theirs, dtype)
    x = make_input(rng, (4, 3, 3, 3), dtype=dtype)
    ours.eval()
    theirs.eval()
    close(ours(x), theirs(torch.from_numpy(x.copy())), dtype, "eval output")
    # The loaded state is a copy, not a view of torch's tensors.
    with torch.no_grad():
        for v in theirs.state_dict().values():
            v.zero_()
    assert ours.num_batches_tracked is None or int(ours.num_batches_tracked) == (3 if track else 0)
    if affine:
        assert np.all(ours.weight != 0)


def test_state_dict_without_num_batches_tracked_loads_zero(rng):
    """Like PyTorch, an old checkpoint without the counter loads as 0."""
    ours, theirs = make_pair(1, 3, np.float32, rng)
    _train_some(ours, rng, (4, 3), np.float32)
    state = {k: v for k, v in theirs.state_dict().items() if k != "num_batches_tracked"}
    ours.load_state_dict({k: v.numpy() for k, v in state.items()})
    assert int(ours.num_batches_tracked) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize(("name", "dim", "shape"), CASES, ids=CASE_IDS)
def test_lazy(name, dim, shape, params, dtype, rng):
    affine, bias = PARAMS[params]
    ours, theirs = make_pair(dim, None, dtype, rng, lazy=True, affine=affine, bias=bias)
    assert ours.num_features == 0
    for index, training in enumerate([True, False, True]):
        ours.train(training)
        theirs.train(training)
        step = Step(ours, theirs, make_input(rng, shape, dtype=dtype, loc=index), dtype)
        step.backward(rng.standard_normal(shape).astype(dtype))
        compare_state(ours, theirs, dtype)
        assert ours.num_features == theirs.num_features == shape[1]
        assert isinstance(ours, CLASSES[dim][0])


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_lazy_load_state_dict_from_torch(dim, rng):
    ours, _ = make_pair(dim, None, np.float64, rng, lazy=True)
    _, theirs = make_pair(dim, 5, np.float64, rng, momentum=0.5)
    shape = {1: (4, 5), 2: (2, 5, 3, 3), 3: (2, 5, 2, 2, 2)}[dim]
    _train_some(theirs, rng, shape, np.float64)
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    assert ours.num_features == 5
    theirs.weight.grad = theirs.bias.grad = None
    compare_state(ours, theirs, np.float64)
    ours.eval()
    theirs.eval()
    x = make_input(rng, shape)
    close(ours(x), theirs(torch.from_numpy(x.copy())), np.float64, "eval output")


@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch(momentum, rng):
    """N = 0: empty output, running stats untouched, counter incremented, zero grads."""
    ours, theirs = make_pair(2, 3, np.float32, rng, momentum=momentum)
    shape = (4, 3, 2, 2)
    Step(ours, theirs, make_input(rng, shape, dtype=np.float32), np.float32).backward(
        np.ones(shape, np.float32)
    )
    mean_before = ours.running_mean.copy()
    var_before = ours.running_var.copy()
    empty = np.zeros((0, 3, 2, 2), np.float32)
    step = Step(ours, theirs, empty, np.float32)
    assert step.y.shape == (0, 3, 2, 2) and step.y.dtype == np.float32
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 2
    assert np.array_equal(ours.running_mean, mean_before)
    assert np.array_equal(ours.running_var, var_before)
    step.backward(empty)
    compare_state(ours, theirs, np.float32)
    # The next batch uses the incremented counter (momentum=None: factor 1/3).
    Step(ours, theirs, make_input(rng, shape, dtype=np.float32, loc=3.0), np.float32)
    compare_state(ours, theirs, np.float32)


def test_empty_batch_eval(rng):
    ours, theirs = make_pair(1, 3, np.float64, rng)
    ours.eval()
    theirs.eval()
    step = Step(ours, theirs, np.zeros((0, 3)), np.float64)
    assert step.y.shape == (0, 3)
    assert int(ours.num_batches_tracked) == 0


def test_single_sample_with_positions_trains(rng):
    """(1, C, H, W) with H*W > 1 is a valid training batch in PyTorch."""
    ours, theirs = make_pair(2, 4, np.float64, rng)
    step = Step(ours, theirs, make_input(rng, (1, 4, 2, 1)), np.float64)
    step.backward(rng.standard_normal((1, 4, 2, 1)))
    compare_state(ours, theirs, np.float64)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_propagates(value, rng):
    """NaN and inf propagate per channel as in PyTorch (no fastmath nnan/ninf)."""
    ours, theirs = make_pair(2, 3, np.float32, rng)
    x = make_input(rng, (2, 3, 4, 4), dtype=np.float32)
    x[1, 1, 2, 3] = value
    y = ours(x)
    ty = theirs(torch.from_numpy(x.copy())).detach().numpy()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ty))
    np.testing.assert_allclose(y[:, [0, 2]], ty[:, [0, 2]], rtol=1e-5, atol=1e-5)
    assert np.isnan(y[:, 1]).all()
    assert np.isnan(ours.running_mean[1]) == np.isnan(theirs.running_mean[1].item())
    assert np.isfinite(ours.running_mean[[0, 2]]).all()


def test_repr_matches_torch():
    ours = numbabn.BatchNorm2d(8, eps=1e-3, momentum=None, bias=False)
    theirs = torch.nn.BatchNorm2d(8, eps=1e-3, momentum=None, bias=False)
    assert repr(ours) == repr(theirs)


def test_reset_parameters(rng):
    ours, theirs = make_pair(2, 3, np.float64, rng)
    _train_some(ours, rng, (2, 3, 2, 2), np.float64)
    _train_some(theirs, rng, (2, 3, 2, 2), np.float64)
    ours.reset_parameters()
    theirs.reset_parameters()
    compare_state(ours, theirs, np.float64)
