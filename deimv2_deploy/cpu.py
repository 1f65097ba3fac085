"""What the CPU is and can do: model, ISA flags (AVX2, AVX-512, VNNI, AMX...), cores, memory (Linux /proc and
/sys; no torch, no inference library). Benchmarks report it (`benchmarks.sysinfo`); exporters and runtimes read it
to say what a precision will do on this machine."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

__all__ = ["cpu_info", "ISA_FLAGS", "INT8_DOT_PRODUCT", "has_int8_dot_product", "read_text"]

# /proc/cpuinfo flag -> how reports name it; the ones that decide CPU inference speed
ISA_FLAGS = {
    "avx2": "AVX2",
    "fma": "FMA",
    "f16c": "F16C",
    "avx512f": "AVX-512F",
    "avx512bw": "AVX-512BW",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX-512 FP16",
    "amx_tile": "AMX",
    "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
}

# the ISA_FLAGS labels that give 8-bit dot products (what makes INT8 inference faster than FP32 on x86)
INT8_DOT_PRODUCT = ("AVX-512 VNNI", "AVX-VNNI", "AMX-INT8")


def has_int8_dot_product(isa: dict[str, bool]) -> bool | None:
    """Whether an x86 CPU's `cpu_info()["isa"]` has int8 dot-product instructions; None when unknown (not x86,
    or no /proc/cpuinfo)."""
    if not isa or "AVX2" not in isa:
        return None
    return any(isa.get(label) for label in INT8_DOT_PRODUCT)



def read_text(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def cpu_info() -> dict[str, Any]:
    """Model name, ISA flags, logical/usable/physical cores and the cgroup CPU quota (containers)."""
    text = read_text("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    physical = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    quota = None
    cpu_max = read_text("/sys/fs/cgroup/cpu.max").split()
    if len(cpu_max) == 2 and cpu_max[0] != "max":
        quota = round(int(cpu_max[0]) / int(cpu_max[1]), 2)
    return {
        "model": model.group(1).strip() if model else (platform.processor() or platform.machine()),
        "arch": platform.machine(),
        "isa": {label: flag in flags for flag, label in ISA_FLAGS.items()} if flags else {},
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "physical_cores": physical,
        "cgroup_cpu_quota": quota,
        "memory_gb": _memory_gb(),
    }


def _memory_gb() -> float | None:
    match = re.search(r"^MemTotal:\s*(\d+) kB", read_text("/proc/meminfo"), re.M)
    return round(int(match.group(1)) / 1024 ** 2, 1) if match else None
