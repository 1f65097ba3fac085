"""The machine a benchmark ran on: CPU model and ISA flags, cores, GPU, library versions, OS, command.

Every report carries this fingerprint, so a number is never read without the hardware behind it. Nothing
here imports torch: GPU facts come from `nvidia-smi`, and from torch.cuda only when torch is already loaded.
"""
from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from deimv2_deploy.cpu import INT8_DOT_PRODUCT, ISA_FLAGS, cpu_info, has_int8_dot_product

__all__ = ["system_fingerprint", "cpu_info", "gpu_info", "library_versions", "device_name", "tier_of",
           "command_line", "load_average", "ISA_FLAGS", "INT8_DOT_PRODUCT", "has_int8_dot_product"]

# distribution names to report (the first installed of each group)
_LIBRARIES = {
    "numpy": ("numpy",),
    "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python"),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
    "openvino": ("openvino",),
    "torch": ("torch",),
    "tensorrt": ("tensorrt", "tensorrt-cu12"),
    "onnx": ("onnx",),
    "nncf": ("nncf",),
}


def gpu_info() -> list[dict[str, Any]]:
    """One entry per NVIDIA GPU (nvidia-smi), else from torch.cuda if torch is loaded; [] when none."""
    gpus: list[dict[str, Any]] = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            for line in out.strip().splitlines():
                name, driver, memory = (p.strip() for p in line.split(",", 2))
                gpus.append({"name": name, "driver": driver, "memory": memory, "source": "nvidia-smi"})
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    if not gpus and "torch" in sys.modules:
        torch = sys.modules["torch"]
        try:
            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    props = torch.cuda.get_device_properties(i)
                    gpus.append({"name": props.name, "driver": None, "memory": f"{props.total_memory // 2**20} MiB",
                                 "source": "torch.cuda", "cuda": torch.version.cuda})
        except Exception:  # a broken CUDA install must not stop a CPU benchmark
            pass
    return gpus


def library_versions() -> dict[str, str | None]:
    """Installed versions (from package metadata, so nothing heavy is imported); None when absent."""
    out: dict[str, str | None] = {}
    for name, dists in _LIBRARIES.items():
        out[name] = None
        for dist in dists:
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    try:
        out["deimv2-deploy"] = metadata.version("deimv2-deploy")
    except metadata.PackageNotFoundError:
        from deimv2_deploy import __version__

        out["deimv2-deploy"] = __version__
    return out


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (runnable processes): above the core count, timings are contended."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def tier_of(device: str) -> str:
    """'GPU' for CUDA devices, 'CPU' otherwise."""
    return "GPU" if device.lower().startswith(("cuda", "gpu")) else "CPU"


def device_name(device: str, cpu: dict[str, Any] | None = None, gpus: list[dict[str, Any]] | None = None) -> str:
    """A person-readable name of the device a row ran on."""
    if tier_of(device) == "GPU":
        gpus = gpu_info() if gpus is None else gpus
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return gpus[index]["name"] if index < len(gpus) else f"{device} (no GPU found)"
    cpu = cpu_info() if cpu is None else cpu
    return str(cpu["model"])


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (shell-quoted), e.g. 'deimv2-bench --sizes atto'."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def system_fingerprint(threads: int | None = None, command: str | None = None) -> dict[str, Any]:
    """Everything a reader needs to reproduce or discount a benchmark number."""
    return {
        "cpu": cpu_info(),
        "threads": threads,
        "gpus": gpu_info(),
        "libraries": library_versions(),
        "load_average": load_average(),  # other work competing for the CPU while this ran
        "os": platform.platform(),
        "python": platform.python_version(),
        "command": command if command is not None else command_line(),
    }
