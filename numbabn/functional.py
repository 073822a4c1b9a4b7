"""Stateless batch normalization: forward, backward and PyTorch's ``batch_norm``.

The modules in :mod:`numbabn.modules` own the state (parameters, running
statistics, gradients) and call these functions.
"""

from __future__ import annotations

from typing import Any, NamedTuple, overload

import numpy as np

from numbabn import _phases
from numbabn import _validation as check
from numbabn._dispatch import Backend, all_host, backend_for, host_backend
from numbabn._phases import Affine, Running, SavedStats
from numbabn.epilogue import Epilogue, epilogue_for

__all__ = ["SavedStats", "batch_norm", "batch_norm_backward", "batch_norm_forward"]


# A host array, used in place: a NumPy array, or any array exporting DLPack or the
# NumPy array interface on the CPU (PyTorch CPU tensors, JAX CPU arrays); or a CUDA
# array: anything with ``__cuda_array_interface__`` (Numba device arrays, CuPy
# arrays, PyTorch CUDA tensors). Results come back as the kind of array given.
Array = Any


def check_forward_args(
    input: Any,
    running_mean: Any | None,
    running_var: Any | None,
    weight: Any | None,
    bias: Any | None,
    out: Any | None,
    training: Any = True,
    momentum: Any = 0.1,
    eps: Any = 1e-5,
    *,
    check_batch: bool = False,
    backend: Backend | None = None,
) -> tuple[Backend, tuple[Any, ...]]:
    """Validate a forward call's arguments, in PyTorch's order and with its errors.

    ``check_batch`` adds PyTorch's "more than 1 value per channel" check when
    ``training`` (SyncBatchNorm leaves it out: it counts the whole batch).

    Returns the backend that serves them and the arrays as that backend's own
    kind (views, not copies), in the order given (a ``backend`` given means
    that all but ``out`` are its kind already); weight and bias come back
    with shape ``(C,)`` (PyTorch takes any shape with ``C`` elements), except
    for an empty input, whose per-channel arrays are not checked (as in
    PyTorch) and come back as given.
    """
    if backend is not None:  # a module's call: its arrays are the backend's, all but out
        out = backend.adopt(out)
    arrays = (input, running_mean, running_var, weight, bias, out)
    if backend is None and all_host(arrays):  # the common case: small calls feel every µs
        backend = host_backend()
    elif backend is None:
        backend = backend_for(
            input=input,
            running_mean=running_mean,
            running_var=running_var,
            weight=weight,
            bias=bias,
            out=out,
        )
        arrays = tuple(map(backend.adopt, arrays))
    x, running_mean, running_var, weight, bias, out = arrays
    if x.ndim < 2:
        raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")
    # torch.nn.functional.batch_norm's checks, then its argument parser's.
    if check_batch and training:
        check.check_batch_size(x)
    check.check_eps(eps, training)
    check.check_scalar_args(training, momentum, eps)
    if x.size == 0:  # ATen returns an empty batch before any other check but the dtype's
        check.check_dtype(x, backend.param_dtypes)
        check.check_out(out, x)
        return backend, arrays
    weight, bias = check.channel_vectors(x, running_mean, running_var, weight, bias, training)
    check.check_dtype(x, backend.param_dtypes)
    check.check_param_dtypes(
        x, running_mean, running_var, weight, bias, training, backend.param_dtypes
    )
    check.check_out(out, x)
    return backend, (x, running_mean, running_var, weight, bias, out)


