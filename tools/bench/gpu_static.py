"""Static evidence for the CUDA kernels, compiled offline for sm_90 (H100, H200): no GPU needed.

Run ``python -m tools.bench.gpu_static`` (``make gpu-static``): it prints a
Markdown table, ``--out FILE`` writes it to a file too, and ``--check`` exits
with 1 on any spill, any occupancy below 50%, any NaN-dropping min/max, any
hot loop of the elementwise and evaluation kernels with fewer than
:data:`MIN_IN_FLIGHT` loads before its first store, or any kernel that does not
compile, printing each failure (``--no-sass`` leaves the disassembly out but for
the kernels whose load order is checked). Where the CUDA toolkit
(``ptxas``) or NVVM is missing it prints one line, starting with
:data:`MISSING`, and exits with 0.

Every entry of :func:`tools.bench.catalogue.catalogue` is compiled for each
input dtype, in parallel worker processes: to PTX by numba-cuda with NVVM
(``compile_ptx`` for compute capability 9.0, with the two look-ups that only
matter on a GPU stubbed, and with a dispatcher's own code-generation options,
such as its launch bounds), to a cubin by ``ptxas -arch=sm_90 -v -lineinfo``,
and back to SASS by ``nvdisasm -c -gp`` (from the toolkit, or the
``nvidia-cuda-nvdisasm`` wheel).

Method
------
Registers, spills, shared memory
    What ``ptxas -v`` reports for the kernel (shared memory: the static amount;
    its padding can differ by a few bytes between runs, as Numba declares a
    module's shared arrays in an order that differs from one process to another).
Occupancy
    Resident warps per SM over 64 at ``numbabn._tunables.THREADS`` threads per
    block: the fewest blocks that registers (65536 per SM, allocated per warp in
    units of 256, at most 255 per thread), shared memory (228 KiB per SM, at
    most 227 KiB per block, allocated in units of 128 bytes plus 1 KiB reserved
    per block), warps (64 per SM) and blocks (32 per SM) allow. The table names
    the limit that binds.
NaN-dropping min/max
    PTX ``min``/``max`` on ``f16``, ``bf16``, ``f32`` or ``f64`` (and the ``x2``
    forms) return the operand that is not NaN; only their ``.NaN`` forms keep it.
SASS instructions per element, per hot loop
    Loops are the natural loops of the SASS control-flow graph (a branch back to
    a block that dominates it); an innermost loop contains no other. The data
    arrays are the kernel's array arguments of the input dtype with the most
    dimensions. Each SASS load (``LD``, ``LDG``) is traced to the PTX load it
    was assembled from (the ``-gp`` line information), and the address of that
    load back through the PTX to the kernel argument whose data pointer it is
    computed from. A hot loop is an innermost loop that loads from a data
    array. The elements one iteration handles are the fewest loads that any one
    data array gets in it: a loop reads each of its data arrays once per
    element, so an unrolled loop reads each several times. The instructions are
    those of all the loop's blocks, every path through its body (branches taken
    at run time or not all count), and a call into a subroutine counts as one.
    A cell lists, for each hot loop in address order, the instructions per
    element, then ``(instructions/elements per iteration)``. PTX without a
    backward branch has no loop, and is not disassembled.
Loads in flight, per hot loop
    The loads from data arrays a loop issues before its first store, its
    blocks taken in address order from its header: Numba passes arrays without
    ``noalias``, so the compiler keeps a store before every later load, and a
    thread has only the loads before a store in flight at once. ``-`` is a loop
    that stores nothing (a reduction).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from numbabn._tunables import THREADS

CC = (9, 0)
ARCH = "sm_90"
DTYPES = ("bfloat16", "float16", "float32", "float64")
MIN_OCCUPANCY = 0.5
# The kernels whose hot loops must load at least MIN_IN_FLIGHT values before a store.
IN_FLIGHT_KERNELS = ("elementwise", "evaluation")
MIN_IN_FLIGHT = 4

# Per-SM limits of compute capability 9.0.
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256  # per warp
MAX_REGISTERS_PER_THREAD = 255
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = 228 * 1024
MAX_SHARED_PER_BLOCK = 227 * 1024
SHARED_UNIT = 128
SHARED_RESERVED_PER_BLOCK = 1024
WARP = 32

# The first words of the one line printed where the compile cannot run (exit status 0),
# and of each line ``--check`` prints for a failed check.
MISSING = "gpu_static: cannot run here: "
FAILED = "FAIL: "


@dataclasses.dataclass(frozen=True)
class Tools:
    """The toolkit's assembler and, when found, its disassembler (for every kernel with
    ``sass``, else for those whose load order is checked)."""

    ptxas: str
    nvdisasm: str | None
    sass: bool = True


@dataclasses.dataclass(frozen=True)
class HotLoop:
    """SASS instructions of one hot loop, the elements an iteration handles, and the data
    loads before its first store (None: it stores nothing)."""

    instructions: int
    elements: int
    in_flight: int | None = None

    @property
    def per_element(self) -> float:
        return self.instructions / self.elements


@dataclasses.dataclass(frozen=True)
class Report:
    """What the compile shows of one kernel for one input dtype."""

    label: str
    dtype: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    occupancy: float
    limiter: str
    min_max: tuple[str, ...]  # the NaN-dropping PTX instructions
    loops: tuple[HotLoop, ...] | None  # None when not disassembled
    error: str = ""  # why it does not compile, if it does not


# -- the tools ----------------------------------------------------------------------


def _tool_dirs() -> list[Path]:
    """Folders that may hold the toolkit's programs, the most explicit first."""
    folders = [
        Path(os.environ[name]) / "bin" for name in ("CUDA_HOME", "CUDA_PATH") if name in os.environ
    ]
    folders += [Path(entry) for entry in os.environ.get("PATH", "").split(os.pathsep) if entry]
    folders.append(Path("/usr/local/cuda/bin"))
    # NVIDIA's wheels (nvidia-cuda-nvdisasm among them) put programs in nvidia/<toolkit>/bin.
    for entry in sys.path:
        wheels = Path(entry or ".") / "nvidia"
        if wheels.is_dir():
            folders += sorted(toolkit / "bin" for toolkit in wheels.iterdir())
    return folders


