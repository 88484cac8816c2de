"""The decode-attention op: Triton kernel (under TRITON_INTERPRET=1 here), CPU path and reference, against
an independent float64 formula; torch.compile; input checks; the real Triton path end to end."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_fastinfer import models
from hf_fastinfer.kernels import _backend
from hf_fastinfer.kernels.decode_attention import (
    decode_attention,
    decode_attention_cpu,
    decode_attention_ref,
    decode_attention_triton,
)
from hf_fastinfer.kernels.kv_quant import quantize_kv

from _helpers import needs_triton


# Per-dtype tolerances against the float64 formula: fp32 accumulates in fp32 (~1e-6 relative over these
# short rows); bf16/fp16 outputs are rounded to 8/11 mantissa bits (2^-8 = 0.0039, 2^-11 = 0.00049) and
# their inputs were already rounded, so the bound is a few output ulps.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}


def _float64_attention(q, k, v, mask, scale, softcap):
    """Independent formula: explicit loops over heads and queries, float64, K/V head = h // groups."""
    batch, hq, lq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    out = torch.zeros(batch, lq, hq, d, dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            kv = h // (hq // hkv)
            for i in range(lq):
                logits = (k[b, kv].double() @ q[b, h, i].double()) * scale
                if softcap is not None:
                    logits = softcap * torch.tanh(logits / softcap)
                allowed = mask[min(b, mask.shape[0] - 1), 0, i, :s] if mask is not None else torch.arange(s) <= s - lq + i
                if not allowed.any():
                    continue  # nothing to attend to: zeros
                logits = logits.masked_fill(~allowed, -math.inf)
                w = torch.softmax(logits, dim=0)
                out[b, i, h] = w @ v[b, kv].double()
    return out


def _case(batch, hq, hkv, lq, s, d, dtype, seed, with_mask=True, quantized=False, batch_mask=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, lq, d, generator=g).to(dtype)
    k = torch.randn(batch, hkv, s, d, generator=g).to(dtype)
    v = torch.randn(batch, hkv, s, d, generator=g).to(dtype)
    mask = None
    if with_mask:
        mask = torch.rand(batch if batch_mask else 1, 1, lq, s + 3, generator=g) > 0.3  # longer than S, as masks may be
        mask[..., s - 1] = True
    ks = vs = None
    if quantized:
        k, ks = quantize_kv(k)
        v, vs = quantize_kv(v)
    return q, k, v, ks, vs, mask


def _dequantized(k, ks):
    return k if ks is None else k.double() * ks.double().unsqueeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 7.0])
def test_reference_against_float64_formula(dtype, softcap):
    q, k, v, _, _, mask = _case(2, 6, 2, 3, 29, 16, dtype, seed=1)
    got = decode_attention_ref(q, k, v, mask=mask, scale=0.25, softcap=softcap)
    expected = _float64_attention(q, k, v, mask, 0.25, softcap)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol)


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v, _, _, mask = _case(2, 4, 2, 2, 9, 8, torch.float32, seed=2)
    mask[0] = False
    for fn in (decode_attention_ref, decode_attention_cpu):
        out = fn(q, k, v, mask=mask)
        assert not out.isnan().any() and torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_cpu_path_matches_reference(quantized, with_mask):
    q, k, v, ks, vs, mask = _case(3, 9, 3, 1, 70, 64, torch.float32, seed=3, with_mask=with_mask, quantized=quantized)
    torch.testing.assert_close(decode_attention_cpu(q, k, v, ks, vs, mask), decode_attention_ref(q, k, v, ks, vs, mask),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize(
    "batch, hq, hkv, lq, s, d, dtype, softcap, quantized, with_mask",
    [
        (1, 9, 3, 1, 37, 64, torch.float32, None, False, True),   # SmolLM2's GQA 9/3, odd length
        (2, 6, 2, 3, 130, 24, torch.bfloat16, None, False, True),  # head_dim not a power of two
        (2, 4, 4, 2, 65, 16, torch.float16, 5.0, False, False),   # MHA, softcap, implicit causal
        (3, 8, 2, 1, 300, 32, torch.float32, None, True, True),   # int8 K/V, several splits
        (1, 2, 1, 4, 7, 8, torch.bfloat16, None, True, False),    # tiny everything
    ],
)
def test_triton_kernel_matches_reference(batch, hq, hkv, lq, s, d, dtype, softcap, quantized, with_mask):
    q, k, v, ks, vs, mask = _case(batch, hq, hkv, lq, s, d, dtype, seed=4, with_mask=with_mask, quantized=quantized)
    got = decode_attention_triton(q, k, v, ks, vs, mask, None, softcap)
    expected = decode_attention_ref(q, k, v, ks, vs, mask, None, softcap)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    f64 = _float64_attention(q, _dequantized(k, ks), _dequantized(v, vs), mask, d ** -0.5, softcap)
    torch.testing.assert_close(got.double(), f64, rtol=rtol, atol=atol)


# Property tests: random shapes, lengths, groupings, masks (some rows fully masked), int8 or float K/V; the
# whole output is compared (the kernels write into torch.empty, so an unwritten element shows up as garbage),
# and no NaN. 70 reference + 70 CPU-path + 70 Triton cases.

shapes = st.tuples(
    st.integers(1, 3),            # batch
    st.integers(1, 4),            # kv heads
    st.integers(1, 4),            # groups
    st.integers(1, 4),            # query tokens
    st.integers(0, 90),           # extra cached positions beyond the queries
    st.sampled_from([8, 16, 24, 64]),
    st.booleans(),                # mask given
    st.booleans(),                # int8
    st.integers(0, 2 ** 16),
)


def _property_case(params):
    batch, hkv, groups, lq, extra, d, with_mask, quantized, seed = params
    return _case(batch, hkv * groups, hkv, lq, lq + extra, d, torch.float32, seed, with_mask=with_mask,
                 quantized=quantized, batch_mask=seed % 2 == 0)


@settings(max_examples=70, deadline=None)
@given(shapes)
def test_property_reference_matches_float64(params):
    q, k, v, ks, vs, mask = _property_case(params)
    got = decode_attention_ref(q, k, v, ks, vs, mask)
    assert not got.isnan().any()
    expected = _float64_attention(q, _dequantized(k, ks), _dequantized(v, vs), mask, q.shape[-1] ** -0.5, None)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=70, deadline=None)
