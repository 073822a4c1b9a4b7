"""Stateful batch-norm modules with the behaviour of ``torch.nn.BatchNorm{1,2,3}d``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, NoReturn, overload

import numpy as np

from numbabn import _validation as check
from numbabn._dispatch import (
    backend_named,
    device_index,
    host_values,
    is_dask_array,
    kind_of,
)
from numbabn._phases import BACKWARD, FORWARD, Pass, SavedStats, TrainingExchange
from numbabn.epilogue import check_activation
from numbabn.functional import (
    BackwardCall,
    BackwardPlan,
    ForwardCall,
    ForwardPlan,
    plan_backward,
    plan_forward,
    prepare_backward,
    prepare_forward,
    run_backward,
    run_forward,
    run_planned,
    run_planned_backward,
)

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "IncompatibleKeys",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]

# The per-channel arrays (on the module's device), then the host batch counter.
_PARAMETER_KEYS = ("weight", "bias")
_BUFFER_KEYS = ("running_mean", "running_var", "num_batches_tracked")
_ARRAY_KEYS = (*_PARAMETER_KEYS, *_BUFFER_KEYS[:2])
_STATE_KEYS = (*_PARAMETER_KEYS, *_BUFFER_KEYS)


class IncompatibleKeys(NamedTuple):
    """Keys that :meth:`load_state_dict` found missing or did not expect."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _device_name(device: str | None) -> str:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` for a device argument (None means the CPU)."""
    if device is None:
        return "cpu"
    kind, colon, index = device.partition(":") if isinstance(device, str) else ("", "", "")
    if device in ("cpu", "cuda") or (kind == "cuda" and colon and index.isdigit()):
        return device
    raise ValueError(
        f"device {device!r} is not available; numbabn runs on 'cpu', 'cuda' or 'cuda:N' "
        "(N the index of a GPU)"
    )


def _module_dtype(dtype: Any) -> np.dtype:
    """``dtype`` as a NumPy dtype of parameters and statistics: float32, float64, or a
    16-bit float (``ml_dtypes.bfloat16``, float16)."""
    dtype = np.dtype(dtype)
    if dtype not in check.SUPPORTED_DTYPES and not check.is_half(dtype):
        raise TypeError(
            f"dtype {dtype} is not supported; use float32, float64, ml_dtypes.bfloat16 or float16"
        )
    return dtype


def _refuse(exchange: TrainingExchange | None, kind: Pass, error: Exception) -> NoReturn:
    """Raise ``error``, a failed check of a ``kind`` call; with an ``exchange``, through it,
    so that every part raises rather than waits for this one."""
    if exchange is None:
        raise error
    exchange.refuse(kind, error)


class _Saved(NamedTuple):
    """What the last forward left for backward (references, not copies)."""

    input: Any  # the caller's array
    stats: SavedStats
    residual: Any
    overwritten: tuple[str, ...]  # arrays that out= wrote over
    whole_count: int | None  # values per channel of the whole batch when an exchange ran