def _find(name: str) -> str | None:
    for folder in _tool_dirs():
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_tools() -> Tools | None:
    """``ptxas`` and ``nvdisasm``; None without ``ptxas``."""
    ptxas = _find("ptxas")
    return None if ptxas is None else Tools(ptxas, _find("nvdisasm"))


def _release(tool: str) -> str:
    """The release line of ``tool --version``."""
    lines = subprocess.run(
        [tool, "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    found = [line for line in lines if "release" in line]
    return (found or lines or ["unknown"])[-1].strip()


def prepare_numba() -> str | None:
    """Let numba-cuda compile without a GPU; None, or what is missing.

    The target is forced to compute capability 9.0 (else NVRTC is asked which
    ones it supports), and two look-ups that only matter on a device are
    stubbed: the current device's compute capability (typing a call to a
    device function asks for it) and the NVRTC library (not needed to emit
    PTX; a toolkit may lack it).

    Raises
    ------
    RuntimeError
        Numba's CUDA simulator is on: it has no compiler.
    """
    try:
        from numba.cuda.core import config
    except ImportError as error:
        return f"numba-cuda cannot be imported ({error})"
    if config.ENABLE_CUDASIM:
        raise RuntimeError("the CUDA simulator is on: run with NUMBA_ENABLE_CUDASIM=0")
    from numba.cuda import cuda_paths, dispatcher
    from numba.cuda.cudadrv import nvvm

    try:
        nvvm.NVVM()
    except Exception as error:  # numba-cuda raises several kinds when it finds no library
        return f"NVVM (libnvvm of a CUDA toolkit) cannot be loaded ({error})"
    from types import SimpleNamespace

    config.FORCE_CUDA_CC = CC
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=CC)
    cuda_paths._get_nvrtc_path = lambda: None
    return None


def _nvvm_version() -> str:
    from numba.cuda import cuda_paths
    from numba.cuda.cudadrv import nvvm

    major, minor = nvvm.NVVM().get_version()
    library = Path(cuda_paths._get_nvvm_path().info)
    # The folder above lib/ names the toolkit (cuda-13.0, or cu13 for a wheel).
    return f"libNVVM {major}.{minor} ({library.name} of {library.parent.parent.name})"


# -- one kernel (in a worker) ---------------------------------------------------------


def _entries(dtype: str) -> list[tuple[str, Any, tuple[Any, ...]]]:
    from numba.cuda import types

    from tools.bench.catalogue import catalogue

    return catalogue(getattr(types, dtype))


def _run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


_COMPILE_OPTIONS = ("debug", "opt", "fastmath", "launch_bounds")


def analyse(task: tuple[str, int, Tools]) -> Report:
    """Compile entry ``index`` of the catalogue for ``dtype`` and read what the tools show."""
    dtype, index, tools = task
    from numba import cuda

    label, kernel, signature = _entries(dtype)[index]
    # A dispatcher is compiled with the options it launches with (its launch bounds).
    chosen = getattr(kernel, "targetoptions", {})
    options = {name: chosen[name] for name in _COMPILE_OPTIONS if name in chosen}
    with tempfile.TemporaryDirectory() as folder:
        source, binary = Path(folder) / "kernel.ptx", Path(folder) / "kernel.cubin"
        try:
            ptx, _ = cuda.compile_ptx(
                getattr(kernel, "py_func", kernel), signature, cc=CC, **options
            )
            source.write_text(ptx)
            info = _run(
                [tools.ptxas, f"-arch={ARCH}", "-v", "-lineinfo", "-o", str(binary), str(source)]
            )
        except Exception as error:  # Numba's typing and lowering errors, a failed ptxas
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            reason = ": ".join([type(error).__name__, *lines[:2]])[:300]  # Numba's gist
            return Report(label, dtype, 0, 0, 0, 0, 0.0, "", (), None, reason)
        loops: tuple[HotLoop, ...] | None = ()
        if tools.nvdisasm is None or not (tools.sass or checks_in_flight(label)):
            loops = None
        elif has_backward_branch(ptx):
            sass = _run([tools.nvdisasm, "-c", "-gp", str(binary)])
            data = _data_arguments(signature, dtype)
            loops = tuple(
                hot_loops(sass, ptx_load_arguments(ptx, _data_parameters(signature)), data)
            )
    resources = ptxas_resources(info)
    fraction, limiter = occupancy(resources["registers"], resources["shared"], THREADS)
    return Report(
        label, dtype, resources["registers"], resources["spill_stores"], resources["spill_loads"],
        resources["shared"], fraction, limiter, tuple(nan_dropping_min_max(ptx)), loops,
    )  # fmt: skip


def checks_in_flight(label: str) -> bool:
    """Whether the hot loops of kernel ``label`` must keep MIN_IN_FLIGHT loads in flight."""
    return label.startswith(IN_FLIGHT_KERNELS)


def _data_parameters(signature: Sequence[Any]) -> dict[int, int]:
    """PTX parameter holding each array argument's data pointer -> the argument's position.

    Numba passes an array as its members, one parameter each (meminfo, parent,
    sizes, the data pointer, then shape and strides).
    """
    from numba import types
    from numba.cuda.descriptor import cuda_target

    models = cuda_target.target_context.data_model_manager
    found = {}
    first = 0
    for position, numba_type in enumerate(signature):
        model = models.lookup(numba_type)
        if isinstance(numba_type, types.Array):
            found[first + model.get_field_position("data")] = position
        first += len(list(_flatten(model.get_argument_type())))
    return found


def _flatten(value: Any) -> Iterable[Any]:
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def _data_arguments(signature: Sequence[Any], dtype: str) -> set[int]:
    """Positions of the array arguments of the input dtype with the most dimensions."""
    from numba.cuda import types

    arrays = {
        position: numba_type.ndim
        for position, numba_type in enumerate(signature)
        if isinstance(numba_type, types.Array) and numba_type.dtype == getattr(types, dtype)
    }
    most = max(arrays.values(), default=0)
    return {position for position, ndim in arrays.items() if ndim == most}


# -- reading ptxas and PTX ------------------------------------------------------------


def ptxas_resources(info: str) -> dict[str, int]:
    """Registers, spill bytes and static shared memory of the entry function, from ``ptxas -v``."""
    entry = info[info.index("Compiling entry function") :]

    def number(pattern: str) -> int:
        found = re.search(pattern, entry)
        return int(found.group(1)) if found else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "shared": number(r"(\d+) bytes smem"),
    }


