"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed), without register spills,
and the quantized matmul uses tensor cores from 16 rows on (mma on sm_80, wgmma on sm_90)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_fastinfer.kernels import _backend

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "aot_report.py"


@pytest.mark.slow
@pytest.mark.skipif(not _backend.triton_available(), reason="needs Triton (its wheel carries ptxas and cuobjdump)")
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT functions, not interpreted
    proc = subprocess.run([sys.executable, str(REPORT), "--json"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"decode_attention_split", "decode_attention_merge", "quant_matmul", "rms_norm", "gated_act",
                       "rotary", "kv_append"}
    assert {row["target"] for row in rows} == {"sm_80", "sm_90"}
    for row in rows:
        label = f"{row['kernel']} [{row['case']}] on {row['target']}"
        assert row["registers"] and row["registers"] <= 255, label
        assert row["stack"] == 0 and row["local"] == 0, f"{label} spills: {row}"
        if row["expects_tensor_cores"]:
            assert row["mma"] or row["wgmma"], label
            if row["target"] == "sm_90":
                assert row["wgmma"], label
