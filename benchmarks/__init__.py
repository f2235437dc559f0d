"""Speed and memory benchmarks: ours against the official SAM 2 code, side by side (see README.md)."""
