"""asv benchmarks: cold and warm start, and operands in mixed memory layouts.

Cold start runs a fresh process on an empty Numba cache of its own, so the
figure includes compiling every kernel the first training forward + backward
needs (``tools.bench.startup``); warm start reruns it on that filled cache.
"""

import os
import sys
import tempfile
from pathlib import Path

# The helpers live in the checkout's tools/, which is not installed: its root goes last on
# the path, so that the numbabn under test is still the installed one.
sys.path.append(str(Path(__file__).resolve().parent.parent))

from tools.bench import layouts, startup  # noqa: E402


class Startup:
    """First training forward + backward in a fresh process, after the import."""

    params = (list(startup.DTYPES), list(startup.SIZES))
    param_names = ["dtype", "size"]
    unit = "seconds"
    timeout = 600

    def setup(self, dtype, size):
        self.cache = tempfile.TemporaryDirectory()
        self.env = {**os.environ, "NUMBA_CACHE_DIR": self.cache.name}

    def teardown(self, dtype, size):
        self.cache.cleanup()

    def track_cold(self, dtype, size):
        return startup.first_call_seconds(startup.SIZES[size], dtype, self.env)["call"]

    def track_warm(self, dtype, size):
        startup.first_call_seconds(startup.SIZES[size], dtype, self.env)  # fills the cache
        return startup.first_call_seconds(startup.SIZES[size], dtype, self.env)["call"]


class MixedLayouts:
    """Train forward + backward with ``out=``, operands in the layouts the case names."""

    params = [case.name for case in layouts.LAYOUT_CASES]
    param_names = ["operands"]

    def setup(self, operands):
        case = next(case for case in layouts.LAYOUT_CASES if case.name == operands)
        self.step = layouts.make_step(case, layouts.SHAPE)
        self.step()  # compiles (or loads) the kernels outside the timing

    def time_forward_backward(self, operands):
        self.step()
