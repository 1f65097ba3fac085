"""Runtimes for DINOv3 ViT (embeddings) and EoMT-DINOv3 (segmentation) artifacts, torch-free.

    from deimv2_deploy.runtimes import load_runtime
    seg = load_runtime("models/eomt_dinov3_coco_640x640_fp32.onnx").predict(cv2.imread("street.jpg"))
    seg.semantic        # (H, W) class index per pixel
    seg.instances       # top-100 overlapping masks, scores, labels (the official instance output)
    seg = runtime.predict(image, tasks="panoptic")
    seg.panoptic        # (H, W) segment ids + segments (label, score, is_thing, area): the official panoptic output

The graph (pixel_values -> transformers' outputs) runs on ONNX Runtime or OpenVINO; the spec in the artifact's
metadata (vit_spec.py) gives the input size and normalisation; segmentation.py holds the official EoMT pre- and
post-processing. The detector's Runtime (base.py) has a different graph contract, so these are their own classes.

Precision: an artifact is FP32, FP16 or INT8 (`spec.precision`, `deimv2-export eomt|dinov3 --precision`).
`precision=` follows the detector's policy (`deimv2_deploy.precision`): on OpenVINO it chooses the arithmetic
("auto": bf16 where the CPU runs it natively, else f32; "fp32" exact f32; "bf16"/"fp16" that hint); ONNX Runtime runs
the artifact's own precision ("auto" or that precision, anything else is an error). Without it an FP32 artifact runs
f32 everywhere and a reduced one with OpenVINO's default for the CPU. `describe()["executed_precision"]` is what
really ran, read back from the compiled model (an FP16 IR runs f32 arithmetic on a CPU without native FP16/bf16).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deimv2_deploy.embeddings import Embeddings
from deimv2_deploy.errors import BackendUnavailableError
from deimv2_deploy.precision import PRECISION_REQUESTS, PrecisionChoice, choose_precision, executed_label
from deimv2_deploy.preprocess import as_rgb_uint8, image_list, resize_like_pil
from deimv2_deploy.runtimes.openvino_backend import executed_precision, openvino_core
from deimv2_deploy.segmentation import (
    TOP_K_INSTANCES,
    Segmentation,
    instance_canvas,
    instances_from_outputs,
    panoptic_from_outputs,
    semantic_from_windows,
    semantic_windows,
)
from deimv2_deploy.vit_spec import VIT_METADATA_KEY, VitSpec, parse_stuff_classes

__all__ = ["VitRuntime", "Dinov3Runtime", "EomtRuntime", "read_vit_spec", "load_vit_runtime", "EOMT_TASKS",
           "DEFAULT_EOMT_TASKS", "VIT_BACKENDS", "parse_eomt_tasks", "normalize", "graph_crops"]

EOMT_TASKS = ("semantic", "instance", "panoptic")
DEFAULT_EOMT_TASKS = ("semantic", "instance")  # panoptic needs the thing/stuff split, which not every artifact has
VIT_BACKENDS = ("onnxruntime", "openvino")


def parse_eomt_tasks(values: Sequence[str] | None, spec: VitSpec, option: str = "task") -> tuple[str, ...]:
    """Task values (repeated or comma-separated, e.g. ["semantic,panoptic"]) -> EoMT tasks in the order given,
    without repeats. None or empty: semantic and instance, plus panoptic when the artifact records its stuff
    classes. ValueError naming a value that is not a task (`option` names where it came from: "--task", "task")."""
    tasks: list[str] = []
    for value in values or ():
        for task in (t.strip().lower() for t in value.split(",") if t.strip()):
            if task not in EOMT_TASKS:
                raise ValueError(f"{option} {task!r} is not an EoMT task: choose from {', '.join(EOMT_TASKS)}")
            if task not in tasks:
                tasks.append(task)
    if tasks:
        return tuple(tasks)
    return DEFAULT_EOMT_TASKS + (("panoptic",) if spec.stuff_classes is not None else ())


def normalize(rgb: np.ndarray, spec: VitSpec) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32: /255, then the spec's mean/std."""
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    x = rgb.transpose(2, 0, 1).astype(np.float32) * np.float32(1 / 255)
    return ((x - mean) / std).astype(np.float32)


