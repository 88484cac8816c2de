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
    assert top.returncode == 0 and "demo" in top.stdout


def test_bad_arguments_are_refused():
    assert _cli("demo", "--max-new-tokens", "1").returncode == 2
    proc = _cli("demo", "--dtype", "int3")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    assert _cli().returncode == 2


@pytest.mark.slow
def test_demo_streams_an_answer_and_times_both_paths():
    proc = _cli("demo", "--prompt", "What is the capital of France?", "--max-new-tokens", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Assistant:" in out and "Paris" in out
    assert "transformers  (attn sdpa, dynamic cache)" in out
    assert "ratio (hf_fastinfer / transformers)" in out
    assert "same tokens as transformers: yes" in out
