"""A tensor, and a channel, of more than 2**31 elements: no 32-bit index anywhere."""

from __future__ import annotations

import numpy as np
import pytest

import numbabn

# Two batch items of one channel: 2**31 + 16 elements (8.6 GB of float32) in one channel.
LENGTH = 2**30 + 8
NEEDED_BYTES = 2 * LENGTH * 4 + (2 << 30)  # the tensor, and room to spare


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.slow
@pytest.mark.skipif(
    _available_bytes() < NEEDED_BYTES,
    reason=f"needs {NEEDED_BYTES / 2**30:.1f} GiB of available memory",
)
def test_training_forward_in_place_beyond_int32_indices():
    """Statistics and output are right at both ends of a 2**31 + 16-element channel."""
    x = np.zeros((2, 1, LENGTH), np.float32)
    # The only non-zero values sit at the far ends of both batch items.
    first, last = np.float32(-1e4), np.float32(3e4)
    x[0, 0, -1] = first
    x[1, 0, -1] = last
    n = x.size
    mean = (float(first) + float(last)) / n
    var = (float(first) ** 2 + float(last) ** 2) / n - mean**2
    invstd = 1.0 / np.sqrt(var + 1e-5)

    bn = numbabn.BatchNorm1d(1, momentum=1.0)
    y = bn(x, out=x)

    assert y is x
    np.testing.assert_allclose(bn.running_mean, [mean], rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, [var * n / (n - 1)], rtol=1e-6)
    expected = {
        (0, 0, 0): -mean * invstd,
        (0, 0, LENGTH - 1): (float(first) - mean) * invstd,
        (1, 0, 0): -mean * invstd,
        (1, 0, LENGTH - 2): -mean * invstd,
        (1, 0, LENGTH - 1): (float(last) - mean) * invstd,
    }
    for index, value in expected.items():
        np.testing.assert_allclose(y[index], value, rtol=1e-5, err_msg=str(index))
