"""Numba CUDA kernels, specialised at compile time.

Every operand is a 4-D view ``(A, C, R, S)`` of the caller's array (see
:mod:`numbabn._views`). The kernels know at compile time which of three
families a view belongs to, and walk it with no more index arithmetic than it
needs:

* ``ROWS``: planar views with ``R == 1`` (NCHW and other arrays whose spatial
  axes merge into one run of ``S`` values per sample and channel);
* ``PLANAR``: planar views of any strides;
* ``CHANNELS_INNER``: ``(P, C, 1, 1)``, the channel axis innermost in memory
  (channels-last data, ``(N, C)`` matrices);
* ``WIDE_ROWS``: rows views whose rows are wide (at least ``WIDE_ROW_THREADS``
  times ``THREADS`` values): a block takes whole rows and, in the reductions, its
  threads walk each row with one index, which saves the carries of a walk across
  rows (the passes that store walk such chunks as plain rows).

Every data kernel takes ``channels_per_block`` and ``per_block`` (values of a
channel a block covers) first. The blocks are ``(chunk, channel group)`` pairs:
block ``(i, j)`` covers chunk ``i`` of the values of its channel group ``j``,
which is one channel for planar data (the block's threads walk along ``S``) or
``channels_per_block`` adjacent channels for channels-inner data (a warp reads
that many neighbouring channels of ``32 / channels_per_block`` positions at
once; ``channels_per_block`` is the channel count rounded up to a power of two,
at most ``CHANNELS_PER_BLOCK``, so narrow tensors keep every thread busy).

Families (:class:`Family`), elementwise modes (:class:`Mode`) and the rows of
the per-channel coefficients (:class:`ForwardRow`, :class:`GradientRow`) are
integer enums: constants of the compiled code, like the flags. Numba indexes
arrays with plain integers only, so a row is written ``ForwardRow.MEAN.value``.

Each kernel factory (:func:`statistics`, :func:`gradient_sums`,
:func:`elementwise`, :func:`evaluation`) returns the kernel for one family and
one set of flags (mode, residual, ReLU): the flags are constants of the
compiled code, so no kernel carries a path it does not take.

Reductions are deterministic without floating-point atomics: each block sums
its values in a fixed order and writes one partial per channel; the last block
of a channel group to finish (an integer counter tells which) merges the
partials with all its threads in a fixed order and computes the per-channel
coefficients, so a training pass is two launches, statistics then the
elementwise pass. The grid depends only on the shape, never on the GPU, so
results are reproducible. The counters wrap back to zero by themselves
(``atomic.inc``), and the backend also zeroes them on the stream before every
reduction launch: a launch that was aborted, or that overlapped another on the
same scratch, cannot leave a later one merging stale partials.

Every data kernel returns at once for an input without values (a caller's
guard normally keeps such calls away): no chunk count or mean of zero values.

Values are accumulated in float64 around a per-channel shift (the channel's
first value for the statistics, the mean for the gradient sums), which keeps
data far from zero precise; the elementwise pass also works in float64 and
rounds once. bfloat16 and float16 arrays are read and written as they are,
widened exactly on load and rounded once on store (:mod:`numbabn._cuda.halves`).

NaN must propagate as in PyTorch: no float ``max()``/``min()`` anywhere (on
the GPU they lower to PTX max/min, which return the operand that is not NaN);
clamps and the ReLU are comparisons that NaN fails.
"""

from __future__ import annotations

import enum
import functools
import math
from pathlib import Path
from typing import Any

from numba import cuda, float64, int32, uint64
from numba.cuda.core import config

from numbabn import _coefficients, _source_stamp, _tunables
from numbabn._cuda import halves
from numbabn._cuda.halves import narrowed, zero_bound

SIMULATOR = bool(config.ENABLE_CUDASIM)

# Threads per block and the most channels per block in the channels-inner family
# (the tests patch them small under the simulator, so that ragged edges run).
THREADS = _tunables.THREADS
CHANNELS_PER_BLOCK = _tunables.CHANNELS_PER_BLOCK
# Rows of at least this many times THREADS values are walked row by row (WIDE_ROWS).
WIDE_ROW_THREADS = _tunables.WIDE_ROW_THREADS
# Partials a thread of the last block loads at once in the merge (see _merge_partials).
MERGE_LOADS = _tunables.MERGE_LOADS
# Blocks of THREADS threads that the data kernels must fit on one multiprocessor at
# once: ptxas keeps their registers within that (64 a thread: 50% occupancy).
MIN_BLOCKS = _tunables.MIN_BLOCKS_PER_SM

# Kernels are cached on disk like the CPU ones, so a warm start compiles nothing;
# the cache is keyed by every source their code comes from (see numbabn._source_stamp).
SOURCES = (Path(__file__), Path(_coefficients.__file__), Path(_tunables.__file__), *halves.SOURCES)
_DIGEST = _source_stamp.digest(SOURCES)

