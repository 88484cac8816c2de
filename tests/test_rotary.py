"""Rotary embedding of q and k: reference against float64 and transformers' own function, CPU path and Triton
kernel (interpreter here) against the reference, in place / out of place, partial rotary, both layouts,
properties with poisoned outputs, compile, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hf_fastinfer.kernels.rotary import rotary, rotary_cpu, rotary_ref, rotary_tables, rotary_triton

from _helpers import needs_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One rounding of a two-term fp32 sum: half an ulp, plus Triton's interpreter truncating (not rounding) fp32
# to bf16 (Triton 3.9): up to 2 ulps of 2^-8 (bf16) / 2^-11 (fp16); fp32: a few 1e-7 of |x|.
RTOL = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _close(got, expected, dtype):
    bound = RTOL[dtype] * expected.double().abs().clamp_min(1.0) + 1e-6
    diff = (got.double() - expected.double()).abs()
    assert (diff <= bound).all(), diff.max()


def _case(b, hq, hk, s, d, r, dtype, seed, positions_max=64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g).to(dtype)
    k = torch.randn(b, hk, s, d, generator=g).to(dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    cos, sin = rotary_tables(inv, positions_max)
    positions = torch.randint(0, positions_max, (b, s), generator=g)
    return q, k, cos, sin, positions


def _float64_rotation(x, positions, inv, interleaved):
    """Independent formula: each pair as a complex number times exp(i * position * inv_freq)."""
    r = 2 * inv.numel()
    x = x.double()
    if interleaved:
        pairs = torch.complex(x[..., 0:r:2], x[..., 1:r:2])
    else:
        pairs = torch.complex(x[..., : r // 2], x[..., r // 2 : r])
    angle = positions.double()[:, None, :, None] * inv.double()
    rotated = pairs * torch.polar(torch.ones_like(angle), angle)
    y = x.clone()
    if interleaved:
        y[..., 0:r:2], y[..., 1:r:2] = rotated.real, rotated.imag
    else:
        y[..., : r // 2], y[..., r // 2 : r] = rotated.real, rotated.imag
    return y


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("d, r", [(64, 64), (40, 16), (96, 32)])
def test_reference_against_float64(interleaved, d, r):
    q, k, cos, sin, positions = _case(2, 3, 1, 5, d, r, torch.float32, seed=0)
    inv = 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    rq, rk = rotary_ref(q, k, cos, sin, positions, interleaved)
    torch.testing.assert_close(rq.double(), _float64_rotation(q, positions, inv, interleaved), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rk.double(), _float64_rotation(k, positions, inv, interleaved), rtol=1e-5, atol=1e-5)


def test_reference_equals_transformers_apply_rotary_pos_emb():
    q, k, cos, sin, positions = _case(2, 4, 2, 6, 32, 32, torch.float32, seed=1)
    full_cos = torch.cat([cos[positions], cos[positions]], dim=-1)  # transformers' [B, S, D] tables
    full_sin = torch.cat([sin[positions], sin[positions]], dim=-1)
    eq, ek = apply_rotary_pos_emb(q, k, full_cos, full_sin)
    rq, rk = rotary_ref(q, k, cos, sin, positions)
    torch.testing.assert_close(rq, eq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rk, ek, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_cpu_path_matches_reference(dtype, interleaved, inplace):
    q, k, cos, sin, positions = _case(2, 6, 2, 7, 48, 32, dtype, seed=2)
    rq, rk = rotary_ref(q, k, cos, sin, positions, interleaved)
    q_in, k_in = q.clone(), k.clone()
    gq, gk = rotary(q_in, k_in, cos, sin, positions, interleaved=interleaved, inplace=inplace)
    assert (gq is q_in) == inplace and (gk is k_in) == inplace
    _close(gq, rq, dtype)
    _close(gk, rk, dtype)
    assert torch.equal(gq[..., 32:], q[..., 32:]) and torch.equal(gk[..., 32:], k[..., 32:])  # pass-through dims


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_triton_kernel_matches_reference(dtype, interleaved, inplace):
    q, k, cos, sin, positions = _case(3, 5, 1, 4, 40, 24, dtype, seed=3)
    rq, rk = rotary_ref(q, k, cos, sin, positions, interleaved)
    q_in, k_in = q.clone(), k.clone()
    gq, gk = rotary_triton(q_in, k_in, cos, sin, positions, interleaved, inplace)
    _close(gq, rq, dtype)
    _close(gk, rk, dtype)
    assert torch.equal(gq[..., 24:], q[..., 24:])


def test_strided_views_of_a_fused_qkv_projection():
    # q and k as [B, H, S, D] views of one [B, S, (Hq + 2 Hk) * D] projection (non-contiguous over heads)
    b, s, hq, hk, d = 2, 5, 4, 2, 16
    qkv = torch.randn(b, s, (hq + 2 * hk) * d)
    q = qkv[..., : hq * d].view(b, s, hq, d).transpose(1, 2)
    k = qkv[..., hq * d : (hq + hk) * d].view(b, s, hk, d).transpose(1, 2)
    _, _, cos, sin, positions = _case(b, hq, hk, s, d, d, torch.float32, seed=4)
    rq, rk = rotary_ref(q, k, cos, sin, positions)
    rotary(q, k, cos, sin, positions, inplace=True)
    torch.testing.assert_close(qkv[..., : hq * d].view(b, s, hq, d).transpose(1, 2), rq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qkv[..., hq * d : (hq + hk) * d].view(b, s, hk, d).transpose(1, 2), rk, rtol=1e-6, atol=1e-6)


def test_per_token_positions_for_padded_rows_and_a_continuing_cache():
    q, k, cos, sin, _ = _case(2, 2, 1, 3, 16, 16, torch.float32, seed=5)
    positions = torch.tensor([[0, 0, 1], [40, 41, 42]])  # a left-padded row and one continuing at position 40
    gq, _ = rotary(q, k, cos, sin, positions)
    for row in range(2):
        for t in range(3):
            alone, _ = rotary_ref(q[row : row + 1, :, t : t + 1], k[row : row + 1, :, t : t + 1], cos, sin,
                                  positions[row : row + 1, t : t + 1])
            torch.testing.assert_close(gq[row : row + 1, :, t : t + 1], alone, rtol=1e-6, atol=1e-6)


cases = st.tuples(
    st.integers(1, 3), st.integers(1, 6), st.integers(1, 3), st.integers(1, 9),  # batch, q heads, k heads, tokens
    st.integers(1, 40), st.integers(1, 40),  # half the head dim, half the rotated dims (clipped to the head dim)
    st.sampled_from(DTYPES), st.booleans(), st.booleans(), st.integers(0, 2 ** 16),  # interleaved, in place
)


def _property_case(params):
    b, hq, hk, s, half_d, half_r, dtype, interleaved, inplace, seed = params
    d, r = 2 * half_d, 2 * min(half_r, half_d)
    return _case(b, hq, hk, s, d, r, dtype, seed), r, dtype, interleaved, inplace


def _check_property(run, params):
    (q, k, cos, sin, positions), r, dtype, interleaved, inplace = _property_case(params)
    rq, rk = rotary_ref(q, k, cos, sin, positions, interleaved)
    if inplace:
        gq, gk = run(q, k, cos, sin, positions, interleaved, True, None)
    else:
        # outputs poisoned with NaN first: an element the kernel does not write shows up
        out = (torch.full_like(q, float("nan")), torch.full_like(k, float("nan")))
        gq, gk = run(q, k, cos, sin, positions, interleaved, False, out)
    assert not gq.isnan().any() and not gk.isnan().any()
    _close(gq, rq, dtype)
    _close(gk, rk, dtype)


@settings(max_examples=100, deadline=None)
@given(cases)
def test_property_cpu_path(params):
    _check_property(rotary_cpu, params)


@pytest.mark.interpreter
@needs_triton
@settings(max_examples=100, deadline=None)
@given(cases)
def test_property_triton(params):
    _check_property(rotary_triton, params)


@pytest.mark.parametrize("inplace", [False, True])
def test_compiles_fullgraph_on_cpu(inplace):
    q, k, cos, sin, positions = _case(1, 4, 2, 3, 32, 32, torch.float32, seed=6)
    expected = rotary_ref(q, k, cos, sin, positions)
    torch._dynamo.reset()

    def step(q, k):
        q2, k2 = rotary(q, k, cos, sin, positions, inplace=inplace)
        return q2 * 2, k2 * 2

    compiled = torch.compile(step, fullgraph=True)
    gq, gk = compiled(q.clone(), k.clone())
    torch.testing.assert_close(gq, expected[0] * 2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gk, expected[1] * 2, rtol=1e-6, atol=1e-6)


def _bad(change):
    q, k, cos, sin, positions = _case(1, 2, 1, 3, 16, 16, torch.float32, seed=7, positions_max=8)
    args = dict(q=q, k=k, cos=cos, sin=sin, positions=positions)
    args.update(change(args))
    return args


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: {"q": a["q"].to(torch.int32)}, TypeError, "q must be float32"),
        (lambda a: {"k": a["k"].half()}, TypeError, "share a dtype"),
        (lambda a: {"q": a["q"][..., :8]}, ValueError, "must agree"),
        (lambda a: {"q": a["q"].transpose(-1, -2).contiguous().transpose(-1, -2)}, ValueError, "contiguous along the head dim"),
        (lambda a: {"positions": a["positions"] + 8}, ValueError, "positions must lie in"),
        (lambda a: {"positions": a["positions"].float()}, ValueError, "positions must be int32/int64"),
        (lambda a: {"cos": torch.zeros(8, 12), "sin": torch.zeros(8, 12)}, ValueError, "rotated dims"),
        (lambda a: {"sin": a["sin"][:, :4]}, ValueError, "one shape"),
    ],
)
def test_bad_input_is_refused(change, error, message):
    args = _bad(change)
    with pytest.raises(error, match=message):
        rotary(args["q"], args["k"], args["cos"], args["sin"], args["positions"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b, hq, hk, s, d, r, batch_tables", [
    (1, 9, 3, 37, 64, 64, False),  # the default model's heads, one table row per token
    (2, 4, 2, 5, 64, 32, True),  # partial rotary, a table row per sequence and token (padded batches)
    (3, 2, 1, 7, 40, 20, True),  # a rotated half of 10: the last lanes of a vector masked
])
def test_rotate_q_k_equals_transformers_apply_rotary_pos_emb(dtype, b, hq, hk, s, d, r, batch_tables):
    """The prompt path's rotary (one compiled call on CPU): bit for bit transformers' own apply_rotary_pos_emb
    in the model dtype, with q / k as the strided views a fused q/k/v projection gives."""
    from hf_fastinfer.kernels._cpu_ext import cpu_extension
    from hf_fastinfer.kernels.decoder_layer import rotate_q_k

    if cpu_extension() is None:
        pytest.skip("needs the compiled CPU kernels (a C++ compiler); without them rotate_q_k is the torch ops")
    g = torch.Generator().manual_seed(b * 100 + d)
    y = torch.randn(b, s, (hq + hk) * d, generator=g).to(dtype)  # one projection's output, q and k side by side
    q = y[..., : hq * d].reshape(b, s, hq, d).transpose(1, 2)
    k = y[..., hq * d :].reshape(b, s, hk, d).transpose(1, 2)
    angles = torch.rand(b if batch_tables else 1, s, r // 2, generator=g) * 50
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    got_q, got_k = rotate_q_k(q, k, cos, sin, r)
    # transformers rotates the first R dims (partial rotary: the rest passes through)
    eq, ek = apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin)
    expected_q, expected_k = torch.cat([eq, q[..., r:]], -1), torch.cat([ek, k[..., r:]], -1)
    assert got_q.dtype == dtype and got_q.shape == q.shape and got_k.shape == k.shape
    assert torch.equal(got_q, expected_q) and torch.equal(got_k, expected_k)
