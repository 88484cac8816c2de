"""Shared helpers for the benchmark scripts: machine description, bandwidth probe, timing, BENCHMARKS.md."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"

#: the compiled kernels' process-wide run-time switches that benchmarks A/B in one process:
#: name -> (the extension's getter, its setter, what it is)
KERNEL_SWITCHES = {
    "nta": ("quant_prefetch_nta", "set_quant_prefetch_nta", "non-temporal prefetch"),
    "twolevel": ("quant_prefetch_two_level", "set_quant_prefetch_two_level", "two-level prefetch"),
    "i8a16": ("int8_int16_activations", "set_int8_int16_activations", "int8 x int16 activations"),
    "i4a16": ("int4_int16_activations", "set_int4_int16_activations", "int4 x int16 activations"),
    "pairs": ("int8_group_pairs", "set_int8_group_pairs", "int8 group pairs"),
    "i4bytes": ("int4_byte_products", "set_int4_byte_products", "int4 byte products"),
    "bf16dot": ("bf16_dot_products", "set_bf16_dot_products", "bf16 dot products"),
}


def kernel_switches(ext) -> dict[str, bool]:
    """Every kernel switch's current setting (the library's own, read before a benchmark changes any)."""
    return {name: getattr(ext, getter)() for name, (getter, _, _) in KERNEL_SWITCHES.items()}


def set_kernel_switch(ext, name: str, on: bool) -> None:
    getattr(ext, KERNEL_SWITCHES[name][1])(on)


def set_kernel_switches(ext, settings: dict[str, bool]) -> None:
    """Put back the settings :func:`kernel_switches` read."""
    for name, on in settings.items():
        set_kernel_switch(ext, name, on)


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
