"""Data-parallel training with SyncBatchNorm: ``mpiexec -n 2 python examples/mpi_data_parallel.py``.

A two-layer NumPy network (linear, batch norm, ReLU, linear) learns to classify
points drawn from four Gaussian blobs. Every rank holds its own shard of each
batch; SyncBatchNorm normalises with the statistics of the whole batch and the
parameter gradients are summed over ranks, so every rank applies the same update
and the model stays identical everywhere, as in one process on the whole batch.
"""

import numpy as np
from mpi4py import MPI

import numbabn as nbn

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

rng = np.random.default_rng(0)  # the same seed everywhere: same data and initial weights
centres = rng.normal(0.0, 3.0, size=(4, 2))
labels = rng.integers(0, 4, size=4096)
points = centres[labels] + rng.normal(0.0, 1.0, size=(4096, 2))

hidden = 32
w1 = rng.normal(0.0, 0.5, size=(2, hidden))
w2 = rng.normal(0.0, 0.5, size=(hidden, 4))
bn = nbn.SyncBatchNorm.convert_sync_batchnorm(nbn.BatchNorm1d(hidden, dtype=np.float64))
learning_rate, batch_size = 0.5, 256


def allreduce_sum(array):
    return comm.allreduce(array, op=MPI.SUM)


for epoch in range(1, 6):
    order = rng.permutation(len(points))
    correct = seen = 0
    loss_sum = 0.0
    for start in range(0, len(points), batch_size):
        batch = order[start : start + batch_size]
        shard = np.array_split(batch, size)[rank]  # this rank's part of the batch
        x, y = points[shard], labels[shard]

        h = x @ w1
        a = bn(h)
        r = np.maximum(a, 0.0)
        logits = r @ w2
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)

        # Cross-entropy averaged over the whole batch, whichever rank holds a row.
        loss_sum += -np.log(probs[np.arange(len(y)), y]).sum()
        correct += int((probs.argmax(axis=1) == y).sum())
        seen += len(y)
        d_logits = probs
        d_logits[np.arange(len(y)), y] -= 1.0
        d_logits /= len(batch)

        grad_w2 = allreduce_sum(r.T @ d_logits)
        d_a = (d_logits @ w2.T) * (a > 0)
        bn.zero_grad()
        d_h = bn.backward(d_a)  # this rank's slice of the whole-batch gradient
        grad_w1 = allreduce_sum(x.T @ d_h)
        w1 -= learning_rate * grad_w1
        w2 -= learning_rate * grad_w2
        for name, param in bn.named_parameters():  # the module's own arrays, updated in place
            param -= learning_rate * allreduce_sum(bn.grads[name])

    loss = allreduce_sum(loss_sum) / len(points)
    accuracy = allreduce_sum(correct) / allreduce_sum(seen)
    if rank == 0:
        print(f"epoch {epoch}: loss {loss:.4f}, accuracy {accuracy:.3f} ({size} ranks)")

# Every rank holds bit-identical running statistics and parameters.
fingerprints = comm.allgather(bn.running_var.tobytes() + w1.tobytes())
if rank == 0:
    same = all(fingerprint == fingerprints[0] for fingerprint in fingerprints)
    print(f"running statistics and weights identical on all ranks: {same}")
