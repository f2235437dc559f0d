"""Runs every benchmark and gathers their tables into one report, benchmarks/results/REPORT.md.

    python benchmarks/run_all.py            # full runs for this machine (CPU: ~45 min on 2 cores)
    python benchmarks/run_all.py --quick    # CI: a few steps each; numbers are not meaningful

Each benchmark is its own script with its own options (see benchmarks/README.md); this only
runs them in turn, keeps going when one fails, and concatenates the markdown they wrote.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

# (script, its markdown result, extra arguments in quick mode)
BENCHMARKS = [
    ("bench_train_step.py", "train_step.md", ["--quick"]),
    ("bench_inference.py", "inference.md", ["--quick"]),
    ("bench_components.py", "components.md", ["--quick"]),
    ("bench_data.py", "bench_data.md", ["--clips", "2", "--workers", "0", "--rounds", "1"]),
    ("bench_memory.py", "memory.md", ["--quick"]),
    ("bench_host_ops.py", "host_ops.md", ["--quick"]),
    ("bench_ddp.py", "ddp.md", ["--quick"]),
]
THREADED = {"bench_train_step.py", "bench_inference.py", "bench_components.py"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="passed to the training, inference and component benchmarks")
    args = parser.parse_args(argv)
    failed, sections = [], []
    for script, result, quick_args in BENCHMARKS:
        cmd = [sys.executable, str(BENCH_DIR / script), *(quick_args if args.quick else [])]
        if args.threads is not None and script in THREADED:
            cmd += ["--threads", str(args.threads)]
        path = RESULTS_DIR / result
        path.unlink(missing_ok=True)  # never report a previous run's table as this one's
        print("$ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd, check=False).returncode != 0:
            failed.append(script)
        if path.is_file():
            sections.append(path.read_text().replace("\n# ", "\n## ").replace("# ", "## ", 1))
    report = RESULTS_DIR / "REPORT.md"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    report.write_text("# Benchmarks: ours vs the official SAM 2 code\n\n" + "\n\n".join(sections))
    print(f"wrote {report}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
