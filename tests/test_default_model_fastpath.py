"""attn "fastinfer" + cache "fastinfer"/"fastinfer_int8" on the real default model (fp32)."""

from __future__ import annotations

import pytest
import torch

from hf_fastinfer import build_cache, evaluation, models

pytestmark = pytest.mark.slow

CHAT_PROMPTS = models.CHAT_PROMPTS


@pytest.fixture(scope="module")
def fast_model():
    return models.load_default(attn_implementation="fastinfer", progress=False)


def _generate(model, inputs, **kwargs):
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=64, do_sample=False, **kwargs)
    return out[:, inputs["input_ids"].shape[1]:]


def test_chat_prompts_match_transformers_token_for_token(default_model, fast_model):
    reference, tokenizer = default_model
    fast, _ = fast_model
    for prompt in CHAT_PROMPTS:
        inputs = models.chat_inputs(tokenizer, prompt)
        expected = _generate(reference, inputs)
        got = _generate(fast, inputs, cache_implementation="fastinfer")
        assert torch.equal(got, expected), (prompt, tokenizer.decode(got[0]), tokenizer.decode(expected[0]))


def test_left_padded_batch_matches_transformers(default_model, fast_model):
    reference, tokenizer = default_model
    fast, _ = fast_model
    prompts = [CHAT_PROMPTS[0], CHAT_PROMPTS[1] + " Keep it short.", "Hi!", CHAT_PROMPTS[8]]
    inputs = models.chat_inputs(tokenizer, prompts)
    lengths = inputs["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) == 4  # four different prompt lengths, left-padded
    expected = _generate(reference, inputs)
    got = _generate(fast, inputs, cache_implementation="fastinfer")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # Each row also matches that prompt generated alone (the padding really is masked).
    for row, prompt in enumerate(prompts):
        alone = _generate(fast, models.chat_inputs(tokenizer, prompt), cache_implementation="fastinfer")
        n = int((expected[row] != tokenizer.pad_token_id).sum()) if tokenizer.pad_token_id is not None else 64
        n = min(n, alone.shape[1])
        assert torch.equal(got[row, :n], alone[0, :n]), prompt


def test_int8_kv_cache_perplexity_and_bytes(default_model):
    model, tokenizer = default_model
    ids = evaluation.reference_tokens(tokenizer, 16384)
    ppl = {
        name: evaluation.perplexity(
            model, ids, window=512, progress=False,
            cache_factory=lambda name=name: build_cache(name, config=model.config, max_cache_len=512),
        )
        for name in ("fastinfer", "fastinfer_int8")
    }
    # fp32 perplexity of this model on this text is about 14.47
    assert 14.0 < ppl["fastinfer"] < 15.0, ppl
    assert ppl["fastinfer_int8"] <= ppl["fastinfer"] * 1.01, ppl

    window = ids[:, :512]
    sizes = {}
    # a bf16 copy of its own: converting the shared fixture to bf16 and back would round its weights for every
    # later test
    bf16_model, _ = models.load_default(dtype=torch.bfloat16, progress=False)
    for name, dtype in (("fastinfer", torch.float32), ("fastinfer", torch.bfloat16), ("fastinfer_int8", torch.float32)):
        cache = build_cache(name, config=model.config, max_cache_len=512)
        with torch.inference_mode():
            (model if dtype == torch.float32 else bf16_model)(window, past_key_values=cache)
        sizes[(name, dtype)] = cache.stored_bytes()
    int8 = sizes[("fastinfer_int8", torch.float32)]
    assert int8 / sizes[("fastinfer", torch.float32)] <= 0.27
    assert int8 / sizes[("fastinfer", torch.bfloat16)] <= 0.53
