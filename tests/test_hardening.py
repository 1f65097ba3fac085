"""Nothing lost, nothing confusing: full disks, read-only folders, SIGTERM, bad inputs typed as a new user would.

Each test reproduces a defect of issue #20. Full and read-only disks are real tmpfs mounts where this machine
allows mounting one (root); elsewhere those tests skip saying why, and simulated failing writers cover the logic.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from deimv2_deploy.runtimes.base import Backend, Runtime
from deimv2_deploy.spec import ArtifactSpec
from deimv2_deploy.video import partial_path, run_video, write_synthetic_video

REPO = Path(__file__).resolve().parents[1]


# --- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, read_only=False) -> a fresh real tmpfs folder; skipped (with the reason) where mounting is
    not allowed."""
    mounted: list[Path] = []

    def mount(size: str = "400k", read_only: bool = False) -> Path:
        if os.name != "posix" or os.geteuid() != 0:
            pytest.skip("a real full / read-only disk needs a tmpfs mount, which needs root; the simulated "
                        "failing-writer tests cover the same logic")
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); the simulated "
                        "failing-writer tests cover the same logic")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_synthetic_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=60, size=(320, 240))


class FakeRuntime(Runtime):
    """Ten fixed detections per image, optionally a hook called on every graph call."""

    backend = Backend.ONNXRUNTIME

    def __init__(self, on_call=None) -> None:
        super().__init__(ArtifactSpec.for_variant("atto"))
        self.on_call, self.calls = on_call, 0

    @classmethod
    def is_available(cls) -> bool:
        return True

    def _infer(self, inputs):
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        n, k = inputs["images"].shape[0], 10
        wh = inputs["orig_target_sizes"][:, None, :].astype(np.float32)
        boxes = np.concatenate([wh * 0.1, wh * 0.6], -1) * np.ones((1, k, 1), np.float32)
        return {"labels": np.zeros((n, k), np.int64), "boxes": boxes.astype(np.float32),
                "scores": np.linspace(0.9, 0.5, k, dtype=np.float32)[None].repeat(n, 0)}


def video_frame_count(path: Path) -> int | None:
    """Frames the container says it holds; None when it cannot be opened (e.g. "moov atom not found")."""
    capture = cv2.VideoCapture(str(path))
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else None
    capture.release()
    return count


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


def one_line(text: str, prog: str) -> str:
    """The one line `prog` says about the problem (the other lines of stderr are progress: "loaded ...")."""
    lines = [line for line in text.splitlines() if line.startswith(f"{prog}:")]
    assert len(lines) == 1, f"expected one {prog} line, got: {text}"
    return lines[0]


# --- the shared writer ---------------------------------------------------------------------------------------
def test_atomic_write_publishes_complete_files_with_usual_permissions(tmp_path):
    from deimv2_deploy.files import NothingWritten, atomic_write

    target = tmp_path / "sub" / "a.json"
    with atomic_write(target) as tmp:
        assert not tmp.exists() and tmp.parent == target.parent and tmp.name.startswith(".")  # nothing made early
        tmp.write_text("{}")
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "{}" and (target.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert hidden(tmp_path) == []
    with pytest.raises(NothingWritten, match="nothing was written"), atomic_write(tmp_path / "empty.txt"):
        pass
    with pytest.raises(RuntimeError, match="boom"), atomic_write(tmp_path / "b.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert not (tmp_path / "b.txt").exists() and hidden(tmp_path) == []


def test_atomic_write_verifies_before_publishing_and_keeps_partials_on_request(tmp_path):
    from deimv2_deploy.files import AtomicWrite, atomic_write

    def never(tmps):
        raise OSError("does not read back")

    with pytest.raises(OSError, match="does not read back"), atomic_write(tmp_path / "v.bin", verify=never) as tmp:
        tmp.write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []
    out = AtomicWrite(tmp_path / "p.mp4").prepare()
    out.tmp.write_bytes(b"frames")
    assert out.keep_partial() == [partial_path(tmp_path / "p.mp4")] and hidden(tmp_path) == []


def test_a_group_is_published_main_file_last_and_old_main_file_first(tmp_path, monkeypatch):
    """The TensorRT engine and its sidecar (and an IR's .xml/.bin): a reader never finds the main file without
    its companion, nor a new companion beside an old main file."""
    from deimv2_deploy.files import atomic_write

    engine, sidecar = tmp_path / "m.engine", tmp_path / "m.engine.json"
    engine.write_bytes(b"old engine")
    events = []
    real_replace, real_unlink = os.replace, Path.unlink
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(b).name)), real_replace(a, b)))
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: (
        events.append(("unlink", self.name)), real_unlink(self, missing_ok=missing_ok)))
    with atomic_write(engine, sidecar) as (engine_tmp, sidecar_tmp):
        engine_tmp.write_bytes(b"new engine")
        sidecar_tmp.write_text("{}")
    assert events == [("unlink", "m.engine"), ("replace", "m.engine.json"), ("replace", "m.engine")]
    assert engine.read_bytes() == b"new engine"


