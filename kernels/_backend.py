"""Which implementation a kernel-library op runs.

Default: the Triton kernel for CUDA tensors when Triton is installed, the CPU path otherwise. Tests force the
Triton kernels onto CPU tensors under ``TRITON_INTERPRET=1`` with :func:`force_triton`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_forced: list[bool] = []


def triton_available() -> bool:
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: activation dtypes every kernel-library op accepts
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, tensor: torch.Tensor) -> None:
    """Raise TypeError unless ``tensor`` is float32, float16 or bfloat16."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")


def eager_cpu(tensor: torch.Tensor) -> bool:
    """Whether an op should call its CPU path directly: eager mode, not headed for Triton (the custom-op
    dispatch costs more than a decode-sized op; under torch.compile the op must be traced instead)."""
    return not use_triton(tensor) and not torch.compiler.is_compiling()


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op called on ``tensor`` should launch its Triton kernel."""
    if not _TRITON_INSTALLED:
        return False
    if _forced:
        return _forced[-1]
    return tensor.is_cuda


@contextlib.contextmanager
def force_triton(enabled: bool = True):
    """Run ops through their Triton kernels (``enabled=True``) or their CPU/reference path, inside the block.

    Forcing Triton on CPU tensors needs ``TRITON_INTERPRET=1`` set before the kernel modules are imported.
    """
    if enabled and not _TRITON_INSTALLED:
        raise RuntimeError("Triton is not installed")
    if enabled and not torch.cuda.is_available() and not interpreter_enabled():
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before hf_fastinfer.kernels is imported")
    _forced.append(enabled)
    try:
        yield
    finally:
        _forced.pop()
