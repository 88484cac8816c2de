"""Gated activation act(gate) * up on a fused gate/up tensor: reference against float64 and transformers' own
MLP math, CPU path and Triton kernel (interpreter here) against the reference, properties, compile, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.activations import ACT2FN

from hf_fastinfer.kernels.gated_act import gated_act, gated_act_cpu, gated_act_ref, gated_act_triton

from _helpers import needs_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Two roundings in bf16 / fp16 (activation, then product): up to two ulps, 2^-6 / 2^-9 relative; fp32 only
# differs in how sigmoid / tanh are evaluated (~1e-6).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}
TRANSFORMERS_NAME = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}


def _close(got, expected, dtype):
    # absolute slack: for very negative gates 1 + tanh(z) cancels in fp32 (error ~1e-7 * |gate| * |up|)
    bound = RTOL[dtype] * expected.double().abs() + 1e-5
    assert ((got.double() - expected.double()).abs() <= bound).all(), (got.double() - expected.double()).abs().max()


def _input(shape, dtype, seed):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_reference_against_float64(activation):
    x = _input((3, 2, 40), torch.float32, 0)
    g, u = x.double()[..., :20], x.double()[..., 20:]
    if activation == "silu":
        a = g / (1 + torch.exp(-g))
    else:
        a = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
    torch.testing.assert_close(gated_act_ref(x, activation).double(), a * u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_reference_equals_and_cpu_path_matches_transformers_mlp_math(dtype, activation):
    x = _input((2, 5, 3072), dtype, 1)  # SmolLM2's 2 x 1536
    x[0, 0, :6] = torch.tensor([-120.0, -60.0, -9.0, 0.0, 9.0, 120.0]).to(dtype)  # saturated tails
    expected = ACT2FN[TRANSFORMERS_NAME[activation]](x[..., :1536]) * x[..., 1536:]
    torch.testing.assert_close(gated_act_ref(x, activation), expected, rtol=0, atol=0)
    # the compiled CPU kernel evaluates exp itself (about 1 ulp in fp32): equal up to the dtype's rounding
    _close(gated_act_cpu(x, activation), expected, dtype)
    # a strided input (unit stride along the last dim) takes the ATen path: transformers' math exactly
    wide = torch.cat([x, x], -1)[..., :3072]  # rows 6144 apart
    torch.testing.assert_close(gated_act_cpu(wide, activation), ACT2FN[TRANSFORMERS_NAME[activation]](
        wide[..., :1536]) * wide[..., 1536:], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_path_propagates_nan_and_inf(dtype):
    x = torch.zeros(1, 8, dtype=dtype)
    x[0, 0], x[0, 1], x[0, 2] = float("nan"), float("inf"), float("-inf")
    x[0, 4:] = 1.0
    for activation in ("silu", "gelu_tanh"):
        got = gated_act_cpu(x, activation)
        expected = gated_act_ref(x, activation)
        assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.isinf(), expected.isinf()), (got, expected)


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_triton_kernel_matches_reference(dtype, activation):
    x = _input((3, 7, 2 * 1500), dtype, 2)  # I not a power of two, several blocks per row
    _close(gated_act_triton(x, activation), gated_act_ref(x, activation), dtype)


cases = st.tuples(st.integers(1, 6), st.integers(1, 700), st.sampled_from(DTYPES), st.sampled_from(["silu", "gelu_tanh"]),
                  st.integers(0, 2 ** 16))


@settings(max_examples=100, deadline=None)
@given(cases)
def test_property_cpu_path(params):
    rows, inner, dtype, activation, seed = params
    x = _input((rows, 2 * inner), dtype, seed)
    got = gated_act(x, activation)
    assert got.shape == (rows, inner) and not got.isnan().any()
    _close(got, gated_act_ref(x, activation), dtype)


@pytest.mark.interpreter
@needs_triton
@settings(max_examples=100, deadline=None)
@given(cases)
def test_property_triton(params):
    rows, inner, dtype, activation, seed = params
    x = _input((rows, 2 * inner), dtype, seed)
    got = gated_act_triton(x, activation)  # written into torch.empty: unwritten elements would show
    assert not got.isnan().any()
    _close(got, gated_act_ref(x, activation), dtype)


def test_compiles_fullgraph_on_cpu():
    x = _input((2, 3, 64), torch.float32, 3)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: gated_act(t, "gelu_tanh") + 1, fullgraph=True)
    torch.testing.assert_close(compiled(x), gated_act(x, "gelu_tanh") + 1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "x, activation, error, message",
    [
        (torch.randn(2, 8), "relu", ValueError, "activation must be one of"),
        (torch.randn(2, 7), "silu", ValueError, "must be 2 \\* I > 0"),
        (torch.randn(2, 8).to(torch.int32), "silu", TypeError, "gate_up must be float32"),
        (torch.randn(8, 2).T, "silu", ValueError, "contiguous along its last dimension"),
    ],
)
def test_bad_input_is_refused(x, activation, error, message):
    with pytest.raises(error, match=message):
        gated_act(x, activation)
