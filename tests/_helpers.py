"""Helpers shared by the tests."""

from __future__ import annotations

import functools
import os
import subprocess

import pytest
import torch
from transformers import BertConfig, BertModel

from hf_fastinfer.kernels import _backend

#: Triton kernels run on a GPU, or on CPU tensors under TRITON_INTERPRET=1 (conftest sets it without CUDA)
needs_triton = pytest.mark.skipif(
    not _backend.triton_available() or not (torch.cuda.is_available() or _backend.interpreter_enabled()),
    reason="needs Triton, on a GPU or under TRITON_INTERPRET=1",
)


def cpuinfo(field: str) -> str:
    """The value of ``field`` (``vendor_id``, ``flags``) on /proc/cpuinfo's first line for it; "" where there is
    none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == field), "")
    except OSError:
        return ""


#: the compiler's predefined macros for the CPU features the kernels branch on -> their names in /proc/cpuinfo
_FEATURE_MACROS = {"__AVX512F__": "avx512f", "__AVX512BW__": "avx512bw", "__AVX512VL__": "avx512vl",
                   "__AVX512VNNI__": "avx512_vnni", "__AVX512BF16__": "avx512_bf16", "__AVX2__": "avx2",
                   "__FMA__": "fma", "__F16C__": "f16c"}


@functools.lru_cache(maxsize=None)
def kernel_cpu_flags() -> frozenset[str]:
    """The CPU features the compiled kernels are built for, in /proc/cpuinfo's names: this CPU's for the native
    build, those of ``$HF_FASTINFER_CPU_ARCH``'s -march target otherwise (the compiler's predefined macros)."""
    from hf_fastinfer.kernels._cpu_ext import target_arch

    arch = target_arch()
    if arch == "native":
        return frozenset(cpuinfo("flags").split())
    compiler = os.environ.get("CXX", "c++")  # the compiler torch's extension builder runs
    macros = subprocess.run([compiler, f"-march={arch}", "-dM", "-E", "-x", "c++", "/dev/null"], capture_output=True,
                            text=True, check=True).stdout
    defined = {line.split()[1] for line in macros.splitlines() if line.startswith("#define ")}
    return frozenset(flag for macro, flag in _FEATURE_MACROS.items() if macro in defined)


def saved_tiny_bert(folder):
    """A small random-weight BertModel (vocabulary 300, 2 layers, hidden 64), saved to ``folder``: an encoder
    for the quantization tests. Returns the model, in eval mode."""
    config = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config).eval()
    model.save_pretrained(folder)
    return model
