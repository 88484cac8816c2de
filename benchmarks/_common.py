"""Shared helpers for the benchmark scripts: machine description, bandwidth probe, timing, BENCHMARKS.md."""

from __future__ import annotations

import platform
import re
import statistics
import time
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def machine() -> str:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({cpu}), {torch.get_num_threads()} threads"
    return f"{device}; torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"


def read_bandwidth_gbs(repeats: int = 7, nbytes: int = 1 << 30) -> tuple[float, float, float]:
    """Memory read bandwidth from a large fp32 sum: (median, min, max) GB/s."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        rates.append(nbytes / (time.perf_counter() - start) / 1e9)
    del x
    return statistics.median(rates), min(rates), max(rates)


def summarize(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)
