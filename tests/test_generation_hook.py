"""cache_implementation="fastinfer" through generate(), the attention function, and their errors."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import hf_fastinfer
from hf_fastinfer import models
from hf_fastinfer.attention import attention_ref

FAMILIES = models.TINY_FAMILIES


def _prompts(batch=3, length=12, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    # left padding of different lengths, as a padded chat batch has
    for row, pad in enumerate(range(0, 2 * batch, 2)):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_fastinfer_attention_and_cache_match_transformers_greedy(family):
    ids, mask = _prompts()
    reference = models.tiny(family, attn_implementation="sdpa")
    fast = models.tiny(family, attn_implementation="fastinfer")
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=False)
    expected = reference.generate(ids, **kwargs)
    got = fast.generate(ids, cache_implementation="fastinfer", **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_generation_config_cache_implementation_name_works():
    model = models.tiny("llama", attn_implementation="fastinfer")
    ids, mask = _prompts(batch=1)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    model.generation_config.cache_implementation = "fastinfer"
    got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_unknown_cache_name_gets_transformers_error_listing_ours():
    model = models.tiny("llama")
    ids, mask = _prompts(batch=1)
    with pytest.raises(ValueError, match=r"Invalid `cache_implementation` \(fastinfr\).*'fastinfer'"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="fastinfr")


def test_unknown_attention_name_gets_transformers_error():
    with pytest.raises(ValueError, match='attn_implementation="fastinfr"'):
        models.tiny("llama", attn_implementation="fastinfr")


def test_cache_and_past_key_values_together_is_refused():
    model = models.tiny("llama")
    ids, mask = _prompts(batch=1)
    with pytest.raises(ValueError, match="Passing both `cache_implementation`"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="fastinfer",
                       past_key_values=transformers.DynamicCache(config=model.config))


def test_disabled_plugin_rejects_its_names():
    model = models.tiny("llama")
    ids, mask = _prompts(batch=1)
    hf_fastinfer.disable()
    try:
        with pytest.raises(ValueError, match="Invalid `cache_implementation`"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="fastinfer")
    finally:
        hf_fastinfer.enable()


def _attention_float64(q, k, v, mask, scaling, softcap=None, sinks=None):
    """Independent formula: loops over heads, float64, explicit softmax."""
    batch, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = torch.zeros(batch, lq, hq, d, dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            kv = h // (hq // hkv)
            s = q[b, h].double() @ k[b, kv].double().T * scaling
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            s = s.masked_fill(~mask[b, 0], -math.inf)
            e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
            denom = e.sum(-1, keepdim=True)
            if sinks is not None:
                denom = denom + torch.exp(sinks[h].double() - s.max(dim=-1, keepdim=True).values)
            out[b, :, h] = (e / denom) @ v[b, kv].double()
    return out


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_attention_reference_against_float64_formula(softcap, with_sinks):
    g = torch.Generator().manual_seed(1)
    batch, hq, hkv, lq, lk, d = 2, 6, 2, 3, 7, 8
    q = torch.randn(batch, hq, lq, d, generator=g)
    k = torch.randn(batch, hkv, lk, d, generator=g)
    v = torch.randn(batch, hkv, lk, d, generator=g)
    causal = torch.arange(lk)[None, :] <= torch.arange(lk - lq, lk)[:, None]
    mask = causal[None, None].expand(batch, 1, lq, lk).clone()
    mask[1, :, :, :2] = False  # left padding in the second row
    sinks = torch.randn(hq, generator=g) if with_sinks else None
    got = attention_ref(q, k, v, mask, 0.3, softcap=softcap, sinks=sinks)
    expected = _attention_float64(q, k, v, mask, 0.3, softcap=softcap, sinks=sinks)
    # fp32 matmuls over d=8 and lk=7 terms: errors stay near 1e-6
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_eager_generate_builds_no_four_d_mask_per_token():
    """On the CPU generate() does not compile the step, so the hook marks the cache it builds eager (not
    compileable): generate() then hands the model the 2-D padding mask instead of building a 4-D mask for every
    decoded token, and the tokens stay transformers' own."""
    model = models.tiny("llama", attn_implementation="fastinfer")
    ids, mask = _prompts()
    seen = []
    original = type(model).forward

    def forward(self, *args, **kwargs):
        m = kwargs.get("attention_mask")
        seen.append(None if m is None else (m.dim() if isinstance(m, torch.Tensor) else type(m).__name__))
        return original(self, *args, **kwargs)

    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    expected = models.tiny("llama", attn_implementation="sdpa").generate(ids, **kwargs)
    model.forward = forward.__get__(model)
    out = model.generate(ids, cache_implementation="fastinfer", return_dict_in_generate=True, **kwargs)
    cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
    assert cache.is_compileable is False and cache.static_shapes is False
    assert seen and all(d == 2 for d in seen), seen
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
