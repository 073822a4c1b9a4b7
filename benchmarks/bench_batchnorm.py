"""asv benchmarks for numbabn's CPU kernels.

Each class is seeded in ``setup`` and calls the kernel once there, so that Numba's
compilation (or cache load) is never part of a timing.
"""

import numpy as np

import numbabn as nbn

SHAPES = [(2, 16, 8, 8), (32, 64, 56, 56), (32, 2048, 7, 7)]


def _input(shape, dtype, layout):
    rng = np.random.default_rng(0)
    if layout == "channels_last":
        order = (0, 2, 3, 1)
        stored = rng.standard_normal([shape[axis] for axis in order]).astype(dtype)
        return stored.transpose(np.argsort(order))
    return rng.standard_normal(shape).astype(dtype)


class BatchNorm2d:
    """Train forward, backward and eval forward of ``BatchNorm2d``."""

    params = (SHAPES, ["float32", "float64"], ["nchw", "channels_last"])
    param_names = ["shape", "dtype", "layout"]

    def setup(self, shape, dtype, layout):
        self.x = _input(shape, dtype, layout)
        self.dy = np.ones_like(self.x)
        self.out = np.empty_like(self.x)
        self.bn = nbn.BatchNorm2d(shape[1], dtype=dtype)
        self.eval_bn = nbn.BatchNorm2d(shape[1], dtype=dtype).eval()
        self.bn(self.x)
        self.bn.backward(self.dy)
        self.eval_bn(self.x)

    def time_train_forward(self, shape, dtype, layout):
        self.bn(self.x, out=self.out)

    def time_backward(self, shape, dtype, layout):
        self.bn.backward(self.dy, out=self.out)

    def time_eval_forward(self, shape, dtype, layout):
        self.eval_bn(self.x, out=self.out)

    def peakmem_train_forward(self, shape, dtype, layout):
        self.bn(self.x)

    def peakmem_backward(self, shape, dtype, layout):
        self.bn.backward(self.dy)


class BatchNorm1d:
    """``(N, C)`` matrices, as after a fully connected layer."""

    params = ([(256, 2048), (4096, 64)], ["float32"])
    param_names = ["shape", "dtype"]

    def setup(self, shape, dtype):
        self.x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        self.dy = np.ones_like(self.x)
        self.bn = nbn.BatchNorm1d(shape[1], dtype=dtype)
        self.bn(self.x)
        self.bn.backward(self.dy)

    def time_train_forward(self, shape, dtype):
        self.bn(self.x)

    def time_backward(self, shape, dtype):
        self.bn.backward(self.dy)


class FusedReluResidual:
    """``relu(bn(x) + z)`` in one pass, and its backward."""

    params = ([(32, 64, 56, 56)], ["float32"])
    param_names = ["shape", "dtype"]

    def setup(self, shape, dtype):
        self.x = _input(shape, dtype, "nchw")
        self.z = _input(shape, dtype, "nchw")
        self.dy = np.ones_like(self.x)
        self.out = np.empty_like(self.x)
        self.bn = nbn.BatchNorm2d(shape[1], dtype=dtype, activation="relu")
        self.bn(self.x, residual=self.z)
        self.bn.backward(self.dy)

    def time_train_forward(self, shape, dtype):
        self.bn(self.x, out=self.out, residual=self.z)

    def time_backward(self, shape, dtype):
        self.bn.backward(self.dy, out=self.out)


class CudaBatchNorm2d:
    """The CUDA kernels (skipped without a GPU); each timing waits for the GPU to finish."""

    params = ([(32, 64, 56, 56), (256, 64, 112, 112)], ["float32"])
    param_names = ["shape", "dtype"]

    def setup(self, shape, dtype):
        try:
            from numba import cuda

            from numbabn._cuda.arrays import SIMULATOR
        except ImportError:
            raise NotImplementedError("numba-cuda is not installed") from None
        if SIMULATOR or not cuda.is_available():
            raise NotImplementedError("no CUDA GPU")
        self.cuda = cuda
        self.x = cuda.to_device(_input(shape, dtype, "nchw"))
        self.dy = cuda.to_device(np.ones(shape, dtype))
        self.out = cuda.device_array(shape, dtype)
        self.bn = nbn.BatchNorm2d(shape[1], dtype=dtype, device="cuda")
        self.bn(self.x, out=self.out)
        self.bn.backward(self.dy, out=self.out)
        cuda.synchronize()

    def time_train_forward(self, shape, dtype):
        self.bn(self.x, out=self.out)
        self.cuda.synchronize()

    def time_backward(self, shape, dtype):
        self.bn.backward(self.dy, out=self.out)
        self.cuda.synchronize()