def test_the_tensorrt_exporter_publishes_engine_and_sidecar_as_one_group():
    source = (REPO / "deimv2_deploy" / "exporters" / "tensorrt_export.py").read_text()
    assert "AtomicWrite(final, sidecar_path(final)" in source and "write_sidecar(final" not in source


# --- full and read-only disks: video ----------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_video_written_to_a_full_disk_fails_and_publishes_nothing(atto_onnx, clip, tmpfs, capsys):
    from deimv2_deploy.cli.infer import main

    disk = tmpfs("300k")
    out, jsonl = disk / "out.mp4", disk / "out.jsonl"
    code = main([str(atto_onnx.path), str(clip), "--output", str(out), "--json", str(jsonl), "--no-progress",
                 "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 1, err
    line = one_line(err, "deimv2-infer")
    assert "no space left on the device" in line and str(disk) in line and ".tmp" not in line, err
    assert not out.exists() and not jsonl.exists() and hidden(disk) == []
    kept = partial_path(out)
    assert not kept.exists() or video_frame_count(kept) is not None  # an unplayable partial is not kept


def test_a_video_whose_encoder_silently_drops_frames_is_not_published(clip, tmp_path, monkeypatch):
    """Simulated full disk for machines that cannot mount one: the encoder's write reports nothing (as OpenCV
    before 4.9 does) and the container is left without its index."""
    import deimv2_deploy.video as video_module

    real = cv2.VideoWriter

    class Dropping:
        def __init__(self, path, *args):
            self.path, self.inner, self.n = path, real(path, *args), 0

        def isOpened(self):
            return self.inner.isOpened()

        def write(self, frame):
            self.n += 1
            if self.n <= 10:
                self.inner.write(frame)
            return None  # no error reported

        def release(self):
            self.inner.release()
            data = Path(self.path).read_bytes()
            Path(self.path).write_bytes(data[:len(data) // 2])  # "moov atom not found"

    monkeypatch.setattr(video_module.cv2, "VideoWriter", Dropping)
    out = tmp_path / "out.mp4"
    with pytest.raises(OSError, match="incomplete"):
        run_video(FakeRuntime(), clip, output=out, json_path=tmp_path / "out.jsonl", progress=False)
    assert not out.exists() and not (tmp_path / "out.jsonl").exists() and hidden(tmp_path) == []
    assert (tmp_path / "out.partial.jsonl").exists()  # the detections are kept; the unplayable video is not


def test_an_encoder_that_reports_a_failed_frame_stops_the_run(clip, tmp_path, monkeypatch):
    import deimv2_deploy.video as video_module

    real = cv2.VideoWriter

    class Failing:
        def __init__(self, *args):
            self.inner, self.n = real(*args), 0

        def isOpened(self):
            return self.inner.isOpened()

        def write(self, frame):
            self.n += 1
            if self.n > 20:
                return False
            self.inner.write(frame)
            return True

        def release(self):
            self.inner.release()

    monkeypatch.setattr(video_module.cv2, "VideoWriter", Failing)
    out = tmp_path / "out.mp4"
    with pytest.raises(OSError, match="could not write frame 20") as info:
        run_video(FakeRuntime(), clip, output=out, progress=False)
    assert not out.exists() and video_frame_count(partial_path(out)) == 20
    assert any("partial output kept" in note for note in info.value.__notes__)


def test_video_writer_that_cannot_open_is_one_line(atto_onnx, clip, tmp_path, monkeypatch, capsys):
    import deimv2_deploy.video as video_module
    from deimv2_deploy.cli.infer import main

    class Closed:
        def __init__(self, *args):
            pass

        def isOpened(self):
            return False

        def release(self):
            pass

    monkeypatch.setattr(video_module.cv2, "VideoWriter", Closed)
    code = main([str(atto_onnx.path), str(clip), "--output", str(tmp_path / "o.mp4"), "--no-progress"])
    assert code == 1 and "OpenCV cannot write mp4v video" in one_line(capsys.readouterr().err, "deimv2-infer")


def test_read_only_output_folder_is_one_line(atto_onnx, clip, example_image_path, tmpfs, capsys):
    from deimv2_deploy.cli.infer import main

    disk = tmpfs("1m", read_only=True)
    for args in ([str(clip), "--output", str(disk / "o.mp4"), "--no-progress"],
                 [str(example_image_path), "--output-dir", str(disk / "images")]):
        code = main([str(atto_onnx.path), *args])
        line = one_line(capsys.readouterr().err, "deimv2-infer")
        assert code == 1 and "read-only file system" in line and ".tmp" not in line, line
    assert list(disk.iterdir()) == []


def test_images_and_json_on_a_full_disk_fail_cleanly(atto_onnx, example_image_path, tmpfs, capsys):
    from deimv2_deploy.cli.infer import main

    disk = tmpfs("16k")
    code = main([str(atto_onnx.path), str(example_image_path), "--output-dir", str(disk), "--json"])
    line = one_line(capsys.readouterr().err, "deimv2-infer")
    assert code == 1 and "no space left on the device" in line and ".tmp" not in line, line
    assert hidden(disk) == [] and all(p.stat().st_size > 0 for p in disk.iterdir())
    from deimv2_deploy.files import write_bytes

    with pytest.raises(OSError) as info:
        write_bytes(disk / "big.bin", b"x" * 200_000)
    assert info.value.errno == errno.ENOSPC and not (disk / "big.bin").exists() and hidden(disk) == []


def test_an_onnx_file_on_a_full_disk_is_not_published(atto_onnx, tmpfs):
    from deimv2_deploy.exporters.onnx_export import publish_onnx

    disk = tmpfs("1m")  # the atto ONNX is about 40 MB
    with pytest.raises(OSError):
        publish_onnx(atto_onnx.path, disk / "deimv2_atto_fp32.onnx", atto_onnx.spec)
    assert list(disk.iterdir()) == []


def test_an_onnx_file_that_does_not_read_back_is_not_published(atto_onnx, tmp_path, monkeypatch):
    import deimv2_deploy.exporters.onnx_export as onnx_export

    def half(src, dst, spec):
        dst.write_bytes(Path(src).read_bytes()[:1000])

    monkeypatch.setattr(onnx_export, "write_onnx_with_spec", half)
    with pytest.raises(OSError, match="did not read back"):
        onnx_export.publish_onnx(atto_onnx.path, tmp_path / "m.onnx", atto_onnx.spec)
    assert list(tmp_path.iterdir()) == []


# --- SIGTERM ----------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_sigterm_keeps_the_partial_video_like_ctrl_c(atto_onnx, tmp_path):
    clip = write_synthetic_video(tmp_path / "long.mp4", frames=400, size=(320, 240))
    out, jsonl = tmp_path / "out" / "o.mp4", tmp_path / "out" / "o.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "deimv2_deploy.cli.infer", str(atto_onnx.path), str(clip),
                             "--output", str(out), "--json", str(jsonl), "--no-progress", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if out.parent.exists() and any(p.stat().st_size > 20_000 for p in out.parent.glob(".o.*.mp4")):
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    line = one_line(err, "deimv2-infer")
    assert "stopped by SIGTERM" in line and "partial output kept" in line, err
    frames = video_frame_count(partial_path(out))
    assert frames and 0 < frames < 400
    assert len(partial_path(jsonl).read_text().splitlines()) == frames
    assert not out.exists() and not jsonl.exists() and hidden(out.parent) == []


def test_sigterm_in_process_raises_terminated_and_keeps_partial_output(clip, tmp_path):
    from deimv2_deploy.signals import Terminated

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this test process has its own SIGTERM handler")

    def stop(call):
        if call == 15:
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "o.mp4"
    with pytest.raises(Terminated):
        run_video(FakeRuntime(stop), clip, output=out, json_path=tmp_path / "o.jsonl", progress=False)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    assert 10 <= video_frame_count(partial_path(out)) < 60 and hidden(tmp_path) == []


def test_a_stop_signal_waits_for_a_publish_to_finish(tmp_path):
    from deimv2_deploy.files import write_text
    from deimv2_deploy.signals import Terminated, shielded, stop_signals_as_interrupt

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this test process has its own SIGTERM handler")
    with pytest.raises(Terminated), stop_signals_as_interrupt():
        with shielded():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            write_text(tmp_path / "done.txt", "finished")  # still runs: the signal waits for the block's end
    assert (tmp_path / "done.txt").read_text() == "finished"


# --- bad inputs, as a new user types them -----------------------------------------------------------------------
@pytest.mark.parametrize("content, says", [
    (b"", "is empty (0 bytes)"),
    (b"this is not a model\n", "ONNX Runtime cannot load"),
    ("truncated", "ONNX Runtime cannot load"),
])
def test_broken_onnx_files_are_one_line(atto_onnx, tmp_path, capsys, content, says, example_image_path):
    from deimv2_deploy.cli.infer import main

    path = tmp_path / "model.onnx"
    data = atto_onnx.path.read_bytes()
    path.write_bytes(data[:len(data) // 3] if content == "truncated" else content)
    code = main([str(path), str(example_image_path), "--output-dir", str(tmp_path / "out")])
    line = one_line(capsys.readouterr().err, "deimv2-infer")
    assert code == 1 and line.startswith("deimv2-infer: error:") and says in line
    assert not (tmp_path / "out").exists()


def test_options_go_anywhere_on_the_line(atto_onnx, example_image_path, tmp_path, capsys):
    from deimv2_deploy.cli.infer import main

    out = tmp_path / "out"
    assert main([str(atto_onnx.path), "--score", "0.5", str(example_image_path), "--output-dir", str(out),
                 "--json"]) == 0
    assert (out / "example.jpg").exists() and (out / "example.json").exists()
    assert main(["--max-detections", "3", str(atto_onnx.path), "--json", str(example_image_path),
                 "--output-dir", str(out / "b")]) == 0  # --json before an image: a flag, not the image's name
    assert (out / "b" / "example.json").exists() and example_image_path.stat().st_size > 1000
    assert len(json.loads((out / "b" / "example.json").read_text())["detections"]) == 3


def test_image_runs_keep_every_output_report_failures_and_honour_json_path(atto_onnx, example_image_path,
                                                                              tmp_path, capsys):
    from deimv2_deploy.cli.infer import main, output_names

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    image = cv2.imread(str(example_image_path))
    for folder in (a, b):
        cv2.imwrite(str(folder / "photo.jpg"), image)
    cv2.imwrite(str(a / "photo.png"), image)
    (b / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    code = main([str(atto_onnx.path), str(a), str(b), "--output-dir", str(out), "--json", str(out / "all.json"),
                 "--score", "0.9"])
    captured = capsys.readouterr()
    assert code == 1  # one input failed: not a success
    assert "skipped" in captured.err and "1 of 4 inputs failed" in captured.err
    assert sorted(p.name for p in out.glob("*.jpg")) == ["a_photo_jpg.jpg", "b_photo_jpg.jpg", "photo_png.jpg"]
    records = json.loads((out / "all.json").read_text())["images"]
    assert sorted(Path(r["image"]).name for r in records) == ["photo.jpg", "photo.jpg", "photo.png"]
    assert not list(out.glob("*photo*.json")) and hidden(out) == []
    assert output_names([Path("x/p.jpg"), Path("x/q.jpg")]) == ["p", "q"]


def test_predict_explains_none_and_empty_images_and_clips_boxes(atto_onnx):
    from deimv2_deploy.runtimes import load_runtime

    runtime = load_runtime(atto_onnx.path, threads=1)
    for bad, says in ((None, "cv2.imread returns None"), ([None], "cv2.imread returns None"),
                      (np.zeros((0, 0, 3), np.uint8), "empty"), (np.zeros((0, 0), np.uint8), "empty"),
                      (np.zeros(5, np.uint8), "shape")):
        with pytest.raises(ValueError, match=says):
            runtime.predict(bad)
    tiny = runtime.predict(np.full((1, 1, 3), 128, np.uint8))
    assert tiny.xyxy.min() >= 0 and tiny.xyxy.max() <= 1
    runtime.clip_boxes = False  # as the COCO evaluation asks: the model's boxes as they are (official protocol)
    assert runtime.predict(np.full((1, 1, 3), 128, np.uint8)).xyxy.min() < 0


def test_unknown_runtime_options_are_errors_naming_the_known_ones(atto_onnx):
    from deimv2_deploy.runtimes import load_runtime

    with pytest.raises(ValueError, match=r"no option 'precison'.*did you mean 'precision'.*threads"):
        load_runtime(atto_onnx.path, backend="openvino", precison="bf16")
    with pytest.raises(ValueError, match=r"onnxruntime backend has no option 'streams'.*spinning"):
        load_runtime(atto_onnx.path, streams=2)


def test_export_mistakes_are_one_line_and_leave_nothing_behind(tmp_path, capsys):
    from deimv2_deploy.cli.export import main

    image = tmp_path / "one.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    store = tmp_path / "store"
    cases = [
        (["atto", "--random-weights", "--format", "openvino", "--precision", "int8", "--calibration", str(image)],
         "must be a folder of images"),
        (["atto", "--random-weights", "--calibration", str(tmp_path)], "--calibration is for INT8"),
        (["atto", "--checkpoint", str(image)], ""),  # not a checkpoint: rejected before anything is written
    ]
    for args, says in cases:
        code = main([*args, "--output-dir", str(store), "--quiet"])
        line = one_line(capsys.readouterr().err, "deimv2-export")
        assert code == 1 and line.startswith("deimv2-export: error:") and says in line, line
        assert not store.exists()  # not even the folder


def test_the_onnx_export_puts_nothing_in_the_store_while_it_works(tmp_path, monkeypatch):
    """A kill during tracing (minutes on the large sizes) must not leave a file behind in the store."""
    import deimv2_deploy.exporters.onnx_export as onnx_export

    store = tmp_path / "store"
    store.mkdir()
    seen = []

    def trace_then_die(graph, spec, path, opset=17, batch=None):
        Path(path).write_bytes(b"half a graph")
        seen.extend(p.name for p in store.iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "trace_to_onnx", trace_then_die)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx("atto", random_weights=True, output_dir=store, quiet=True)
    assert seen == [] and list(store.iterdir()) == []


def test_cli_user_errors_cover_os_errors():
    from deimv2_deploy.cli import USER_ERRORS, user_message

    for error in (NotADirectoryError("x"), OSError(errno.EROFS, "Read-only file system", "/mnt/x"),
                  OSError(errno.ENOSPC, "No space left on device", "/mnt/y")):
        assert isinstance(error, USER_ERRORS)
    assert "read-only file system" in user_message(OSError(errno.EROFS, "Read-only file system", "/m/x"))
    assert "no space left" in user_message(OSError(errno.ENOSPC, "No space left on device", "/m/y"))


# --- onnxsim's console notes ----------------------------------------------------------------------------------
def test_native_console_output_is_captured_and_summarised(capfd):
    import ctypes

    from deimv2_deploy.exporters.onnx_export import summarize_onnxsim_output
    from deimv2_deploy.native import native_output_captured

    with native_output_captured() as lines:
        os.write(1, b'WARNING: failed to run "Concat" op (name is "/a/Concat_2"), skip... no initializer x\n')
        ctypes.CDLL(None).printf(b'WARNING: failed to run "Reshape" op (name is "/b"), skip... no initializer y\n')
        os.write(2, b'WARNING: failed to run "Concat" op (name is "/c"), skip... no initializer z\n')
    assert capfd.readouterr() == ("", "")
    assert len(lines) == 3
    note, said = summarize_onnxsim_output(lines)
    assert note == "3 nodes left unfolded (Concat x2, Reshape x1)" and said is None
    assert summarize_onnxsim_output(["something odd", "and more"])[1] == "onnxsim said: something odd (+1 more lines)"


def test_the_dinov3_export_keeps_onnxsim_notes_in_its_build_info(s_onnx):
    assert s_onnx.spec.build["simplified"].startswith("onnxsim")
    assert "left unfolded" in s_onnx.spec.build["simplified"]


# --- the house: imports flow one way ----------------------------------------------------------------------------
LAYERS = {  # package part -> the parts it may import (besides itself)
    "core": set(),
    "data": {"core"},
    "models": {"core"},
    "runtimes": {"core", "models"},
    "exporters": {"core", "data", "models", "runtimes"},  # data: INT8 calibration on a COCO-format dataset
    "evaluation": {"core", "data", "models", "runtimes"},
    "training": {"core", "data", "models", "runtimes", "evaluation"},  # validates through a runtime
    "top": {"core", "data", "models", "training", "runtimes", "exporters", "evaluation", "top"},
}
_PARTS = {"data": "data", "models": "models", "training": "training", "runtimes": "runtimes", "exporters": "exporters",
          "evaluation": "evaluation", "segmentation_evaluation": "evaluation",  # both measure runtimes on datasets
          "benchmarks": "top", "cli": "top", "capi": "top", "demo": "top", "serving": "top"}


def _layer(module: str) -> str:
    parts = module.split(".")
    return _PARTS.get(parts[1], "core") if len(parts) > 1 else "core"


def test_imports_flow_one_way():
    """checkpoint -> models -> runtimes -> exporters -> benchmarks / CLI, over the shared core (spec, files,
    media, video, cpu...), with data -> training and evaluation beside them: no module imports a part above its
    own, not even inside a function."""
    import ast

    package = REPO / "deimv2_deploy"
    wrong = []
    for path in package.rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        mine = _layer(module)
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            for name in names:
                if name.startswith("deimv2_deploy."):
                    theirs = _layer(name)
                    if theirs != mine and theirs not in LAYERS[mine]:
                        wrong.append(f"{module} ({mine}) imports {name} ({theirs})")
    assert not wrong, "\n".join(wrong)
