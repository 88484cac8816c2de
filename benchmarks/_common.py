"""Shared helpers for the benchmark scripts: machine description, bandwidth probe, timing, BENCHMARKS.md."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def machine() -> str:
    from hf_fastinfer.bench import machine_description

    return machine_description("cuda" if torch.cuda.is_available() else "cpu")


def read_bandwidth_gbs(repeats: int = 7, nbytes: int = 1 << 30) -> tuple[float, float, float]:
    """Memory read bandwidth from a large fp32 sum on the CPU: (median, min, max) GB/s."""
    from hf_fastinfer.bench import read_bandwidth_gbs as measure

    return measure("cpu", repeats, nbytes)


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