# The simulator takes none of the code-generation options.
_GPU_ONLY: dict[str, Any] = {} if SIMULATOR else {"forceinline": True}
_BOUNDED: dict[str, Any] = {} if SIMULATOR else {"launch_bounds": (THREADS, MIN_BLOCKS)}


def _kernel(function: Any, bounded: bool = True) -> Any:
    options = _BOUNDED if bounded else {}
    # The stamp installs the kernel cache (numba-cuda's own would be looked up at import).
    return _source_stamp.stamp(cuda.jit(**options)(function), "numbabn._cuda", _DIGEST)


# Device functions are inlined into the kernels, where their family and flag
# arguments are constants: the branches on them fold away.
_device = cuda.jit(device=True, **_GPU_ONLY)


class Family(enum.IntEnum):
    """How a view is walked (see the module docstring)."""

    ROWS = 0
    PLANAR = 1
    CHANNELS_INNER = 2
    WIDE_ROWS = 3


class ForwardRow(enum.IntEnum):
    """Rows of the forward's per-channel coefficients (float64, ``(COEFFICIENT_ROWS, C)``).

    ``y = relu((x - MEAN) * SCALE + SHIFT (+ z))``, with ``INVSTD`` kept for
    backward and ``M2`` (the batch's sum of squared deviations) for the moments alone.
    """

    MEAN = 0
    INVSTD = 1
    SCALE = 2
    SHIFT = 3
    M2 = 4


class GradientRow(enum.IntEnum):
    """Rows of the backward's per-channel coefficients.

    ``dx = (g + BETA * (x - MEAN) + GAMMA) * ALPHA``, where ``g`` is ``dy``
    masked by the forward's ReLU, rebuilt as ``(x - MEAN) * MASK_SCALE +
    MASK_SHIFT (+ z) > 0``.
    """

    MEAN = 0
    ALPHA = 1
    BETA = 2
    GAMMA = 3
    MASK_SCALE = 4
    MASK_SHIFT = 5


COEFFICIENT_ROWS = max(len(ForwardRow), len(GradientRow))


class Mode(enum.IntEnum):
    """What the elementwise kernel computes."""

    AFFINE = 0  # out = relu((x - MEAN) * SCALE + SHIFT + z), ForwardRow
    GRADIENT = 1  # out = (dy + BETA * (x - MEAN) + GAMMA) * ALPHA, GradientRow
    MASKED_GRADIENT = 2  # the same with dy masked by the forward's ReLU (no residual)
    MASKED_SCALE = 3  # out = g * ALPHA, g = dy through the forward's ReLU (fixed statistics)
    SCALED_GRADIENT = 4  # out = dy * ALPHA (dy masked already, fixed statistics)


# The per-channel arithmetic, shared with the CPU kernels (see numbabn._coefficients).
_channel_moments = _device(_coefficients.channel_moments)
_scale_channel = _device(_coefficients.scale_channel)
_running_average = _device(_coefficients.running_average)
_unbiased_variance = _device(_coefficients.unbiased_variance)
_backward_channel = _device(_coefficients.backward_channel)
_parameter_gradients = _device(_coefficients.parameter_gradients)


@_device
def _finite_or_zero(value):
    """``value``, or 0 when it is infinite or NaN (a shift must not make ``inf - inf``)."""
    return value if math.isfinite(value) else 0.0


@_device
def _relu(value, bound):
    """``value`` clamped below at 0 as PyTorch's ReLU does on it rounded to the output's
    type, whose values below ``bound`` in magnitude round to zero (see
    :func:`~numbabn._cuda.halves.zero_bound`): a negative one stays, to be stored as -0;
    NaN stays NaN."""
    return 0.0 if value < -bound else value


# -- where a thread works ---------------------------------------------------------


@_device
def _n_values(x):
    return x.shape[0] * x.shape[2] * x.shape[3]


@_device
def _update_running(running_mean, running_var, c, mean, m2, count, momentum):
    """PyTorch's update of channel ``c``'s running statistics from a batch's ``mean`` and
    ``m2`` over ``count`` values (any momentum, NaN included)."""
    unbiased = _unbiased_variance(m2, count)
    new_mean = _running_average(float64(running_mean[c]), mean, momentum)
    running_mean[c] = narrowed(new_mean, running_mean)
    new_var = _running_average(float64(running_var[c]), unbiased, momentum)
    running_var[c] = narrowed(new_var, running_var)


