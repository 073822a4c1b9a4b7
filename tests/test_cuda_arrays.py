"""The CUDA backend's streams, read-only arrays, devices and host threads.

A call runs on one stream: the ``stream=`` given, else the one the input's
producer named (CUDA Array Interface v3), or PyTorch's current stream for a
PyTorch tensor (whose interface, v2, names none), and its results say so. Read-only
device arrays are never written. Modules take device ids (``"cuda:1"``) and
refuse arrays of another GPU. Calls from several host threads at once each
work in scratch memory of their own. These run in Numba's CUDA simulator and on
a GPU (``make test-gpu``); importing foreign arrays (CuPy, PyTorch) needs a GPU.
"""

from __future__ import annotations

import sys
import threading
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import reference as ref
from conftest import make_input, tolerances

pytest.importorskip("numba_cuda")

from device import SIMULATOR, host, to_device  # noqa: E402
from numba import cuda  # noqa: E402

import numbabn  # noqa: E402
from numbabn import functional as F  # noqa: E402
from numbabn._cuda import arrays  # noqa: E402


@pytest.fixture(autouse=True)
def _small_blocks(cuda_small_blocks):
    """Several blocks and chunks on tiny shapes."""


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_results_are_valid_on_the_stream_given(rng, layout):
    x = make_input(rng, (4, 3, 5, 2), layout, np.float32)
    stream = cuda.stream()
    d_x = to_device(x)
    y, saved = F.batch_norm_forward(d_x, None, None, training=True, stream=stream)
    dx, _, _ = F.batch_norm_backward(to_device(np.ones_like(x)), d_x, saved, stream=stream)
    assert y.stream is stream and saved.mean.stream is stream and dx.stream is stream
    stream.synchronize()
    np.testing.assert_allclose(host(y), ref.forward(x).output, **tolerances(np.float32))


def test_work_follows_the_inputs_stream_by_default(rng):
    x = make_input(rng, (4, 3, 5), "contiguous", np.float32)
    stream = cuda.stream()
    produced = cuda.to_device(x, stream=stream).bind(stream)  # valid on that stream
    y = F.batch_norm(produced, None, None, training=True)
    assert y.stream is stream
    stream.synchronize()
    np.testing.assert_allclose(host(y), ref.forward(x).output, **tolerances(np.float32))


def test_host_arrays_take_no_stream(rng):
    x = make_input(rng, (4, 3, 5), "contiguous", np.float32)
    with pytest.raises(TypeError, match="stream= orders work on a CUDA device"):
        F.batch_norm(x, None, None, training=True, stream=cuda.stream())


def _read_only(array):
    """A device array marked as its exporter marks a read-only one."""
    device_array = to_device(array)
    device_array.writeable = False
    return device_array


@pytest.mark.parametrize("written", ["running_mean", "out"])
def test_read_only_device_arrays_are_not_written(rng, written):
    x = make_input(rng, (4, 3, 5), "contiguous", np.float32)
    running = {"running_mean": np.zeros(3, np.float32), "running_var": np.ones(3, np.float32)}
    out = np.full_like(x, 7.0)
    arguments = {name: to_device(value) for name, value in running.items()}
    arguments["out"] = to_device(out)
    arguments[written] = _read_only(running.get(written, out))
    with pytest.raises(ValueError, match=f"{written} is read-only"):
        F.batch_norm(to_device(x), training=True, **arguments)
    np.testing.assert_array_equal(host(arguments["running_mean"]), running["running_mean"])
    np.testing.assert_array_equal(host(arguments["out"]), out)


def test_read_only_inputs_are_read(rng):
    x = make_input(rng, (4, 3, 5), "contiguous", np.float32)
    y = F.batch_norm(_read_only(x), None, None, training=True)
    np.testing.assert_allclose(host(y), ref.forward(x).output, **tolerances(np.float32))


def test_each_thread_and_stream_has_its_own_scratch():
    keys = {}

    def record(name, stream=None):
        with arrays.on_stream(stream, None):
            keys[name] = arrays.queue_key()

    stream = cuda.stream()
    record("main")
    record("stream", stream)
    worker = threading.Thread(target=record, args=("thread",))
    worker.start()
    worker.join()
    assert len(set(keys.values())) == 3


