"""Device arrays: taking them in without copies, viewing, allocating, handing them back.

Anything with ``__cuda_array_interface__`` (Numba device arrays, CuPy arrays,
PyTorch CUDA tensors) is viewed as a Numba device array over the same memory.
Results go back to the caller as the kind of array the caller passed in.
Under Numba's CUDA simulator, device arrays wrap host NumPy arrays.

A call runs on one stream (:func:`on_stream`): its launches, copies and new
arrays are ordered there, and the arrays it returns say so (their ``stream``,
exported through the interface). By default that is the stream the input's
producer named in its interface (version 3's ``stream``: CuPy's current
stream), or for a PyTorch tensor, whose interface (version 2) names none,
PyTorch's current stream on the tensor's GPU; so the work follows the
producer's without the host waiting.

A call whose input is a PyTorch tensor or a CuPy array allocates its new arrays
through that library (its caching allocator or memory pool, for the call's
stream), and hands its results back as that library's views of them: no copy,
no host synchronisation, and memory the library can reuse as soon as the
caller drops it.

bfloat16 data are Numba device arrays of ``ml_dtypes.bfloat16``, which
numba-cuda's kernels take as its bfloat16. PyTorch exports its bfloat16 CUDA
tensors as raw 2-byte values (typestr ``<V2``) and takes none back: such a
tensor is viewed as bfloat16 on the way in; results come back from PyTorch's
own bfloat16 memory (see above), or, made by Numba, as their 16-bit integers
viewed as ``torch.bfloat16``; no copy either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from numba import cuda
from numba.cuda.core import config
from numba.cuda.cudadrv import devicearray, driver

from numbabn._cpu.halves import bfloat16
from numbabn._validation import is_bfloat16

SIMULATOR = bool(config.ENABLE_CUDASIM)


def adopt(array: Any) -> Any:
    """View ``array`` as a Numba device array without copying (None stays None).

    The view keeps the stream the exporter named (no host synchronisation: the
    call's work is ordered after the producer's on that stream) and its
    read-only mark, as ``writeable = False`` (the argument checks refuse to
    write such an array).
    """
    if array is None or devicearray.is_cuda_ndarray(array):
        return array
    if getattr(array, "requires_grad", False):
        array = array.detach()  # PyTorch exports no interface for tensors that require grad
    # Read once (PyTorch builds the description in Python each time); the stream is
    # bound below to numbabn's object for it, not to a new one made per call.
    interface = array.__cuda_array_interface__
    description = {**interface, "stream": None}
    adopted = cuda.from_cuda_array_interface(description, owner=array, sync=False)
    if _holds_bfloat16(array) and not is_bfloat16(adopted.dtype):
        adopted = retyped(adopted, bfloat16())  # exported as raw 2-byte values
    handle = producer_stream(array, interface)
    if handle and not SIMULATOR:  # the simulator has no streams of other libraries
        adopted = adopted.bind(_external_stream(context_key(), handle))
    if interface["data"][1]:
        adopted.writeable = False
    return adopted


def producer_stream(array: Any, interface: dict[str, Any] | None = None) -> int | None:
    """The handle of the stream ``array``'s data is valid on, by its exporter (None: not
    named, 0: the default stream); ``interface`` is its array interface when already read.

    Version 3 of the interface names it (``stream``); PyTorch exports version 2,
    which does not, while its work is queued on its current stream for the
    tensor's GPU: that stream it is.
    """
    if interface is None:
        interface = array.__cuda_array_interface__
    if "stream" in interface:
        return interface["stream"]
    if type(array).__module__.partition(".")[0] == "torch":
        return int(sys.modules["torch"].cuda.current_stream(array.device).cuda_stream)
    return None


@functools.lru_cache(maxsize=64)
def _external_stream(context: int, handle: int) -> Any:
    """One Numba stream object per context and stream handle, which does not own the
    stream (launch configurations hold these, not the caller's stream objects)."""
    return cuda.external_stream(handle)


_this_call = threading.local()


def current_stream() -> Any:
    """The stream of this thread's call (0: Numba's default stream)."""
    return getattr(_this_call, "stream", 0)


def _library(array: Any) -> str:
    """The top-level module of ``array``'s type ("torch", "cupy", "numba", ...)."""
    return type(array).__module__.partition(".")[0]


def library_owner(array: Any) -> Any | None:
    """The PyTorch tensor or CuPy array whose memory the device array ``array`` views
    (None for memory of Numba's, and in the simulator)."""
    owner = getattr(getattr(array, "gpu_data", None), "owner", None)
    return owner if _library(owner) in ("torch", "cupy") else None


@contextlib.contextmanager
def on_stream(stream: Any | None, x: Any, others: tuple[Any, ...] = ()) -> Iterator[None]:
    """Run the launches and copies made inside on ``stream``, by default ``x``'s.

    ``x`` is the call's input as adopted: its stream is the producer's. Arrays in
    ``others`` valid on yet another stream are waited for on the device (an
    event on their stream, which the call's stream waits on), as the CUDA Array
    Interface asks of a consumer.
    """
    previous = current_stream(), getattr(_this_call, "allocator", None)
    chosen = getattr(x, "stream", 0) if stream is None else stream
    if not SIMULATOR:  # the simulator runs every launch to its end at once
        for array in (x, *others):
            producer = getattr(array, "stream", 0)
            if producer and (not chosen or int(producer) != int(chosen)):
                event = cuda.event(timing=False)
                event.record(producer)
                event.wait(chosen)
    _this_call.stream = chosen
    _this_call.allocator = library_owner(x)
    try:
        yield
    finally:
        _this_call.stream, _this_call.allocator = previous


def like(result: Any, original: Any) -> Any:
    """``result`` (a Numba device array) as the kind of array ``original`` is, without a copy.

    Memory that library allocated (see :func:`empty`) comes back as its own view of it;
    other memory through the array interface.
    """
    library = _library(original)
    owner = library_owner(result)
    if owner is not None and _library(owner) == library:
        return _library_view(owner, tuple(result.shape), tuple(result.strides), _pointer(result))
    if library == "cupy":
        return sys.modules["cupy"].asarray(result)
    if library == "torch":
        torch = sys.modules["torch"]
        if is_bfloat16(result.dtype):  # PyTorch takes no bfloat16 interface: the bits go
            bits = torch.as_tensor(retyped(result, np.dtype(np.int16)), device=original.device)
            return bits.view(torch.bfloat16)
        return torch.as_tensor(result, device=original.device)
    return result


def _pointer(array: Any) -> int:
    """The address of a Numba device array's first element: its memory pointer's (what
    its array interface exports, without building that description)."""
    return int(array.gpu_data.device_pointer_value or 0)


def _library_view(
    owner: Any, shape: tuple[int, ...], strides: tuple[int, ...], pointer: int
) -> Any:
    """The PyTorch tensor or CuPy array of ``shape`` and byte ``strides`` from address
    ``pointer`` on, a view of ``owner``'s memory (and of its dtype)."""
    if _library(owner) == "torch":
        itemsize = owner.element_size()
        offset = owner.storage_offset() + (pointer - owner.data_ptr()) // itemsize
        return owner.as_strided(shape, tuple(stride // itemsize for stride in strides), offset)
    cupy = sys.modules["cupy"]
    return cupy.ndarray(shape, owner.dtype, owner.data + (pointer - owner.data.ptr), strides)


def _library_empty(owner: Any, shape: tuple[int, ...], dtype: np.dtype) -> Any | None:
    """A new C-contiguous array made by ``owner``'s library on its device, for the call's
    stream; None when the library has no such dtype."""
    handle = int(current_stream() or 0)
    if _library(owner) == "torch":
        torch = sys.modules["torch"]
        torch_dtype = getattr(torch, dtype.name, None)
        if not isinstance(torch_dtype, torch.dtype):
            return None
        # The caching allocator keeps a block for the stream current when it was made.
        on_stream: Any = contextlib.nullcontext()
        if handle != torch.cuda.current_stream(owner.device).cuda_stream:
            external = torch.cuda.ExternalStream(handle, device=owner.device)
            on_stream = torch.cuda.stream(external)
        with on_stream:
            return torch.empty(shape, dtype=torch_dtype, device=owner.device)
    cupy = sys.modules["cupy"]
    if dtype.name == "bfloat16":
        return None
    with owner.device:
        on_stream = contextlib.nullcontext()
        if handle != cupy.cuda.get_current_stream().ptr:
            on_stream = cupy.cuda.ExternalStream(handle)
        with on_stream:
            return cupy.empty(shape, dtype)


def _holds_bfloat16(array: Any) -> bool:
    """Whether another library's array holds bfloat16 (``torch.bfloat16``, for one)."""
    return str(getattr(array, "dtype", "")).endswith("bfloat16")


def retyped(array: Any, dtype: np.dtype) -> Any:
    """``array``'s memory as ``dtype``, a dtype of the same size: the same shape and strides."""
    if SIMULATOR:
        return type(array)(array._ary.view(dtype), stream=array.stream)
    return devicearray.DeviceNDArray(
        array.shape, array.strides, dtype, stream=array.stream, gpu_data=array.gpu_data
    )


def view(array: Any, shape: tuple[int, ...], strides: tuple[int, ...]) -> Any:
    """A view of ``array`` with another shape and strides, starting at the same element."""
    if SIMULATOR:
        return type(array)(
            np.lib.stride_tricks.as_strided(array._ary, shape, strides), stream=array.stream
        )
    return devicearray.DeviceNDArray(
        shape, strides, array.dtype, stream=array.stream, gpu_data=array.gpu_data
    )


def empty(shape: tuple[int, ...], dtype: Any) -> Any:
    """A new C-contiguous device array, valid on the call's stream: made by the library
    of the call's input when that is PyTorch or CuPy (see :func:`like`), else by Numba."""
    stream = current_stream()
    owner = getattr(_this_call, "allocator", None)
    made = None if owner is None else _library_empty(owner, shape, np.dtype(dtype))
    if made is None:
        return cuda.device_array(shape, dtype, stream=stream)
    return _numba_view(made, np.dtype(dtype), stream)


def _numba_view(made: Any, dtype: np.dtype, stream: Any) -> Any:
    """A Numba device array over ``made``, a new PyTorch tensor or CuPy array of ``dtype``,
    valid on ``stream``.

    Built from the pointer, shape and strides the library holds rather than through the
    array interface, where PyTorch assembles the description in Python, Numba derives
    shape, strides and size from it again, wraps the stream CuPy names in a new stream
    object, and ``bind`` copies the array once more. As Numba's import through the
    interface does, the memory pointer holds ``made`` as its owner: that keeps the memory
    allocated while the array, its views and its slices (whose pointers pass the owner
    on) live, and is how :func:`library_owner` finds it.
    """
    if _library(made) == "torch":
        pointer = made.data_ptr()
        strides = tuple(stride * dtype.itemsize for stride in made.stride())
    else:
        pointer, strides = made.data.ptr, made.strides
    memory = None  # an empty array: Numba gives it a null pointer of its own
    if made.nbytes:
        memory = driver.MemoryPointer(
            cuda.current_context(), ctypes.c_void_p(pointer), made.nbytes, owner=made
        )
    return devicearray.DeviceNDArray(
        tuple(made.shape), strides, dtype, stream=stream, gpu_data=memory
    )


def _memory_order(array: Any) -> list[int]:
    """The axes of ``array`` from the largest stride to the smallest."""
    return sorted(range(array.ndim), key=lambda axis: -abs(array.strides[axis]))


def _in_logical_order(dense: Any, order: list[int]) -> Any:
    """View a C-contiguous array whose axes are ``order`` with its axes put back in order."""
    if order == sorted(order):
        return dense
    shape = [0] * dense.ndim
    strides = [0] * dense.ndim
    for position, axis in enumerate(order):
        shape[axis] = dense.shape[position]
        strides[axis] = dense.strides[position]
    return view(dense, tuple(shape), tuple(strides))


def empty_like(array: Any) -> Any:
    """A new device array shaped like ``array``, its axes in the same memory order."""
    order = _memory_order(array)
    return _in_logical_order(empty(tuple(array.shape[axis] for axis in order), array.dtype), order)


def to_device(array: np.ndarray) -> Any:
    """Copy a host array to a new device array, its axes in the same memory order."""
    order = _memory_order(array)
    dense = cuda.to_device(np.ascontiguousarray(array.transpose(order)), stream=current_stream())
    return _in_logical_order(dense, order)


def to_host(array: Any) -> np.ndarray:
    """Copy a device array (any strides) to a new host array."""
    if SIMULATOR:
        return np.array(array._ary)
    dense = array.is_c_contiguous() or array.is_f_contiguous()
    if not (dense and all(stride >= 0 for stride in array.strides)):
        # Staged in the source's memory order, which copy_to_host keeps.
        staged = empty_like(array)
        copy(array, staged)
        array = staged
    stream = current_stream()
    host = array.copy_to_host(stream=stream)
    if stream:
        stream.synchronize()  # the copy was queued behind the call's work
    return host


def as_5d(array: Any) -> Any:
    """``array`` viewed with size-1 axes added in front, to five axes."""
    pad = 5 - array.ndim
    return view(array, (1,) * pad + tuple(array.shape), (0,) * pad + tuple(array.strides))


def current_device() -> int:
    """The index of the GPU whose context is current (the simulator has one, 0)."""
    return 0 if SIMULATOR else cuda.get_current_device().id


def on_device(index: int) -> contextlib.AbstractContextManager[Any]:
    """Make GPU ``index`` current for what follows (nothing to do when it is)."""
    if index == current_device():
        return contextlib.nullcontext()
    return cuda.gpus[index]


def device_of(array: Any) -> int | None:
    """The index of the GPU whose memory holds ``array`` (None when it cannot be told:
    the simulator, an empty array, a driver that does not say)."""
    if SIMULATOR:
        return None
    pointer = getattr(array, "__cuda_array_interface__", {}).get("data", (0,))[0]
    if not pointer:
        return None
    attribute = driver.binding.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
    try:
        return int(
            driver.driver.cuPointerGetAttribute(attribute, driver.binding.CUdeviceptr(pointer))
        )
    except Exception:  # an old driver, or memory it does not know: no check
        return None


def context_key() -> int:
    """The current CUDA context, as an integer (0 in the simulator, which has one)."""
    if SIMULATOR:
        return 0
    handle = cuda.current_context().handle
    return int(getattr(handle, "value", None) or int(handle))


def queue_key() -> tuple[int, ...]:
    """What orders this call's launches: its context, stream and host thread.

    Launches of one key run one after another, so they may share scratch
    memory. Every thread gets keys of its own: with per-thread default streams
    two threads' launches on "the default stream" overlap, and the simulator
    runs each launch on the calling thread.
    """
    stream = current_stream()
    # A stream's handle (the simulator's streams have none: their identity).
    stream_key = 0 if not stream else id(stream) if SIMULATOR else int(stream)
    return (context_key(), stream_key, threading.get_ident())


def configured(kernel: Any, blocks: int, threads: int) -> Any:
    """``kernel[blocks, threads, stream]`` on the call's stream, made once per grid on a GPU.

    numbabn sizes its grids to the data, so Numba's warning that a small grid
    under-uses the GPU would only repeat itself for every small tensor. (The
    simulator's kernels keep one configuration at a time: nothing to reuse.)
    """
    if SIMULATOR:
        return kernel[blocks, threads]
    stream = current_stream()
    return _configured(kernel, blocks, threads, context_key(), int(stream) if stream else 0)


@functools.lru_cache(maxsize=1024)
def _configured(kernel: Any, blocks: int, threads: int, context: int, handle: int) -> Any:
    """Cached by the stream's handle, not its object: every object naming that stream (a
    new one per call for some callers) finds the configuration again."""
    stream = _external_stream(context, handle) if handle else 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Grid size .* under-utilization")
        return kernel[blocks, threads, stream]


def copy(source: Any, target: Any) -> None:
    """``target[...] = source`` on the device, for arrays of one shape and any strides."""
    from numbabn._cuda import kernels

    n = math.prod(source.shape)
    if n:
        blocks = -(-n // kernels.THREADS)
        configured(kernels.copy_5d, blocks, kernels.THREADS)(as_5d(source), as_5d(target))


def upload(values: np.ndarray, slot: int) -> Any:
    """Host ``values`` copied into a C-contiguous device array :func:`kept` for this call
    queue, ``slot`` and their shape and dtype."""
    target = kept(slot, values.shape, values.dtype)
    assign(target, values)
    return target


def kept(slot: int | str, shape: tuple[int, ...], dtype: Any) -> Any:
    """A C-contiguous device array kept for this call queue (see :func:`queue_key`),
    ``slot``, shape and dtype: made by the first such call, rewritten by the next ones,
    in order on their stream (nothing is allocated after the first call of a signature).

    A call's arrays that are live together take different slots; calls of other
    streams, contexts or host threads get arrays of their own.
    """
    return _kept(queue_key(), slot, tuple(shape), tuple(range(len(shape))), np.dtype(dtype))


def kept_like(array: Any, slot: int | str) -> Any:
    """A device array shaped like ``array``, its axes in the same memory order (as
    :func:`empty_like`), :func:`kept` for this call queue and ``slot``."""
    order = tuple(_memory_order(array))
    return _kept(queue_key(), slot, tuple(array.shape), order, np.dtype(array.dtype))


@functools.lru_cache(maxsize=64)
def _kept(
    queue: tuple[int, ...], slot: int | str, shape: tuple[int, ...], order: tuple[int, ...],
    dtype: np.dtype,  # the dtype itself: a bfloat16's typestr names raw 2-byte values
) -> Any:  # fmt: skip
    dense = empty(tuple(shape[axis] for axis in order), dtype)
    return _in_logical_order(dense, list(order))


def filled(value: float, n: int, dtype: np.dtype) -> Any:
    """A shared constant device vector standing in for a missing weight or bias (one per
    context, copied before any stream reads it)."""
    return _filled(value, n, dtype, context_key())


@functools.lru_cache(maxsize=64)
def _filled(value: float, n: int, dtype: np.dtype, context: int) -> Any:
    return cuda.to_device(np.full(n, value, dtype))


def zero(target: Any) -> None:
    """Zero the contiguous device array ``target`` on the call's stream."""
    driver.device_memset(target, 0, target.nbytes, stream=current_stream())


def assign(target: Any, values: np.ndarray | float) -> None:
    """Copy host ``values`` (or one value) into the contiguous device array ``target``."""
    values = np.broadcast_to(values, tuple(target.shape))
    target.copy_to_device(np.ascontiguousarray(values, target.dtype), stream=current_stream())


def may_share_memory(a: Any, b: Any) -> bool:
    """Whether two device arrays' memory ranges may overlap."""
    if SIMULATOR:
        return np.may_share_memory(a._ary, b._ary)
    if math.prod(a.shape) == 0 or math.prod(b.shape) == 0:
        return False
    a_start, a_stop = _span(a)
    b_start, b_stop = _span(b)
    return a_start < b_stop and b_start < a_stop


def _span(array: Any) -> tuple[int, int]:
    start = array.__cuda_array_interface__["data"][0]
    low = sum(min(0, (n - 1) * s) for n, s in zip(array.shape, array.strides, strict=True))
    high = sum(max(0, (n - 1) * s) for n, s in zip(array.shape, array.strides, strict=True))
    return start + low, start + high + array.dtype.itemsize