@_device
def _thread_range(x, family, channels_per_block, per_block):
    """This thread's ``(chunk, group, channel, first value, values, step, active)``.

    The grid is one-dimensional, chunks fastest (a second grid axis would cap the
    channel groups at 65535). The thread takes ``values`` values of its channel,
    ``step`` apart from ``first`` on; in ``WIDE_ROWS`` views, ``values`` counts
    the chunk's rows instead (see :func:`_loop_counts`).
    """
    n_values = _n_values(x)
    n_chunks = (n_values + per_block - 1) // per_block
    block = cuda.blockIdx.x
    group = block // n_chunks
    chunk = block - group * n_chunks
    t = cuda.threadIdx.x
    if family == Family.CHANNELS_INNER:
        row = t // channels_per_block
        channel = group * channels_per_block + (t - row * channels_per_block)
        step = THREADS // channels_per_block
    else:
        row = t
        channel = group
        step = THREADS
    first = chunk * per_block + row
    stop = chunk * per_block + per_block
    if stop > n_values:
        stop = n_values
    if family == Family.WIDE_ROWS:  # the rows of the chunk (a chunk is whole rows)
        values = (stop - chunk * per_block) // x.shape[3]
    else:
        values = (stop - first + step - 1) // step if first < stop else 0
    return chunk, group, channel, first, values, step, channel < x.shape[1]


@_device
def _position(x, family, k):
    """Value ``k`` of a channel as ``(a, r, s)``."""
    if family == Family.CHANNELS_INNER:
        return k, 0, 0
    n_s = x.shape[3]
    q = k // n_s
    s = k - q * n_s
    if family == Family.PLANAR:
        n_r = x.shape[2]
        a = q // n_r
        return a, q - a * n_r, s
    return q, 0, s


@_device
def _advance(x, family, a, r, s, da, dr, ds):
    """``(a, r, s)`` moved on by ``(da, dr, ds)`` (from :func:`_position`), with carries."""
    if family == Family.CHANNELS_INNER:
        return a + da, 0, 0
    if family == Family.WIDE_ROWS:  # within a row: no carry
        return a, 0, s + ds
    s += ds
    a += da
    if s >= x.shape[3]:
        s -= x.shape[3]
        if family == Family.ROWS:
            a += 1
        else:
            r += 1
    if family == Family.PLANAR:
        r += dr
        if r >= x.shape[2]:
            r -= x.shape[2]
            a += 1
    return a, r, s


@_device
def _loop_counts(x, family, taken, s):
    """``(rows, values per row)`` of a thread's walk from ``taken`` and its first ``s``.

    One "row" of ``taken`` values in the flat walks; in ``WIDE_ROWS`` views,
    ``taken`` rows of the values ``s, s + THREADS, ...`` each.
    """
    if family == Family.WIDE_ROWS:
        return taken, (x.shape[3] - s + THREADS - 1) // THREADS
    return 1, taken


@_device
def _next_row(family, a, s, ds, per_row):
    """The start of the thread's next row (``WIDE_ROWS``: the same ``s`` in row ``a + 1``)."""
    if family == Family.WIDE_ROWS:
        return a + 1, s - per_row * ds
    return a, s


@_device
def _raw(x, family, a, c, r, s):
    """``x[a, c, r, s]`` in ``x``'s dtype, indexing only the axes the family has.

    The indices are never negative: as unsigned integers they skip the
    wraparound a signed index costs in every access.
    """
    if family == Family.CHANNELS_INNER:
        return x[uint64(a), uint64(c), 0, 0]
    if family == Family.PLANAR:
        return x[uint64(a), uint64(c), uint64(r), uint64(s)]
    return x[uint64(a), uint64(c), 0, uint64(s)]


@_device
def _load(x, family, a, c, r, s):
    """``x[a, c, r, s]`` in float64 (see :func:`_raw`)."""
    return float64(_raw(x, family, a, c, r, s))


@_device
def _store(out, family, a, c, r, s, value):
    """``out[a, c, r, s] = value``, rounded once to ``out``'s dtype (see :func:`_load`)."""
    value = narrowed(value, out)
    if family == Family.CHANNELS_INNER:
        out[uint64(a), uint64(c), 0, 0] = value
    elif family == Family.PLANAR:
        out[uint64(a), uint64(c), uint64(r), uint64(s)] = value
    else:
        out[uint64(a), uint64(c), 0, uint64(s)] = value


# -- loads in flight ----------------------------------------------------------------------
# Numba passes arrays without noalias, so the compiler keeps every load after the stores
# before it: a loop of load, store, load, store has one load in flight per thread. The
# passes that store therefore load a group of values of each array they read before they
# store any: IN_FLIGHT loads in all (four values of one array, or two of each of two).
IN_FLIGHT = 4


@_device
def _group_load(x, family, a, c, r, s, da, dr, ds, width, n):
    """The first ``n`` of the next ``width`` (2 or 4) values of channel ``c`` from
    ``(a, r, s)`` on, ``(da, dr, ds)`` apart, in ``x``'s dtype; past the ``n``th, the
    first again. Four are returned whatever the width (the last two are unused for 2)."""
    v0 = _raw(x, family, a, c, r, s)
    a, r, s = _advance(x, family, a, r, s, da, dr, ds)
    v1 = _raw(x, family, a, c, r, s) if n > 1 else v0
    v2 = v0
    v3 = v0
    if width == 4:
        a, r, s = _advance(x, family, a, r, s, da, dr, ds)
        v2 = _raw(x, family, a, c, r, s) if n > 2 else v0
        a, r, s = _advance(x, family, a, r, s, da, dr, ds)
        v3 = _raw(x, family, a, c, r, s) if n > 3 else v0
    return v0, v1, v2, v3


