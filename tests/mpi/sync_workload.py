"""Run under ``mpiexec -n K [--device cuda]``: SyncBatchNorm on uneven per-rank batches vs
one process, on host arrays or (in Numba's CUDA simulator or on GPUs) on device arrays.

Every rank checks its output, dx, running statistics, counter and (summed over
ranks) parameter gradients against BatchNorm on the concatenated batch, then
rank 0 prints ``sync ok``. A rank-0-only batch size list makes rank 1 empty when
there are 3 ranks. Also checks that a channel mismatch raises on every rank.
"""

import sys

import numpy as np
from mpi4py import MPI

import numbabn as nbn

device = "cuda" if "--device" in sys.argv and sys.argv[-1] == "cuda" else "cpu"
if device == "cuda":
    from numba import cuda

    def put(array):
        return cuda.to_device(np.ascontiguousarray(array))

    def host(array):
        return array.copy_to_host()
else:

    def put(array):
        return array

    def host(array):
        return np.asarray(array)


comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
# Uneven batch sizes; with 3 ranks, rank 1 holds nothing.
batch_sizes = {2: [3, 5], 3: [4, 0, 3]}[size]
channels = 4
rng = np.random.default_rng(7)
full_x = rng.standard_normal((sum(batch_sizes), channels, 3, 5)) * 2.0 + 1e3
full_dy = rng.standard_normal(full_x.shape)
starts = np.cumsum([0, *batch_sizes])
mine = slice(starts[rank], starts[rank + 1])


def make(module_class, **kwargs):
    module = module_class(channels, dtype=np.float64, momentum=None, **kwargs)
    module.weight[...] = np.linspace(0.5, 2.0, channels)
    module.bias[...] = np.linspace(-1.0, 1.0, channels)
    return module


reference = make(nbn.BatchNorm2d)
synced = nbn.SyncBatchNorm(channels, dtype=np.float64, momentum=None, device=device)
synced.load_state_dict(reference.state_dict())
for step in range(3):
    x = full_x * (step + 1)
    y_ref = reference(x)
    dx_ref = reference.backward(full_dy)
    y = synced(put(x[mine]))
    dx = synced.backward(put(full_dy[mine]))
    np.testing.assert_allclose(host(y), y_ref[mine], rtol=0, atol=1e-10)
    np.testing.assert_allclose(host(dx), dx_ref[mine], rtol=0, atol=1e-10)
    state = synced.state_dict()
    np.testing.assert_allclose(state["running_mean"], reference.running_mean, rtol=1e-12)
    np.testing.assert_allclose(state["running_var"], reference.running_var, rtol=1e-12)
    assert int(synced.num_batches_tracked) == int(reference.num_batches_tracked)
    for name in ("weight", "bias"):
        total = comm.allreduce(host(synced.grads[name]))
        np.testing.assert_allclose(total, reference.grads[name], rtol=1e-10, atol=1e-10)

# Every rank ends with bit-identical running statistics.
states = comm.allgather(synced.state_dict()["running_var"].tobytes())
assert all(state == states[0] for state in states)

# Eval communicates nothing and matches.
synced.eval()
reference.eval()
np.testing.assert_allclose(host(synced(put(full_x[mine]))), reference(full_x)[mine], atol=1e-10)

# A rank with a different channel count: a clear error on every rank, no hang.
synced.train()
before = synced.state_dict()
bad = full_x[mine][:, :3] if rank == size - 1 else full_x[mine]
try:
    synced(put(bad))
except (ValueError, RuntimeError) as error:
    message = str(error)
else:
    sys.exit(f"rank {rank}: no error for a channel mismatch")
assert "rank" in message or "should contain" in message, message
for key, value in synced.state_dict().items():
    assert np.array_equal(value, before[key]), key

if rank == 0:
    print(f"sync ok on {size} ranks ({device})")