@pytest.mark.skipif(SIMULATOR, reason="the simulator runs one host thread's kernels at a time")
def test_concurrent_calls_from_host_threads(rng):
    """Four threads train on data of their own at once: each gets its own batch's result."""
    inputs = [make_input(rng, (4, 3, 6), "contiguous", np.float64, loc=i) for i in range(4)]
    results: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(len(inputs))

    def train(index: int) -> None:
        d_x = to_device(inputs[index])
        barrier.wait()
        for _ in range(3):
            results[index] = host(F.batch_norm(d_x, None, None, training=True))

    threads = [threading.Thread(target=train, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, x in enumerate(inputs):
        np.testing.assert_allclose(results[index], ref.forward(x).output, **tolerances(x.dtype))


def _exported(interface: dict, module: str) -> object:
    """An array of GPU 0 exported through the CUDA Array Interface by a library ``module``."""
    array = type("Exported", (), {"__module__": module})()
    array.__cuda_array_interface__ = interface
    array.device = "cuda:0"
    return array


def test_the_producers_stream_is_the_one_named_or_pytorchs_current_one(monkeypatch):
    interface = {"shape": (2,), "typestr": "<f4", "data": (1 << 20, False), "version": 2}
    current = {"cuda:0": SimpleNamespace(cuda_stream=0x5EED)}
    fake_torch = SimpleNamespace(cuda=SimpleNamespace(current_stream=current.__getitem__))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    assert arrays.producer_stream(_exported(interface, "torch")) == 0x5EED
    assert arrays.producer_stream(_exported(interface, "somewhere")) is None
    named = {**interface, "version": 3, "stream": 0xCAFE}
    assert arrays.producer_stream(_exported(named, "torch")) == 0xCAFE


@pytest.mark.parametrize("read_only", [False, True])
def test_an_array_is_adopted_from_one_reading_of_its_interface(monkeypatch, read_only):
    """Numba views an exported array from the description read once (the exporter may build
    it in Python each time), with the array as owner, bound to numbabn's object for the
    stream named, not to one Numba would make for it; a read-only mark is kept."""
    interface = {
        "shape": (2,), "typestr": "<f4", "data": (1 << 20, read_only), "version": 3,
        "stream": 0xCAFE,
    }  # fmt: skip
    reads, viewed = [], []

    class Exported:
        @property
        def __cuda_array_interface__(self):
            reads.append(1)
            return interface

    def from_interface(description, owner, sync):
        viewed.append((description, owner, sync))
        return SimpleNamespace(bind=lambda stream: SimpleNamespace(stream=stream))

    monkeypatch.setattr(cuda, "from_cuda_array_interface", from_interface, raising=False)
    monkeypatch.setattr(arrays, "SIMULATOR", False)
    monkeypatch.setattr(arrays, "context_key", lambda: 0)
    monkeypatch.setattr(arrays, "_external_stream", lambda context, handle: f"stream {handle}")
    exported = Exported()
    adopted = arrays.adopt(exported)
    assert len(reads) == 1
    assert viewed == [({**interface, "stream": None}, exported, False)]
    assert adopted.stream == "stream 51966"
    assert getattr(adopted, "writeable", True) is not read_only


@pytest.mark.skipif(SIMULATOR, reason="PyTorch CUDA tensors need a real GPU")
def test_pytorch_tensors_run_on_pytorchs_current_stream(rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this PyTorch has no CUDA")
    x = make_input(rng, (64, 3, 33, 33), "contiguous", np.float32)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        busy = torch.ones(2048, 2048, device="cuda")
        for _ in range(8):  # keep the side stream busy before x is written
            busy = busy @ busy / 2048
        tensor = torch.from_numpy(x).to("cuda", non_blocking=True)
        assert int(arrays.adopt(tensor).stream) == side.cuda_stream
        y = F.batch_norm(tensor, None, None, training=True)
        grown = y * 1.0  # PyTorch's next kernel on the side stream reads y
    side.synchronize()
    np.testing.assert_allclose(grown.cpu().numpy(), ref.forward(x).output, rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(SIMULATOR, reason="CuPy arrays need a real GPU")
def test_cupy_current_stream_and_read_only_export(rng):
    cupy = pytest.importorskip("cupy")
    x = make_input(rng, (8, 3, 5), "contiguous", np.float32)
    with cupy.cuda.Stream(non_blocking=True) as stream:
        device_x = cupy.asarray(x)
        y = F.batch_norm(device_x, None, None, training=True)
        assert y.__cuda_array_interface__["stream"] == stream.ptr
        stream.synchronize()
    np.testing.assert_allclose(cupy.asnumpy(y), ref.forward(x).output, **tolerances(np.float32))

    class ReadOnly:
        """A running mean whose exporter marks it read-only."""

        def __init__(self, array):
            interface = dict(array.__cuda_array_interface__)
            interface["data"] = (interface["data"][0], True)
            self.__cuda_array_interface__ = interface

    running_mean = cupy.zeros(3, np.float32)
    with pytest.raises(ValueError, match="running_mean is read-only"):
        F.batch_norm(device_x, ReadOnly(running_mean), cupy.ones(3, np.float32), training=True)


def test_device_ids(rng):
    x = make_input(rng, (4, 3, 5), "contiguous", np.float32)
    bn = numbabn.BatchNorm1d(3, device="cuda:0")
    assert bn.device == "cuda:0"
    y = bn(to_device(x))
    np.testing.assert_allclose(host(y), ref.forward(x).output, **tolerances(np.float32))
    bn.backward(to_device(np.ones_like(x)))
    assert bn.to("cpu").device == "cpu" and bn.to("cuda:0").device == "cuda:0"
    count = len(cuda.gpus)
    with pytest.raises(ValueError, match=rf"device 'cuda:{count}' is not available: Numba finds"):
        numbabn.BatchNorm1d(3, device=f"cuda:{count}")
    for wrong in ("gpu", "cuda:x", "cuda:"):
        with pytest.raises(ValueError, match="numbabn runs on 'cpu', 'cuda' or 'cuda:N'"):
            numbabn.BatchNorm1d(3, device=wrong)


@pytest.mark.skipif(SIMULATOR or len(cuda.gpus) < 2, reason="needs two GPUs")
def test_arrays_of_another_gpu_are_refused(rng):
    x = make_input(rng, (4, 3, 5), "contiguous", np.float32)
    bn = numbabn.BatchNorm1d(3, device="cuda:1")
    with cuda.gpus[0]:
        on_first = cuda.to_device(x)
    with pytest.raises(TypeError, match="is on cuda:1 but the input is on cuda:0"):
        bn(on_first)
    with cuda.gpus[1]:
        on_second = cuda.to_device(x)
    np.testing.assert_allclose(host(bn(on_second)), ref.forward(x).output, rtol=2e-6, atol=2e-6)


@pytest.fixture
def per_call(monkeypatch):
    """``per_call(call)``: the kernel launches and Numba device allocations ``call()`` makes."""
    counts = {"launches": 0, "allocations": 0}

    def counted(function, key):
        def call(*args, **kwargs):
            counts[key] += 1
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(arrays, "configured", counted(arrays.configured, "launches"))
    for allocating in ("device_array", "to_device"):
        monkeypatch.setattr(cuda, allocating, counted(getattr(cuda, allocating), "allocations"))

    def count(call):
        counts.update(launches=0, allocations=0)
        call()
        return counts["launches"], counts["allocations"]

    return count


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_launches_and_allocations_per_call(rng, per_call, layout):
    """Train forward 2 launches, backward 2, eval 1, eval backward 3; after the first call of
    a signature, new device memory only for results (the saved statistics among them)."""
    x = make_input(rng, (4, 3, 5, 2), layout, np.float32)
    dy = to_device(make_input(rng, (4, 3, 5, 2), layout, np.float32))
    d_x = to_device(x)
    bn = numbabn.BatchNorm2d(3, device="cuda")
    for training in (True, False):  # compiles, and makes the scratch memory of this shape
        bn.train(training)
        bn(d_x)
        bn.backward(dy)
    bn.train()
    bn.zero_grad()
    assert per_call(lambda: bn(d_x)) == (2, 2)  # the output and the coefficients it returns
    assert per_call(lambda: bn.backward(dy)) == (2, 2)  # dx and [dweight, dbias]
    bn.eval()
    assert per_call(lambda: bn(d_x)) == (1, 2)
    bn.zero_grad()
    assert per_call(lambda: bn.backward(dy)) == (3, 2)  # sums, scale, dx


def test_staging_memory_is_kept_per_signature(rng, per_call):
    """Operands of four strided axis groups (x, dy, an out) are copied through staging
    memory that a signature's first call makes: later calls allocate only what they return
    (the coefficients, [dweight, dbias]), and compute on their own values."""
    shape = (2, 3, 2, 3, 2)
    xs = [make_input(rng, shape, "inner_slice", np.float32, loc=loc) for loc in (0.0, 5.0)]
    d_xs = [to_device(x) for x in xs]
    d_dy = to_device(make_input(rng, shape, "crop", np.float32))
    out = to_device(make_input(rng, shape, "inner_slice", np.float32))
    weight = to_device(np.linspace(0.5, 1.5, 3, dtype=np.float32))

    def step(d_x):
        _, saved = F.batch_norm_forward(d_x, None, None, weight, training=True, out=out)
        return F.batch_norm_backward(d_dy, d_x, saved, weight, out=out)

    step(d_xs[0])
    results = []
    # Copies: x in, y out; x and dy in, dx out.
    assert per_call(lambda: results.append(step(d_xs[1]))) == (2 + 2 + 2 + 3, 1 + 1)
    forward = ref.forward(xs[1])
    expected = ref.backward(host(d_dy), xs[1], forward.mean, forward.invstd, host(weight))
    np.testing.assert_allclose(host(out), expected.grad_input, **tolerances(np.float32))
    np.testing.assert_allclose(host(results[0][1]), expected.grad_weight, **tolerances(np.float32))


def test_staging_memory_is_its_streams_own():
    """Calls on two streams never share staging memory; calls on one stream do."""
    x = to_device(np.zeros((2, 3, 4), np.float32))
    first, second = cuda.stream(), cuda.stream()
    kept = []
    for stream in (first, second, first):
        with arrays.on_stream(stream, x):
            kept.append(arrays.kept_like(x, "input"))
    assert kept[0] is kept[2]
    assert not arrays.may_share_memory(kept[0], kept[1])


def test_launch_configurations_are_cached_by_stream_handle(monkeypatch):
    """Two stream objects of one handle (a new one per call for some producers) find one
    configuration, which launches on a stream object of numbabn's own."""
    made = []

    class Kernel:
        def __getitem__(self, configuration):
            made.append(configuration)
            return configuration

    monkeypatch.setattr(arrays, "SIMULATOR", False)
    monkeypatch.setattr(arrays, "context_key", lambda: 0)
    monkeypatch.setattr(arrays, "_external_stream", lambda context, handle: f"stream {handle}")
    kernel = Kernel()
    configured = []
    for stream in (_Handle(0xBEEF), _Handle(0xBEEF), _Handle(0xF00D), 0):
        with arrays.on_stream(stream, None):
            configured.append(arrays.configured(kernel, 7, 16))
    assert made == [(7, 16, "stream 48879"), (7, 16, "stream 61453"), (7, 16, 0)]
    assert configured[0] is configured[1]


class _Handle:
    """A stream object of a producer: its handle is all it shares with another."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __int__(self) -> int:
        return self.handle

    def __bool__(self) -> bool:
        return True


def test_memory_of_the_inputs_library_comes_back_as_its_own_view():
    """A result in memory the input's library allocated is that library's view of it (the
    kernels' offset, shape and strides), not a wrapper made through the interface."""
    torch = pytest.importorskip("torch")
    owner = torch.arange(24, dtype=torch.float32)
    base = owner.data_ptr()
    view = arrays._library_view(owner, (3, 2), (4, 12), base + 8)
    assert view.data_ptr() == base + 8
    assert view.tolist() == [[2, 5], [3, 6], [4, 7]]
    device_array = SimpleNamespace(
        shape=(2, 3), strides=(12, 4),
        gpu_data=SimpleNamespace(owner=owner, device_pointer_value=base + 24),
    )  # fmt: skip
    returned = arrays.like(device_array, torch.zeros(1))
    assert type(returned) is torch.Tensor
    assert returned.tolist() == [[6, 7, 8], [9, 10, 11]]


@pytest.mark.parametrize("stream", [None, 0xBEEF])
def test_new_arrays_of_a_pytorch_call_come_from_pytorch(monkeypatch, stream):
    """Under a call whose input is a PyTorch tensor, new device arrays are torch.empty's, made
    for the call's stream (PyTorch's current one, else that stream as PyTorch's current)."""
    torch = pytest.importorskip("torch")
    made, streams = [], []
    empty = torch.empty

    def recorded_empty(*args, **kwargs):
        made.append((args, kwargs))
        return empty(*args, **{**kwargs, "device": "cpu"})

    monkeypatch.setattr(torch, "empty", recorded_empty)
    current = SimpleNamespace(cuda_stream=0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda handle, device: handle)
    monkeypatch.setattr(
        torch.cuda, "stream", lambda chosen: streams.append(chosen) or nullcontext()
    )
    monkeypatch.setattr(arrays, "_numba_view", lambda made, dtype, on: ("viewed", made, on))
    monkeypatch.setattr(cuda, "device_array", None)  # Numba allocates nothing
    owner = SimpleNamespace(device="cuda:0")
    monkeypatch.setattr(arrays, "library_owner", lambda x: owner)
    monkeypatch.setattr(arrays, "_library", lambda array: "torch")
    with arrays.on_stream(None if stream is None else _Handle(stream), None):
        assert arrays.empty((2, 3), np.float32)[0] == "viewed"
    assert made == [(((2, 3),), {"dtype": torch.float32, "device": "cuda:0"})]
    assert streams == ([] if stream is None else [stream])


@pytest.mark.parametrize("library", ["torch", "cupy"])
def test_new_library_arrays_are_viewed_from_their_pointer(monkeypatch, library):
    """A new PyTorch tensor or CuPy array becomes a Numba device array through a memory
    pointer that holds it (so it lives while Numba's array does) over its address, size,
    shape and byte strides, valid on the call's stream; an empty one has no pointer."""
    torch = pytest.importorskip("torch")
    tensor = torch.empty((2, 3, 4), dtype=torch.float16)
    made = tensor if library == "torch" else _CupyArray(tensor)
    pointers, arrays_made = [], []

    def recorded(calls, returned):
        return lambda *args, **kwargs: calls.append((args, kwargs)) or returned

    monkeypatch.setattr(cuda, "current_context", lambda: "context")
    monkeypatch.setattr(
        arrays, "driver", SimpleNamespace(MemoryPointer=recorded(pointers, "memory"))
    )
    monkeypatch.setattr(
        arrays, "devicearray", SimpleNamespace(DeviceNDArray=recorded(arrays_made, "array"))
    )
    half = np.dtype(np.float16)
    assert arrays._numba_view(made, half, "stream") == "array"
    (((context, address, size), kwargs),) = pointers
    assert (context, address.value, size) == ("context", tensor.data_ptr(), 48)
    assert kwargs["owner"] is made
    (((shape, strides, dtype), kwargs),) = arrays_made
    assert (shape, strides, dtype) == ((2, 3, 4), (24, 8, 2), np.float16)
    assert kwargs == {"stream": "stream", "gpu_data": "memory"}
    arrays._numba_view(made[:0] if library == "torch" else _CupyArray(tensor[:0]), half, 0)
    assert len(pointers) == 1 and arrays_made[-1][1]["gpu_data"] is None


class _CupyArray:
    """What a CuPy array offers of itself, over a CPU tensor's memory."""

    __module__ = "cupy"

    def __init__(self, tensor) -> None:
        self.shape, self.nbytes = tuple(tensor.shape), tensor.nbytes
        self.strides = tuple(stride * tensor.element_size() for stride in tensor.stride())
        self.data = SimpleNamespace(ptr=tensor.data_ptr())


@pytest.mark.skipif(SIMULATOR, reason="PyTorch and CuPy CUDA arrays need a real GPU")
@pytest.mark.parametrize("library", ["torch", "cupy"])
def test_results_are_allocated_by_the_callers_library(rng, library):
    """A repeated call allocates its result from PyTorch's caching allocator or CuPy's pool,
    and nothing else that stays."""
    module = pytest.importorskip(library)
    x = make_input(rng, (8, 3, 16, 16), "contiguous", np.float32)
    if library == "torch":
        if not module.cuda.is_available():
            pytest.skip("this PyTorch has no CUDA")
        device_x = module.from_numpy(x).cuda()
        used = module.cuda.memory_allocated
    else:
        device_x = module.asarray(x)
        used = module.get_default_memory_pool().used_bytes
    F.batch_norm(device_x, None, None, training=True)  # the scratch of this signature
    before = used()
    y = F.batch_norm(device_x, None, None, training=True)
    assert type(y) is type(device_x)
    assert x.nbytes <= used() - before < x.nbytes + 4096
