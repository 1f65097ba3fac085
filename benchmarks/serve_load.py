"""Load on deimv2-serve (Ray Serve) over loopback, against Runtime.predict in one process.

For each size, the model's in-process baseline first: `Runtime.predict` on the same JPEG's decoded image with all
the machine's threads and the runtime options a replica uses (ONNX Runtime spinning off), what one process does
per request without a server, and `predict` on batches of `--max-batch` copies (the per-image time batching can
reach). Then for each replica count, a fresh
`deimv2-serve` (the console script's code, in its own process, on 127.0.0.1) and, for each concurrency, a
client with that many threads, each on its own keep-alive connection, sending the JPEG until the requests are
used up. Per row: throughput (answers per second of wall time), latency percentiles of every request (no
trimming), failed requests (non-200 answers and connection errors), the batch sizes the server reports, and its
own time split (receive, decode, queue, inference). With `--kill-replica SIZE`, one more run of that size on
the largest replica count kills one replica (SIGKILL) a third of the way through, and reports what failed and
when a new replica answered.

The client runs on the same cores as the server, so a row measures the whole machine; the load average before
and after each row is recorded (other people's work shares these machines).

    PYTHONPATH=. .venv/bin/python benchmarks/serve_load.py --sizes atto s --requests atto=2000 s=64 \\
        --replicas 1 2 --concurrency 1 8 32 --kill-replica atto --json benchmarks/serve_load.json \\
        --markdown benchmarks/serve_load.md

Models: `<models-dir>/deimv2_<size>_random_fp32.onnx` (exported with random weights when missing; needs torch).
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from deimv2_deploy.benchmarks.stats import summarize
from deimv2_deploy.benchmarks.sysinfo import cpu_info, library_versions, load_average
from deimv2_deploy.media import atomic_path, read_image
from deimv2_deploy.runtimes import load_runtime

HOST = "127.0.0.1"  # loopback only
REPO = Path(__file__).resolve().parents[1]


def model_path(models_dir: Path, size: str) -> Path:
    path = models_dir / f"deimv2_{size}_random_fp32.onnx"
    if not path.exists():
        from deimv2_deploy.exporters.onnx_export import export_onnx

        print(f"exporting {size} with random weights to {models_dir} ...", file=sys.stderr, flush=True)
        path = export_onnx(size, random_weights=True, output_dir=models_dir, quiet=True).path
    return path


# --- the in-process baseline --------------------------------------------------------------------------------
def baseline(path: Path, image_path: Path, calls: int, max_batch: int, threads: int) -> dict[str, Any]:
    runtime = load_runtime(path, threads=threads, spinning=False)  # as a replica builds it
    image = read_image(image_path)
    runtime.predict(image)  # warm-up
    single = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        runtime.predict(image, score_threshold=0.4)
        single.append(time.perf_counter_ns() - t0)
    runtime.max_batch = max_batch
    batched = []
    for _ in range(max(3, calls // max_batch)):
        t0 = time.perf_counter_ns()
        runtime.predict([image] * max_batch, score_threshold=0.4)
        batched.append(time.perf_counter_ns() - t0)
    runtime.close()
    stats = summarize(single).to_dict()
    per_image = summarize(batched).p50 / max_batch
    return {"threads": threads, "predict_ms": stats, "predict_per_s": 1000.0 / stats["mean"],
            f"batch{max_batch}_per_image_ms_p50": per_image, "batched_per_s": 1000.0 / per_image}


# --- the server ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Server:
    """deimv2-serve in a child process; `stop` sends SIGTERM and waits."""

    def __init__(self, artifact: Path, replicas: int, max_batch: int, batch_wait_ms: float, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.cmd = [sys.executable, "-m", "deimv2_deploy.cli.serve", str(artifact), "--host", HOST, "--port",
                    str(self.port), "--replicas", str(replicas), "--max-batch", str(max_batch), "--batch-wait-ms",
                    str(batch_wait_ms)]
        self.process: subprocess.Popen | None = None
        self.ready_s = 0.0

    def start(self, timeout: float = 300.0) -> None:
        t0 = time.perf_counter()
        with open(self.log, "ab") as fh:
            self.process = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT,
                                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        while time.perf_counter() - t0 < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"deimv2-serve exited with {self.process.returncode}; see {self.log}")
            try:
                status, _ = request_once(self.port, "GET", "/health")
                if status == 200:
                    self.ready_s = time.perf_counter() - t0
                    return
            except (OSError, ValueError, http.client.HTTPException):  # not up yet (Serve's proxy answers text)
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"deimv2-serve did not answer in {timeout:.0f} s; see {self.log}")

    def replicas(self) -> list[psutil.Process]:
        out = []
        for proc in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if "ServeReplica" in " ".join(proc.cmdline()):
                    out.append(proc)
            except psutil.NoSuchProcess:
                pass
        return out

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def request_once(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if response.status == 200 else {}
    finally:
        conn.close()


# --- the client ---------------------------------------------------------------------------------------------
def run_load(port: int, body: bytes, concurrency: int, requests: int, kill: Server | None = None,
             timeout: float = 300.0) -> dict[str, Any]:
    """`requests` POST /detect from `concurrency` threads, each on a keep-alive connection (reopened after an
    error). With `kill`, one replica of that server is killed once a third of the requests are answered."""
    remaining = [requests]
    lock = threading.Lock()
    records: list[tuple[int, int, float, dict | None]] = []  # (latency ns, status or -1, finished at, answer)
    errors: collections.Counter = collections.Counter()
    killed_at: list[float] = []
    before_kill: set[str] = set()

    def take() -> bool:
        with lock:
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True

    def worker() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        while take():
            t0 = time.perf_counter_ns()
            try:
                conn.request("POST", "/detect", body=body, headers={"Content-Type": "image/jpeg"})
                response = conn.getresponse()
                raw = response.read()
                status, answer = response.status, (json.loads(raw) if response.status == 200 else None)
                if status != 200:
                    errors[f"HTTP {status}: {raw[:120]!r}"] += 1
            except (OSError, http.client.HTTPException) as e:
                status, answer = -1, None
                errors[type(e).__name__] += 1
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
            done = time.perf_counter()
            with lock:
                records.append((time.perf_counter_ns() - t0, status, done, answer))
                if kill is not None and not killed_at and len(records) >= requests // 3:
                    before_kill.update(r[3]["replica"] for r in records if r[3])
                    victims = kill.replicas()
                    if victims:
                        victims[0].kill()  # SIGKILL: no clean-up at all
                        killed_at.append(time.perf_counter())
        conn.close()

    load_before = load_average()
    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in records if r[1] == 200]
    answers = [r[3] for r in ok]
    batch_sizes = collections.Counter(a["batch_size"] for a in answers)
    served = sum(batch_sizes.values())
    row: dict[str, Any] = {
        "concurrency": concurrency, "requests": len(records), "ok": len(ok), "failed": len(records) - len(ok),
        "errors": dict(errors), "wall_s": wall, "throughput_per_s": len(ok) / wall,
        "latency_ms": summarize([r[0] for r in ok]).to_dict() if ok else None,
        "batch_sizes": {str(k): v for k, v in sorted(batch_sizes.items())},
        "mean_batch": sum(k * v for k, v in batch_sizes.items()) / served if served else None,
        "server_ms_mean": {k: sum(a["timing_ms"][k] for a in answers) / len(answers)
                           for k in ("receive", "decode", "queue", "inference", "total")} if answers else None,
        "replicas_seen": len({a["replica"] for a in answers}),
        "load_average_before": load_before, "load_average_after": load_average(),
    }
    if kill is not None:
        row["kill"] = _kill_report(records, killed_at, before_kill)
    return row


def _kill_report(records: list, killed_at: list[float], before: set[str]) -> dict[str, Any]:
    if not killed_at:
        return {"killed": False}
    t_kill = killed_at[0]
    after = [r for r in records if r[2] >= t_kill]
    new = [r for r in after if r[3] and r[3]["replica"] not in before]
    return {"killed": True, "answers_before_kill": len(records) - len(after),
            "failed_after_kill": sum(1 for r in after if r[1] != 200),
            "ok_after_kill": sum(1 for r in after if r[1] == 200),
            "first_answer_from_new_replica_s": (min(r[2] for r in new) - t_kill) if new else None,
            "answers_from_new_replica": len(new)}


# --- report -------------------------------------------------------------------------------------------------
def to_markdown(result: dict[str, Any]) -> str:
    cpu = result["machine"]["cpu"]
    lines = [
        "# deimv2-serve under load (Ray Serve, loopback)", "",
        f"- date: {result['created']}",
        f"- command: `{result['command']}`",
        f"- CPU: {cpu['model']}, {cpu.get('usable_cores', cpu.get('logical_cores'))} usable cores; client, Ray "
        "and the replicas all share them",
        f"- load average before/after the whole run: {result['load_average_start']} / "
        f"{result.get('load_average_end', '(running)')} (1/5/15 min; other jobs share this machine)",
        f"- libraries: {', '.join(f'{k} {v}' for k, v in result['machine']['libraries'].items() if v)}",
        f"- server: `deimv2-serve` batches of up to {result['settings']['max_batch']}, batch wait "
        f"{result['settings']['batch_wait_ms']} ms, replicas share the cores equally (1 replica: 2 threads; "
        "2 replicas: 1 thread each); request: the example JPEG (500x375, 132 kB), default score 0.4",
        "- models: random-weight ONNX (timing only): nearly every query scores above 0.4, so each answer carries "
        "300 detections (about 25 kB of JSON)", "",
        "## In-process baseline (`Runtime.predict`, one process, no server)", "",
        "| size | threads | predict p50 ms | mean ms | p99 ms | predict/s | batched per-image p50 ms | batched img/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, b in result["baseline"].items():
        s = b["predict_ms"]
        per = next(v for k, v in b.items() if k.endswith("_per_image_ms_p50"))
        lines.append(f"| {size} | {b['threads']} | {s['p50']:.1f} | {s['mean']:.1f} | {s['p99']:.1f} | "
                     f"{b['predict_per_s']:.1f} | {per:.1f} | {b['batched_per_s']:.1f} |")
    lines += ["", "## Through the service", "",
              "| size | replicas | concurrency | requests | failed | req/s | p50 ms | p90 ms | p99 ms | max ms | "
              "mean batch | batch sizes (size: count) | server receive / decode / queue / inference ms | "
              "load 1m before→after |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for row in result["rows"]:
        lat = row["latency_ms"] or {}
        srv = row["server_ms_mean"] or {}
        sizes = ", ".join(f"{k}: {v}" for k, v in row["batch_sizes"].items())
        lines.append(
            f"| {row['size']} | {row['replicas']} | {row['concurrency']} | {row['requests']} | {row['failed']} | "
            f"{row['throughput_per_s']:.1f} | {lat.get('p50', 0):.1f} | {lat.get('p90', 0):.1f} | "
            f"{lat.get('p99', 0):.1f} | {lat.get('max', 0):.1f} | {row['mean_batch'] or 0:.2f} | {sizes} | "
            f"{srv.get('receive', 0):.1f} / {srv.get('decode', 0):.1f} / {srv.get('queue', 0):.1f} / "
            f"{srv.get('inference', 0):.1f} | "
            f"{row['load_average_before'][0]}→{row['load_average_after'][0]} |")
    overhead = [f"- {size}: serving overhead per request (1 replica, concurrency 1): service p50 − in-process "
                f"predict p50 = {r['latency_ms']['p50'] - result['baseline'][size]['predict_ms']['p50']:.1f} ms; "
                f"service mean − the server's own inference mean in the same requests = "
                f"{r['latency_ms']['mean'] - r['server_ms_mean']['inference']:.1f} ms"
                for r in result["rows"] for size in [r["size"]]
                if r["replicas"] == 1 and r["concurrency"] == 1 and r["latency_ms"] and size in result["baseline"]]
    if overhead:
        lines += ["", *overhead]
    kills = [r for r in result["rows"] if "kill" in r]
    if kills:
        lines += ["", "## A replica killed under load", ""]
        for r in kills:
            k = r["kill"]
            if not k.get("killed"):
                lines.append(f"- {r['size']}, {r['replicas']} replicas: no replica found to kill")
                continue
            first = k["first_answer_from_new_replica_s"]
            recovered = f"{first:.1f} s" if first is not None else "never (within the run)"
            lines.append(
                f"- {r['size']}, {r['replicas']} replicas, concurrency {r['concurrency']}: one replica SIGKILLed "
                f"after {k['answers_before_kill']} answers; afterwards {k['ok_after_kill']} answered and "
                f"{k['failed_after_kill']} failed ({r['errors'] or 'no errors'}); the replacement replica answered "
                f"its first request {recovered} after "
                f"the kill and {k['answers_from_new_replica']} in all")
    lines.append("")
    return "\n".join(lines)


def write(result: dict[str, Any], json_path: Path | None, md_path: Path | None) -> None:
    if json_path:
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    if md_path:
        with atomic_path(md_path) as tmp:
            tmp.write_text(to_markdown(result))


def parse_requests(items: list[str], sizes: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        size, _, n = item.rpartition("=")
        targets = [size] if size else sizes
        for s in targets:
            out[s] = int(n)
    missing = [s for s in sizes if s not in out]
    if missing:
        raise SystemExit(f"--requests gives no count for {missing} (use e.g. --requests atto=2000 s=64)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["atto"])
    p.add_argument("--requests", nargs="+", default=["2000"], help="per row: N, or SIZE=N per size")
    p.add_argument("--replicas", nargs="+", type=int, default=[1, 2])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--baseline-calls", type=int, default=200, help="predict calls of the in-process baseline (atto)")
    p.add_argument("--kill-replica", metavar="SIZE",
                   help="one more run for this size on the largest replica count, killing a replica mid-way")
    p.add_argument("--image", type=Path, default=REPO.parent / "shared" / "media" / "example.jpg")
    p.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "deimv2_serve_bench_store")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    requests = parse_requests(args.requests, args.sizes)
    body = args.image.read_bytes()
    cpus = len(os.sched_getaffinity(0))
    result: dict[str, Any] = {
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "benchmarks/serve_load.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": {**cpu_info(), "usable_cores": cpus}, "libraries": {
            **library_versions(), "ray": _version("ray")}},
        "load_average_start": load_average(),
        "settings": {"max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms, "image": args.image.name},
        "baseline": {}, "rows": [],
    }
    args.models_dir.mkdir(parents=True, exist_ok=True)
    log = args.models_dir / "serve_load.log"
    for size in args.sizes:
        path = model_path(args.models_dir, size)
        calls = args.baseline_calls if size == "atto" else max(10, args.baseline_calls // 20)
        print(f"[{size}] in-process baseline ({calls} predict calls)", file=sys.stderr, flush=True)
        result["baseline"][size] = baseline(path, args.image, calls, args.max_batch, cpus)
        write(result, args.json, args.markdown)
        runs = [(r, False) for r in args.replicas]
        if args.kill_replica == size:
            runs.append((max(args.replicas), True))
        for replicas, kill in runs:
            server = Server(path, replicas, args.max_batch, args.batch_wait_ms, log)
            try:
                server.start()
                print(f"[{size}] {replicas} replica(s) ready in {server.ready_s:.1f} s", file=sys.stderr, flush=True)
                run_load(server.port, body, 4, 4 * args.max_batch)  # warm-up, not reported
                for concurrency in ([max(args.concurrency)] if kill else args.concurrency):
                    row = run_load(server.port, body, concurrency, requests[size], kill=server if kill else None)
                    row.update(size=size, replicas=replicas, server_ready_s=server.ready_s)
                    result["rows"].append(row)
                    lat = row["latency_ms"] or {}
                    print(f"[{size}] replicas {replicas} concurrency {concurrency}{' (kill)' if kill else ''}: "
                          f"{row['throughput_per_s']:.1f} req/s, p50 {lat.get('p50', 0):.1f} ms, "
                          f"failed {row['failed']}, mean batch {row['mean_batch'] or 0:.2f}", file=sys.stderr,
                          flush=True)
                    write(result, args.json, args.markdown)
            finally:
                code = server.stop()
                result["rows"][-1]["server_exit"] = code if result["rows"] else None
    result["load_average_end"] = load_average()
    write(result, args.json, args.markdown)
    print(to_markdown(result))
    return 0


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