class _BatchNorm:
    """State and behaviour shared by the batch-norm modules."""

    _allowed_ndims: ClassVar[tuple[int, ...]]
    _ndim_label: ClassVar[str]

    # Parameters and running statistics: arrays on the module's device, or None.
    weight: Any | None
    bias: Any | None
    running_mean: Any | None
    running_var: Any | None
    # A host int64 0-d array on every device; None without running statistics.
    num_batches_tracked: np.ndarray | None
    # What runs between the phases in training when the batch is spread (SyncBatchNorm).
    _exchange: TrainingExchange | None = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: str | None = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        activation: str | None = None,
    ) -> None:
        check_activation(activation)
        self.device = _device_name(device)
        self._backend = backend_named(self.device)
        self._gpu = self._backend.device_for(device_index(self.device))
        dtype = _module_dtype(np.float32 if dtype is None else dtype)
        # Kept as given and checked at each call, as in PyTorch.
        self.eps = eps
        self.momentum = momentum
        self.affine = bool(affine)
        self.has_bias = bool(affine and bias)
        self.track_running_stats = bool(track_running_stats)
        self.activation = activation
        self.dtype = dtype
        self.training = True
        self._saved: _Saved | None = None
        # The last planned forward's and backward's signatures and plans.
        self._plan: tuple[tuple[Any, ...], ForwardPlan] | None = None
        self._backward_plan: tuple[tuple[Any, ...], BackwardPlan] | None = None
        self._allocate(num_features)

    def _allocate(self, num_features: int) -> None:
        """Create the parameters and statistics of ``num_features`` channels.

        ``num_features`` is checked as PyTorch's allocation of them checks it;
        without any, PyTorch keeps it unchecked and unused, and so does this.
        """
        if self.affine:
            num_features = check.check_num_features(num_features, "empty")
        elif self.track_running_stats:
            num_features = check.check_num_features(num_features, "zeros")
        self.num_features = num_features
        c, dtype = num_features, self.dtype
        with self._backend.on_device(self._gpu):
            self._allocate_arrays(c, dtype)

    def _allocate_arrays(self, c: int, dtype: np.dtype) -> None:
        new = self._backend.from_host
        self.weight = new(np.ones(c, dtype)) if self.affine else None
        self.bias = new(np.zeros(c, dtype)) if self.has_bias else None
        if self.track_running_stats:
            self.running_mean = new(np.zeros(c, dtype))
            self.running_var = new(np.ones(c, dtype))
            # A host counter on every device: momentum=None reads it each step.
            self.num_batches_tracked = np.array(0, dtype=np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.grads: dict[str, np.ndarray | None] = {}
        if self.weight is not None:
            self.grads["weight"] = None
        if self.bias is not None:
            self.grads["bias"] = None

    # -- modes and resets -------------------------------------------------

    def train(self, mode: bool = True) -> Self:
        """Set training mode (batch statistics, running-statistics updates); return self."""
        self.training = bool(mode)
        return self

    def eval(self) -> Self:
        """Set evaluation mode (running statistics); return self."""
        return self.train(False)

    def reset_running_stats(self) -> None:
        """Set running mean to 0, running variance to 1 and the batch counter to 0."""
        if self.track_running_stats:
            self._backend.assign(self.running_mean, 0.0)
            self._backend.assign(self.running_var, 1.0)
            assert self.num_batches_tracked is not None  # allocated with the statistics
            self.num_batches_tracked[...] = 0

    def reset_parameters(self) -> None:
        """Reset the running statistics, weight to 1 and bias to 0."""
        self.reset_running_stats()
        if self.weight is not None:
            self._backend.assign(self.weight, 1.0)
        if self.bias is not None:
            self._backend.assign(self.bias, 0.0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear accumulated gradients (to None, or to zeros with ``set_to_none=False``)."""
        for name, grad in self.grads.items():
            if set_to_none or grad is None:
                self.grads[name] = None
            else:
                self._backend.assign(grad, 0.0)

    def to(self, device: Any = None, dtype: Any = None) -> Self:
        """Move and/or convert parameters, running statistics and gradients; return self.

        Parameters
        ----------
        device : {"cpu", "cuda"} or dtype, optional
            ``"cpu"`` (NumPy arrays) or ``"cuda"`` (Numba device arrays). A
            dtype here is taken as ``dtype``, as ``torch.nn.Module.to`` does:
            ``bn.to(np.float64)``.
        dtype : float32, float64, ml_dtypes.bfloat16 or float16, optional
            New dtype of the parameters, running statistics and gradients
            (the batch counter stays int64).

        Notes
        -----
        Everything is converted before anything changes, so a failure leaves
        the module as it was. The arrays are replaced, not changed in place:
        take :meth:`parameters` again after converting. A pending backward is
        dropped: call forward again.
        """
        if device is not None and not isinstance(device, str):
            device, dtype = None, device  # bn.to(np.float64)
        return self._convert(
            self.device if device is None else _device_name(device),
            self.dtype if dtype is None else _module_dtype(dtype),
        )

    def _convert(self, target: str, new_dtype: np.dtype) -> Self:
        """Put the state on device ``target`` with dtype ``new_dtype`` (see :meth:`to`)."""
        if target == self.device and new_dtype == self.dtype:
            return self
        backend = backend_named(target)
        if check.is_half(new_dtype) and not isinstance(backend.param_dtypes, check.HalfParamDtypes):
            raise TypeError(
                f"the {target} backend keeps parameters in float32 for {new_dtype} input; "
                f"convert the module with .float() and pass {new_dtype} input to it"
            )
        gpu = backend.device_for(device_index(target))

        def moved(array: Any) -> Any:
            if array is None:
                return None
            with self._backend.on_device(self._gpu):
                host = self._backend.to_host(array).astype(new_dtype, copy=False)
            with backend.on_device(gpu):
                return backend.from_host(host)

        # Copy everything first, so a failure leaves the module where it was.
        state = {key: moved(getattr(self, key)) for key in _ARRAY_KEYS}
        grads = {name: moved(grad) for name, grad in self.grads.items()}
        for key, value in state.items():
            setattr(self, key, value)
        self.grads = grads
        self.device, self._backend, self.dtype, self._gpu = target, backend, new_dtype, gpu
        self._saved = None
        return self

    def double(self) -> Self:
        """Same as ``to(dtype=np.float64)``."""
        return self._convert(self.device, np.dtype(np.float64))

    def float(self) -> Self:
        """Same as ``to(dtype=np.float32)``."""
        return self._convert(self.device, np.dtype(np.float32))

    def half(self) -> Self:
        """Same as ``to(dtype=np.float16)``."""
        return self._convert(self.device, np.dtype(np.float16))

    def bfloat16(self) -> Self:
        """Same as ``to(dtype=ml_dtypes.bfloat16)`` (needs the ``ml_dtypes`` package)."""
        try:
            import ml_dtypes
        except ImportError:
            raise ImportError(
                "bfloat16 is NumPy's through the ml_dtypes package: pip install ml_dtypes"
            ) from None
        return self._convert(self.device, np.dtype(ml_dtypes.bfloat16))

    def cpu(self) -> Self:
        """Same as ``to("cpu")``."""
        return self.to("cpu")

    def cuda(self) -> Self:
        """Same as ``to("cuda")``."""
        return self.to("cuda")

    # -- forward and backward ---------------------------------------------

    def _check_input(self, x: Any) -> None:
        """Check the rank of ``x``, an input already viewed as the backend's kind of array."""
        check.check_ndim(x, self._allowed_ndims, self._ndim_label)

    def _check_kind(self, x: Any, name: str) -> None:
        """Raise TypeError unless ``x`` is an array on the module's device."""
        kind = kind_of(x)  # TypeError, naming what is accepted, for anything else
        if kind != self.device and kind != self.device.partition(":")[0]:
            raise TypeError(
                f"{self._name()} is on {self.device} but the {name} is a {kind} array; "
                f"move the module with .to({kind!r}) or the {name} to {self.device}"
            )
        if self._gpu is not None:
            gpu = self._backend.device_of(x)
            if gpu is not None and gpu != self._gpu:
                raise TypeError(
                    f"{self._name()} is on cuda:{self._gpu} but the {name} is on "
                    f"cuda:{gpu}; move the module with .to('cuda:{gpu}') or the {name} to "
                    f"cuda:{self._gpu}"
                )

    def _momentum_argument(self, tracking: bool) -> Any:
        """The ``momentum`` a call passes on: the running-average factor when tracking.

        As PyTorch, a call passes a momentum (0.0 for None) even when nothing is
        tracked, so its type is checked on every call. With ``momentum=None`` the
        factor makes a cumulative moving average over the batches seen so far.
        """
        momentum = self.momentum
        if momentum is not None:
            return momentum
        if not tracking:
            return 0.0
        assert self.num_batches_tracked is not None  # allocated with the statistics
        return 1.0 / float(self.num_batches_tracked + 1)

    @overload
    def forward(
        self, x: np.ndarray, out: np.ndarray | None = None, *, residual: np.ndarray | None = None
    ) -> np.ndarray: ...
    @overload
    def forward(self, x: Any, out: Any | None = None, *, residual: Any | None = None) -> Any: ...
    def forward(self, x: Any, out: Any | None = None, *, residual: Any | None = None) -> Any:
        """Normalise ``x``; in training, update the running statistics.

        Parameters
        ----------
        x : array
            Batch of shape ``(N, C, ...)`` (see the class for the allowed ranks),
            on the module's device: on the CPU a NumPy array or any host array
            exporting DLPack or the NumPy array interface (a PyTorch CPU tensor,
            a JAX CPU array, a ``numpy.memmap``), used in place, not copied.
        out : array, optional
            Array to write the output into, with the shape and dtype of ``x``.
        residual : array, optional
            Added before the activation, in the same pass: the output is
            ``activation(bn(x) + residual)``. Kept by reference for backward.

        Returns
        -------
        array
            The normalised batch, of the same kind as ``x`` (a PyTorch tensor
            for a PyTorch tensor; a plain ndarray for an ndarray subclass), or
            ``out`` itself.

        Raises
        ------
        RuntimeError
            PyTorch's text when ``x`` has another dtype than the module's
            parameters, followed by the module's dtype and how to convert either.
        """
        if is_dask_array(x):
            return self._dask_forward(x, out, residual)
        exchange = self._exchange if self.training else None
        tracking = self.training and self.track_running_stats
        if residual is None:
            return self._planned_forward(x, tracking, out, exchange)
        with self._backend.on_device(self._gpu):
            try:
                call = self._prepare_forward(x, out, residual, tracking, exchange is None)
            except Exception as error:
                _refuse(exchange, FORWARD, error)
            output, saved = run_forward(call, exchange=exchange)
        if tracking:
            self._count_batch()
        count = None if exchange is None else exchange.count
        self._remember(call, saved, residual, count)
        return output

    def _planned_forward(
        self, x: Any, tracking: bool, out: Any | None, exchange: TrainingExchange | None
    ) -> Any:
        """A forward without a residual, checked in full only when its signature differs
        from the last such call's (see :class:`ForwardPlan`); ``out=``, when given, is part
        of the signature (its kind, shape, strides, dtype and whether it may be written),
        and whether it overlaps ``x`` is looked at on every call. With an ``exchange``,
        a failed check makes every part raise."""
        exchanged = exchange is not None
        with self._backend.on_device(self._gpu):
            try:  # one frame: each Python call costs a small forward a few percent
                self._check_kind(x, "input")
                array = self._backend.adopt(x)
                momentum = self._momentum_argument(tracking)
                running = self.running_mean
                out_array = out_signature = None
                if out is not None:
                    out_array = self._backend.adopt(out)
                    out_signature = (
                        type(out), out_array.shape, out_array.strides, out_array.dtype,
                        check.writeable(out_array),
                    )  # fmt: skip
                signature = (
                    array.shape, array.strides, array.dtype, self.training, tracking,
                    self.activation, id(self.weight), id(self.bias), id(running),
                    id(self.running_var), tracking and check.writeable(running), type(momentum),
                    type(self.eps), self.eps, out_signature, exchanged,
                )  # fmt: skip
                plan = self._plan
                if plan is None or plan[0] != signature:
                    call = self._prepare_forward(x, out, None, tracking, not exchanged)
                    held = (self.weight, self.bias, self.running_mean, self.running_var)
                    plan = self._plan = (signature, plan_forward(call, held, exchanged))
            except Exception as error:
                _refuse(exchange, FORWARD, error)
            output, saved = run_planned(plan[1], array, x, momentum, out_array, out, exchange)
        if tracking:
            self._count_batch()
        overwritten: tuple[str, ...] = ()
        if out_array is not None and self._backend.may_share_memory(out_array, array):
            overwritten = ("input",)
        count = None if exchange is None else exchange.count
        self._saved = _Saved(x, saved, None, overwritten, count)
        return output

    def _prepare_forward(
        self, x: Any, out: Any | None, residual: Any | None, tracking: bool, check_batch: bool
    ) -> ForwardCall:
        """Check a forward call of this module's arrays; change nothing."""
        self._check_kind(x, "input")
        array = self._backend.adopt(x)
        self._check_input(array)
        if residual is not None:
            self._check_kind(residual, "residual")
        try:
            return prepare_forward(
                array, *self._call_args(tracking), out=out, residual=residual,
                activation=self.activation, check_batch=check_batch, backend=self._backend,
                caller_input=x,
            )  # fmt: skip
        except RuntimeError as error:
            self._explain_dtype_mismatch(error, array.dtype)
            raise

    def _call_args(self, tracking: bool) -> tuple[Any, Any, Any, Any, bool, Any, Any]:
        """``(running_mean, running_var, weight, bias, training, momentum, eps)`` of a call,
        as ``functional.batch_norm`` takes them (batch statistics without running ones)."""
        use_running = not self.training or self.track_running_stats
        return (
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            self.training or self.running_mean is None,
            self._momentum_argument(tracking),
            self.eps,
        )

    def _count_batch(self) -> None:
        """Add one to ``num_batches_tracked`` (a training forward that tracks statistics)."""
        # Item assignment: several times cheaper than += on a 0-d array.
        counter = self.num_batches_tracked
        assert counter is not None  # tracking: allocated with the statistics
        counter[()] = counter[()] + 1

    def _dask_forward(self, x: Any, out: Any | None, residual: Any | None) -> Any:
        """A lazy forward of a Dask array (of host blocks), on the CPU, without ``out=``."""
        if self.device != "cpu":
            raise TypeError(
                f"{self._name()} is on {self.device} but the input is a Dask array "
                "(of host blocks); move the module with .to('cpu')"
            )
        if out is not None or residual is not None:
            raise ValueError(
                "a Dask input gives a lazy Dask output: out= and residual= take in-memory "
                "arrays only (add a residual to the result with +)"
            )
        self._check_input(x)
        from numbabn import dask as nbdask

        tracking = self.training and self.track_running_stats
        try:
            output = nbdask.batch_norm(x, *self._call_args(tracking), activation=self.activation)
        except RuntimeError as error:
            self._explain_dtype_mismatch(error, x.dtype)
            raise
        if tracking:
            self._count_batch()
        self._saved = None  # backward takes in-memory arrays only
        return output

    def _explain_dtype_mismatch(self, error: RuntimeError, dtype: np.dtype) -> None:
        """Add to PyTorch's text of a parameter-dtype error what to do about it.

        The text stays PyTorch's first (searchable, and what PyTorch raises);
        the module's name, both dtypes and both remedies follow.
        """
        if not check.is_param_dtype_error(error):
            return
        wanted = check.PARAM_DTYPES.get(dtype)
        text = getattr(error, "pytorch_text", error.args[0])
        text += ("" if text.endswith(".") else ".") + (
            f" {self._name()} has {self.dtype} parameters and running statistics "
            f"but the input is {dtype}: "
        )
        if wanted is not None:
            method = ".double()" if wanted == np.float64 else ".float()"
            text += (
                f"construct the module with dtype=np.{wanted} (or convert it with {method} "
                f"or .to(dtype=np.{wanted})), or "
            )
        error.args = (f"{text}convert the input to {self.dtype}",)

    def _remember(
        self, call: ForwardCall, saved: SavedStats, residual: Any | None, count: int | None
    ) -> None:
        """Keep what backward needs; note when ``out=`` wrote over an array it reads."""
        overwritten = []
        if call.out is not None:
            may_share_memory = self._backend.may_share_memory
            residual_array = None if call.epilogue is None else call.epilogue.residual
            for name, array in (("input", call.x), ("residual", residual_array)):
                if array is not None and may_share_memory(call.out, array):
                    overwritten.append(name)
        self._saved = _Saved(call.input, saved, residual, tuple(overwritten), count)

    def _saved_for_backward(self) -> _Saved:
        if self._saved is None:
            raise RuntimeError(
                "backward called before forward: there is no input to differentiate (a "
                "forward of a Dask array keeps none; backward takes in-memory arrays)"
            )
        saved = self._saved
        needs_input = saved.stats.batch_stats or self.weight is not None or self.activation
        needed = [
            name
            for name in saved.overwritten
            if (name == "input" and needs_input) or (name == "residual" and self.activation)
        ]
        if needed:
            raise RuntimeError(
                f"backward needs the last forward's {needed[0]}, but out= wrote the output over "
                f"it; call forward without out= aliasing the {needed[0]} before backward"
            )
        return saved

    @overload
    def __call__(
        self, x: np.ndarray, out: np.ndarray | None = None, *, residual: np.ndarray | None = None
    ) -> np.ndarray: ...
    @overload
    def __call__(self, x: Any, out: Any | None = None, *, residual: Any | None = None) -> Any: ...
    def __call__(self, x: Any, out: Any | None = None, *, residual: Any | None = None) -> Any:
        """Same as :meth:`forward`."""
        return self.forward(x, out, residual=residual)

    @overload
    def backward(
        self, grad_output: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]: ...
    @overload
    def backward(self, grad_output: Any, out: Any | None = None) -> Any: ...
    def backward(self, grad_output: Any, out: Any | None = None) -> Any:
        """Gradient w.r.t. the last forward's input; accumulate parameter gradients.

        Parameters
        ----------
        grad_output : array
            Gradient of the loss w.r.t. the last output (same shape and dtype),
            any kind of array :meth:`forward` takes.
        out : array, optional
            Array to write the input gradient into.

        Returns
        -------
        dx or (dx, dresidual)
            Gradient w.r.t. the input of the last :meth:`forward` (of that
            input's kind), and w.r.t. its residual when one was given. The
            parameter gradients accumulate in :attr:`grads` as NumPy arrays.
        """
        saved = self._saved
        # An exchanged forward's backward exchanges; so does a training backward without a
        # forward, so that its error reaches the ranks waiting for it.
        exchanging = self.training if saved is None else saved.whole_count is not None
        exchange = self._exchange if exchanging else None
        if out is None and saved is not None and saved.residual is None:
            return self._planned_backward(grad_output, saved, exchange)
        with self._backend.on_device(self._gpu):
            try:
                call = self._prepare_backward(grad_output, out)
            except Exception as error:
                _refuse(exchange, BACKWARD, error)
            count = 0 if saved is None else saved.whole_count or 0
            grad_input, grad_weight, grad_bias, *grad_residual = run_backward(
                call, exchange=exchange, count=count
            )
            self._accumulate_grads(grad_weight, grad_bias)
        return grad_input if call.originals[2] is None else (grad_input, grad_residual[0])

    def _planned_backward(
        self, grad_output: Any, saved: _Saved, exchange: TrainingExchange | None
    ) -> Any:
        """A backward without ``out=`` or a residual, checked in full only when its signature
        differs from the last such call's (see :class:`BackwardPlan`). With an ``exchange``,
        a failed check makes every part raise."""
        exchanged = exchange is not None
        with self._backend.on_device(self._gpu):
            try:
                self._check_kind(grad_output, "grad_output")
                adopt = self._backend.adopt
                dy, x = adopt(grad_output), adopt(saved.input)
                signature = (
                    dy.shape, dy.strides, dy.dtype, x.shape, x.strides, x.dtype,
                    saved.stats.batch_stats, saved.overwritten, id(self.weight), id(self.bias),
                    self.activation, exchanged,
                )  # fmt: skip
                plan = self._backward_plan
                if plan is None or plan[0] != signature:
                    call = self._prepare_backward(grad_output, None)
                    held = (self.weight, self.bias)
                    plan = self._backward_plan = (signature, plan_backward(call, held, exchanged))
            except Exception as error:
                _refuse(exchange, BACKWARD, error)
            grad_input, grad_weight, grad_bias = run_planned_backward(
                plan[1], dy, x, saved.stats, grad_output, saved.input, exchange,
                saved.whole_count or 0,
            )  # fmt: skip
            self._accumulate_grads(grad_weight, grad_bias)
        return grad_input

    def _prepare_backward(self, grad_output: Any, out: Any | None) -> BackwardCall:
        """Check a backward call against the last forward; change nothing."""
        saved = self._saved_for_backward()
        self._check_kind(grad_output, "grad_output")
        adopt = self._backend.adopt
        check.check_like(
            "grad_output", adopt(grad_output), adopt(saved.input), "the last forward's input"
        )
        return prepare_backward(
            grad_output, saved.input, saved.stats, self.weight, out=out, bias=self.bias,
            residual=saved.residual, activation=self.activation, backend=self._backend,
        )  # fmt: skip

    def _accumulate_grads(self, grad_weight: np.ndarray, grad_bias: np.ndarray) -> None:
        """Add parameter gradients to ``grads`` (kept until :meth:`zero_grad`)."""
        for name, grad in (("weight", grad_weight), ("bias", grad_bias)):
            if name not in self.grads:
                continue
            if self.grads[name] is None:
                self.grads[name] = grad
            else:
                self._backend.accumulate(self.grads[name], grad)

    def share_state(self, other: _BatchNorm) -> None:
        """Take ``other``'s arrays as this module's own, not copies: its parameters, running
        statistics, batch counter and gradients, so that an update through either module
        shows in both (``SyncBatchNorm.convert_sync_batchnorm`` does this)."""
        for key in _STATE_KEYS:
            setattr(self, key, getattr(other, key))
        self.grads = other.grads

    # -- parameters and buffers ------------------------------------------------

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        """``(name, array)`` for ``weight`` and ``bias`` (those the module has), as PyTorch.

        The arrays are the module's own (not copies): an optimiser updates them
        in place, ``p -= lr * bn.grads[name]``, with the gradient under the same
        name in :attr:`grads` (None until a backward). ``prefix`` is put before
        each name with a dot, as PyTorch's.
        """
        return self._named(_PARAMETER_KEYS, prefix)

    def parameters(self) -> Iterator[Any]:
        """The parameter arrays of :meth:`named_parameters`: ``weight``, then ``bias``."""
        return (array for _, array in self.named_parameters())

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        """``(name, array)`` for ``running_mean``, ``running_var`` and ``num_batches_tracked``.

        Those the module has (none without ``track_running_stats``); the
        module's own arrays, as :meth:`named_parameters`.
        """
        return self._named(_BUFFER_KEYS, prefix)

    def buffers(self) -> Iterator[Any]:
        """The arrays of :meth:`named_buffers`."""
        return (array for _, array in self.named_buffers())

    def _named(self, keys: tuple[str, ...], prefix: str) -> Iterator[tuple[str, Any]]:
        for name in keys:
            array = getattr(self, name)
            if array is not None:
                yield (f"{prefix}.{name}" if prefix else name), array

    # -- state_dict ---------------------------------------------------------

    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Host (NumPy) copies of the parameters and buffers under PyTorch's keys."""
        state = OrderedDict(
            (key, self._backend.to_host(getattr(self, key)))
            for key in _ARRAY_KEYS
            if getattr(self, key) is not None
        )
        if self.num_batches_tracked is not None:
            state["num_batches_tracked"] = self.num_batches_tracked.copy()
        return state

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True
    ) -> IncompatibleKeys:
        """Copy parameters and buffers from ``state_dict`` (e.g. PyTorch's, converted).

        Values may be NumPy arrays, CUDA arrays, or anything ``numpy.asarray``
        accepts (CPU tensors included), whatever device the module is on.
        Nothing is changed unless the whole load succeeds.

        Raises
        ------
        RuntimeError
            With PyTorch's text, on missing or unexpected keys (when ``strict``)
            and on any shape mismatch.
        """
        loadable, missing, unexpected = self._loadable(state_dict, strict)
        for key, value in loadable.items():
            target = getattr(self, key)
            if key == "num_batches_tracked":
                target[...] = value
            else:
                self._backend.assign(target, value)
        return IncompatibleKeys(missing, unexpected)

    def _loadable(
        self, state_dict: Mapping[str, Any], strict: bool
    ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
        """Check ``state_dict`` and convert its values to the state's dtypes, changing nothing.

        Returns the host arrays to load, and the missing and unexpected keys.
        """
        current = {key: getattr(self, key) for key in _STATE_KEYS if getattr(self, key) is not None}
        values = {key: host_values(value) for key, value in state_dict.items()}
        # Like PyTorch, a checkpoint without a batch counter loads with 0.
        if "num_batches_tracked" in current and "num_batches_tracked" not in values:
            values["num_batches_tracked"] = np.array(0, dtype=np.int64)
        missing = [key for key in current if key not in values]
        unexpected = [key for key in values if key not in current]
        errors = []
        if strict and missing:
            names = ", ".join(f'"{key}"' for key in missing)
            errors.append(f"Missing key(s) in state_dict: {names}. ")
        if strict and unexpected:
            names = ", ".join(f'"{key}"' for key in unexpected)
            errors.append(f"Unexpected key(s) in state_dict: {names}. ")
        for key, target in current.items():
            if key in values and values[key].shape != tuple(target.shape):
                errors.append(
                    f"size mismatch for {key}: copying a param with shape "
                    f"{values[key].shape} from checkpoint, the shape in current model is "
                    f"{tuple(target.shape)}."
                )
        if errors:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {self._name()}:\n\t" + "\n\t".join(errors)
            )
        # Converted before anything is written, so a value that cannot be changes nothing.
        loadable = {
            key: values[key].astype(target.dtype)
            for key, target in current.items()
            if key in values
        }
        return loadable, missing, unexpected

    def _name(self) -> str:
        """The module's class name, as its messages and repr show it."""
        return type(self).__name__

    def __repr__(self) -> str:
        return (
            f"{self._name()}({self.num_features}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, bias={self.has_bias}, "
            f"track_running_stats={self.track_running_stats}"
            + (f", activation={self.activation!r})" if self.activation else ")")
        )


# The constructor parameters of every eager module, in each class's docstring.
_PARAMETERS = """
    Parameters
    ----------
    num_features : int
        Number of channels ``C``.
    eps : float, default 1e-5
        Added to the variance inside the square root; checked at each call,
        as in PyTorch: positive in training, non-negative in evaluation.
    momentum : float or None, default 0.1
        Weight of the new batch in the running statistics,
        ``running = (1 - momentum) * running + momentum * batch``, for any real
        number, as in PyTorch; None for a cumulative average over all batches
        seen.
    affine : bool, default True
        Learnable per-channel weight (and bias).
    track_running_stats : bool, default True
        Keep running statistics and use them in evaluation mode.
    device : {"cpu", "cuda", None}
        Where the state lives: NumPy arrays, or Numba device arrays on the GPU.
    dtype : float32, float64, ml_dtypes.bfloat16 or float16, default float32
        Dtype of the parameters and statistics, and of the accepted input
        (a float32 module takes bfloat16 and float16 input too, as PyTorch's
        does).
    bias : bool, default True
        With ``affine``, whether there is a bias.
    activation : {None, "relu"}
        Applied to the output in the same pass (``forward(x, residual=z)``
        adds ``z`` first); backward recomputes the ReLU mask from the input.
"""


class BatchNorm1d(_BatchNorm):
    __doc__ = (
        "Batch normalization over ``(N, C)`` or ``(N, C, L)`` input, as "
        "``torch.nn.BatchNorm1d``.\n" + _PARAMETERS
    )

    _allowed_ndims = (2, 3)
    _ndim_label = "2D or 3D"


class BatchNorm2d(_BatchNorm):
    __doc__ = (
        "Batch normalization over ``(N, C, H, W)`` input, as ``torch.nn.BatchNorm2d``.\n"
        + _PARAMETERS
    )

    _allowed_ndims = (4,)
    _ndim_label = "4D"


class BatchNorm3d(_BatchNorm):
    __doc__ = (
        "Batch normalization over ``(N, C, D, H, W)`` input, as ``torch.nn.BatchNorm3d``.\n"
        + _PARAMETERS
    )

    _allowed_ndims = (5,)
    _ndim_label = "5D"


class _Lazy(_BatchNorm):
    """Infers ``num_features`` from the first input (mixed in before its eager class).

    Until then the module has no parameters or statistics; the first forward
    (or a state dict) allocates them, and from then on it is its eager class
    in all but name (an instance of it, too).
    """

    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: str | None = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        activation: str | None = None,
    ) -> None:
        self._materialized = False
        super().__init__(
            0, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, activation=activation,
        )  # fmt: skip

    def _materialize_then(self, num_features: int, action: Callable[[], Any]) -> Any:
        """Allocate the state of ``num_features`` channels and run ``action``.

        If ``action`` fails the module goes back to being lazy and empty, so a
        failed call changes nothing.
        """
        self._allocate(num_features)
        self._materialized = True
        try:
            return action()
        except BaseException:
            self._materialized = False
            self._allocate(0)
            raise

    def reset_running_stats(self) -> None:
        """As the eager class's; before the first input, PyTorch's ValueError."""
        if not self._materialized and self.track_running_stats:
            raise ValueError(
                "Attempted to use an uninitialized parameter in reset_running_stats. This "
                "error happens when you are using a `LazyModule`: call forward with a batch "
                "first to initialize the parameters"
            )
        super().reset_running_stats()

    def reset_parameters(self) -> None:
        """As the eager class's; nothing to reset before the first input (as in PyTorch)."""
        if self._materialized:
            super().reset_parameters()

    def forward(self, x: Any, out: Any | None = None, *, residual: Any | None = None) -> Any:
        if self._materialized:
            return super().forward(x, out, residual=residual)
        if is_dask_array(x):
            array = x
        else:
            self._check_kind(x, "input")
            array = self._backend.adopt(x)
        self._check_input(array)
        return self._materialize_then(
            array.shape[1], lambda: super(_Lazy, self).forward(x, out, residual=residual)
        )

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True
    ) -> IncompatibleKeys:
        reference = state_dict.get("running_mean", state_dict.get("weight"))
        if self._materialized or reference is None:
            return super().load_state_dict(state_dict, strict)
        return self._materialize_then(
            np.shape(reference)[0], lambda: super(_Lazy, self).load_state_dict(state_dict, strict)
        )

    def _name(self) -> str:
        """The eager class's name once materialized, as PyTorch's module becomes it."""
        return type(self).__mro__[2].__name__ if self._materialized else type(self).__name__


class LazyBatchNorm1d(_Lazy, BatchNorm1d):
    """:class:`BatchNorm1d` whose ``num_features`` comes from the first input."""


class LazyBatchNorm2d(_Lazy, BatchNorm2d):
    """:class:`BatchNorm2d` whose ``num_features`` comes from the first input."""


class LazyBatchNorm3d(_Lazy, BatchNorm3d):
    """:class:`BatchNorm3d` whose ``num_features`` comes from the first input."""