def occupancy(registers: int, shared: int, threads: int) -> tuple[float, str]:
    """Theoretical occupancy on sm_90, and the limit that binds (a hardware maximum on ties)."""
    warps = -(-threads // WARP)
    warp_registers = -(-registers * WARP // REGISTER_UNIT) * REGISTER_UNIT
    block_shared = -(-shared // SHARED_UNIT) * SHARED_UNIT + SHARED_RESERVED_PER_BLOCK
    fits = registers <= MAX_REGISTERS_PER_THREAD and shared <= MAX_SHARED_PER_BLOCK
    blocks = {
        "warps": MAX_WARPS_PER_SM // warps,
        "blocks": MAX_BLOCKS_PER_SM,
        "registers": REGISTERS_PER_SM // max(warp_registers, 1) // warps if fits else 0,
        "shared memory": SHARED_PER_SM // block_shared if fits else 0,
    }
    limiter = min(blocks, key=lambda name: blocks[name])
    return blocks[limiter] * warps / MAX_WARPS_PER_SM, limiter


_MIN_MAX = re.compile(r"^\s*(?:@!?%\w+\s+)?(?:min|max)((?:\.\w+)+)\s.*$", re.M)
_FLOAT_TYPES = {"f16", "f16x2", "bf16", "bf16x2", "f32", "f64"}


def nan_dropping_min_max(ptx: str) -> list[str]:
    """The PTX ``min``/``max`` instructions on floats that return the operand that is not NaN."""
    found = []
    for match in _MIN_MAX.finditer(ptx):
        modifiers = match.group(1).split(".")[1:]
        if modifiers[-1] in _FLOAT_TYPES and "NaN" not in modifiers:
            found.append(match.group(0).strip())
    return found


_PTX_LABEL = re.compile(r"^(\$\w+):", re.M)
_PTX_BRANCH = re.compile(r"^\s*(?:@!?%\w+\s+)?bra(?:\.uni)?\s+(\$\w+)\s*;", re.M)


def has_backward_branch(ptx: str) -> bool:
    """Whether any branch goes back to an earlier label (else the code has no loop)."""
    labels = {match.group(1): match.start() for match in _PTX_LABEL.finditer(ptx)}
    return any(
        labels.get(match.group(1), len(ptx)) < match.start() for match in _PTX_BRANCH.finditer(ptx)
    )


_PTX_REGISTER = re.compile(r"%\w+")
_PTX_PARAMETER = re.compile(r"_param_(\d+)\]")
_PTX_ADDRESS = re.compile(r"\[([^\]]*)\]")
# Opcodes that define no register (atomics and loads define one from memory).
_NO_DESTINATION = ("st.", "bra", "ret", "exit", "bar", "membar", "fence", "red.", "call", "trap")
_FROM_MEMORY = ("ld.", "ldu.", "atom.")
_NOT_ARRAY_SPACES = ("param", "shared", "local", "const")


def ptx_load_arguments(ptx: str, data_parameters: dict[int, int]) -> dict[int, int]:
    """PTX line (from 1) of each load from an array argument -> that argument's position.

    A load's address is followed back through every instruction that defines
    its registers to the kernel parameters it is computed from (PTX registers
    are almost all assigned once), stopping at values read from memory.
    """
    parameters: dict[str, set[int]] = {}  # register -> parameters loaded into it
    sources: dict[str, list[str]] = {}  # register -> registers it is computed from
    loads: dict[int, list[str]] = {}
    for number, line in enumerate(ptx.splitlines(), start=1):
        statement = line.split("//")[0].strip().rstrip(";")
        if statement.startswith("@"):
            statement = statement.split(None, 1)[-1]
        opcode, _, operands = statement.partition(" ")
        if not operands or opcode.startswith(_NO_DESTINATION):
            continue
        split = operands.index("}") + 1 if operands.lstrip().startswith("{") else operands.find(",")
        destination, rest = operands[:split], operands[split:]
        for register in _PTX_REGISTER.findall(destination):
            if opcode.startswith("ld.param"):
                parameter = _PTX_PARAMETER.search(rest)
                if parameter:
                    parameters.setdefault(register, set()).add(int(parameter.group(1)))
            elif not opcode.startswith(_FROM_MEMORY):
                sources.setdefault(register, []).extend(_PTX_REGISTER.findall(rest))
        space = opcode.split(".")[1] if "." in opcode else ""
        if opcode.startswith(("ld.", "ldu.")) and space not in _NOT_ARRAY_SPACES:
            within = _PTX_ADDRESS.search(rest)
            loads[number] = _PTX_REGISTER.findall(within.group(1)) if within else []
    arrays = {}
    for number, address in loads.items():
        arguments = {
            data_parameters[parameter]
            for parameter in _reaching(address, parameters, sources)
            if parameter in data_parameters
        }
        if len(arguments) == 1:
            arrays[number] = arguments.pop()
    return arrays


def _reaching(
    registers: list[str], parameters: dict[str, set[int]], sources: dict[str, list[str]]
) -> set[int]:
    """The kernel parameters that the values of ``registers`` are computed from."""
    found: set[int] = set()
    seen: set[str] = set()
    pending = list(registers)
    while pending:
        register = pending.pop()
        if register not in seen:
            seen.add(register)
            found |= parameters.get(register, set())
            pending += sources.get(register, [])
    return found


# -- reading SASS -------------------------------------------------------------------------


_SASS_PTX_LINE = re.compile(r'^\s*//## File "\.nv_debug_ptx_txt", line (\d+)')
_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;")
_SASS_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_JUMPS = ("BRA", "JMP")
_ENDS = ("EXIT", "RET", "KILL")


@dataclasses.dataclass(frozen=True)
class _Instruction:
    predicated: bool
    opcode: str
    operands: str
    ptx_line: int


def _sass_instructions(sass: str) -> tuple[list[_Instruction], dict[str, int]]:
    """The disassembly's instructions in order, and the instruction each label points to."""
    instructions: list[_Instruction] = []
    labels: dict[str, int] = {}
    ptx_line = 0
    for line in sass.splitlines():
        if found := _SASS_PTX_LINE.match(line):
            ptx_line = int(found.group(1))
        elif found := _SASS_LABEL.match(line):
            labels[found.group(1)] = len(instructions)
        elif found := _SASS_INSTRUCTION.match(line):
            text = found.group(1)
            predicated = text.startswith("@") and not text.startswith("@PT ")
            if text.startswith("@"):
                text = text.split(None, 1)[1]
            opcode, _, operands = text.partition(" ")
            instructions.append(_Instruction(predicated, opcode, operands, ptx_line))
    return instructions, labels


def _blocks(
    instructions: list[_Instruction], labels: dict[str, int]
) -> tuple[list[range], list[list[int]]]:
    """The basic blocks (ranges of instructions) and each block's successors."""
    leaders = {0, *labels.values()}
    for index, instruction in enumerate(instructions):
        if instruction.opcode.split(".")[0] in (*_JUMPS, "BRX", "JMX", *_ENDS):
            leaders.add(index + 1)
    starts = sorted(leader for leader in leaders if leader < len(instructions))
    ends = [*starts[1:], len(instructions)]
    blocks = [range(start, end) for start, end in zip(starts, ends, strict=True)]
    block_at = {block.start: number for number, block in enumerate(blocks)}
    successors = []
    for number, block in enumerate(blocks):
        last = instructions[block[-1]]
        base = last.opcode.split(".")[0]
        target = _SASS_TARGET.search(last.operands)
        # A condition is a predicate guard or an operand before the target (BRA.U, BRA.DIV).
        conditional = last.predicated or bool(last.operands.split("`")[0].strip())
        following = [number + 1] if number + 1 < len(blocks) else []
        if base in _JUMPS and target:
            jump = block_at[labels[target.group(1)]]
            successors.append([jump, *following] if conditional else [jump])
        elif base in _ENDS and not last.predicated:
            successors.append([])
        else:
            successors.append(following)
    return blocks, successors


def _innermost_loops(successors: list[list[int]]) -> list[tuple[int, set[int]]]:
    """``(header, blocks)`` of each innermost natural loop reachable from the first block."""
    order: list[int] = []  # post-order of a depth-first walk from block 0
    seen = {0}
    stack = [(0, iter(successors[0]))]
    while stack:
        block, pending = stack[-1]
        successor = next(pending, None)
        if successor is None:
            order.append(block)
            stack.pop()
        elif successor not in seen:
            seen.add(successor)
            stack.append((successor, iter(successors[successor])))
    order.reverse()
    predecessors: dict[int, list[int]] = {block: [] for block in order}
    for block in order:
        for successor in successors[block]:
            predecessors[successor].append(block)
    dominators = {block: set(order) for block in order}
    dominators[0] = {0}
    changed = True
    while changed:
        changed = False
        for block in order[1:]:
            common = set.intersection(*(dominators[before] for before in predecessors[block]))
            if common | {block} != dominators[block]:
                dominators[block], changed = common | {block}, True
    loops: dict[int, set[int]] = {}  # header -> body
    for block in order:
        for header in successors[block]:
            if header in dominators[block]:  # a back edge
                body = loops.setdefault(header, {header})
                members = [block]
                while members:
                    member = members.pop()
                    if member not in body:
                        body.add(member)
                        members += predecessors[member]
    return [
        (header, body)
        for header, body in loops.items()
        if not any(other != header and other in body for other in loops)
    ]


def hot_loops(sass: str, load_arguments: dict[int, int], data: set[int]) -> list[HotLoop]:
    """Each innermost loop that reads data arrays, in address order (see the module's method).

    ``load_arguments`` maps PTX lines of loads to the array argument they read,
    ``data`` holds the positions of the data arrays.
    """
    instructions, labels = _sass_instructions(sass)
    if not instructions:
        return []
    blocks, successors = _blocks(instructions, labels)
    found = []
    for header, body in _innermost_loops(successors):
        # From the header on in address order, then the blocks laid out before it.
        walk = sorted(body, key=lambda block: (block < header, block))
        members = [index for block in walk for index in blocks[block]]
        reads: dict[int, int] = {}
        in_flight = None
        for index in members:
            instruction = instructions[index]
            base = instruction.opcode.split(".")[0]
            if base in ("ST", "STG") and in_flight is None:
                in_flight = sum(reads.values())
            if base in ("LD", "LDG") and load_arguments.get(instruction.ptx_line) in data:
                argument = load_arguments[instruction.ptx_line]
                reads[argument] = reads.get(argument, 0) + 1
        if reads:
            loop = HotLoop(len(members), min(reads.values()), in_flight)
            found.append((min(members), loop))
    return [loop for _, loop in sorted(found, key=lambda item: item[0])]


# -- the report -----------------------------------------------------------------------------


def _loops_cell(loops: tuple[HotLoop, ...] | None) -> str:
    if loops is None:
        return "not disassembled"
    if not loops:
        return "no loop"
    return "; ".join(
        f"{loop.per_element:.1f} ({loop.instructions}/{loop.elements})" for loop in loops
    )


def _in_flight_cell(loops: tuple[HotLoop, ...] | None) -> str:
    if not loops:
        return ""
    return "; ".join("-" if loop.in_flight is None else str(loop.in_flight) for loop in loops)


def _opcode(instruction: str) -> str:
    words = instruction.split()
    return words[1] if words[0].startswith("@") else words[0]


def table(reports: Sequence[Report]) -> str:
    """The Markdown table of ``reports``, one row each."""
    lines = [
        "| kernel | dtype | registers | spill stores/loads (B) | shared (B) | occupancy % "
        "| NaN-dropping min/max | SASS instructions per element, per hot loop "
        "| loads in flight, per hot loop |",
        "| --- | --- | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for report in reports:
        if report.error:
            lines.append(f"| {report.label} | {report.dtype} | does not compile |{' |' * 6}")
            continue
        min_max = ", ".join(sorted({_opcode(instruction) for instruction in report.min_max}))
        lines.append(
            f"| {report.label} | {report.dtype} | {report.registers} "
            f"| {report.spill_stores}/{report.spill_loads} | {report.shared} "
            f"| {100 * report.occupancy:.1f} ({report.limiter}) | {min_max or 'none'} "
            f"| {_loops_cell(report.loops)} | {_in_flight_cell(report.loops)} |"
        )
    return "\n".join(lines)


def failures(reports: Sequence[Report]) -> list[str]:
    """One line per failed check: a spill, occupancy below 50%, a NaN-dropping min/max, an
    elementwise or evaluation hot loop with fewer than MIN_IN_FLIGHT loads before a store
    (and a kernel that does not compile)."""
    found = []
    for report in reports:
        name = f"{report.label} ({report.dtype})"
        if report.error:
            found.append(f"{name}: does not compile: {report.error}")
            continue
        if report.spill_stores or report.spill_loads:
            found.append(
                f"{name}: spills ({report.spill_stores} bytes stored, {report.spill_loads} loaded)"
            )
        if report.occupancy < MIN_OCCUPANCY:
            found.append(
                f"{name}: occupancy {100 * report.occupancy:.1f}% < {100 * MIN_OCCUPANCY:.0f}% "
                f"(limited by {report.limiter}: {report.registers} registers, "
                f"{report.shared} bytes of shared memory)"
            )
        found += [f"{name}: NaN-dropping {instruction}" for instruction in report.min_max]
        if checks_in_flight(report.label) and report.loops is not None:
            found += [
                f"{name}: hot loop {number} has {loop.in_flight} loads in flight before a "
                f"store (at least {MIN_IN_FLIGHT} wanted)"
                for number, loop in enumerate(report.loops, 1)
                if loop.in_flight is not None and loop.in_flight < MIN_IN_FLIGHT
            ]
    return found


def _header(tools: Tools, disassembler: str, compiles: int, workers: int, seconds: float) -> str:
    from importlib.metadata import version

    return "\n".join([
        f"## CUDA kernels compiled for {ARCH}, {THREADS} threads per block",
        "",
        "Written by `make gpu-static` (`python -m tools.bench.gpu_static`), without a GPU;",
        "the method is described in tools/bench/gpu_static.py.",
        "",
        f"- numba-cuda {version('numba-cuda')}, {_nvvm_version()}",
        f"- ptxas: {_release(tools.ptxas)}",
        f"- nvdisasm: {disassembler}",
        f"- {compiles} kernels compiled in {seconds:.1f} s by {workers} worker processes",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Compile, print the table (and write it with ``--out``); the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.gpu_static",
        description="Registers, spills, shared memory, occupancy, min/max and SASS per "
        f"element of numbabn's CUDA kernels, compiled for {ARCH} without a GPU.",
    )
    parser.add_argument("--out", type=Path, help="write the table (Markdown) to this file too")
    parser.add_argument(
        "--check", action="store_true",
        help="exit with 1 on any spill, occupancy below 50%%, NaN-dropping min/max, too few "
        "loads in flight or failed compile",
    )  # fmt: skip
    parser.add_argument(
        "--no-sass",
        action="store_true",
        help="skip the disassembly (and the SASS counts) but of the kernels whose load order "
        "is checked",
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="compiling processes (one per CPU)"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    tools = find_tools()
    if tools is None:
        print(MISSING + "no ptxas (CUDA toolkit) on PATH, in CUDA_HOME or in /usr/local/cuda")
        return 0
    problem = prepare_numba()
    if problem is not None:
        print(MISSING + problem)
        return 0
    disassembler = "none found, so no SASS counts (pip install nvidia-cuda-nvdisasm)"
    if tools.nvdisasm is not None:
        disassembler = "not run (--no-sass)" if args.no_sass else _release(tools.nvdisasm)
    if args.no_sass:
        tools = dataclasses.replace(tools, sass=False)
    # Rows by entry, then dtype.
    tasks = [(dtype, index, tools) for dtype in DTYPES for index in range(len(_entries(dtype)))]
    tasks.sort(key=lambda task: task[1])
    workers = max(1, min(args.workers, len(tasks)))
    # Forked workers inherit the prepared numba-cuda; elsewhere each prepares its own.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, initializer=prepare_numba) as pool:
        reports = pool.map(analyse, tasks, chunksize=1)
    failed = failures(reports)
    summary = "\n".join(f"- {line}" for line in failed) or "- none"
    header = _header(tools, disassembler, len(tasks), workers, time.perf_counter() - start)
    text = (
        f"{header}\n\n{table(reports)}\n\nFailing the checks (a spill, occupancy below "
        f"{100 * MIN_OCCUPANCY:.0f}%, a NaN-dropping min/max, fewer than {MIN_IN_FLIGHT} "
        f"loads in flight in an elementwise or evaluation loop):\n\n{summary}\n"
    )
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if not args.check:
        return 0
    for line in failed:
        print(FAILED + line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