def graph_crops(rgb: np.ndarray, spec: VitSpec) -> list[np.ndarray]:
    """The (H, W, 3) uint8 RGB crops at the input size that predict() gives the graph for one image, as INT8
    calibration feeds them: DINOv3 the stretched image; EoMT the padded canvas of instance/panoptic and the middle
    window of semantic's sliding windows (the others are more of the same; two per image keeps the count known)."""
    if spec.family == "dinov3":
        return [resize_like_pil(rgb, spec.input_size)]
    size = spec.input_size[0]
    windows, _, _ = semantic_windows(rgb, size)
    return [instance_canvas(rgb, size)[0], windows[len(windows) // 2]]


def read_vit_spec(path: str | os.PathLike) -> VitSpec | None:
    """The VitSpec an .onnx / .xml artifact carries, or None (a detector artifact, or no deimv2 metadata)."""
    p = Path(path)
    suffix = p.suffix.lower()
    text = None
    if suffix == ".onnx":
        try:
            import onnx
        except ImportError:  # onnx comes with the export extra; onnxruntime is always there (builds a session)
            import onnxruntime

            session = onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            text = dict(session.get_modelmeta().custom_metadata_map).get(VIT_METADATA_KEY)
        else:
            try:
                proto = onnx.load(str(p), load_external_data=False)
            except Exception:  # noqa: BLE001 - not readable as ONNX: the detector path gives the clear error
                return None
            text = {m.key: m.value for m in proto.metadata_props}.get(VIT_METADATA_KEY)
    elif suffix == ".xml":
        try:
            core = openvino_core()
        except BackendUnavailableError:
            return None
        try:
            model = core.read_model(str(p))
        except Exception:  # noqa: BLE001 - the detector path reports unreadable IR
            return None
        if model.has_rt_info([VIT_METADATA_KEY]):
            text = str(model.get_rt_info([VIT_METADATA_KEY]).astype(str))
    return None if text is None else VitSpec.from_metadata({VIT_METADATA_KEY: text})


class _OrtGraph:
    def __init__(self, path: Path, threads: int | None, spinning: bool = True) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime") from e
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        if not spinning:  # idle threads sleep between runs (a server's replica leaves the cores to its HTTP side)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def __call__(self, pixel_values: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
        return self.session.run(list(names), {"pixel_values": pixel_values})


def _openvino_hint(precision: str | None, weights: str, core: Any) -> tuple[str | None, PrecisionChoice | None]:
    """(INFERENCE_PRECISION_HINT, the policy's choice) for an artifact of precision `weights`: the detector's policy
    when `precision` is given; else f32 for an FP32 artifact (a bf16 CPU would default to bf16) and OpenVINO's
    default for a reduced one (as the detector's OpenVINO runtime does)."""
    if precision is None:
        return ("f32" if weights == "fp32" else None), None
    from deimv2_deploy.cpu import cpu_info
    from deimv2_deploy.precision import openvino_capabilities

    choice = choose_precision(precision, weights, openvino_capabilities(core, "CPU"), cpu_info()["isa"])
    return choice.inference_precision, choice


class _OpenVinoGraph:
    def __init__(self, path: Path, threads: int | None, spinning: bool = True, precision: str | None = None,
                 weights: str = "fp32") -> None:  # spinning: ORT only
        core = openvino_core()
        hint, self.choice = _openvino_hint(precision, weights, core)
        config: dict[str, Any] = {} if hint is None else {"INFERENCE_PRECISION_HINT": hint}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(str(path), "CPU", config)
        # a port may carry several tensor names (the ONNX name among them): report the one the graph contract uses
        wanted = ("pixel_values", "last_hidden_state", "pooler_output", "class_queries_logits", "masks_queries_logits")

        def name(port: Any) -> str:
            return next((n for n in wanted if n in port.get_names()), port.get_any_name())

        self.input_names = tuple(name(p) for p in self.compiled.inputs)
        self.output_names = tuple(name(p) for p in self.compiled.outputs)

    def __call__(self, pixel_values: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
        result = self.compiled({"pixel_values": pixel_values})
        return [np.array(result[self.compiled.output(n)]) for n in names]  # copies: never the request's buffers

    def arithmetic(self) -> str | None:
        """"f32" / "bf16" / "f16" as compiled (a bf16 hint on a CPU without bf16 compiles to f32)."""
        def read(name: str) -> Any:
            try:
                return self.compiled.get_property(name)
            except RuntimeError:
                return None

        return executed_precision(read("INFERENCE_PRECISION_HINT"), read("EXECUTION_MODE_HINT"))


class VitRuntime:
    """A DINOv3 / EoMT artifact on ONNX Runtime or OpenVINO (CPU): the graph, its spec and its preprocessing.
    `spinning=False` (ONNX Runtime; OpenVINO ignores it) stops idle inference threads from busy-waiting.
    `precision`: the precision policy (module docstring); None keeps each backend's default."""

    def __init__(self, path: str | os.PathLike, spec: VitSpec | None = None, backend: str = "onnxruntime",
                 threads: int | None = None, spinning: bool = True, precision: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"artifact not found: {self.path}")
        spec = spec or read_vit_spec(self.path)
        if spec is None:
            raise ValueError(f"{self.path} carries no DINOv3/EoMT metadata: export it with "
                             "`deimv2-export dinov3|eomt --checkpoint FOLDER`")
        backend = {"ort": "onnxruntime", "onnx": "onnxruntime", "ov": "openvino"}.get(backend, backend)
        if backend not in VIT_BACKENDS:
            raise ValueError(f"DINOv3/EoMT artifacts run on {' or '.join(VIT_BACKENDS)}, not {backend!r}")
        if backend == "onnxruntime" and self.path.suffix.lower() != ".onnx":
            raise ValueError(f"onnxruntime cannot load {self.path.suffix} files; use backend='openvino'")
        self.spec, self.backend = spec, backend
        requested = _precision_request(precision)
        self.precision_choice: PrecisionChoice | None = None
        if backend == "onnxruntime":
            self.precision_choice = _onnxruntime_choice(requested, spec.precision)
            self.graph: Any = _OrtGraph(self.path, threads, spinning)
        else:
            self.graph = _OpenVinoGraph(self.path, threads, spinning, requested, spec.precision)
            self.precision_choice = self.graph.choice
        if tuple(self.graph.input_names) != spec.input_names or set(self.graph.output_names) != set(spec.output_names):
            raise ValueError(f"{self.path} has inputs {list(self.graph.input_names)} and outputs "
                             f"{list(self.graph.output_names)}, not the {spec.family} graph its metadata describes")
        self.max_batch = spec.batch or 8

    def inference_precision(self) -> str | None:
        """The arithmetic that runs: OpenVINO's as compiled; ONNX Runtime's CPU provider computes an FP32 graph in
        f32 (an FP16 graph partly casts back to f32 on x86, so it is reported by its weights)."""
        if self.graph is None:
            return None
        if self.backend == "openvino":
            return self.graph.arithmetic()
        return "f32" if self.spec.precision == "fp32" else None

    def describe(self) -> dict[str, Any]:
        """Backend, family, `precision` (the artifact's), `executed_precision` (what really runs: "fp32", "bf16",
        "int8+fp32"...), `precision_choice` (the policy's decision when a precision was asked for)."""
        arithmetic = self.inference_precision()
        return {"backend": self.backend, "family": self.spec.family, "precision": self.spec.precision,
                "input_size": list(self.spec.input_size), "inference_precision": arithmetic,
                "executed_precision": executed_label(self.spec.precision, arithmetic),
                "precision_choice": None if self.precision_choice is None else self.precision_choice.to_dict()}

    def close(self) -> None:
        """Release the graph (the session or compiled model); the runtime cannot predict afterwards."""
        self.graph = None

    # --- the graph -------------------------------------------------------------------------------------
    def infer(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """pixel_values float32 (N, 3, H, W), normalised -> the graph's outputs by name (numpy)."""
        h, w = self.spec.input_size
        if not isinstance(pixel_values, np.ndarray) or pixel_values.dtype != np.float32:
            raise ValueError(f"pixel_values must be a float32 numpy array, got "
                             f"{getattr(pixel_values, 'dtype', type(pixel_values).__name__)}")
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, h, w) or pixel_values.shape[0] < 1:
            raise ValueError(f"this {self.spec.family} artifact takes pixel_values of shape (N, 3, {h}, {w}), got "
                             f"{pixel_values.shape}; pass images to predict() to have them resized, or re-export "
                             "with --input-size")
        if self.spec.batch is not None and pixel_values.shape[0] != self.spec.batch:
            raise ValueError(f"this artifact has a fixed batch of {self.spec.batch}, got {pixel_values.shape[0]}")
        if self.graph is None:
            raise RuntimeError(f"the runtime of {self.path.name} was closed: load the artifact again")
        names = self.spec.output_names
        return dict(zip(names, self.graph(np.ascontiguousarray(pixel_values), names), strict=True))

    def _infer_many(self, rgb_inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Run (H, W, 3) uint8 RGB images already at the input size, in batches; outputs concatenated."""
        step = self.spec.batch or self.max_batch
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, len(rgb_inputs), step):
            chunk = rgb_inputs[start:start + step]
            pixels = np.stack([self.normalize(x) for x in chunk])
            if self.spec.batch is not None and len(chunk) < self.spec.batch:  # pad a fixed batch; dropped below
                pixels = np.concatenate([pixels, np.repeat(pixels[-1:], self.spec.batch - len(chunk), 0)])
            out = self.infer(pixels)
            parts.append({k: v[:len(chunk)] for k, v in out.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def normalize(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (3, H, W) float32: /255, then mean/std."""
        return normalize(rgb, self.spec)


def _precision_request(precision: str | None) -> str | None:
    if precision is None:
        return None
    key = str(precision).lower()
    key = {"f32": "fp32", "float32": "fp32", "f16": "fp16", "float16": "fp16", "bfloat16": "bf16"}.get(key, key)
    if key not in PRECISION_REQUESTS:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_REQUESTS)}, got {precision!r}")
    return key


def _onnxruntime_choice(requested: str | None, weights: str) -> PrecisionChoice | None:
    """ONNX Runtime runs the artifact's own precision: "auto" or that precision; anything else is an error."""
    if requested is None:
        return None
    if requested not in ("auto", weights):
        instead = ("bf16 arithmetic is an OpenVINO option: use backend='openvino'" if requested == "bf16"
                   else f"export a {requested} artifact (deimv2-export ... --precision {requested}), or use "
                        "backend='openvino'")
        raise ValueError(f"ONNX Runtime runs the artifact's own precision ({weights}), not {requested}: {instead}")
    return PrecisionChoice(requested, weights, "f32" if weights == "fp32" else None,
                           f"onnxruntime runs the artifact's own precision ({weights})")


class Dinov3Runtime(VitRuntime):
    """DINOv3 ViT features: `predict(image)` -> Embeddings (a list for a list of images)."""

    def predict(self, images: np.ndarray | Sequence[np.ndarray], color: str = "bgr") -> Embeddings | list[Embeddings]:
        """Images uint8 (H, W, 3), BGR unless color="rgb", any size: resized to the input size (ignoring aspect,
        as transformers' DINOv3 image processor does), /255, ImageNet mean/std."""
        items, single = image_list(images)
        rgbs = [as_rgb_uint8(x, color) for x in items]
        sizes = [x.shape[:2] for x in rgbs]
        out = self._infer_many([resize_like_pil(x, self.spec.input_size) for x in rgbs])
        hidden, pooled = out["last_hidden_state"], out["pooler_output"]
        rows, cols = self.spec.grid
        r = self.spec.num_register_tokens
        if hidden.shape[1] != 1 + r + rows * cols:
            raise ValueError(f"{self.path}: last_hidden_state has {hidden.shape[1]} tokens, expected 1 + {r} + "
                             f"{rows * cols}: the artifact does not match its metadata")
        results = [Embeddings(cls=hidden[i, 0].copy(), registers=hidden[i, 1:1 + r].copy(),
                              patches=hidden[i, 1 + r:].reshape(rows, cols, -1).copy(), pooled=pooled[i].copy(),
                              image_size=(int(sizes[i][0]), int(sizes[i][1]))) for i in range(len(items))]
        return results[0] if single else results


class EomtRuntime(VitRuntime):
    """EoMT-DINOv3 segmentation: `predict(image)` -> Segmentation (semantic map, instance and panoptic segments)."""

    def stuff_classes(self, override: str | Sequence[int | str] | None = None) -> tuple[int, ...]:
        """The stuff labels for panoptic: `override` if given, else the artifact's; ValueError when neither says."""
        if override is not None:
            return parse_stuff_classes(override if isinstance(override, str) else list(override),
                                       self.spec.class_names)
        if self.spec.stuff_classes is None:
            raise ValueError(f"{self.path.name} does not record which classes are stuff, which panoptic segmentation "
                             "needs (transformers' config does not hold it): re-export with `deimv2-export eomt "
                             "--stuff-classes 80-132` (COCO panoptic; 'none' if every class is a thing) or pass "
                             "stuff_classes (deimv2-infer: --stuff-classes)")
        return self.spec.stuff_classes

    def predict(self, images: np.ndarray | Sequence[np.ndarray], tasks: str | Sequence[str] = DEFAULT_EOMT_TASKS,
                color: str = "bgr", top_k: int = TOP_K_INSTANCES,
                stuff_classes: str | Sequence[int | str] | None = None) -> Segmentation | list[Segmentation]:
        """Images uint8 (H, W, 3), BGR unless color="rgb", any size. `tasks`: "semantic" (official sliding windows),
        "instance" (official top-k over (query, class) pairs) and/or "panoptic" (official: one segment per kept
        query or stuff class). Semantic runs its own windows; instance and panoptic share one pass over the padded
        canvas. Panoptic takes its stuff classes from `stuff_classes` or else the artifact (ValueError if neither)."""
        tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        unknown = [t for t in tasks if t not in EOMT_TASKS]
        if unknown or not tasks:
            bad = unknown[0] if unknown else "(none)"
            raise ValueError(f"unknown task {bad!r}: choose from {', '.join(EOMT_TASKS)}")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        stuff = self.stuff_classes(stuff_classes) if "panoptic" in tasks else ()
        items, single = image_list(images)
        rgbs = [as_rgb_uint8(x, color) for x in items]
        size = self.spec.input_size[0]
        names = self.spec.class_names
        semantic: list[np.ndarray | None] = [None] * len(rgbs)
        instances: list[Any] = [None] * len(rgbs)
        panoptic: list[Any] = [None] * len(rgbs)
        if "semantic" in tasks:
            windows, layout = [], []
            for rgb in rgbs:
                w, spans, scaled = semantic_windows(rgb, size)
                layout.append((len(windows), len(w), spans, scaled))
                windows.extend(w)
            out = self._infer_many(windows)
            for i, (first, count, spans, scaled) in enumerate(layout):
                sl = slice(first, first + count)
                semantic[i] = semantic_from_windows(out["class_queries_logits"][sl], out["masks_queries_logits"][sl],
                                                    spans, scaled, rgbs[i].shape[:2], size)
        if "instance" in tasks or "panoptic" in tasks:
            canvases = [instance_canvas(rgb, size) for rgb in rgbs]
            out = self._infer_many([c for c, _ in canvases])
            for i, (_, scaled) in enumerate(canvases):
                classes, masks = out["class_queries_logits"][i], out["masks_queries_logits"][i]
                if "instance" in tasks:
                    instances[i] = instances_from_outputs(classes, masks, scaled, rgbs[i].shape[:2], size, top_k,
                                                          names)
                if "panoptic" in tasks:
                    panoptic[i] = panoptic_from_outputs(classes, masks, scaled, rgbs[i].shape[:2], size, stuff, names)
        results = [Segmentation((int(r.shape[0]), int(r.shape[1])), names, semantic[i], instances[i], panoptic[i])
                   for i, r in enumerate(rgbs)]
        return results[0] if single else results


def load_vit_runtime(path: str | os.PathLike, backend: str | None = None, threads: int | None = None,
                     spec: VitSpec | None = None, spinning: bool = True, precision: str | None = None) -> VitRuntime:
    """The runtime of a DINOv3 (Dinov3Runtime) or EoMT (EomtRuntime) artifact; backend from the file type.
    `precision`: the precision policy (module docstring), None for each backend's default."""
    p = Path(path)
    spec = spec or read_vit_spec(p)
    if spec is None:
        raise ValueError(f"{p} carries no DINOv3/EoMT metadata: export it with "
                         "`deimv2-export dinov3|eomt --checkpoint FOLDER`")
    backend = backend or ("openvino" if p.suffix.lower() == ".xml" else "onnxruntime")
    cls = EomtRuntime if spec.family == "eomt" else Dinov3Runtime
    return cls(p, spec, backend, threads, spinning, precision)
