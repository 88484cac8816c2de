"""kernels/linear.py (float weights) and the many-row CPU path of quantized weights: the compiled GEMV for decode
rows, the fp32-BLAS path for prefill rows, against the reference.

Tolerances: fp32 agrees to summation order (1e-5 relative); bf16 / fp16 results are rounded once from an fp32
accumulation, so they may sit one rounding step (2^-8 / 2^-11 relative) from the reference's rounding.
"""

from __future__ import annotations

import pytest
import torch

from hf_fastinfer.kernels import linear as lin
from hf_fastinfer.kernels import quant_matmul as qm
from hf_fastinfer.kernels._cpu_ext import cpu_extension
from hf_fastinfer.kernels.quant_format import quantize_weight
from hf_fastinfer.kernels.quant_matmul import quant_matmul_cpu, quant_matmul_ref

from _helpers import kernel_cpu_flags

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
needs_compiled = pytest.mark.skipif(cpu_extension() is None, reason="needs the compiled CPU kernels (a C++ compiler)")


def _close(got, expected, dtype):
    assert got.shape == expected.shape and got.dtype == expected.dtype
    err = (got.float() - expected.float()).abs().max() / expected.float().abs().max()
    assert err <= TOLERANCE[dtype], float(err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_reference(dtype, rows, bias):
    gen = torch.Generator().manual_seed(rows)
    n, k = 83, 70  # no multiple of 4 or 16: the tails run
    w = (torch.randn(n, k, generator=gen) * 0.1).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    x = torch.randn(2, rows, k, generator=gen).to(dtype)[:1]  # [1, rows, k]
    _close(lin.linear(x, w, b), lin.linear_ref(x, w, b), dtype)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs PyTorch built with oneDNN")
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_prefill_rows_through_onednn(monkeypatch, bias):
    """The oneDNN product that fp32 prefill rows take on AMD CPUs, run here whatever the CPU: a strided
    [2, 20, k] input (a transposed view), odd sizes, with and without bias."""
    monkeypatch.setattr(lin, "onednn_linear", lambda: True)
    gen = torch.Generator().manual_seed(5)
    n, k = 83, 70
    w = torch.randn(n, k, generator=gen) * 0.1
    b = torch.randn(n, generator=gen) if bias else None
    x = torch.randn(20, 2, k, generator=gen).transpose(0, 1)  # [2, 20, k], not contiguous
    _close(lin.linear_cpu(x, w, b), lin.linear_ref(x, w, b), torch.float32)


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_prefill_linear_float_weights(dtype, onednn, bias):
    """The compiled prefill product of a float weight: its fp32 product by BLAS or (AMD CPUs' road, run here
    whatever the CPU) by oneDNN's linear, a transposed view as input."""
    if onednn and not torch.backends.mkldnn.is_available():
        pytest.skip("needs PyTorch built with oneDNN")
    ext = cpu_extension()
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(130, 96, generator=gen) * 0.1).to(dtype)
    x = torch.randn(96, 33, generator=gen).to(dtype).t()  # [33, 96], not contiguous
    b = torch.randn(130, generator=gen).to(dtype) if bias else None
    _close(ext.prefill_linear(x, w, None, None, b, 0, 0, 96, onednn=onednn), lin.linear_ref(x, w, b), dtype)