@overload
def batch_norm_forward(
    input: np.ndarray,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    out: np.ndarray | None = None,
    residual: np.ndarray | None = None,
    activation: str | None = None,
    stream: None = None,
) -> tuple[np.ndarray, SavedStats]: ...
@overload
def batch_norm_forward(
    input: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    out: Array | None = None,
    residual: Array | None = None,
    activation: str | None = None,
    stream: Any | None = None,
) -> tuple[Array, SavedStats]: ...
def batch_norm_forward(
    input: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    out: Array | None = None,
    residual: Array | None = None,
    activation: str | None = None,
    stream: Any | None = None,
) -> tuple[Array, SavedStats]:
    """Normalise ``input`` per channel and return what the backward pass needs.

    Parameters
    ----------
    input : array
        Shape ``(N, C, *spatial)``, float32 or float64, or 16-bit floats
        (``ml_dtypes.bfloat16`` and float16, on the CPU and on CUDA),
        any strides. Host arrays of any library that exports DLPack or the
        NumPy array interface (PyTorch CPU tensors, JAX CPU arrays,
        ``numpy.memmap``) are used in place, as are CUDA arrays (anything with
        ``__cuda_array_interface__``), which run on the GPU; all arrays of a
        call must be on one side. Read-only arrays serve as inputs, not as
        ``out`` or as running statistics updated in training.
    running_mean, running_var : ndarray or None
        Running statistics, shape ``(C,)``, same dtype as ``input`` (float32
        or the input's own for 16-bit float input). Updated in
        place when ``training`` is True (the variance with Bessel's correction):
        ``running = (1 - momentum) * running + momentum * batch_statistic``.
        Both or neither; required when ``training`` is False.
    weight, bias : ndarray or None
        Affine parameters, ``C`` elements (shape ``(C,)``, or any shape with
        ``C`` elements, as in PyTorch); None means 1 and 0.
    training : bool
        Use the batch's statistics (True) or the running ones (False). A
        Python bool, as PyTorch requires.
    momentum : float
        Weight of the batch statistic in the running-statistics update; any
        real number, as in PyTorch (the update above is applied as written).
    eps : float
        Added to the variance inside the square root: positive in training,
        non-negative otherwise.
    out : ndarray, optional
        Array to write the output into (shape and dtype of ``input``).
    residual : array, optional
        Added to the normalised output in the same pass (shape and dtype of
        ``input``, same device), before the activation.
    activation : {None, "relu"}
        Applied last, in the same pass: ``relu(bn(x) + residual)``.
    stream : numba.cuda stream, optional
        CUDA input only: the stream the call's work is queued on. By default
        the stream the input's producer named in its CUDA Array Interface
        (PyTorch's or CuPy's current stream), else Numba's default stream. The
        results are valid on that stream (their ``stream``); nothing waits on
        the host.

    Returns
    -------
    output : array
        The normalised batch, laid out like ``input`` in memory, of the same
        kind as ``input`` (CuPy in, CuPy out; a PyTorch tensor for a PyTorch
        tensor; a plain ndarray for an ndarray subclass), or ``out`` itself.
    saved : SavedStats
        Per-channel mean and inverse standard deviation used.

    Raises
    ------
    ValueError, RuntimeError, TypeError, NotImplementedError
        On a bad shape, channel count, dtype or argument, with PyTorch's
        exception types and texts, in PyTorch's order; nothing is modified then.
    """
    args = (input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is None and stream is None:
        signature = _signature(*args, activation, out)
        plan = _PLANS.get(signature) if signature is not None else None
        if plan is None:
            call = prepare_forward(*args, out, None, activation)
            plan = plan_forward(call, (running_mean, running_var, weight, bias))
            if signature is not None:
                _keep(_PLANS, signature, plan)
        adopt = plan.call.backend.adopt
        out_array = None if out is None else adopt(out)
        return run_planned(plan, adopt(input), input, momentum, out_array, out)
    return run_forward(prepare_forward(*args, out, residual, activation), stream)


# The plans of the functional API's last signatures, oldest first.
_PLANS: dict[tuple[Any, ...], ForwardPlan] = {}
_BACKWARD_PLANS: dict[tuple[Any, ...], BackwardPlan] = {}
PLANS_KEPT = 32


def _signature(
    input: Any,
    running_mean: Any | None,
    running_var: Any | None,
    weight: Any | None,
    bias: Any | None,
    training: Any,
    momentum: Any,
    eps: Any,
    activation: str | None,
    out: Any | None = None,
) -> tuple[Any, ...] | None:
    """What the checks of a forward call read; None when that cannot be read without
    adopting ``input`` or ``out`` (an array without ``strides``, such as a PyTorch tensor)
    or an argument is unhashable."""
    strides = getattr(input, "strides", None)
    if strides is None:
        return None
    out_signature = _out_signature(out)
    if out_signature is None:
        return None
    updates = training is True
    signature = (
        type(input), input.shape, strides, input.dtype, type(training), training,
        type(momentum), type(eps), eps, activation, id(running_mean), id(running_var),
        id(weight), id(bias), updates and check.writeable(running_mean),
        updates and check.writeable(running_var), out_signature,
    )  # fmt: skip
    try:
        hash(signature)
    except TypeError:
        return None
    return signature


def _out_signature(out: Any | None) -> tuple[Any, ...] | None:
    """What the checks of an ``out=`` array read (its kind, shape, strides, dtype and whether
    it may be written; not its identity): ``()`` without one, None when its strides cannot
    be read without adopting it."""
    if out is None:
        return ()
    strides = getattr(out, "strides", None)
    if strides is None:
        return None
    return (type(out), out.shape, strides, out.dtype, check.writeable(out))


def _keep(plans: dict[tuple[Any, ...], Any], signature: tuple[Any, ...], plan: Any) -> None:
    """Keep ``plan`` for ``signature``; forget the oldest beyond :data:`PLANS_KEPT`."""
    plans[signature] = plan
    if len(plans) > PLANS_KEPT:
        plans.pop(next(iter(plans)), None)


class ForwardCall(NamedTuple):
    """A forward call's checked arguments, as its backend's arrays."""

    backend: Backend
    x: Any
    running: Running
    affine: Affine
    out: Any | None
    epilogue: Epilogue | None
    training: bool
    eps: float
    input: Any  # the caller's arrays, whose kinds the results take
    caller_out: Any | None


def prepare_forward(
    input: Any,
    running_mean: Any | None,
    running_var: Any | None,
    weight: Any | None,
    bias: Any | None,
    training: Any,
    momentum: Any,
    eps: Any,
    out: Any | None,
    residual: Any | None,
    activation: str | None,
    *,
    check_batch: bool = True,
    backend: Backend | None = None,
    caller_input: Any = None,
) -> ForwardCall:
    """Check a forward call's arguments (see :func:`check_forward_args`); change nothing.

    ``caller_input``, when ``input`` is already the backend's view of it, is the
    array whose kind the output takes.
    """
    backend, arrays = check_forward_args(
        input, running_mean, running_var, weight, bias, out, training, momentum, eps,
        check_batch=check_batch, backend=backend,
    )  # fmt: skip
    x, running_mean, running_var, weight, bias, out_array = arrays
    epilogue = epilogue_for(_adopt_like(backend, "residual", residual, x), activation)
    check.check_running_writeable(training, running_mean, running_var)
    affine = _phases.with_defaults(
        backend, Affine(weight, bias), x.shape[1], backend.param_dtypes[x.dtype]
    )
    # Python floats for the kernels: one compiled signature whatever number type was given.
    running = Running(running_mean, running_var, float(momentum))
    caller_input = input if caller_input is None else caller_input
    return ForwardCall(
        backend, x, running, affine, out_array, epilogue, training, float(eps), caller_input,
        out,
    )  # fmt: skip


def run_forward(
    call: ForwardCall, stream: Any | None = None, exchange: _phases.Exchange | None = None
) -> tuple[Array, SavedStats]:
    """Run a checked forward call (with an exchange between its phases when given)."""
    backend, x = call.backend, call.x
    others: tuple[Any, ...] = (*call.running[:2], *call.affine, call.out)
    if call.epilogue is not None:
        others += (call.epilogue.residual,)
    with backend.on_stream(stream, x, others):
        output, saved = _phases.forward(
            backend, x, call.running, call.affine, call.training, call.eps, call.out,
            call.epilogue, exchange,
        )  # fmt: skip
    return _returned(backend, output, call.input, call.caller_out), saved


class ForwardPlan(NamedTuple):
    """What a forward call's checks decided, reused by the calls of the same signature.

    A signature is what the checks read: the input's shape, strides and dtype,
    the per-channel arrays (by identity: a plan holds them, so an identity is
    never reused while it lives), the mode and the scalars' types. Calls that
    share one are checked once; each then only views its input and runs
    ``runner(x, momentum)``: the backend's own for that signature and those
    arrays (one compiled call for a small tensor on the CPU), else the fused passes.
    """

    call: ForwardCall  # the planning call's checked arguments, its own arrays left out
    runner: Any | None
    held: tuple[Any, ...]  # the arrays whose identities the signature holds, as given


def plan_forward(call: ForwardCall, held: tuple[Any, ...], exchanged: bool = False) -> ForwardPlan:
    """A plan for the calls of ``call``'s signature (made after its checks passed), holding
    the arrays ``held`` whose identities are in the signature; ``exchanged`` plans calls
    that run with an exchange between their phases (which the backend's runner does not)."""
    runner = None
    if call.x.size and not exchanged:
        runner = call.backend.plan_forward(
            call.x, *call.affine, *call.running[:2], call.training, call.eps, call.epilogue,
            call.out,
        )  # fmt: skip
    return ForwardPlan(call._replace(x=None, input=None, out=None, caller_out=None), runner, held)


def run_planned(
    plan: ForwardPlan,
    x: Any,
    caller_input: Any,
    momentum: float,
    out: Any | None = None,
    caller_out: Any | None = None,
    exchange: _phases.Exchange | None = None,
) -> tuple[Array, SavedStats]:
    """Run a forward of ``x`` (the backend's array of the plan's signature) by ``plan``, into
    ``out`` (the backend's view of the caller's ``caller_out``) when the plan has one, with
    ``exchange`` between the phases of an exchanged plan."""
    call = plan.call
    if plan.runner is None:
        running = Running(call.running.mean, call.running.var, float(momentum))
        return run_forward(
            call._replace(x=x, input=caller_input, running=running, out=out, caller_out=caller_out),
            exchange=exchange,
        )
    output, mean, invstd = plan.runner(x, float(momentum), out)
    saved = SavedStats(mean, invstd, call.training)
    return _returned(call.backend, output, caller_input, caller_out), saved


def _adopt_like(backend: Backend, name: str, array: Any | None, x: Any) -> Any | None:
    """``array`` as the backend's kind, checked to have the shape and dtype of ``x``."""
    if array is None:
        return None
    backend_for(input=x, **{name: array})  # raises TypeError on mixed devices
    adopted = backend.adopt(array)
    check.check_like(name, adopted, x)
    return adopted


def _returned(backend: Backend, output: Any, input: Any, out: Any | None) -> Any:
    """The caller's ``out``, or ``output`` as the kind of array ``input`` is."""
    return out if out is not None else backend.like(output, input)


@overload
def batch_norm(
    input: np.ndarray,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    out: np.ndarray | None = None,
    residual: np.ndarray | None = None,
    activation: str | None = None,
    stream: None = None,
) -> np.ndarray: ...
@overload
def batch_norm(
    input: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    out: Array | None = None,
    residual: Array | None = None,
    activation: str | None = None,
    stream: Any | None = None,
) -> Array: ...
def batch_norm(
    input: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    out: Array | None = None,
    residual: Array | None = None,
    activation: str | None = None,
    stream: Any | None = None,
) -> Array:
    """Batch normalization with the signature of ``torch.nn.functional.batch_norm``.

    See :func:`batch_norm_forward` for the parameters; this returns only the
    output. Running statistics are updated in place when ``training`` is True.
    """
    output, _ = batch_norm_forward(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        out=out, residual=residual, activation=activation, stream=stream,
    )  # fmt: skip
    return output


@overload
def batch_norm_backward(
    grad_output: np.ndarray,
    input: np.ndarray,
    saved: SavedStats,
    weight: np.ndarray | None = None,
    *,
    out: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    residual: None = None,
    activation: str | None = None,
    stream: None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]: ...
@overload
def batch_norm_backward(
    grad_output: np.ndarray,
    input: np.ndarray,
    saved: SavedStats,
    weight: np.ndarray | None = None,
    *,
    out: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    residual: np.ndarray,
    activation: str | None = None,
    stream: None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray]: ...
@overload
def batch_norm_backward(
    grad_output: Array,
    input: Array,
    saved: SavedStats,
    weight: Array | None = None,
    *,
    out: Array | None = None,
    bias: Array | None = None,
    residual: Array | None = None,
    activation: str | None = None,
    stream: Any | None = None,
) -> tuple[Array, ...]: ...
def batch_norm_backward(
    grad_output: Array,
    input: Array,
    saved: SavedStats,
    weight: Array | None = None,
    *,
    out: Array | None = None,
    bias: Array | None = None,
    residual: Array | None = None,
    activation: str | None = None,
    stream: Any | None = None,
) -> tuple[Array, ...]:
    """Gradients of batch normalization.

    Parameters
    ----------
    grad_output : ndarray
        Gradient of the loss w.r.t. the output; shape and dtype of ``input``.
    input : ndarray
        The forward pass's input.
    saved : SavedStats
        Returned by :func:`batch_norm_forward` for that input.
    weight : ndarray or None
        The forward pass's weight (None for no affine parameters); the
        parameter gradients have its shape.
    out : ndarray, optional
        Array to write the input gradient into.
    bias, residual, activation
        The forward's, when it had an activation: the ReLU mask is recomputed
        from ``input`` and ``residual`` rather than stored.
    stream : numba.cuda stream, optional
        CUDA input only: as for :func:`batch_norm_forward`, by default
        ``grad_output``'s producer's stream.

    Returns
    -------
    grad_input : ndarray
        Gradient w.r.t. ``input``.
    grad_weight, grad_bias : ndarray or None
        ``sum(g * xhat)`` and ``sum(g)`` per channel, where ``g`` is
        ``grad_output`` through the activation, in the dtype of ``weight``;
        None when ``weight`` is None.
    grad_residual : ndarray
        Only when ``residual`` is given: the gradient w.r.t. it (``g``; with no
        activation, ``grad_output`` itself).
    """
    if residual is None and stream is None:
        signature = _backward_signature(grad_output, input, saved, weight, bias, activation, out)
        plan = _BACKWARD_PLANS.get(signature) if signature is not None else None
        if plan is None:
            call = prepare_backward(
                grad_output, input, saved, weight, out=out, bias=bias, activation=activation
            )
            plan = plan_backward(call, (weight, bias))
            if signature is not None:
                _keep(_BACKWARD_PLANS, signature, plan)
        adopt = plan.call.backend.adopt
        out_array = None if out is None else adopt(out)
        return run_planned_backward(
            plan, adopt(grad_output), adopt(input), saved, grad_output, input,
            out=out_array, caller_out=out,
        )  # fmt: skip
    call = prepare_backward(
        grad_output, input, saved, weight, out=out, bias=bias, residual=residual,
        activation=activation,
    )  # fmt: skip
    return run_backward(call, stream)


def _backward_signature(
    grad_output: Any,
    input: Any,
    saved: SavedStats,
    weight: Any | None,
    bias: Any | None,
    activation: str | None,
    out: Any | None = None,
) -> tuple[Any, ...] | None:
    """What the checks of a backward call read (see :func:`_signature`)."""
    strides = getattr(grad_output, "strides", None), getattr(input, "strides", None)
    if None in strides:
        return None
    out_signature = _out_signature(out)
    if out_signature is None:
        return None
    return (
        type(grad_output), grad_output.shape, grad_output.dtype, type(input), input.shape,
        input.dtype, *strides, type(saved.mean), tuple(saved.mean.shape), saved.batch_stats,
        id(weight), id(bias), activation, out_signature,
    )  # fmt: skip


class BackwardCall(NamedTuple):
    """A backward call's checked arguments, as its backend's arrays."""

    backend: Backend
    dy: Any
    x: Any
    saved: SavedStats
    affine: Affine  # weight None: no affine parameters
    out: Any | None
    epilogue: Epilogue | None
    originals: tuple[Any, Any | None, Any | None]  # the caller's input, weight and residual
    caller_out: Any | None
    grad_output: Any


def prepare_backward(
    grad_output: Any,
    input: Any,
    saved: SavedStats,
    weight: Any | None,
    *,
    out: Any | None = None,
    bias: Any | None = None,
    residual: Any | None = None,
    activation: str | None = None,
    backend: Backend | None = None,
) -> BackwardCall:
    """Check a backward call's arguments (a ``backend`` given means they are known to be
    its arrays); change nothing."""
    if backend is None:
        backend = backend_for(
            grad_output=grad_output, input=input, weight=weight, bias=bias, out=out,
            saved_mean=saved.mean,
        )  # fmt: skip
    arrays = (grad_output, input, weight, bias, out)
    dy, x, weight_array, bias_array, out_array = map(backend.adopt, arrays)
    check.check_like("grad_output", dy, x)
    check.check_dtype(x, backend.param_dtypes)
    check.check_channel_vector("weight", weight_array, x)
    check.check_channel_vector("bias", bias_array, x)
    check.check_out(out_array, x)
    epilogue = epilogue_for(_adopt_like(backend, "residual", residual, x), activation)
    n_channels = x.shape[1]
    weight_array = check.flat_vector(weight_array, n_channels)
    bias_array = check.flat_vector(bias_array, n_channels)
    if tuple(saved.mean.shape) != (n_channels,):
        raise ValueError(
            f"saved statistics are for {saved.mean.shape[0]} channels but the input has "
            f"{n_channels}"
        )
    hands_on_dy = epilogue is not None and not epilogue.relu
    if hands_on_dy and out_array is not None and backend.may_share_memory(out_array, dy):
        raise ValueError(
            "out= shares memory with grad_output, which is also returned as the residual's "
            "gradient; pass another out= array"
        )
    return BackwardCall(
        backend, dy, x, saved, Affine(weight_array, bias_array), out_array, epilogue,
        (input, weight, residual), out, grad_output,
    )  # fmt: skip


def run_backward(
    call: BackwardCall,
    stream: Any | None = None,
    exchange: _phases.TrainingExchange | None = None,
    count: int = 0,
) -> tuple[Array, ...]:
    """Run a checked backward call; with an exchange, over a whole batch of ``count``
    values per channel. Returns what :func:`batch_norm_backward` returns."""
    backend, x = call.backend, call.x
    residual = None if call.epilogue is None else call.epilogue.residual
    others = (x, *call.affine, call.out, residual, call.saved.mean, call.saved.invstd)
    with backend.on_stream(stream, call.dy, others):
        grads = _phases.backward(
            backend, call.dy, x, call.saved, call.affine, backend.param_dtypes[x.dtype],
            call.out, call.epilogue, exchange, count,
        )  # fmt: skip
    return _backward_results(backend, grads, call.originals, call.caller_out, call.grad_output)


class BackwardPlan(NamedTuple):
    """What a backward call's checks decided, reused by the calls of the same signature (as
    :class:`ForwardPlan`; the saved statistics are the call's own, checked by shape)."""

    call: BackwardCall  # the planning call's checked arguments, its own arrays left out
    runner: Any | None
    held: tuple[Any, ...]  # the arrays whose identities the signature holds, as given


def plan_backward(
    call: BackwardCall, held: tuple[Any, ...], exchanged: bool = False
) -> BackwardPlan:
    """A plan for the backwards of ``call``'s signature (made after its checks passed);
    ``exchanged`` as for :func:`plan_forward`."""
    runner = None
    if call.out is None and call.x.size and not exchanged:
        backend, x = call.backend, call.x
        weight = _phases.with_defaults(
            backend, call.affine, x.shape[1], backend.param_dtypes[x.dtype]
        ).weight
        runner = backend.plan_backward(call.dy, x, weight, call.saved.batch_stats, call.epilogue)
    input, weight, residual = call.originals
    leftover = call._replace(
        dy=None, x=None, out=None, originals=(None, weight, residual), caller_out=None,
        grad_output=None,
    )  # fmt: skip
    return BackwardPlan(leftover, runner, held)


def run_planned_backward(
    plan: BackwardPlan,
    dy: Any,
    x: Any,
    saved: SavedStats,
    grad_output: Any,
    caller_input: Any,
    exchange: _phases.TrainingExchange | None = None,
    count: int = 0,
    out: Any | None = None,
    caller_out: Any | None = None,
) -> tuple[Array, ...]:
    """Run a backward of ``dy`` and ``x`` (the backend's arrays of the plan's signature), into
    ``out`` (the backend's view of the caller's ``caller_out``) when the plan has one; an
    exchanged plan's with ``exchange`` over a whole batch of ``count`` values per channel."""
    call = plan.call
    originals = (caller_input, *call.originals[1:])
    if plan.runner is None:
        checked = call._replace(
            dy=dy, x=x, saved=saved, out=out, originals=originals, caller_out=caller_out,
            grad_output=grad_output,
        )  # fmt: skip
        return run_backward(checked, exchange=exchange, count=count)
    grads = (*plan.runner(dy, x, saved.mean, saved.invstd), None)
    return _backward_results(call.backend, grads, originals, None, grad_output)


def _backward_results(
    backend: Backend,
    grads: tuple[Any, Any | None, Any | None, Any | None],
    originals: tuple[Any, Any | None, Any | None],
    out: Any | None,
    grad_output: Any,
) -> tuple[Any, ...]:
    """The backward's results as the caller's kinds of arrays, in the documented shape.

    ``grad_residual`` None means the residual's gradient is ``grad_output`` itself.
    """
    grad_input, grad_weight, grad_bias, grad_residual = grads
    input, weight, residual = originals
    grad_input = _returned(backend, grad_input, input, out)
    if weight is None:
        grad_weight = grad_bias = None
    else:
        assert grad_weight is not None and grad_bias is not None  # computed when weight is given
        shape = tuple(weight.shape)  # the forward's weight may have any shape of C elements
        if tuple(grad_weight.shape) != shape:
            grad_weight, grad_bias = grad_weight.reshape(shape), grad_bias.reshape(shape)
        grad_weight, grad_bias = backend.like(grad_weight, weight), backend.like(grad_bias, weight)
    if residual is None:
        return grad_input, grad_weight, grad_bias
    if grad_residual is None:
        return grad_input, grad_weight, grad_bias, grad_output
    return grad_input, grad_weight, grad_bias, backend.like(grad_residual, residual)