@_device
def _group_store(out, family, a, c, r, s, da, dr, ds, width, n, v0, v1, v2, v3):
    """Store the first ``n`` values of a group where :func:`_group_load` read them;
    returns the position ``width`` steps on."""
    _store(out, family, a, c, r, s, v0)
    a, r, s = _advance(out, family, a, r, s, da, dr, ds)
    if n > 1:
        _store(out, family, a, c, r, s, v1)
    if width == 4:
        a, r, s = _advance(out, family, a, r, s, da, dr, ds)
        if n > 2:
            _store(out, family, a, c, r, s, v2)
        a, r, s = _advance(out, family, a, r, s, da, dr, ds)
        if n > 3:
            _store(out, family, a, c, r, s, v3)
    return _advance(out, family, a, r, s, da, dr, ds)


@_device
def _reads_second(mode, residual):
    """Whether a storing pass reads a second array: ``z`` with a residual, ``x`` in the
    gradient modes but ``SCALED_GRADIENT``."""
    if mode == Mode.AFFINE:
        return residual
    return mode != Mode.SCALED_GRADIENT


@_device
def _value(mode, residual, relu, first, second, coefficients):
    """One value of the elementwise pass in float64 (see its docstring): from ``x`` and
    ``z`` with the :class:`ForwardRow` coefficients ``(mean, scale, shift, 0, 0, 0)`` in
    the ``AFFINE`` mode, else from ``dy`` and ``x`` with the :class:`GradientRow` ones."""
    if mode == Mode.AFFINE:
        mean, scale, shift = coefficients[0], coefficients[1], coefficients[2]
        out = (float64(first) - mean) * scale + shift
        if residual:
            out += float64(second)
        return _relu(out, zero_bound(first)) if relu else out  # x's type: the output's
    mean, alpha, beta, gamma, mask_scale, mask_shift = coefficients
    g = float64(first)
    centred = float64(second) - mean
    # Zero where the forward's output, rounded to dy's type, was 0 or below; NaN passes dy
    # on, as PyTorch's ReLU backward does.
    if (mode == Mode.MASKED_GRADIENT or mode == Mode.MASKED_SCALE) and (
        centred * mask_scale + mask_shift <= zero_bound(first)
    ):
        g = 0.0
    if mode == Mode.MASKED_SCALE or mode == Mode.SCALED_GRADIENT:
        return g * alpha  # 0 * (x - mean) would be NaN for infinite x
    return (g + beta * centred + gamma) * alpha


@_device
def _group(first, second, out, family, a, c, r, s, da, dr, ds, n, mode, residual, relu, co):
    """``out = _value(first, second)`` for a group of ``n`` values from ``(a, r, s)`` on
    (4 values of ``first``, or 2 each of both arrays: see :func:`_reads_second`); returns
    the position after the group."""
    width = 2 if _reads_second(mode, residual) else 4
    f0, f1, f2, f3 = _group_load(first, family, a, c, r, s, da, dr, ds, width, n)
    s0, s1, s2, s3 = f0, f1, f2, f3
    if _reads_second(mode, residual):
        s0, s1, s2, s3 = _group_load(second, family, a, c, r, s, da, dr, ds, width, n)
    return _group_store(
        out, family, a, c, r, s, da, dr, ds, width, n,
        _value(mode, residual, relu, f0, s0, co), _value(mode, residual, relu, f1, s1, co),
        _value(mode, residual, relu, f2, s2, co), _value(mode, residual, relu, f3, s3, co),
    )  # fmt: skip


