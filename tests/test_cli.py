"""`python -m hf_fastinfer`: help text and the demo, as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "hf_fastinfer", *args], capture_output=True, text=True, timeout=timeout)


def test_help_documents_every_demo_option():
    proc = _cli("demo", "--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--prompt", "--max-new-tokens", "--dtype", "--device", "--threads", "--repeats", "--no-baseline"):
        assert option in proc.stdout
    top = _cli("--help")
    assert top.returncode == 0 and "demo" in top.stdout and "bench" in top.stdout


def test_bad_arguments_are_refused():
    assert _cli("demo", "--max-new-tokens", "1").returncode == 2
    proc = _cli("demo", "--dtype", "int3")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    assert _cli().returncode == 2


@pytest.mark.slow
def test_demo_streams_an_answer_and_compares_three_paths():
    proc = _cli("demo", "--prompt", "What is the capital of France?", "--max-new-tokens", "16", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Assistant:" in out and "Paris" in out
    rows = {line.split("  ")[0]: line for line in out.splitlines()
            if line.startswith(("transformers fp32", "hf_fastinfer fp32"))}
    assert set(rows) == {"transformers fp32 (sdpa, dynamic cache)", "hf_fastinfer fp32 (kernels, exact)",
                         "hf_fastinfer fp32 int8 weights"}, out
    # the exact path must give transformers' tokens; every hf_fastinfer row has a speed ratio and memory numbers
    assert rows["hf_fastinfer fp32 (kernels, exact)"].rstrip().endswith("yes")
    for label, line in rows.items():
        numbers = [float(x.rstrip("x")) for x in line[len(label):].split() if x.rstrip("x").replace(".", "").isdigit()]
        assert all(n > 0 for n in numbers) and len(numbers) >= (4 if label.startswith("transformers") else 5), line
    int8 = rows["hf_fastinfer fp32 int8 weights"].split()
    exact = rows["hf_fastinfer fp32 (kernels, exact)"].split()
    # int8 weights hold well under half the float weights' bytes (the float embedding table stays)
    assert float(int8[-3]) < 0.6 * float(exact[-3]), (int8, exact)
