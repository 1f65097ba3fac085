"""deimv2-bench: latency/FPS of DEIMv2 sizes on each backend, per device tier (CPU or GPU).

    from deimv2_deploy.benchmarks import BenchConfig, run_benchmark, to_markdown
    result = run_benchmark(BenchConfig(sizes=("atto",), backends=("torch", "onnxruntime"), random_weights=True))
    print(to_markdown(result))

`config` (what to run, rows, results), `artifacts` (the table of row kinds and their artifacts in the model store),
`calls` (what is timed per mode, parity), `timing` (the clocks), `harness` (runs the rows), `stats` (statistics
over every timed call), `sysinfo` (machine fingerprint), `report` (markdown, CSV, JSON, plot), `vit` (the rows of
one EoMT-DINOv3 / DINOv3 model: `BenchConfig(vit="folder_or_artifact", mode="predict", tasks=("semantic",))`).
"""
from deimv2_deploy.benchmarks.harness import (
    SCHEMA_VERSION,
    BenchConfig,
    BenchResult,
    BenchRow,
    Skip,
    run_benchmark,
    time_calls,
)
from deimv2_deploy.benchmarks.report import (
    load_json,
    to_csv,
    to_markdown,
    write_csv,
    write_json,
    write_markdown,
    write_plot,
)
from deimv2_deploy.benchmarks.stats import LatencyStats, percentile, summarize
from deimv2_deploy.benchmarks.sysinfo import system_fingerprint

__all__ = ["BenchConfig", "BenchResult", "BenchRow", "Skip", "run_benchmark", "time_calls",
           "SCHEMA_VERSION", "to_markdown", "to_csv", "write_markdown", "write_csv", "write_json", "write_plot",
           "load_json", "LatencyStats", "summarize", "percentile", "system_fingerprint"]
