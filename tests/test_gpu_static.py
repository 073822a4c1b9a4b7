"""The CUDA kernels compiled offline for sm_90 (H100, H200), without a GPU.

Every kernel of the catalogue (tools/bench/catalogue.py), for every input
dtype, must compile and assemble without register spills, reach at least 50% theoretical
occupancy at numbabn's block size, and use no PTX ``min``/``max`` that drops NaN
(they return the operand that is not NaN, where PyTorch propagates NaN; the
simulator runs Python's ``max``, so only the compiled code shows them). The
compile and its method are in tools/bench/gpu_static.py; it needs NVVM and
``ptxas`` from a CUDA toolkit, and the test skips without them. The readers of
the tools' output are checked on samples here too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench import gpu_static


@pytest.mark.slow
def test_cuda_kernels_do_not_spill_fill_half_an_sm_and_keep_nan(tmp_path):
    environment = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0", "NUMBA_CACHE_DIR": str(tmp_path)}
    table = tmp_path / "gpu-static.md"
    # The checks need no SASS: the disassembly is left out, for time.
    command = ["-m", "tools.bench.gpu_static", "--check", "--no-sass", "--out", str(table)]
    result = subprocess.run(
        [sys.executable, *command],
        capture_output=True, text=True, env=environment, cwd=Path(__file__).parent.parent,
        timeout=600, check=False,
    )  # fmt: skip
    if result.returncode == 0 and result.stdout.startswith(gpu_static.MISSING):
        pytest.skip(result.stdout.strip())
    failed = [
        line.removeprefix(gpu_static.FAILED)
        for line in result.stdout.splitlines()
        if line.startswith(gpu_static.FAILED)
    ]
    if failed:
        pytest.fail("kernels that fail the static checks on sm_90:\n" + "\n".join(failed))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| kernel | dtype |" in table.read_text()


@pytest.mark.parametrize(
    ("registers", "shared", "expected"),
    [
        (32, 0, (1.0, "warps")),
        (48, 4100, (0.625, "registers")),  # 1536 registers a warp: 42 warps, 5 blocks
        (64, 0, (0.5, "registers")),
        (87, 0, (0.25, "registers")),  # rounded up to 2816 a warp: 23 warps, 2 blocks
        (32, 100 * 1024, (0.25, "shared memory")),  # 101 KiB a block with the reserved 1 KiB
        (256, 0, (0.0, "registers")),  # more than 255: no block fits
    ],
)
def test_occupancy_on_sm_90(registers, shared, expected):
    assert gpu_static.occupancy(registers, shared, 256) == expected


def test_nan_dropping_min_max_is_found_and_the_nan_forms_pass():
    ptx = "\n".join([
        "\tmax.NaN.f32 \t%f1, %f2, %f3;",
        "\t@%p1 min.ftz.f32 \t%f1, %f2, %f3;",
        "\tmax.s64 \t%rd1, %rd2, %rd3;",
        "\tmin.f64 \t%fd1, %fd2, %fd3;",
        "\tmax.NaN.f16x2 \t%r1, %r2, %r3;",
    ])  # fmt: skip
    assert gpu_static.nan_dropping_min_max(ptx) == [
        "@%p1 min.ftz.f32 \t%f1, %f2, %f3;",
        "min.f64 \t%fd1, %fd2, %fd3;",
    ]


def test_ptx_loads_are_traced_to_the_array_they_read():
    ptx = "\n".join([
        "\tld.param.u64 \t%rd1, [kernel_param_4];",  # the first array's data pointer
        "\tld.param.u64 \t%rd2, [kernel_param_9];",  # its stride
        "\tld.param.u64 \t%rd3, [kernel_param_17];",  # the second array's data pointer
        "$L__BB0_1:",
        "\tmul.lo.s64 \t%rd4, %rd5, %rd2;",
        "\tadd.s64 \t%rd6, %rd1, %rd4;",
        "\tld.f32 \t%f1, [%rd6];",
        "\tadd.s64 \t%rd7, %rd3, %rd4;",
        "\tld.global.f32 \t%f2, [%rd7+4];",
        "\tld.shared.f64 \t%fd1, [%rd8];",
        "\tadd.s64 \t%rd5, %rd5, 1;",
        "\t@%p1 bra \t$L__BB0_1;",
    ])  # fmt: skip
    assert gpu_static.ptx_load_arguments(ptx, {4: 0, 17: 1}) == {7: 0, 9: 1}
    assert gpu_static.has_backward_branch(ptx)
    assert not gpu_static.has_backward_branch(f"{ptx.replace('$L__BB0_1:', '')}\n$L__BB0_1:")


SASS = """
	//## File ".nv_debug_ptx_txt", line 3
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
	//## File ".nv_debug_ptx_txt", line 20
        /*0010*/                   LD.E R2, desc[UR4][R4.64] ;
        /*0020*/                   LD.E R3, desc[UR4][R6.64] ;
	//## File ".nv_debug_ptx_txt", line 21
        /*0030*/                   LD.E.64 R8, desc[UR4][R10.64] ;
        /*0040*/                   FADD R2, R2, R3 ;
        /*0050*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0060*/                   LDS R2, [R4] ;
        /*0070*/                   BRA.U !UP0, `(.L_x_1) ;
        /*0080*/                   EXIT ;
.L_x_2:
        /*0090*/                   BRA `(.L_x_2);
