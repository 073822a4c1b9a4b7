"""A one-line description of the CPU the benchmark ran on, read from the system."""

from __future__ import annotations

import os
import platform
from pathlib import Path

_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in ``/proc/cpuinfo`` (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _cache_sizes() -> list[str]:
    """``"L2 512 KiB"``-style sizes of the data and unified caches beyond L1."""
    sizes = []
    for index in sorted(_CACHES.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if level != "1" and kind in ("Data", "Unified"):
            sizes.append(f"L{level} {_readable(size)}")
    return sizes


def _readable(size: str) -> str:
    """``"32768K"`` as ``"32 MiB"``, ``"512K"`` as ``"512 KiB"``."""
    if not (size.endswith("K") and size[:-1].isdigit()):
        return size
    kib = int(size[:-1])
    return f"{kib // 1024} MiB" if kib % 1024 == 0 else f"{kib} KiB"


def describe() -> str:
    """CPU model, core count, widest vector instructions, caches, and whether it is virtual."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    parts = [f"{os.cpu_count()} cores"]
    if "avx512f" in flags:
        parts.append("AVX-512")
    elif "avx2" in flags:
        parts.append("AVX2")
    parts += _cache_sizes()
    if "hypervisor" in flags:
        parts.append("a virtual machine")
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        name += f", family {info['cpu family']} model {info['model']}"
    return f"{name} ({', '.join(parts)})"
