"""The prefill-attention kernel (CPU, AVX-512 and AVX2 builds) against the exact reference and torch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_fastinfer.attention import attention_ref, fastinfer_attention_forward
from hf_fastinfer.kernels import prefill_attention as pa

needs_kernel = pytest.mark.skipif(not pa.prefill_attention_available(),
                                  reason="needs the compiled kernels' AVX-512 or AVX2 build (the kernel exists only there)")

#: the largest |error| against the fp32 reference a dtype's output rounding allows (one ulp of values about 1-2)
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _qkv(batch, heads, kv_heads, q_len, kv_len, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=gen).to(dtype)
    return q, k, v


def _sdpa(q, k, v, mask, scale, causal):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=True).transpose(1, 2)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch, heads, kv_heads, q_len, dim", [(1, 9, 3, 256, 64), (2, 4, 2, 37, 32),
                                                                (1, 8, 8, 100, 128), (1, 4, 1, 19, 80),
                                                                (3, 2, 1, 2, 16)])
def test_causal_prompt_matches_the_reference_and_sdpa(dtype, batch, heads, kv_heads, q_len, dim):
    q, k, v = _qkv(batch, heads, kv_heads, q_len, q_len, dim, dtype, seed=q_len * dim)
    scale = dim ** -0.5
    out = pa.prefill_attention(q, k, v, None, scale, causal=True)
    assert out is not None and out.dtype == dtype and out.shape == (batch, q_len, heads, dim) and out.is_contiguous()
    causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()[None, None]
    ref = attention_ref(q, k, v, causal, scale).float()
    assert (out.float() - ref).abs().max() <= TOLERANCE[dtype]
    assert (out.float() - _sdpa(q, k, v, None, scale, True).float()).abs().max() <= 2 * TOLERANCE[dtype]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bool_mask_padding_and_sliding_window(dtype):
    batch, heads, kv_heads, q_len, dim = 3, 6, 2, 40, 64
    q, k, v = _qkv(batch, heads, kv_heads, q_len, q_len, dim, dtype, seed=7)
    pos = torch.arange(q_len)
    mask = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < 9)  # causal, a window of 9 keys
    mask = mask[None, None].repeat(batch, 1, 1, 1)
    mask[0, :, :, :5] = False  # left padding: rows 0-4 of sequence 0 see no key
    mask[2, :, :, :17] = False
    # the mask may be longer than the keys (a static-shape buffer's mask, sliced by the kernel)
    wide = torch.cat([mask, torch.ones(batch, 1, q_len, 8, dtype=torch.bool)], dim=-1)
    out = pa.prefill_attention(q, k, v, wide, 0.125, causal=True)
    ref = attention_ref(q, k, v, mask, 0.125).float()
    seen = mask.any(-1)[:, 0]  # [B, Lq]: rows that see at least one key
    assert (out.float() - ref).abs()[seen].max() <= TOLERANCE[dtype]
    assert torch.equal(out[~seen], torch.zeros_like(out[~seen]))  # rows that see nothing: zeros, never NaN
    sdpa = _sdpa(q, k, v, mask, 0.125, False).float()
    assert (out.float() - sdpa).abs()[seen].max() <= 2 * TOLERANCE[dtype]
    # one mask for the whole batch
    shared = mask[1:2]
    out = pa.prefill_attention(q, k, v, shared, 0.125, causal=False)
    assert (out.float() - attention_ref(q, k, v, shared, 0.125).float()).abs().max() <= TOLERANCE[dtype]


@needs_kernel
def test_full_attention_strided_inputs_and_more_keys_than_queries():
    # q as the model hands it over: a transposed view of [B, L, H, D]
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 21, 4, 32, generator=gen).transpose(1, 2)
    k = torch.randn(2, 2, 50, 32, generator=gen)
    v = torch.randn(2, 2, 50, 32, generator=gen)
    out = pa.prefill_attention(q, k, v, None, 0.2, causal=False)
    assert (out - attention_ref(q, k, v, None, 0.2)).abs().max() <= TOLERANCE[torch.float32]
    # causal with more keys than queries: SDPA's is_causal aligns them top-left (query i sees keys 0..i)
    out = pa.prefill_attention(q, k, v, None, 0.2, causal=True)
    assert (out - _sdpa(q, k, v, None, 0.2, True)).abs().max() <= 2 * TOLERANCE[torch.float32]


@needs_kernel
def test_nan_inputs_give_nan_rows():
    q, k, v = _qkv(1, 2, 1, 20, 20, 16, torch.float32, seed=5)
    k[0, 0, 3, 0] = float("nan")
    out = pa.prefill_attention(q, k, v, None, 0.25, causal=True)
    assert out[0, :3].isfinite().all()  # rows 0-2 do not see key 3
    assert out[0, 3:].isnan().all()


def test_calls_it_does_not_take_return_none():
    q, k, v = _qkv(1, 2, 1, 8, 8, 24, torch.float32, seed=1)
    assert pa.prefill_attention(q, k, v, None, 0.2, causal=True) is None  # head dim not a multiple of 16
    q, k, v = _qkv(1, 2, 1, 8, 8, 32, torch.float32, seed=1)
    assert pa.prefill_attention(q, k, v, torch.zeros(1, 1, 8, 8), 0.2, causal=False) is None  # additive mask
    assert pa.prefill_attention(q.double(), k.double(), v.double(), None, 0.2, causal=True) is None
    assert pa.prefill_attention(q.requires_grad_(), k, v, None, 0.2, causal=True) is None  # autograd: SDPA


@needs_kernel
def test_fastinfer_attention_takes_the_kernel_for_prompts(monkeypatch):
    """The "fastinfer" attention function routes a CPU prompt to the kernel, with SDPA's rule for is_causal."""
    calls = []
    real = pa.prefill_attention

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    import hf_fastinfer.attention as attention

    monkeypatch.setattr(attention, "prefill_attention", spy)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 3
    q, k, v = _qkv(1, 6, 2, 30, 30, 64, torch.float32, seed=2)
    out, _ = fastinfer_attention_forward(module, q, k, v, None, scaling=0.125)
    assert calls == [True]
    assert (out - _sdpa(q, k, v, None, 0.125, True)).abs().max() <= 2 * TOLERANCE[torch.float32]
    module.is_causal = False  # an encoder's attention: every key
    out, _ = fastinfer_attention_forward(module, q, k, v, None, scaling=0.125)
    assert calls == [True, False]
    assert (out - _sdpa(q, k, v, None, 0.125, False)).abs().max() <= 2 * TOLERANCE[torch.float32]
