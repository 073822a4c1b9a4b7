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


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_launches_and_allocations_per_call(rng, monkeypatch, layout):
    """Train forward 2 launches, backward 2, eval 1; new device memory only for results."""
    x = make_input(rng, (4, 3, 5, 2), layout, np.float32)
    dy = to_device(make_input(rng, (4, 3, 5, 2), layout, np.float32))
    d_x = to_device(x)
    bn = numbabn.BatchNorm2d(3, device="cuda")
    bn(d_x)
    bn.backward(dy)  # compiles, and makes the scratch memory of this shape
    counts = {"launches": 0, "allocations": 0}
    configured, device_array = arrays.configured, cuda.device_array

    def counted_configured(*args):
        counts["launches"] += 1
        return configured(*args)

    def counted_device_array(*args, **kwargs):
        counts["allocations"] += 1
        return device_array(*args, **kwargs)

    monkeypatch.setattr(arrays, "configured", counted_configured)
    monkeypatch.setattr(cuda, "device_array", counted_device_array)

    def per_call(call):
        counts.update(launches=0, allocations=0)
        call()
        return counts["launches"], counts["allocations"]

    bn.zero_grad()
    assert per_call(lambda: bn(d_x)) == (2, 2)  # the output and the coefficients it returns
    assert per_call(lambda: bn.backward(dy)) == (2, 2)  # dx and [dweight, dbias]
    bn.eval()
    assert per_call(lambda: bn(d_x)) == (1, 2)