@_device
def _walk(first, second, out, family, a, c, r, s, da, dr, ds, taken, mode, residual, relu, co):
    """:func:`_group` over a thread's ``taken`` values: whole groups, then one partial
    group (a flat walk: see _flat_storing)."""
    width = 2 if _reads_second(mode, residual) else 4
    for _group_number in range(taken // width):
        a, r, s = _group(
            first, second, out, family, a, c, r, s, da, dr, ds, width, mode, residual, relu, co
        )
    left = taken % width
    if left:
        _group(first, second, out, family, a, c, r, s, da, dr, ds, left, mode, residual, relu, co)


# -- block reductions and the merge of partials -------------------------------------


@_device
def _block_reduce(sum_a, sum_b, keep):
    """Sum the block's per-thread pairs in a fixed order; threads ``t < keep`` get the
    totals of the threads ``t, t + keep, t + 2 * keep, ...``."""
    t = cuda.threadIdx.x
    shared_a = cuda.shared.array(THREADS, float64)
    shared_b = cuda.shared.array(THREADS, float64)
    shared_a[t] = sum_a
    shared_b[t] = sum_b
    cuda.syncthreads()
    width = THREADS // 2
    while width >= keep:
        if t < width:
            shared_a[t] += shared_a[t + width]
            shared_b[t] += shared_b[t + width]
        cuda.syncthreads()
        width //= 2
    total_a = shared_a[t]
    total_b = shared_b[t]
    cuda.syncthreads()  # the arrays are free for the next reduction
    return total_a, total_b


@_device
def _partial_index(family, channel, chunk):
    """Where a channel's partial of a chunk lives: threads of a warp touch neighbours."""
    if family == Family.CHANNELS_INNER:
        return chunk, channel
    return channel, chunk


@_device
def _last_block(counters, group, n_chunks):
    """Whether this block is the last of its channel group to have written its partials.

    The writers have fenced after their partials (only they need to); after the
    barrier the signalling thread fences again, so the count is ordered after
    every write of the block (the PTX memory model's cumulativity), and once more
    after the count, so the last block reads the others' partials only then. The
    counter wraps to zero at ``n_chunks``: every launch leaves it as it found it.
    """
    is_last = cuda.shared.array(1, int32)
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        cuda.threadfence()
        finished = cuda.atomic.inc(counters, group, n_chunks - 1)
        cuda.threadfence()
        is_last[0] = 1 if finished == n_chunks - 1 else 0
    cuda.syncthreads()
    return is_last[0] != 0


@_device
def _merge_partials(family, partials, channel, n_chunks, row, keep):
    """The sums of channel ``channel``'s partials ``row, row + rows, row + 2 * rows, ...``
    (``rows = THREADS // keep``), added in that order.

    Each round loads ``MERGE_LOADS`` of them before adding any, so that the thread has
    that many loads in flight: ``ceil(n_chunks / (rows * MERGE_LOADS))`` rounds that wait
    on memory one after another, which the grid keeps to at most ``MAX_MERGE_ROUNDS``.
    """
    rows = THREADS // keep
    merge_a = 0.0
    merge_b = 0.0
    for first in range(row, n_chunks, rows * MERGE_LOADS):
        loaded = cuda.local.array((MERGE_LOADS, 2), float64)
        for k in range(MERGE_LOADS):
            if first + k * rows < n_chunks:
                i, j = _partial_index(family, channel, first + k * rows)
                loaded[k, 0] = partials[i, j, 0]
                loaded[k, 1] = partials[i, j, 1]
        for k in range(MERGE_LOADS):
            if first + k * rows < n_chunks:
                merge_a += loaded[k, 0]
                merge_b += loaded[k, 1]
    return merge_a, merge_b


@_device
def _reduce_to_partials(
    family, sum_a, sum_b, channels_per_block, chunk, group, channel, partials, counters
):
    """Write the block's sums as partials and merge them in the group's last block.

    Returns ``(total_a, total_b, finishing)``: ``finishing`` is True for the
    threads of the last block that finish a channel (one per channel), which
    hold its merged totals. With one chunk per channel the block's own totals
    are the channel's: no partials, fences or counter.
    """
    keep = channels_per_block if family == Family.CHANNELS_INNER else 1
    n_chunks = cuda.gridDim.x // counters.shape[0]
    valid = channel < partials.shape[1 if family == Family.CHANNELS_INNER else 0]
    total_a, total_b = _block_reduce(sum_a, sum_b, keep)
    t = cuda.threadIdx.x
    if n_chunks == 1:
        return total_a, total_b, t < keep and valid
    if t < keep and valid:
        i, j = _partial_index(family, channel, chunk)
        partials[i, j, 0] = total_a
        partials[i, j, 1] = total_b
        cuda.threadfence()
    if not _last_block(counters, group, n_chunks):
        return 0.0, 0.0, False
    # All threads merge, each a fixed stride of chunks, then the same fixed tree.
    merge_a = 0.0
    merge_b = 0.0
    if valid:
        merge_a, merge_b = _merge_partials(family, partials, channel, n_chunks, t // keep, keep)
    total_a, total_b = _block_reduce(merge_a, merge_b, keep)
    return total_a, total_b, t < keep and valid


# -- statistics ---------------------------------------------------------------------


@functools.cache
def statistics(family: Family) -> Any:
    """The training statistics kernel of a family (see the returned kernel's docstring)."""

    def forward_statistics(
        channels_per_block, per_block, x, weight, bias, running_mean, running_var,
        update_running, momentum, eps, coeffs, partials, counters,
    ):  # fmt: skip
        """Batch statistics; writes the :class:`ForwardRow` rows of ``coeffs``.

        Updates the running statistics in place when ``update_running``.
        """
        if _n_values(x) == 0:
            return
        chunk, group, channel, k, taken, step, active = _thread_range(
            x, family, channels_per_block, per_block
        )
        sum_v = 0.0
        sum_vv = 0.0
        shift = 0.0
        if active:
            shift = _finite_or_zero(float64(x[0, channel, 0, 0]))
            a, r, s = _position(x, family, k)
            da, dr, ds = _position(x, family, step)
            rows, per_row = _loop_counts(x, family, taken, s)
            for _row in range(rows):
                for _value in range(per_row):
                    dv = _load(x, family, a, channel, r, s) - shift
                    sum_v += dv
                    sum_vv += dv * dv
                    a, r, s = _advance(x, family, a, r, s, da, dr, ds)
                a, s = _next_row(family, a, s, ds, per_row)
        total_v, total_vv, finishing = _reduce_to_partials(
            family, sum_v, sum_vv, channels_per_block, chunk, group, channel, partials, counters
        )
        if not finishing:
            return
        count = _n_values(x)
        mean, m2 = _channel_moments(total_v, total_vv, shift, count)
        invstd, scale = _scale_channel(m2 / count, float64(weight[channel]), eps)
        coeffs[ForwardRow.MEAN.value, channel] = mean
        coeffs[ForwardRow.INVSTD.value, channel] = invstd
        coeffs[ForwardRow.SCALE.value, channel] = scale
        coeffs[ForwardRow.SHIFT.value, channel] = float64(bias[channel])
        coeffs[ForwardRow.M2.value, channel] = m2
        if update_running:
            _update_running(running_mean, running_var, channel, mean, m2, count, momentum)

    return _kernel(forward_statistics)


# -- gradient sums -----------------------------------------------------------------

# _flat_when_masked: the passes through the forward's ReLU walk wide rows as plain rows
# (any chunk of whole rows is a chunk of values): rebuilding the mask, a row-by-row walk
# needs more than the 64 registers a thread that half occupancy leaves.
# _flat_storing: so do the elementwise and evaluation passes, which load a group of values
# before storing any: the compiler unrolls a row-by-row walk of groups and keeps an offset
# for each of its 16 positions, more than those 64 registers.


@functools.cache
def gradient_sums(family: Family, masked: bool, residual: bool) -> Any:
    """The gradient-sums kernel of a family, through the forward's ReLU when ``masked``
    (with its residual add when ``residual``)."""
    if masked and family == Family.WIDE_ROWS:
        return gradient_sums(Family.ROWS, masked, residual)  # see _flat_when_masked

    def sums(
        channels_per_block, per_block, dy, x, z, mean, invstd, weight, bias, batch_stats,
        coeffs, grads, partials, counters, dz,
    ):  # fmt: skip
        """``sum(g)`` and ``sum(g * (x - mean))`` per channel, finished into gradients.

        ``g`` is ``dy``, or (masked) ``dy`` unless the forward's ReLU input
        ``(x - mean) * weight * invstd + bias (+ z)`` was 0 or below; a NaN
        pre-activation passes ``dy`` on, as PyTorch's ReLU backward does. With
        the residual, ``dz = g`` (the residual's gradient, and what the second
        pass reads in place of ``dy``, ``z`` and the mask). Writes
        ``grads = [sum(g * xhat), sum(g)]`` (the weight and bias gradients) and
        the :class:`GradientRow` rows of ``coeffs``: the input gradient is ``(g
        + beta * (x - mean) + gamma) * alpha`` (through the batch statistics
        with ``batch_stats``, else ``g * weight * invstd``), and the mask rows
        rebuild the mask. ``alpha`` multiplies last, as in PyTorch.
        """
        if _n_values(x) == 0:
            return
        chunk, group, channel, k, taken, step, active = _thread_range(
            x, family, channels_per_block, per_block
        )
        sum_g = 0.0
        sum_gx = 0.0
        if active:
            m = mean[channel]
            scale = float64(weight[channel]) * invstd[channel]
            shift = float64(bias[channel])
            a, r, s = _position(x, family, k)
            da, dr, ds = _position(x, family, step)
            rows, per_row = _loop_counts(x, family, taken, s)
            for _row in range(rows):
                for _value in range(per_row):
                    g = _load(dy, family, a, channel, r, s)
                    centred = _load(x, family, a, channel, r, s) - m
                    if masked:
                        pre = centred * scale + shift
                        if residual:
                            pre += _load(z, family, a, channel, r, s)
                        if pre <= zero_bound(dy):  # the output rounded to dy's type
                            g = 0.0
                        if residual:
                            _store(dz, family, a, channel, r, s, g)
                    # Masked values still add 0 * (x - m): NaN for infinite x, as in PyTorch.
                    sum_g += g
                    sum_gx += g * centred
                    a, r, s = _advance(x, family, a, r, s, da, dr, ds)
                a, s = _next_row(family, a, s, ds, per_row)
        total_g, total_gx, finishing = _reduce_to_partials(
            family, sum_g, sum_gx, channels_per_block, chunk, group, channel, partials, counters
        )
        if not finishing:
            return
        c = channel
        grad_weight, grad_bias = _parameter_gradients(total_g, total_gx, invstd[c])
        grads[0, c] = narrowed(grad_weight, grads)
        grads[1, c] = narrowed(grad_bias, grads)
        count = _n_values(x)
        alpha, beta, gamma = _backward_channel(
            total_g, total_gx, count, invstd[c], float64(weight[c])
        )
        if not batch_stats:  # dx = g * weight * invstd
            beta = 0.0
            gamma = 0.0
        coeffs[GradientRow.MEAN.value, c] = mean[c]
        coeffs[GradientRow.ALPHA.value, c] = alpha
        coeffs[GradientRow.BETA.value, c] = beta
        coeffs[GradientRow.GAMMA.value, c] = gamma
        coeffs[GradientRow.MASK_SCALE.value, c] = alpha
        coeffs[GradientRow.MASK_SHIFT.value, c] = float64(bias[c])

    return _kernel(sums)


# -- elementwise passes ---------------------------------------------------------------


@functools.cache
def elementwise(family: Family, mode: Mode, residual: bool, relu: bool) -> Any:
    """The elementwise kernel of a family for one ``mode`` (``AFFINE`` with or without the
    residual and ReLU, ``GRADIENT``, ``MASKED_GRADIENT``, ``MASKED_SCALE``, ``SCALED_GRADIENT``)."""
    if family == Family.WIDE_ROWS:
        return elementwise(Family.ROWS, mode, residual, relu)  # see _flat_storing
    masked = mode in (Mode.MASKED_GRADIENT, Mode.MASKED_SCALE)

    def pass_(channels_per_block, per_block, x, dy, z, coeffs, out):
        """``out`` from ``x`` (and ``dy``, ``z``) with per-channel ``coeffs``, in float64.

        ``AFFINE`` (:class:`ForwardRow` coefficients): ``relu((x - mean) * scale
        + shift + z)`` (the add and ReLU as compiled in). The gradient modes
        (:class:`GradientRow` coefficients): ``GRADIENT``: ``(dy + beta * (x -
        mean) + gamma) * alpha``; ``MASKED_GRADIENT``: the same with ``g = dy``
        unless ``(x - mean) * mask_scale + mask_shift`` is 0 or below (NaN
        passes, as in PyTorch); ``MASKED_SCALE``: ``g * alpha`` (``x`` only
        enters the mask); ``SCALED_GRADIENT``: ``dy * alpha``.
        """
        if _n_values(x) == 0:
            return
        _, _, channel, k, taken, step, active = _thread_range(
            x, family, channels_per_block, per_block
        )
        if not active:
            return
        a, r, s = _position(x, family, k)
        da, dr, ds = _position(x, family, step)
        if mode == Mode.AFFINE:
            affine = (
                coeffs[ForwardRow.MEAN.value, channel],
                coeffs[ForwardRow.SCALE.value, channel],
                coeffs[ForwardRow.SHIFT.value, channel],
                0.0, 0.0, 0.0,
            )  # fmt: skip
            _walk(
                x, z, out, family, a, channel, r, s, da, dr, ds, taken, mode, residual, relu, affine
            )
        else:
            gradient = (
                coeffs[GradientRow.MEAN.value, channel],
                coeffs[GradientRow.ALPHA.value, channel],
                coeffs[GradientRow.BETA.value, channel],
                coeffs[GradientRow.GAMMA.value, channel],
                coeffs[GradientRow.MASK_SCALE.value, channel] if masked else 0.0,
                coeffs[GradientRow.MASK_SHIFT.value, channel] if masked else 0.0,
            )
            _walk(
                dy, x, out, family, a, channel, r, s, da, dr, ds, taken, mode, False, False,
                gradient,
            )  # fmt: skip

    return _kernel(pass_)


@functools.cache
def evaluation(family: Family, residual: bool, relu: bool) -> Any:
    """The evaluation forward of a family: coefficients and normalisation in one launch."""
    if family == Family.WIDE_ROWS:
        return evaluation(Family.ROWS, residual, relu)  # see _flat_storing

    def evaluate(
        channels_per_block, per_block, x, z, running_mean, running_var, weight, bias, eps,
        coeffs, out,
    ):  # fmt: skip
        """``out = relu((x - running_mean) * weight * invstd + bias (+ z))``.

        Each thread computes its channel's coefficients from the running
        statistics; the first chunk's threads also write its :class:`ForwardRow`
        rows of ``coeffs`` but ``M2`` (backward needs the mean and invstd).
        """
        if _n_values(x) == 0:
            return
        _, _, channel, k, taken, step, active = _thread_range(
            x, family, channels_per_block, per_block
        )
        if not active:
            return
        mean = float64(running_mean[channel])
        invstd, scale = _scale_channel(float64(running_var[channel]), float64(weight[channel]), eps)
        shift = float64(bias[channel])
        if k == 0:  # the first chunk's first position
            coeffs[ForwardRow.MEAN.value, channel] = mean
            coeffs[ForwardRow.INVSTD.value, channel] = invstd
            coeffs[ForwardRow.SCALE.value, channel] = scale
            coeffs[ForwardRow.SHIFT.value, channel] = shift
        a, r, s = _position(x, family, k)
        da, dr, ds = _position(x, family, step)
        affine = (mean, scale, shift, 0.0, 0.0, 0.0)
        _walk(
            x, z, out, family, a, channel, r, s, da, dr, ds, taken, Mode.AFFINE, residual, relu,
            affine,
        )  # fmt: skip

    return _kernel(evaluate)


# -- per-channel kernels (one thread per channel) -------------------------------------


def _running_coefficients(running_mean, running_var, weight, bias, eps, coeffs):
    """Evaluation coefficients ``[mean, invstd, weight * invstd, bias]`` from running statistics."""
    c = cuda.grid(1)
    if c < coeffs.shape[1]:
        invstd, scale = _scale_channel(float64(running_var[c]), float64(weight[c]), eps)
        coeffs[ForwardRow.MEAN.value, c] = float64(running_mean[c])
        coeffs[ForwardRow.INVSTD.value, c] = invstd
        coeffs[ForwardRow.SCALE.value, c] = scale
        coeffs[ForwardRow.SHIFT.value, c] = float64(bias[c])


running_coefficients = _kernel(_running_coefficients, bounded=False)


def _batch_coefficients(
    mean, m2, count, weight, bias, eps, running_mean, running_var, update_running, momentum,
    coeffs,
):  # fmt: skip
    """Training coefficients ``[mean, invstd, scale, shift]`` from statistics merged elsewhere.

    ``mean`` and ``m2`` cover ``count`` values per channel (every rank's or
    chunk's). Updates the running statistics in place when ``update_running``,
    as the statistics kernel does.
    """
    c = cuda.grid(1)
    if c < coeffs.shape[1]:
        invstd, scale = _scale_channel(m2[c] / count, float64(weight[c]), eps)
        coeffs[ForwardRow.MEAN.value, c] = mean[c]
        coeffs[ForwardRow.INVSTD.value, c] = invstd
        coeffs[ForwardRow.SCALE.value, c] = scale
        coeffs[ForwardRow.SHIFT.value, c] = float64(bias[c])
        if update_running:
            _update_running(running_mean, running_var, c, mean[c], m2[c], count, momentum)


batch_coefficients = _kernel(_batch_coefficients, bounded=False)


def _gradient_coefficients(sums, count, mean, invstd, weight, coeffs):
    """``GRADIENT`` coefficients from ``sums = [sum(dy), sum(dy * (x - mean))]`` over ``count``."""
    c = cuda.grid(1)
    if c < coeffs.shape[1]:
        alpha, beta, gamma = _backward_channel(
            sums[0, c], sums[1, c], count, invstd[c], float64(weight[c])
        )
        coeffs[GradientRow.MEAN.value, c] = mean[c]
        coeffs[GradientRow.ALPHA.value, c] = alpha
        coeffs[GradientRow.BETA.value, c] = beta
        coeffs[GradientRow.GAMMA.value, c] = gamma


gradient_coefficients = _kernel(_gradient_coefficients, bounded=False)


def _gradient_scale(invstd, weight, coeffs):
    """``AFFINE`` coefficients of ``dx = dy * weight * invstd``: mean and shift 0, that scale."""
    c = cuda.grid(1)
    if c < coeffs.shape[1]:
        coeffs[ForwardRow.MEAN.value, c] = 0.0
        coeffs[ForwardRow.SCALE.value, c] = float64(weight[c]) * invstd[c]
        coeffs[ForwardRow.SHIFT.value, c] = 0.0


gradient_scale = _kernel(_gradient_scale, bounded=False)


def _accumulate(target, source):
    """``target += source`` for vectors: the float64 sum rounded to their dtype, which is
    their own correctly rounded sum (float64 has more than twice their precision)."""
    i = cuda.grid(1)
    if i < target.shape[0]:
        target[i] = narrowed(float64(target[i]) + float64(source[i]), target)


accumulate = _kernel(_accumulate, bounded=False)


def _copy_5d(source, target):
    """``target[...] = source`` for 5-D arrays of any strides (a staging copy)."""
    i = cuda.grid(1)
    n4 = target.shape[4]
    n3 = target.shape[3]
    n2 = target.shape[2]
    n1 = target.shape[1]
    if i >= n1 * n2 * n3 * n4 * target.shape[0]:
        return
    i4 = i % n4
    i //= n4
    i3 = i % n3
    i //= n3
    i2 = i % n2
    i //= n2
    i1 = i % n1
    i0 = i // n1
    target[i0, i1, i2, i3, i4] = source[i0, i1, i2, i3, i4]


copy_5d = _kernel(_copy_5d, bounded=False)