@given(shapes)
def test_property_cpu_path_matches_reference(params):
    q, k, v, ks, vs, mask = _property_case(params)
    got = decode_attention_cpu(q, k, v, ks, vs, mask)
    assert not got.isnan().any()
    torch.testing.assert_close(got, decode_attention_ref(q, k, v, ks, vs, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
@needs_triton
@settings(max_examples=70, deadline=None)
@given(shapes)
def test_property_triton_matches_reference(params):
    q, k, v, ks, vs, mask = _property_case(params)
    got = decode_attention_triton(q, k, v, ks, vs, mask)
    assert not got.isnan().any()
    torch.testing.assert_close(got, decode_attention_ref(q, k, v, ks, vs, mask), rtol=1e-5, atol=1e-5)


def test_compiles_fullgraph_on_cpu():
    q, k, v, ks, vs, mask = _case(2, 6, 3, 1, 40, 16, torch.float32, seed=5, quantized=True)

    def step(q, k, v, ks, vs, mask):
        return decode_attention(q, k, v, ks, vs, mask, scale=0.3) * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, ks, vs, mask), step(q, k, v, ks, vs, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda a: a.update(q=a["q"].to(torch.int32)), TypeError, "q must be float32"),
        (lambda a: a.update(k=a["k"][:, :, :, :-1]), ValueError, "must be \\[B=2, Hkv, S, D=16\\]"),
        (lambda a: a.update(q=torch.randn(2, 5, 1, 16)), ValueError, "multiple of key/value heads"),
        (lambda a: a.update(mask=a["mask"].float()), TypeError, "mask must be bool"),
        (lambda a: a.update(mask=a["mask"][..., :10]), ValueError, "mask must be \\[B\\|1, 1, Lq=1, >=S=40\\]"),
        (lambda a: a.update(k_scale=torch.ones(2, 3, 40)), ValueError, "only for int8"),
        (lambda a: a.update(k=a["k"].to(torch.int8)), TypeError, "int8 k needs int8 v"),
        (lambda a: a.update(q=torch.randn(2, 6, 41, 16)), ValueError, "more query tokens"),
    ],
)
def test_bad_input_is_refused_before_any_kernel(mutate, error, message):
    q, k, v, _, _, mask = _case(2, 6, 3, 1, 40, 16, torch.float32, seed=6)
    args = dict(q=q, k=k, v=v, mask=mask)
    mutate(args)
    with pytest.raises(error, match=message):
        decode_attention(**args)


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize("cache", ["fastinfer", "fastinfer_int8"])
def test_triton_decode_path_end_to_end_on_a_tiny_model(cache):
    # Real Triton kernels (interpreted on CPU here) inside generate(): tokens equal the CPU path's.
    model = models.tiny("qwen3", attn_implementation="fastinfer", num_hidden_layers=1)
    ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation=cache)
    with _backend.force_triton(False):
        expected = model.generate(ids, **kw)
    with _backend.force_triton(True):
        got = model.generate(ids, **kw)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if cache == "fastinfer":
        reference = models.tiny("qwen3", attn_implementation="sdpa", num_hidden_layers=1)
        torch.testing.assert_close(got, reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False),
                                   rtol=0, atol=0)
