"""The precision policy: which arithmetic a runtime uses when the user asks for `precision="auto"` (or names one).

The choice reads what the machine can do, never a CPU model name: OpenVINO's own list of the CPU's
`OPTIMIZATION_CAPABILITIES` ("BF16" where the plugin runs bf16 natively: AVX-512 BF16 or AMX), and where no
list is at hand, the CPU's ISA flags (`deimv2_deploy.cpu`). The artifact is never swapped: INT8 runs only when an
INT8 artifact was given; "auto" on a float artifact chooses between f32 and bf16 arithmetic.

    auto   INT8 artifact  -> int8, its float layers in bf16 where the CPU has bf16, else f32
           float artifact -> bf16 where the CPU has bf16 (what stock OpenVINO does there too), else fp32
    fp32   exact FP32 arithmetic on every CPU (OpenVINO's INFERENCE_PRECISION_HINT f32, set explicitly)
    bf16 / fp16  that arithmetic; a CPU without it runs f32, and describe() says so (read from the compiled model)
    int8   needs an INT8 artifact (deimv2-export --precision int8 --calibration DIR)

What ran is reported by the runtime (`describe()["executed_precision"]`), read back from the compiled model, so a
choice the library overrides is never reported as made. No accuracy budget (`--max-ap-drop`) is applied here: the
AP of each precision must be measured with deimv2-val on the user's data; see benchmarks/results/precision_avx2.md.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PRECISION_REQUESTS", "PrecisionChoice", "choose_precision", "bf16_capable", "executed_label",
           "openvino_capabilities", "bf16_export_error"]

PRECISION_REQUESTS = ("auto", "fp32", "bf16", "fp16", "int8")
# OpenVINO INFERENCE_PRECISION_HINT value per requested float arithmetic
_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_LABELS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


@dataclass(frozen=True)
class PrecisionChoice:
    """What the policy decided for one runtime: `precision` as a user reads it ("fp32", "bf16", "int8"...),
    `inference_precision` the OpenVINO hint it sets ("f32", "bf16", "f16"), and why."""

    requested: str
    precision: str
    inference_precision: str | None  # None: a backend that runs the artifact as it is and does not say
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def openvino_capabilities(core: Any, device: str = "CPU") -> tuple[str, ...] | None:
    """The device's OPTIMIZATION_CAPABILITIES ("FP32", "BF16", "INT8", "FP16"...), or None where it does not say."""
    try:
        return tuple(str(c).upper() for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # noqa: BLE001 - a device or plugin without the property: the caller falls back to flags
        return None


def bf16_capable(capabilities: Iterable[str] | None, isa: Mapping[str, bool] | None) -> bool:
    """Whether bf16 arithmetic runs natively: OpenVINO's capability list when given, else the CPU flags
    (AVX-512 BF16 or AMX-BF16). Unknown (neither) counts as no: f32 is never wrong."""
    if capabilities is not None:
        return "BF16" in {str(c).upper() for c in capabilities}
    isa = isa or {}
    return bool(isa.get("AVX-512 BF16") or isa.get("AMX-BF16"))


def _check(requested: str) -> str:
    key = str(requested).lower()
    key = {"f32": "fp32", "float32": "fp32", "f16": "fp16", "float16": "fp16", "bfloat16": "bf16"}.get(key, key)
    if key not in PRECISION_REQUESTS:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_REQUESTS)}, got {requested!r}")
    return key


def choose_precision(requested: str, artifact_precision: str, capabilities: Iterable[str] | None = None,
                     isa: Mapping[str, bool] | None = None) -> PrecisionChoice:
    """The arithmetic for an artifact of `artifact_precision` ("fp32", "fp16", "int8") when the user asks for
    `requested` (PRECISION_REQUESTS), on a CPU with OpenVINO `capabilities` and/or `isa` flags (cpu_info()["isa"])."""
    key = _check(requested)
    weights = str(artifact_precision).lower()
    bf16 = bf16_capable(capabilities, isa)
    float_hint = "bf16" if bf16 else "f32"
    why_float = ("the CPU runs bf16 natively (OpenVINO lists BF16)" if bf16 and capabilities is not None
                 else "the CPU has AVX-512 BF16 / AMX-BF16" if bf16
                 else "the CPU has no native bf16 (no AVX-512 BF16 / AMX), so f32 is the fastest float arithmetic")
    if key == "int8" and weights != "int8":
        raise ValueError(f"precision 'int8' needs an INT8 artifact, this one is {weights}: export one with "
                         "deimv2-export --format openvino --precision int8 --calibration DIR")
    if key in ("auto", "int8") and weights == "int8":
        return PrecisionChoice(requested, f"int8+{_LABELS[float_hint]}", float_hint,
                               f"INT8 artifact: quantized layers run INT8, the float layers {_LABELS[float_hint]} "
                               f"({why_float})")
    if key == "auto":
        return PrecisionChoice(requested, _LABELS[float_hint], float_hint,
                               f"auto on a {weights} artifact: {_LABELS[float_hint]} because {why_float}")
    hint = _HINTS[key]
    label = f"int8+{key}" if weights == "int8" else key
    reason = f"{key} requested"
    if key == "bf16" and not bf16:
        reason += "; this CPU has no native bf16, OpenVINO will run f32 (describe() reports what ran)"
    return PrecisionChoice(requested, label, hint, reason)


def executed_label(weights: str | None, arithmetic: str | None) -> str | None:
    """One word for what ran: the arithmetic ("fp32", "bf16", "fp16"), prefixed "int8+" for an INT8 artifact
    (its float layers' arithmetic); the weights' precision where the runtime does not report its arithmetic."""
    label = _LABELS.get(str(arithmetic).lower()) if arithmetic is not None else None
    if label is None:
        return weights
    return f"int8+{label}" if weights == "int8" else label


def bf16_export_error(fmt: str) -> str:
    """What to say when an export in bf16 is asked for (`fmt`: the export format): it is a load-time arithmetic."""
    why = {"onnx": " (ONNX Runtime's CPU provider has no bf16 arithmetic)",
           "tensorrt": " (TensorRT engines here are fp32, fp16 or int8)"}.get(fmt, "")
    return ("bf16 is not a file precision: OpenVINO chooses bf16 arithmetic when it loads an FP32 artifact on a CPU "
            "that runs it natively (AVX-512 BF16 / AMX)" + why + "; export --precision fp32 (or auto) and load it with "
            "--precision bf16 or auto (deimv2-infer, deimv2-bench, load_runtime(..., precision=...))")
