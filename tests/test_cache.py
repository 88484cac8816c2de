"""hf_fastinfer's KV caches: layer mechanics, int8 quantization, growth, every generate() mode, errors."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

import hf_fastinfer
from hf_fastinfer import build_cache, models
from hf_fastinfer.kernels.kv_quant import dequantize_kv, quantize_kv
from hf_fastinfer.cache import (
    SLIDING_ROLLBACK_MARGIN,
    FastInferCache,
    FastInferInt8Cache,
    FastInferLayer,
)


def _kv(batch, heads, length, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, length, dim, generator=g), torch.randn(batch, heads, length, dim, generator=g)


def _prompts(batch=3, length=12, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):  # left padding of 0, 3, 6, ... tokens
        ids[row, : 3 * row] = 0
        mask[row, : 3 * row] = 0
    return ids, mask


# -- layer mechanics against transformers' DynamicLayer --------------------------------------------------

def test_layer_matches_dynamic_layer_through_updates_crops_and_reorders():
    ours, theirs = FastInferLayer(max_cache_len=8), DynamicLayer()
    for step, length in enumerate([5, 1, 1, 7, 1, 30, 2]):  # crosses the capacity several times
        k, v = _kv(3, 2, length, 4, seed=step)
        a, b = ours.update(k, v), theirs.update(k, v)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
        assert ours.get_seq_length() == theirs.get_seq_length()
        assert ours.get_mask_sizes(1) == theirs.get_mask_sizes(1)
        if step == 3:
            ours.crop(-4), theirs.crop(-4)
        if step == 4:
            beam_idx = torch.tensor([2, 0, 0])
            ours.reorder_cache(beam_idx), theirs.reorder_cache(beam_idx)
    assert ours.capacity >= ours.length == theirs.get_seq_length()
    ours.batch_repeat_interleave(2), theirs.batch_repeat_interleave(2)
    ours.batch_select_indices(torch.tensor([5, 1])), theirs.batch_select_indices(torch.tensor([5, 1]))
    k, v = _kv(2, 2, 1, 4, seed=99)
    torch.testing.assert_close(ours.update(k, v)[0], theirs.update(k, v)[0], rtol=0, atol=0)


def test_growth_is_amortised():
    layer = FastInferLayer(max_cache_len=64)
    capacities = set()
    for step in range(1000):
        layer.update(*_kv(1, 1, 1, 8, seed=step))
        capacities.add(layer.capacity)
    assert layer.length == 1000
    assert sorted(capacities) == [64, 128, 256, 512, 1024]  # doubling: log(n) reallocations


def test_sliding_layer_drops_old_positions_but_keeps_a_rollback_margin():
    window = 8
    layer = FastInferLayer(max_cache_len=16, sliding_window=window)
    for step in range(600):
        layer.update(*_kv(1, 1, 1, 4, seed=step))
    assert layer.get_seq_length() == 600
    assert window - 1 + SLIDING_ROLLBACK_MARGIN <= layer.length <= layer.capacity < 600
    kv_length, kv_offset = layer.get_mask_sizes(1)
    assert kv_offset + kv_length == 601  # absolute positions line up with the mask
    layer.crop(-5)
    assert layer.get_seq_length() == 595
    with pytest.raises(RuntimeError, match="keeps only the last"):
        layer.crop(-(layer.length + 1))


def test_static_shapes_return_whole_buffers_and_matching_mask_sizes():
    layer = FastInferLayer(max_cache_len=64, static_shapes=True)
    for step, length in enumerate([10, 1, 60, 1]):
        expected_len, _ = layer.get_mask_sizes(length)
        keys, _ = layer.update(*_kv(2, 2, length, 4, seed=step))
        assert keys.shape[2] == layer.capacity == expected_len


# -- int8 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_kv_against_float64_formula(dtype):
    x = (torch.randn(2, 3, 17, 24, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    q, scale = quantize_kv(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (2, 3, 17)
    x64 = x.double()
    scale64 = scale.double()  # the stored (fp16-rounded) scale is the one quantized against
    expected = torch.round(x64 / scale64.unsqueeze(-1)).clamp(-127, 127)
    assert torch.equal(q.double(), expected)
    # absmax / 127 before fp16 rounding (relative error 2^-11)
    torch.testing.assert_close(scale64, x64.abs().amax(-1) / 127, rtol=2 ** -10, atol=0)
    error = (dequantize_kv(q, scale, torch.float64) - x64).abs()
    assert (error <= scale64.unsqueeze(-1) * 0.5 * (1 + 1e-3) + x64.abs() * 2 ** -10).all()


def test_all_zero_rows_quantize_without_nan():
    q, scale = quantize_kv(torch.zeros(1, 1, 3, 8))
    assert torch.equal(q, torch.zeros_like(q)) and (scale > 0).all()
    assert not dequantize_kv(q, scale, torch.float32).isnan().any()


def test_int8_layer_stores_int8_and_reads_back_within_quantization_error():
    layer = FastInferLayer(quantized=True)
    k, v = _kv(2, 3, 20, 16, seed=0)
    keys, values = layer.update(k, v)
    assert layer.keys.dtype == torch.int8 and layer.key_scales.dtype == torch.float16
    assert keys.dtype == torch.float32  # dequantized: this layer was not built for hf_fastinfer attention
    assert (keys - k).abs().max() <= k.abs().max() / 127
    assert layer.stored_bytes() == 2 * (2 * 3 * 20 * 16 + 2 * 3 * 20 * 2)


def test_int8_cache_bytes_against_fp32_and_bf16():
    config = models.tiny_config("llama", num_key_value_heads=2, head_dim=64, hidden_size=128)
    sizes = {}
    for name, dtype in (("fastinfer", torch.float32), ("fastinfer", torch.bfloat16), ("fastinfer_int8", torch.float32)):
        cache = build_cache(name, config=config, max_cache_len=256)
        for layer_idx in range(config.num_hidden_layers):
            cache.update(*[t.to(dtype) for t in _kv(2, 2, 200, 64, seed=layer_idx)], layer_idx)
        sizes[(name, dtype)] = cache.stored_bytes()
    int8 = sizes[("fastinfer_int8", torch.float32)]
    # head_dim 64: (1 + 2/64) bytes per element against 4 and 2
    assert int8 / sizes[("fastinfer", torch.float32)] <= 0.27
    assert int8 / sizes[("fastinfer", torch.bfloat16)] <= 0.53


# -- generate() ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "qwen2_moe"])
def test_beam_search_sampling_and_static_shapes_match_transformers(family):
    ids, mask = _prompts()
    reference = models.tiny(family, attn_implementation="sdpa")
    fast = models.tiny(family, attn_implementation="fastinfer")
    kw = dict(attention_mask=mask, max_new_tokens=20)
    expected = reference.generate(ids, num_beams=4, do_sample=False, **kw)
    torch.testing.assert_close(fast.generate(ids, num_beams=4, do_sample=False, cache_implementation="fastinfer", **kw),
                               expected, rtol=0, atol=0)
    torch.manual_seed(7)
    expected = reference.generate(ids, do_sample=True, top_k=20, temperature=0.8, **kw)
    torch.manual_seed(7)
    got = fast.generate(ids, do_sample=True, top_k=20, temperature=0.8, cache_implementation="fastinfer", **kw)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    expected = reference.generate(ids, do_sample=False, **kw)
    static = build_cache("fastinfer", config=fast.config, max_cache_len=16, static_shapes=True)
    torch.testing.assert_close(fast.generate(ids, do_sample=False, past_key_values=static, **kw), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_assisted_and_prompt_lookup_decoding_match_transformers(family):
    ids, mask = _prompts(batch=1, length=24)
    reference = models.tiny(family, attn_implementation="sdpa")
    fast = models.tiny(family, attn_implementation="fastinfer")
    assistant_ref = models.tiny(family, seed=1, num_hidden_layers=1, attn_implementation="sdpa")
    assistant = models.tiny(family, seed=1, num_hidden_layers=1, attn_implementation="fastinfer")
    assistant.generation_config.cache_implementation = "fastinfer"
    kw = dict(attention_mask=mask, max_new_tokens=120, do_sample=False)
    greedy = reference.generate(ids, **kw)
    expected = reference.generate(ids, assistant_model=assistant_ref, **kw)
    torch.testing.assert_close(expected, greedy, rtol=0, atol=0)  # lossless speculative decoding
    got = fast.generate(ids, assistant_model=assistant, cache_implementation="fastinfer", **kw)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    expected = reference.generate(ids, prompt_lookup_num_tokens=3, **kw)
    got = fast.generate(ids, prompt_lookup_num_tokens=3, cache_implementation="fastinfer", **kw)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_int8_kernel_path_equals_dequantized_path_in_every_mode(family):
    # hf_fastinfer attention reads the int8 cache undequantized; SDPA attention reads it dequantized.
    ids, mask = _prompts()
    sdpa = models.tiny(family, attn_implementation="sdpa")
    fast = models.tiny(family, attn_implementation="fastinfer")
    for mode in (dict(do_sample=False), dict(do_sample=False, num_beams=3)):
        kw = dict(attention_mask=mask, max_new_tokens=20, **mode)
        expected = sdpa.generate(ids, past_key_values=build_cache("fastinfer_int8", config=sdpa.config), **kw)
        got = fast.generate(ids, cache_implementation="fastinfer_int8", **kw)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    one, one_mask = ids[2:], mask[2:]
    kw = dict(attention_mask=one_mask, max_new_tokens=60, do_sample=False, prompt_lookup_num_tokens=3)
    expected = sdpa.generate(one, past_key_values=build_cache("fastinfer_int8", config=sdpa.config), **kw)
    torch.testing.assert_close(fast.generate(one, cache_implementation="fastinfer_int8", **kw), expected, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_generates_3000_tokens_from_a_cache_sized_for_256(family):
    ids, mask = _prompts(batch=2)
    reference = models.tiny(family, attn_implementation="sdpa")
    fast = models.tiny(family, attn_implementation="fastinfer")
    kw = dict(attention_mask=mask, max_new_tokens=3000, min_new_tokens=3000, do_sample=False)
    expected = reference.generate(ids, **kw)
    cache = build_cache("fastinfer", config=fast.config, max_cache_len=256)
    got = fast.generate(ids, past_key_values=cache, **kw)
    assert got.shape == (2, 3012)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert cache.get_seq_length() == 3011  # the last token is returned, not cached
    if family == "mistral":  # sliding window 16: memory stays bounded
        assert all(layer.capacity <= 512 for layer in cache.layers)
    int8 = build_cache("fastinfer_int8", config=fast.config, max_cache_len=256)
    assert fast.generate(ids, past_key_values=int8, **kw).shape == (2, 3012)


def test_cache_reuse_reset_and_batch_mismatch():
    model = models.tiny("llama", attn_implementation="fastinfer")
    ids, mask = _prompts(batch=2)
    cache = build_cache("fastinfer", config=model.config)
    first = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=5, do_sample=False)
    with pytest.raises(ValueError, match="holds a batch of 2 sequences.*batch of 1.*cache.reset"):
        model(ids[:1], past_key_values=cache)
    cache.reset()
    again = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    cache.reset()
    single = model.generate(ids[:1], attention_mask=mask[:1], past_key_values=cache, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(single, first[:1], rtol=0, atol=0)


def test_decode_slots_are_reserved_in_every_layer_or_in_none():
    """reserve_decode_slots takes the same position in every layer (the slot the fused step writes K/V at), and
    takes none while any layer is full, holds another batch or another length."""
    config = models.tiny("llama").config
    cache = FastInferCache(config=config, max_cache_len=8)
    for j in range(len(cache.layers)):
        cache.update(*_kv(2, config.num_key_value_heads, 5, config.head_dim, seed=j), j)
    lengths = lambda: [(layer.length, layer.cumulative_length) for layer in cache.layers]  # noqa: E731
    assert cache.reserve_decode_slots(1) is None and lengths() == [(5, 5)] * len(cache.layers)  # another batch
    assert cache.reserve_decode_slots(2) == 5 and lengths() == [(6, 6)] * len(cache.layers)
    cache.layers[-1].length += 1  # one layer at another length
    assert cache.reserve_decode_slots(2) is None
    cache.layers[-1].length -= 1
    for layer in cache.layers[1:]:
        layer.length = layer.capacity - 1
    cache.layers[0].length = cache.layers[0].capacity - 1
    assert cache.reserve_decode_slots(2) == cache.layers[0].capacity - 1
    before = lengths()
    assert cache.reserve_decode_slots(2) is None and lengths() == before  # every layer full


def test_growth_disabled_errors():
    model = models.tiny("llama", attn_implementation="fastinfer")
    ids, mask = _prompts(batch=1, length=100)
    small = build_cache("fastinfer", config=model.config, max_cache_len=64, growth=False)
    with pytest.raises(ValueError, match="built for 64 positions with growth disabled, but the prompt has 100"):
        model.generate(ids, attention_mask=mask, past_key_values=small, max_new_tokens=2)
    fits = build_cache("fastinfer", config=model.config, max_cache_len=110, growth=False)  # capacity 128
    with pytest.raises(ValueError, match="growth is disabled"):
        model.generate(ids, attention_mask=mask, past_key_values=fits, max_new_tokens=40, min_new_tokens=40)


def test_cache_classes_and_unknown_names():
    config = models.tiny_config("mistral")
    assert type(build_cache("fastinfer", config=config)) is FastInferCache
    cache = build_cache("fastinfer_int8", config=config)
    assert type(cache) is FastInferInt8Cache and all(layer.is_sliding for layer in cache.layers)
    with pytest.raises(ValueError, match="Unknown hf_fastinfer cache 'fastinfer_fp8'"):
        build_cache("fastinfer_fp8", config=config)
    assert hf_fastinfer.CACHE_IMPLEMENTATIONS == ("fastinfer", "fastinfer_int8")


def test_cache_classes_are_public_and_usable_like_transformers_static_cache():
    model = models.tiny("llama", attn_implementation="fastinfer")
    ids, mask = _prompts(batch=2)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    expected = model.generate(ids, cache_implementation="fastinfer", **kw)
    for cls in (hf_fastinfer.FastInferCache, hf_fastinfer.FastInferInt8Cache):
        cache = cls(config=model.config, max_cache_len=32)
        assert isinstance(cache, FastInferCache) and cache.quantized is (cls is FastInferInt8Cache)
        out = model.generate(ids, past_key_values=cache, **kw)
        if cls is FastInferCache:
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
        else:
            assert out.shape == expected.shape


@pytest.mark.parametrize("make", [
    lambda: build_cache("fastinfer", config=None),
    lambda: hf_fastinfer.FastInferCache(config=None),
    lambda: hf_fastinfer.FastInferInt8Cache(None, 64),
])
def test_missing_config_is_named(make):
    with pytest.raises(ValueError, match="needs the model's config.*config=model.config"):
        make()


def test_wrong_config_and_capacity_are_named():
    with pytest.raises(TypeError, match="must be a transformers model config.*got dict"):
        build_cache("fastinfer", config={"num_hidden_layers": 2})
    config = models.tiny_config("llama")
    with pytest.raises(ValueError, match="max_cache_len must be a positive integer.*got 0"):
        hf_fastinfer.FastInferCache(config, max_cache_len=0)
    with pytest.raises(ValueError, match="max_cache_len must be a positive integer.*got '256'"):
        build_cache("fastinfer", config=config, max_cache_len="256")
