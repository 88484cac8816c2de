"""RMSNorm (+ fused residual add, Gemma's 1+w): reference against float64 and transformers' own modules,
CPU path and Triton kernel (interpreter here) against the reference, property tests, compile, input checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hf_fastinfer.kernels.rms_norm import rms_norm, rms_norm_cpu, rms_norm_ref, rms_norm_triton

from _helpers import needs_triton


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative tolerance of outputs against the reference, per dtype: fp32 differs only in summation order
# (~1e-6); in bf16 / fp16 the Llama convention rounds twice (normalised value, then the product with the
# weight), and an implementation may land one unit in the last place off at each rounding (Triton's
# interpreter rounds fp32 -> bf16 differently from PyTorch): two ulps, 2^-6 / 2^-9 relative.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}


def _close(got, expected, dtype):
    bound = RTOL[dtype] * expected.double().abs().clamp_min(1e-3) + 1e-6
    assert ((got.double() - expected.double()).abs() <= bound).all(), (got.double() - expected.double()).abs().max()


def _inputs(shape, dtype, residual, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = (torch.randn(shape[-1], generator=g) * 0.5 + 1).to(dtype)
    r = torch.randn(*shape, generator=g).to(dtype) if residual else None
    return x, w, r


@pytest.mark.parametrize("gemma", [False, True])
def test_reference_against_float64(gemma):
    x, w, r = _inputs((4, 3, 50), torch.float32, True, seed=0)
    out, res = rms_norm_ref(x, w, r, 1e-5, gemma)
    h = x.double() + r.double()
    n = h / torch.sqrt((h ** 2).mean(-1, keepdim=True) + 1e-5)
    expected = n * ((1 + w.double()) if gemma else w.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.double(), h, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [False, True])
def test_reference_and_cpu_path_equal_transformers_modules(dtype, gemma):
    x, w, _ = _inputs((2, 7, 576), dtype, False, seed=1)
    module = (GemmaRMSNorm(576, eps=1e-6) if gemma else LlamaRMSNorm(576, eps=1e-6)).to(dtype)
    module.weight.data.copy_(w)
    with torch.no_grad():
        expected = module(x)
    torch.testing.assert_close(rms_norm_ref(x, w, None, 1e-6, gemma)[0], expected, rtol=0, atol=0)
    _close(rms_norm_cpu(x, w, None, 1e-6, gemma)[0], expected, dtype)


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_triton_kernel_matches_reference(dtype, gemma, residual):
    x, w, r = _inputs((3, 5, 77), dtype, residual, seed=2)
    out, res = rms_norm_triton(x, w, r, 1e-6, gemma)
    _check_triton(out, res, x, w, r, 1e-6, gemma, dtype)


def _check_triton(out, res, x, w, r, eps, gemma, dtype):
    if r is None:
        assert res is None
        _close(out, rms_norm_ref(x, w, None, eps, gemma)[0], dtype)
        return
    # The new residual within rounding of x + r; the norm checked on the residual the kernel produced, so a
    # one-ulp difference in the add is not amplified through the row's variance.
    _close(res, rms_norm_ref(x, w, r, eps, gemma)[1], dtype)
    _close(out, rms_norm_ref(res, w, None, eps, gemma)[0], dtype)


cases = st.tuples(
    st.integers(1, 5), st.integers(1, 300),       # rows, hidden size (any, not only powers of two)
    st.sampled_from(DTYPES), st.booleans(), st.booleans(),  # dtype, gemma, residual
    st.sampled_from([1e-6, 1e-5]), st.integers(0, 2 ** 16),
)


@settings(max_examples=100, deadline=None)
@given(cases)
def test_property_cpu_path(params):
    rows, hidden, dtype, gemma, residual, eps, seed = params
    x, w, r = _inputs((rows, hidden), dtype, residual, seed)
    out, res = rms_norm(x, w, r, eps, gemma)
    ref_out, ref_res = rms_norm_ref(x, w, r, eps, gemma)
    assert not out.isnan().any()
    _close(out, ref_out, dtype)
    if residual:
        torch.testing.assert_close(res, ref_res, rtol=0, atol=0)


@pytest.mark.interpreter
@needs_triton
@settings(max_examples=100, deadline=None)
@given(cases)
def test_property_triton(params):
    rows, hidden, dtype, gemma, residual, eps, seed = params
    x, w, r = _inputs((rows, hidden), dtype, residual, seed)
    out, res = rms_norm_triton(x, w, r, eps, gemma)  # outputs come from torch.empty: unwritten ones show
    assert not out.isnan().any()
    _check_triton(out, res, x, w, r, eps, gemma, dtype)


def test_compiles_fullgraph_on_cpu():
    x, w, r = _inputs((2, 3, 64), torch.float32, True, seed=3)

    def block(x, r):
        out, res = rms_norm(x, w, r, 1e-6)
        return out * 2, res

    torch._dynamo.reset()
    got, expected = torch.compile(block, fullgraph=True)(x, r), block(x, r)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(x=torch.randn(2, 8).to(torch.int32)), TypeError, "x must be float32"),
        (dict(x=torch.randn(8, 2).T), ValueError, "contiguous along its last dimension"),
        (dict(weight=torch.ones(7)), ValueError, "weight must be a float tensor of shape \\[8\\]"),
        (dict(residual=torch.randn(2, 7)), ValueError, "residual must match x"),
        (dict(residual=torch.randn(2, 8).half()), ValueError, "residual must match x"),
        (dict(eps=0.0), ValueError, "eps must be positive"),
    ],
)
def test_bad_input_is_refused(change, error, message):
    args = {**dict(x=torch.randn(2, 8), weight=torch.ones(8), residual=None, eps=1e-6), **change}
    with pytest.raises(error, match=message):
        rms_norm(**args)