@needs_compiled
@pytest.mark.parametrize("bits, group_size, k", [(8, 32, 96), (8, 48, 100), (4, 32, 96), (4, 48, 101), (4, 64, 130)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("onednn", [False, True])
def test_quantized_prefill_rows_match_reference(bits, group_size, k, symmetric, dtype, onednn, monkeypatch):
    """More rows than the GEMV takes: the weight dequantized by the compiled kernel, then BLAS, or (AMD CPUs'
    path, run here whatever the CPU) dequantized whole and multiplied by oneDNN's linear."""
    if onednn and not torch.backends.mkldnn.is_available():
        pytest.skip("needs PyTorch built with oneDNN")
    monkeypatch.setattr(qm, "onednn_linear", lambda: onednn)
    gen = torch.Generator().manual_seed(k)
    q = quantize_weight(torch.randn(70, k, generator=gen), bits, group_size, symmetric, scale_dtype=torch.float16)
    x = torch.randn(3, 7, k, generator=gen).to(dtype)  # 21 rows
    bias = torch.randn(70, generator=gen)
    got = quant_matmul_cpu(x, q.qweight, q.scales, q.zeros, bias, bits, group_size, k)
    _close(got, quant_matmul_ref(x, q.qweight, q.scales, q.zeros, bias, bits, group_size, k), dtype)


@pytest.mark.parametrize("onednn", [False, True])
def test_gram_matches_float64(monkeypatch, onednn):
    """x^T x as calibration sums it: by MKL, or by oneDNN's linear (AMD CPUs' road, run here whatever the CPU);
    symmetric, and close to the float64 product."""
    if onednn and not torch.backends.mkldnn.is_available():
        pytest.skip("needs PyTorch built with oneDNN")
    monkeypatch.setattr(lin, "onednn_linear", lambda: onednn)
    x = torch.randn(300, 70, generator=torch.Generator().manual_seed(3))
    got = lin.gram(x)
    expected = x.double().T @ x.double()
    assert got.dtype == torch.float32 and got.shape == (70, 70)
    assert torch.equal(got, got.T)
    assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < 1e-6


def test_native_half_probe_is_cached_and_boolean():
    first = lin.native_half_gemm(torch.bfloat16)
    assert isinstance(first, bool) and lin.native_half_gemm(torch.bfloat16) is first
    assert lin.native_half_gemm(torch.float32) is False


def test_linear_rejects_bad_input():
    with pytest.raises(ValueError, match="dtype"):
        lin.linear(torch.randn(2, 4), torch.randn(3, 4).double())
    with pytest.raises(ValueError, match="features"):
        lin.linear(torch.randn(2, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="bias"):
        lin.linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4))


@needs_compiled
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("n, k", [(83, 70), (96, 576), (9, 33)])
def test_bf16_weights_through_dot_products_match_the_float_road(rows, n, k):
    """bf16 weights meet bf16 activations through AVX512-BF16 dot products where the CPU has them (one road, the
    other widening to fp32): both are the product accumulated in fp32 and rounded once, whatever the tails."""
    ext = cpu_extension()
    assert ext.bf16_dot_products() == ("avx512_bf16" in kernel_cpu_flags())
    if not ext.bf16_dot_products():
        pytest.skip("needs AVX512-BF16 dot products (the kernels are built for a CPU without them)")
    gen = torch.Generator().manual_seed(n * k + rows)
    w = (torch.randn(n, k, generator=gen) * 0.1).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16()
    x = torch.randn(rows, k, generator=gen).bfloat16()
    try:
        ext.set_bf16_dot_products(False)
        float_road = ext.dense_gemv(x, w, b)
    finally:
        ext.set_bf16_dot_products(True)
    dot_road = ext.dense_gemv(x, w, b)
    exact = x.double() @ w.double().T + b.double()
    # one bf16 rounding of the exact value (2^-9 relative) plus fp32 accumulation in any order
    bound = exact.abs() * 2.0**-8 + (x.double().abs() @ w.double().abs().T) * k * 2.0**-23
    for got in (dot_road, float_road):
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        assert ((got.double() - exact).abs() <= bound).all()
    # the dot products count a denormal input as zero (the float road keeps it): proof of which road ran
    tiny = torch.zeros(1, k, dtype=torch.bfloat16)
    tiny[0, 0] = 1e-39
    ones = torch.ones(4, k, dtype=torch.bfloat16)
    assert (ext.dense_gemv(tiny, ones, None) == 0).all()
    try:
        ext.set_bf16_dot_products(False)
        assert (ext.dense_gemv(tiny, ones, None) != 0).all()
    finally:
        ext.set_bf16_dot_products(True)
