"""C ABI: libdeimv2.so built once per module with cffi, driven by real C programs compiled with cc.

examples/c/detect.c must print what the Python API returns for the same image; examples/c/selftest.c walks
every error path, the capacity protocol, strides and threads. Both run with a scrubbed environment (no
PYTHONPATH, PYTHONHOME, VIRTUAL_ENV, venv on PATH), as a C program started from anywhere would.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deimv2_deploy.capi.build import HEADER_PATH, _c_string, find_compiler
from deimv2_deploy.capi.embedded import DETECTION_DTYPE, Status, image_from_buffer

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "c"


def _outside_env(**extra: str) -> dict[str, str]:
    """The environment of a C program run outside the venv: no Python variables at all."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def _compile(capi: Path, source: Path, out: Path) -> Path:
    cmd = [find_compiler() or "cc", "-O2", "-Wall", "-Wextra", "-Werror", "-std=c11", "-pthread", f"-I{capi}",
           str(source), "-o", str(out), f"-L{capi}", "-ldeimv2", f"-Wl,-rpath,{capi}", "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
    return out


# --- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def capi(tmp_path_factory) -> Path:
    """libdeimv2.so + deimv2.h, built through the CLI (once per module)."""
    pytest.importorskip("cffi", reason="cffi is needed to build the C library (pip install deimv2-deploy[capi])")
    if find_compiler() is None:
        pytest.skip("no C compiler (cc) on this machine")
    from deimv2_deploy.cli.capi import main

    out = tmp_path_factory.mktemp("capi")
    assert main(["build", "--output", str(out)]) == 0
    assert (out / "libdeimv2.so").is_file() and (out / "deimv2.h").read_text() == HEADER_PATH.read_text()
    return out


@pytest.fixture(scope="module")
def programs(capi, tmp_path_factory) -> dict[str, Path]:
    bin_dir = tmp_path_factory.mktemp("cbin")
    return {name: _compile(capi, EXAMPLES / f"{name}.c", bin_dir / name) for name in ("detect", "selftest")}


@pytest.fixture(scope="module")
def images(example_image_path, tmp_path_factory) -> dict:
    """The example photo as binary PPM and as raw BGR, plus the pixels the C programs will read."""
    cv2 = pytest.importorskip("cv2")
    folder = tmp_path_factory.mktemp("images")
    ppm = folder / "example.ppm"
    assert cv2.imwrite(str(ppm), cv2.imread(str(example_image_path)))
    pixels = cv2.imread(str(ppm))  # PPM is lossless: exactly what detect.c decodes
    raw = folder / "example.bgr"
    np.ascontiguousarray(pixels).tofile(raw)
    return {"ppm": ppm, "raw": raw, "pixels": pixels}


@pytest.fixture(scope="module")
def runtime(atto_onnx):
    from deimv2_deploy.runtimes import load_runtime

    rt = load_runtime(atto_onnx.path)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def selftest(programs, atto_onnx, images) -> dict[str, dict]:
    """examples/c/selftest.c's report, one dict per case."""
    h, w = images["pixels"].shape[:2]
    done = subprocess.run([str(programs["selftest"]), str(atto_onnx.path), str(images["raw"]), str(w), str(h)],
                          capture_output=True, text=True, env=_outside_env(), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    cases = {}
    for line in done.stdout.splitlines():
        record = json.loads(line)
        cases[record["case"]] = record
    return cases


def _run_detect(programs, *args: str) -> dict:
    done = subprocess.run([str(programs["detect"]), *args], capture_output=True, text=True, env=_outside_env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _assert_same_detections(from_c: list[dict], expected, class_names) -> None:
    """Order-free: every C detection has its own Python twin (same label, box within 1e-3 px, score 1e-6)."""
    assert len(from_c) == len(expected)
    scores = [d["score"] for d in from_c]
    assert scores == sorted(scores, reverse=True), "deimv2_detect must return detections best first"
    unused = set(range(len(expected)))
    for d in from_c:
        box = np.asarray(d["box"], dtype=np.float64)
        twin = next((j for j in sorted(unused) if expected.labels[j] == d["label"]
                     and abs(float(expected.scores[j]) - d["score"]) <= 1e-6
                     and np.abs(expected.xyxy[j] - box).max() <= 1e-3), None)
        assert twin is not None, f"C detection {d} has no match in the Python API's detections"
        unused.discard(twin)
        assert d["class_name"] == class_names[d["label"]]


# --- no compiler needed ------------------------------------------------------------------------------------
def test_header_agrees_with_the_python_side():
    header = HEADER_PATH.read_text()
    codes = {name: int(value) for name, value in re.findall(r"\bDEIMV2_((?:OK|ERR_\w+))\s*=\s*(\d+)", header)}
    assert codes == {s.name: s.value for s in Status}
    body = re.search(r"typedef struct deimv2_detection \{(.*?)\} deimv2_detection;", header, re.S).group(1)
    fields = re.findall(r"(float|int)\s+([\w\s,]+);", body)
    names = [n.strip() for _, group in fields for n in group.split(",")]
    assert tuple(names) == DETECTION_DTYPE.names and DETECTION_DTYPE.itemsize == 24


def test_image_from_buffer_honours_the_stride():
    width, height, stride = 5, 3, 5 * 3 + 4
    rows = np.full((height, stride), 255, np.uint8)
    pixels = np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3)
    rows[:, :width * 3] = pixels.reshape(height, -1)
    buffer = rows.tobytes()[:stride * (height - 1) + width * 3]  # the last row may end right after its pixels
    image = image_from_buffer(buffer, width, height, stride)
    np.testing.assert_array_equal(image, pixels)
    assert image.flags.c_contiguous and image.flags.writeable  # a copy, not a view of the caller's memory


def test_c_string_literals_escape_paths():
    assert _c_string('/a b/"q"\\x') == '"/a b/\\"q\\"\\\\x"'
    assert _c_string("é\n") == '"\\303\\251\\012"'


def test_embedded_side_imports_no_torch():
    code = "import sys, deimv2_deploy.capi.embedded; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_cli_info_reports_how_to_link(tmp_path, capsys):
    from deimv2_deploy.cli.capi import main

    assert main(["info", "--json", "--output", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["built"] is False and info["library"] == str(tmp_path.resolve() / "libdeimv2.so")
    assert f"-L{tmp_path.resolve()} -ldeimv2" in info["compile"] and "-Wl,-rpath," in info["compile"]
    assert info["environment"]["python"] == sys.executable


# --- the library from C ------------------------------------------------------------------------------------
def test_detect_example_matches_python_api(programs, atto_onnx, images, runtime):
    from_c = _run_detect(programs, str(atto_onnx.path), str(images["ppm"]))
    expected = runtime.predict(images["pixels"], score_threshold=0.0)
    assert from_c["image_size"] == list(images["pixels"].shape[:2])
    assert len(from_c["detections"]) == runtime.spec.top_k == 300
    assert from_c["classes"] == list(runtime.spec.class_names) and len(from_c["classes"]) == 80  # COCO's, in order
    _assert_same_detections(from_c["detections"], expected, runtime.spec.class_names)


def test_detect_example_raw_input_and_threshold(programs, atto_onnx, images, runtime):
    scores = np.sort(runtime.predict(images["pixels"]).scores)[::-1]
    gaps = np.flatnonzero(scores[:-1] - scores[1:] > 1e-4)
    k = gaps[len(gaps) // 2]  # a threshold between two clearly different scores, near the middle
    threshold = float((scores[k] + scores[k + 1]) / 2)
    h, w = images["pixels"].shape[:2]
    from_c = _run_detect(programs, "--threshold", repr(threshold), "--raw", str(w), str(h),
                         str(atto_onnx.path), str(images["raw"]))
    expected = runtime.predict(images["pixels"], score_threshold=threshold)
    assert 0 < len(expected) < 300 and len(from_c["detections"]) == k + 1
    _assert_same_detections(from_c["detections"], expected, runtime.spec.class_names)


def test_detect_example_names_a_custom_models_own_classes(programs, three_class_model, images):
    """A 3-class model (cat, dog, bird) through the C ABI: deimv2_num_classes/deimv2_class_name give its names, on
    ONNX Runtime and OpenVINO alike, and every detection is named after its label."""
    from deimv2_deploy.runtimes import load_runtime

    for path in (three_class_model.onnx, three_class_model.xml):
        from_c = _run_detect(programs, str(path), str(images["ppm"]))
        assert from_c["classes"] == list(three_class_model.names), path
        with load_runtime(path) as rt:
            expected = rt.predict(images["pixels"], score_threshold=0.0)
        assert len(from_c["detections"]) == 300 and {d["label"] for d in from_c["detections"]} <= {0, 1, 2}
        _assert_same_detections(from_c["detections"], expected, three_class_model.names)


def test_selftest_open_errors(selftest):
    expect = {
        "open_null_out": ("DEIMV2_ERR_INVALID_ARGUMENT", "out is NULL"),
        "open_null_artifact": ("DEIMV2_ERR_INVALID_ARGUMENT", "artifact path is NULL"),
        "open_missing_file": ("DEIMV2_ERR_NOT_FOUND", "/nonexistent/deimv2_atto.onnx"),
        "open_bad_backend": ("DEIMV2_ERR_INVALID_ARGUMENT", "unknown backend 'no-such-backend'"),
        "open_wrong_backend_for_file": ("DEIMV2_ERR_INVALID_ARGUMENT", "'tensorrt' cannot load .onnx"),
        "open_bad_device": ("DEIMV2_ERR_INVALID_ARGUMENT", "'quantum'"),
    }
    for case, (status, message) in expect.items():
        got = selftest[case]
        assert got["status"] == status and message in got["error"], got
        assert got["error"].startswith("deimv2_open: ") and got["value"] is None, got  # *out reset to NULL
    assert selftest["open"]["status"] == "DEIMV2_OK" and selftest["open"]["error"] == ""
    assert selftest["version"]["value"] == __import__("deimv2_deploy").__version__
    assert selftest["status_name_unknown"]["value"] == "DEIMV2_UNKNOWN_STATUS"


def test_selftest_detect_errors(selftest):
    expect = {
        "detect_null_handle": "handle is NULL",
        "detect_null_image": "image pointer (bgr) is NULL",
        "detect_null_count": "count is NULL",
        "detect_zero_width": "got 0 x 375",
        "detect_negative_height": "got 500 x -5",
        "detect_small_stride": "stride 1499 is less than width * 3 = 1500",
        "detect_negative_capacity": "capacity must be >= 0, got -1",
        "detect_null_out": "out is NULL but capacity is 5",
        "detect_nan_threshold": "NaN",
        "detect_garbage_handle": "0x1234 is not an open handle",
        "detect_after_close": "is not an open handle",
    }
    for case, message in expect.items():
        got = selftest[case]
        assert got["status"] == "DEIMV2_ERR_INVALID_ARGUMENT" and message in got["error"], got
        assert got["count"] == 0, got  # *count is reset before any check that can fail
    assert "is not an open handle" in selftest["close_twice"]["error"]  # reported, not a crash
    assert selftest["close"]["error"] == "" and selftest["close_null"]["error"] == ""


def test_selftest_queries(selftest):
    assert selftest["num_classes"]["count"] == 80 and selftest["max_detections"]["count"] == 300
    assert selftest["num_classes_null"]["count"] == -1 and "handle is NULL" in selftest["num_classes_null"]["error"]
    assert selftest["max_detections_null"]["count"] == -1
    assert selftest["class_name_0"]["value"] == "person"
    for case, message in [("class_name_negative", "label -1 is out of range 0..79"),
                          ("class_name_too_large", "label 1000 is out of range 0..79"),
                          ("class_name_null_handle", "handle is NULL")]:
        assert selftest[case]["value"] is None and message in selftest[case]["error"], selftest[case]


def test_selftest_capacity_and_stride(selftest):
    assert selftest["detect_full"]["status"] == "DEIMV2_OK" and selftest["detect_full"]["count"] == 300
    for case, written in [("detect_capacity_zero", 0), ("detect_capacity_five", 5)]:
        got = selftest[case]
        assert got["status"] == "DEIMV2_ERR_CAPACITY" and got["count"] == 300, got  # the size needed
        assert f"300 detections but capacity is {written}" in got["error"]
    assert selftest["detect_capacity_five"]["value"] == "best five written"
    assert selftest["detect_padded_stride"]["status"] == "DEIMV2_OK"
    assert selftest["detect_padded_stride"]["value"] == "same as packed"


def test_selftest_threads(selftest):
    got = selftest["threads"]
    assert got["status"] == "DEIMV2_OK" and got["value"] == "rounds=12 mismatches=0 failures=0 leaked=0", got
    assert selftest["main_error_kept"]["value"] == "kept"  # deimv2_last_error is per thread


def test_wrong_python_environment_is_an_error_not_a_crash(programs, atto_onnx, images):
    done = subprocess.run([str(programs["detect"]), str(atto_onnx.path), str(images["ppm"])], capture_output=True,
                          text=True, env=_outside_env(DEIMV2_PYTHON="/nonexistent/bin/python"), timeout=120)
    assert done.returncode == 1, done.stderr  # the program's own error exit, not a signal or Python's exit()
    assert "DEIMV2_ERR_PYTHON" in done.stderr and "/nonexistent/bin/python" in done.stderr
    assert "Set DEIMV2_PYTHON" in done.stderr and done.stdout == ""


def test_makefile_builds_the_example(capi, tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    work = tmp_path / "c"
    shutil.copytree(EXAMPLES, work)
    command = ["make", "-C", str(work), "detect", "selftest", f"DEIMV2_CAPI={capi}", f"CC={find_compiler()}"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (work / "detect").is_file() and (work / "selftest").is_file()
