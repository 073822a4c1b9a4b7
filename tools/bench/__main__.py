"""``python -m tools.bench``: numbabn beside PyTorch, NumPy and the memory roofline."""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numba
import numpy as np

import numbabn
from tools.bench import machine
from tools.bench.cases import DEFAULT_CASES, QUICK_CASES, Case
from tools.bench.fused import FUSED_CASES, QUICK_FUSED_CASES, fused_markdown, measure_fused
from tools.bench.layouts import layouts_markdown, measure_layouts
from tools.bench.measure import measure_case
from tools.bench.peers import torch_available
from tools.bench.report import markdown, write_json, write_png
from tools.bench.small_calls import measure_small, small_markdown
from tools.bench.startup import startup_markdown, startup_seconds


def _progress(items: Sequence[Case], description: str) -> Iterator[Case]:
    try:
        from tqdm import tqdm
    except ImportError:
        for index, item in enumerate(items, 1):
            print(f"[{index}/{len(items)}] {description} {item.name}", file=sys.stderr)
            yield item
        return
    bar = tqdm(items, desc=description, unit="case", file=sys.stderr)
    for item in bar:
        bar.set_postfix_str(item.name)
        yield item


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description="Time numbabn's kernels beside PyTorch, plain NumPy and a roofline.",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="CPU kernels or CUDA kernels"
    )
    parser.add_argument("--quick", action="store_true", help="three small cases, fewer repeats")
    parser.add_argument("--repeat", type=int, default=None, help="samples per median")
    parser.add_argument("--threads", type=int, default=None, help="Numba and PyTorch threads")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up timings")
    parser.add_argument(
        "--output", type=Path, default=Path("benchmarks/results"), help="folder for the files"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda":
        _main_gpu(args)
        return

    if args.threads:
        numba.set_num_threads(args.threads)
    threads = numba.get_num_threads()
    cases = QUICK_CASES if args.quick else DEFAULT_CASES
    repeat = args.repeat or (5 if args.quick else 15)
    with_torch = not args.no_torch and torch_available()
    versions = f"numbabn {numbabn.__version__}, numpy {np.__version__}, numba {numba.__version__}"
    if with_torch:
        import torch

        versions += f", torch {torch.__version__}"
    header = (
        f"## numbabn CPU benchmark\n\nMachine: {machine.describe()}, "
        f"{threads} threads "
        f"(numbabn and PyTorch alike), Python {platform.python_version()}; {versions}."
    )
    print(header.replace("## ", ""), file=sys.stderr)

    results = [
        measure_case(case, repeat, threads, with_torch) for case in _progress(cases, "bench")
    ]
    fused_cases = QUICK_FUSED_CASES if args.quick else FUSED_CASES
    fused = [
        measure_fused(case, repeat, threads, with_torch) for case in _progress(fused_cases, "fused")
    ]
    layouts = measure_layouts(repeat, args.quick, threads, with_torch)
    small = measure_small(repeat, threads, with_torch)
    startup = None
    if not args.no_startup:
        print("start-up: cold and warm processes, then a warm-up per dtype", file=sys.stderr)
        # --quick: float32 only, without the minutes-long whole warm-up.
        startup = startup_seconds(("float32",), False) if args.quick else startup_seconds()
    report = "\n".join(
        [
            markdown(results, header),
            fused_markdown(fused),
            layouts_markdown(layouts),
            small_markdown(small),
        ]
        + ([startup_markdown(startup)] if startup else [])
    )
    print(report)

    args.output.mkdir(parents=True, exist_ok=True)
    meta = {
        "header": header, "threads": threads, "repeat": repeat, "startup": startup, "fused": fused,
        "layouts": layouts, "small": small,
    }  # fmt: skip
    json_path, png_path = args.output / "cpu.json", args.output / "cpu.png"
    write_json(json_path, results, meta)
    chart = png_path if write_png(png_path, results) else "no chart: matplotlib is not installed"
    print(f"wrote {json_path}; {chart}", file=sys.stderr)


def _main_gpu(args: argparse.Namespace) -> None:
    """The ``--device cuda`` run: numbabn's CUDA kernels beside cuDNN and a streaming roofline."""
    from tools.bench import gpu

    torch = None
    if not args.no_torch and torch_available():
        import torch as torch_module

        torch = torch_module if torch_module.cuda.is_available() else None
    if gpu.arrays.SIMULATOR:
        cases = gpu.SIMULATOR_CASES
    else:
        cases = gpu.QUICK_GPU_CASES if args.quick else gpu.GPU_CASES
    repeat = args.repeat or (5 if args.quick else 15)
    versions = f"numbabn {numbabn.__version__}, numba {numba.__version__}"
    if torch is not None:
        versions += f", torch {torch.__version__} (cuDNN {torch.backends.cudnn.version()})"
    header = f"## numbabn GPU benchmark\n\nGPU: {gpu.gpu_name()}; {versions}."
    print(header.replace("## ", ""), file=sys.stderr)
    results = [gpu.measure_gpu_case(case, repeat, torch) for case in _progress(cases, "bench")]
    print(gpu.gpu_markdown(results, header))
    args.output.mkdir(parents=True, exist_ok=True)
    json_path = args.output / "gpu.json"
    write_json(json_path, results, {"header": header, "repeat": repeat})
    print(f"wrote {json_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