"""


def test_sass_hot_loops_count_instructions_per_element():
    # Line 20 loads data array 0 twice an iteration (unrolled), line 21 array 5
    # (not data); the second loop reads no global memory, the third is unreachable.
    loops = gpu_static.hot_loops(SASS, {20: 0, 21: 5}, {0})
    assert loops == [gpu_static.HotLoop(instructions=5, elements=2)]
    assert loops[0].per_element == 2.5


STORING_SASS = """
.L_x_0:
	//## File ".nv_debug_ptx_txt", line 30
        /*0000*/                   LDG.E R2, desc[UR4][R4.64] ;
	//## File ".nv_debug_ptx_txt", line 31
        /*0010*/                   STG.E desc[UR4][R6.64], R2 ;
	//## File ".nv_debug_ptx_txt", line 30
        /*0020*/                   LDG.E R3, desc[UR4][R8.64] ;
	//## File ".nv_debug_ptx_txt", line 31
        /*0030*/                   STG.E desc[UR4][R10.64], R3 ;
        /*0040*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
	//## File ".nv_debug_ptx_txt", line 30
        /*0050*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0060*/                   LDG.E R3, desc[UR4][R8.64] ;
	//## File ".nv_debug_ptx_txt", line 32
        /*0070*/                   LDG.E R12, desc[UR4][R14.64] ;
        /*0080*/                   LDG.E R13, desc[UR4][R16.64] ;
	//## File ".nv_debug_ptx_txt", line 31
        /*0090*/                   STG.E desc[UR4][R6.64], R2 ;
        /*00a0*/                   STG.E desc[UR4][R10.64], R3 ;
        /*00b0*/               @P0 BRA `(.L_x_1) ;
        /*00c0*/                   EXIT ;
"""


def test_sass_hot_loops_count_the_loads_in_flight_before_a_store():
    # Line 30 loads data array 0, line 32 data array 2; line 31 stores.
    load_order, grouped = gpu_static.hot_loops(STORING_SASS, {30: 0, 32: 2}, {0, 2})
    assert load_order == gpu_static.HotLoop(instructions=5, elements=2, in_flight=1)
    assert grouped == gpu_static.HotLoop(instructions=7, elements=2, in_flight=4)
    assert gpu_static.hot_loops(SASS, {20: 0, 21: 5}, {0})[0].in_flight is None  # no store


def _report(label: str, loops: tuple) -> gpu_static.Report:
    return gpu_static.Report(label, "float32", 40, 0, 0, 0, 0.75, "registers", (), loops)


def test_elementwise_loops_with_fewer_than_four_loads_in_flight_fail_the_check():
    one = gpu_static.HotLoop(5, 2, in_flight=1)
    four = gpu_static.HotLoop(7, 2, in_flight=4)
    failed = gpu_static.failures([
        _report("elementwise[rows, affine]", (four, one)),
        _report("evaluation[planar]", (four,)),
        _report("statistics[rows]", (gpu_static.HotLoop(4, 4),)),
        _report("gradient_sums[rows, masked, residual]", (one,)),  # a reduction: not checked
    ])  # fmt: skip
    assert failed == [
        "elementwise[rows, affine] (float32): hot loop 2 has 1 loads in flight before a store "
        "(at least 4 wanted)"
    ]
