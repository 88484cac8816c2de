"""Every SIMD road of the compiled CPU kernels, on one host.

The kernels take AVX-512 loops where the CPU has them, AVX2 + FMA loops where it has only those, and portable
scalar loops elsewhere (ARM, older x86). A host runs its own road in every other test; here the kernels are
rebuilt for each road below it (``HF_FASTINFER_CPU_ARCH``, a separate extension in torch's cache) and the
kernel tests, which compare each op with its PyTorch reference, and the injected tiny families' fp32 tokens
against transformers' run against that build in a fresh process (two builds cannot share one process).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from hf_fastinfer.kernels._cpu_ext import cpu_extension

from _helpers import kernel_cpu_flags

ROOT = Path(__file__).resolve().parents[1]

#: the tests that run against each road: every compiled op against its reference, and the fused decode step of
#: every tiny family against transformers' own tokens
ROAD_TESTS = [
    "tests/test_decoder_layer.py",
    "tests/test_linear.py",
    "tests/test_quant_matmul.py",
    "tests/test_gated_act.py",
    "tests/test_rms_norm.py",
    "tests/test_rotary.py",
    "tests/test_kv_quant.py",
    "tests/test_prefill_attention.py",
    "tests/test_injection.py",
]

#: -march target -> the road its build must report
X86_ROADS = {"x86-64-v3": "avx2", "x86-64": "portable"}
ORDER = ["avx512", "avx2", "portable"]


def _roads_below_native() -> list[tuple[str, str]]:
    ext = cpu_extension()
    if ext is None or platform.machine() not in ("x86_64", "AMD64"):
        return []
    native = ext.simd_road()
    return [(arch, road) for arch, road in X86_ROADS.items() if ORDER.index(road) > ORDER.index(native)]


def _run(args: list[str], arch: str, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_FASTINFER_CPU_ARCH=arch)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_native_build_reports_its_road():
    ext = cpu_extension()
    if ext is None:
        pytest.skip("the compiled kernels could not be built here (no C++ compiler or ninja)")
    road = ext.simd_road()
    assert road in ORDER
    has = kernel_cpu_flags()  # the features of the CPU (or -march target) the build is for
    if platform.machine() == "x86_64" and has:
        expected = "avx512" if {"avx512f", "avx512bw", "avx512vl"} <= has else "avx2" if {"avx2", "fma"} <= has else \
            "portable"
        assert road == expected


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(X86_ROADS))
def test_road_below_native(arch):
    roads = dict(_roads_below_native())
    if arch not in roads:
        pytest.skip(f"-march={arch} is not a road below this host's own (or the host is not x86-64)")
    probe = _run(["-c", "from hf_fastinfer.kernels._cpu_ext import cpu_extension as c; m = c(); "
                        "print('ROAD', m.simd_road() if m is not None else None)"], arch, timeout=900)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert f"ROAD {roads[arch]}" in probe.stdout, probe.stdout[-2000:] + probe.stderr[-3000:]
    run = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow and not gpu", *ROAD_TESTS],
               arch, timeout=1800)
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, tail
    assert " passed" in run.stdout and " failed" not in run.stdout, tail
