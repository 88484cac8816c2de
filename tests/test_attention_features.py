"""The "fastinfer" attention on features SDPA lacks (softcap, sinks), odd masks, and a compiled decode step."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from hf_fastinfer import attention, models


def _build(config_class, seed=0, attn="eager", **settings):
    config = getattr(transformers, config_class)(**settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


GEMMA2 = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, sliding_window=8, attn_logit_softcapping=5.0,
              final_logit_softcapping=30.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GPT_OSS = dict(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, sliding_window=8, num_local_experts=4, num_experts_per_tok=2,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("config_class, settings", [("Gemma2Config", GEMMA2), ("GptOssConfig", GPT_OSS)],
                         ids=["gemma2-softcap", "gpt_oss-sinks"])
@pytest.mark.parametrize("cache", ["fastinfer", None])
def test_softcap_and_sinks_match_eager(config_class, settings, cache):
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    eager = _build(config_class, **settings)
    fast = _build(config_class, attn="fastinfer", **settings)
    if config_class == "GptOssConfig":  # random sinks, so that they matter
        for a, b in zip(eager.model.layers, fast.model.layers):
            torch.nn.init.normal_(a.self_attn.sinks, std=1.0)
            b.self_attn.sinks.data.copy_(a.self_attn.sinks.data)
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, attention_mask=mask).logits * mask[..., None],
                                   eager(ids, attention_mask=mask).logits * mask[..., None], rtol=1e-4, atol=1e-4)
    kw = dict(attention_mask=mask, max_new_tokens=30, do_sample=False)
    expected = eager.generate(ids, **kw)
    torch.testing.assert_close(fast.generate(ids, cache_implementation=cache, **kw), expected, rtol=0, atol=0)


def test_additive_float_mask_falls_back_to_sdpa_with_one_warning(caplog):
    model = models.tiny("llama", attn_implementation="fastinfer")
    layer = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g)
    bias = torch.randn(1, 1, 1, 9, generator=g)  # e.g. a position bias: not expressible as a boolean mask
    attention._warned.clear()
    with caplog.at_level(logging.WARNING):
        out, _ = attention.fastinfer_attention_forward(layer, q, k, v, bias, scaling=0.25)
        attention.fastinfer_attention_forward(layer, q, k, v, bias, scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                                attn_mask=bias, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    warnings = [r for r in caplog.records if "floating-point (additive) attention mask" in r.getMessage()]
    assert len(warnings) == 1


def test_dropout_in_training_is_refused():
    model = models.tiny("llama", attn_implementation="fastinfer").train()
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    with pytest.raises(NotImplementedError, match="dropout in training mode"):
        attention.fastinfer_attention_forward(model.model.layers[0].self_attn, q, k, k, None, dropout=0.1)


@pytest.mark.slow
def test_compiled_decode_step_matches_eager():
    # transformers compiles the decode step for compileable caches (on GPU by default; forced here on CPU).
    # The hook then switches the cache to static shapes so that the compiled graph is reused between steps.
    model = models.tiny("llama", attn_implementation="fastinfer")
    reference = models.tiny("llama", attn_implementation="sdpa")
    ids = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    config = transformers.CompileConfig(fullgraph=False)
    config._compile_all_devices = True
    torch._dynamo.reset()
    got = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, cache_implementation="fastinfer",
                         compile_config=config)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert hasattr(model, "_compiled_call")  # the decode step really went through torch.compile
