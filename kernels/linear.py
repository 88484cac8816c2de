"""Float linear layer for decode: y = x @ W.T + b with a float32 / bfloat16 / float16 weight.

x: [..., K] of the weight's dtype; weight: [N, K]; bias: [N] or None. Returns [..., N] in x's dtype,
accumulated in fp32 and rounded once (as ``F.linear`` does).

GPU: ``F.linear`` (cuBLAS already reads the weight at the memory bandwidth for a few rows, so there is no Triton
kernel here). CPU: up to :data:`CPU_GEMV_MAX_ROWS` rows run the compiled GEMV in ``kernels/cpu/dense_gemv.cpp``,
which moves the machine's read bandwidth where eager ``F.linear`` moves about half of it in bf16 (BENCHMARKS.md);
more rows go to BLAS, where the arithmetic dominates: ``F.linear``, or for bf16 / fp16 weights on a CPU without
native half-precision products, the weight converted to fp32 for the call (``kernels/cpu/prefill_linear.cpp``).
On AMD CPUs every fp32 product of many rows runs oneDNN's linear instead of MKL's sgemm (:func:`onednn_linear`).
Kernel injection gives the projections of injected blocks and a float model's output projection this forward.
"""

from __future__ import annotations

import functools

import torch

from . import _backend
from ._cpu_ext import cpu_extension

__all__ = ["CPU_GEMV_MAX_ROWS", "gram", "linear", "linear_cpu", "linear_ref", "onednn_linear"]

#: up to this many activation rows the compiled GEMV runs on CPU; above it, F.linear
CPU_GEMV_MAX_ROWS = 8


def _check_inputs(x, weight, bias) -> None:
    _backend.check_float("x", x)
    if weight.dim() != 2 or weight.dtype != x.dtype:
        raise ValueError(f"weight must be a 2-D tensor of x's dtype ({x.dtype}), got {weight.dtype} {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {weight.shape[1]}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias. See the module docstring."""
    _check_inputs(x, weight, bias)
    if _backend.eager_cpu(x) and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return linear_cpu(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


_NATIVE_HALF: dict[torch.dtype, bool] = {}


def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` (bf16 / fp16) natively (AVX512-BF16 or AMX tiles). Without it oneDNN
    converts inside every F.linear call, and converting the weight to fp32 once per call for BLAS is several
    times faster (BENCHMARKS.md)."""
    if dtype not in _NATIVE_HALF:
        cpu = getattr(torch, "cpu", None)
        probe = {torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
                 torch.float16: ("_is_amx_fp16_supported",)}.get(dtype, ())
        _NATIVE_HALF[dtype] = any(bool(getattr(cpu, name, lambda: False)()) for name in probe)
    return _NATIVE_HALF[dtype]


@functools.cache
def onednn_linear() -> bool:
    """Whether fp32 products of many rows go to oneDNN's linear (``mkldnn::_linear_pointwise`` on the fp32 weight
    as stored or as dequantized, ``kernels/cpu/prefill_linear.cpp``) rather than to MKL's sgemm: on AMD CPUs,
    where MKL takes a slower code path (it tunes for Intel's) while oneDNN picks its kernels by instruction set.
    Measured on an AMD EPYC (AVX-512), the default model's prefill shapes (256 rows): oneDNN 2.0-2.3x MKL,
    results within 8e-7 relative (summation order). bf16 is left alone: ``F.linear`` already runs oneDNN there
    and measured the same as this op (0.4-1.1 ms a projection either way). On Intel CPUs MKL stays, as
    transformers runs it."""
    vendor = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    vendor = line.split(":", 1)[1].strip()
                    break
    except OSError:  # not Linux: F.linear, as before
        return False
    return (vendor == "AuthenticAMD" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x [K, K] of fp32 rows x [T, K] (calibration's Hessian sums). On AMD CPUs (:func:`onednn_linear`) one
    oneDNN linear of x^T against itself, 1.1-2.3x MKL's sgemm on the default model's calibration shapes (2,048 -
    8,192 rows of 576 / 1,536 features; within 1e-6 relative, summation order); elsewhere ``x.T @ x``."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and onednn_linear() and \
            not (torch.is_grad_enabled() and x.requires_grad):
        xt = x.T.contiguous()  # [K, T]: the product's input and its weight
        return torch.ops.mkldnn._linear_pointwise(xt, xt, None, "none", [], "")
    return x.T @ x


def linear_cpu(x, weight, bias=None):
    """CPU path: the compiled GEMV for a few rows of a contiguous weight; for more rows, the compiled prefill
    product when it beats ``F.linear``: bf16 / fp16 weights on a CPU without native half-precision products (the
    weight in fp32, then BLAS) and fp32 weights on an AMD CPU (oneDNN's linear); else F.linear."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows > 0 and weight.is_contiguous():
        ext = cpu_extension()
        if ext is not None:
            if rows <= CPU_GEMV_MAX_ROWS:
                return ext.dense_gemv(x, weight, bias)
            fp32 = weight.dtype == torch.float32
            if (onednn_linear() if fp32 else not native_half_gemm(weight.dtype)):
                return ext.prefill_linear(x, weight, None, None, bias, 0, 0, weight.shape[1], onednn=onednn_linear())
    return torch.nn.functional.linear(x, weight, bias)


def linear_ref(x, weight, bias=None):
    """Pure PyTorch: the product in fp32 (float64 for fp32 inputs' reference), rounded to x's dtype."""
    compute = torch.float64 if x.dtype == torch.float32 else torch.float32
    y = x.to(compute) @ weight.to(compute).T
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)
