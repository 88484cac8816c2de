"""Kernel injection (hf_fastinfer.injection) on tiny models of every family: the same tokens as transformers'
own path, in every generation mode, with every cache; what is fused and what is left alone; undo; compile.

fp32 greedy tokens are compared for equality: the fused layer differs from transformers' forward only by
summation order (about 1e-7 relative), far below the gap between the top two logits of these models.
"""

from __future__ import annotations

import collections
import inspect
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, BertConfig, BertModel, DynamicCache
from transformers.generation.streamers import BaseStreamer

import hf_fastinfer
from hf_fastinfer import models
from hf_fastinfer.injection import injection_report, is_injected
from hf_fastinfer.kernels._cpu_ext import cpu_extension

torch.manual_seed(0)
PROMPTS = torch.randint(3, 500, (3, 12), generator=torch.Generator().manual_seed(1))
MASK = torch.ones_like(PROMPTS)
MASK[0, :4] = 0  # left padding
MASK[1, :2] = 0


def pair(family, **kwargs):
    """(transformers' model, the same model injected)."""
    reference = models.tiny(family, attn_implementation="sdpa", **kwargs)
    fast = models.tiny(family, attn_implementation="fastinfer", **kwargs)
    hf_fastinfer.inject(fast)
    return reference, fast


def decode_calls(model) -> int:
    return sum(layer.decode_calls for layer in model._hf_fastinfer_injection.layers.values())


@pytest.mark.parametrize("cache", [None, "fastinfer", "fastinfer_int8"])
@pytest.mark.parametrize("family", models.TINY_FAMILIES)
def test_greedy_tokens_match_transformers(family, cache):
    reference, fast = pair(family)
    kwargs = dict(attention_mask=MASK, max_new_tokens=24, do_sample=False)
    if cache == "fastinfer_int8":
        # the int8 cache changes the numbers; compare with transformers' model on the same cache
        reference = models.tiny(family, attn_implementation="fastinfer")
    expected = reference.generate(PROMPTS, **kwargs, **({"cache_implementation": cache} if cache else {}))
    got = fast.generate(PROMPTS, **kwargs, **({"cache_implementation": cache} if cache else {}))
    assert torch.equal(got, expected)
    assert decode_calls(fast) >= 2 * 20  # the fused path ran for (nearly) every decoded token of both layers


def test_fused_layer_output_matches_transformers_layer_by_layer():
    """Logits of a decode step, and every block's output (hidden states), against transformers' forward."""
    reference, fast = pair("qwen3")
    ids = PROMPTS[:1]
    outs = []
    for model in (reference, fast):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            first = model(ids, past_key_values=cache, use_cache=True)
            nxt = first.logits[:, -1:].argmax(-1)
            outs.append(model(nxt, past_key_values=cache, use_cache=True, output_hidden_states=True))
    for a, b in zip(outs[0].hidden_states, outs[1].hidden_states):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1].logits, outs[0].logits, rtol=1e-5, atol=1e-5)


class _Collect(BaseStreamer):
    def __init__(self):
        self.pieces = []

    def put(self, value):
        self.pieces.append(value.clone())

    def end(self):
        self.pieces.append(None)


def test_generation_modes_keep_working():
    reference, fast = pair("llama")
    ids, mask = PROMPTS[:1], MASK[:1]
    for kwargs in (dict(num_beams=3, num_return_sequences=2), dict(num_beams=2, cache_implementation="fastinfer"),
                   dict(prompt_lookup_num_tokens=3), dict(cache_implementation="fastinfer", prompt_lookup_num_tokens=2)):
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, **kwargs)
        got = fast.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, **kwargs)
        assert torch.equal(got, expected), kwargs
    # sampling: the same seed draws the same tokens from the same distributions
    torch.manual_seed(7)
    sampled_ref = reference.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, top_k=20)
    torch.manual_seed(7)
    sampled_fast = fast.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, top_k=20)
    assert torch.equal(sampled_fast, sampled_ref)
    # assisted decoding, the assistant injected too
    assistant_ref = models.tiny("llama", num_hidden_layers=1, attn_implementation="sdpa")
    assistant = models.tiny("llama", num_hidden_layers=1, attn_implementation="fastinfer")
    hf_fastinfer.inject(assistant)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                  assistant_model=assistant_ref)
    got = fast.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, assistant_model=assistant)
    assert torch.equal(got, expected)
    # streaming: the streamer sees every token as it is made
    streamer = _Collect()
    got = fast.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, streamer=streamer)
    streamed = torch.cat([p.reshape(-1) for p in streamer.pieces[1:-1]])
    assert torch.equal(streamed, got[0, ids.shape[1]:]) and streamer.pieces[-1] is None


def test_forward_called_directly_with_and_without_autograd():
    reference, fast = pair("gemma")
    ids = PROMPTS[:2]
    expected = reference(ids, attention_mask=MASK[:2]).logits
    torch.testing.assert_close(fast(ids, attention_mask=MASK[:2]).logits, expected, rtol=1e-5, atol=1e-5)
    # one decode step with autograd on takes the model's own forward and is differentiable
    cache = DynamicCache(config=fast.config)
    fast(ids, attention_mask=MASK[:2], past_key_values=cache, use_cache=True)
    out = fast(ids[:, -1:], past_key_values=cache, use_cache=True).logits
    assert out.requires_grad
    out.sum().backward()
    assert fast.model.embed_tokens.weight.grad is not None


def test_report_and_the_moe_blocks_log(caplog):
    _, fast = pair("mixtral")
    report = injection_report(fast)
    assert report.fused_blocks == ["model.layers.0", "model.layers.1"]
    assert set(report.attention_only) == {"model.layers.0", "model.layers.1"}
    assert "lm_head" in report.forwards and "model.norm" in report.forwards
    with caplog.at_level(logging.INFO, logger="hf_fastinfer"):
        hf_fastinfer.inject(fast)
    assert "MLP left to transformers" in caplog.text and "MixtralSparseMoeBlock" in caplog.text
    assert "attention only" in str(report)


def test_unrecognised_blocks_are_left_alone_and_named(caplog):
    """Gemma 2's blocks have four norms (sandwich norms): not the pre-norm block the fused layer computes."""
    config = models.tiny_config("gemma")
    from transformers import Gemma2Config

    config = Gemma2Config(**{k: v for k, v in config.to_dict().items() if k in Gemma2Config().to_dict()})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids = PROMPTS[:1]
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match="no decoder block"):
        report = hf_fastinfer.inject(model)
    assert report.fused_blocks == []
    assert "model.layers.0" in report.left_alone and "4 norm modules" in report.left_alone["model.layers.0"]
    assert "forward" not in model.model.layers[0].__dict__
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expected)


def test_a_block_whose_forward_differs_is_left_alone(caplog):
    """The probe catches a block that looks right but computes something else (here: an extra scale)."""
    reference, _ = pair("llama")
    model = models.tiny("llama", attn_implementation="sdpa")
    layer = model.model.layers[1]
    original = type(layer).forward
    layer.forward = lambda *a, **k: original(layer, *a, **k) * 1.5  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="hf_fastinfer"):
        report = hf_fastinfer.inject(model)
    assert report.fused_blocks == ["model.layers.0"]
    assert "differs from its forward" in report.left_alone["model.layers.1"]
    assert "model.layers.1" in caplog.text


def test_encoder_has_nothing_to_inject():
    config = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64)
    model = BertModel(config).eval()
    ids = torch.randint(0, 300, (1, 6))
    expected = model(ids).last_hidden_state
    with pytest.warns(UserWarning, match="no decoder block it can fuse"):
        hf_fastinfer.inject(model)
    torch.testing.assert_close(model(ids).last_hidden_state, expected, rtol=0, atol=0)


def _storages(model) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}


def test_fused_projections_share_memory_and_uninject_restores():
    model = models.tiny("llama", attn_implementation="fastinfer")
    ids = PROMPTS[:1]
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    before = sum(_storages(model).values())
    hf_fastinfer.inject(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    # q, k, v (and gate, up) are consecutive views of one tensor: no second copy of any weight
    base = attn.q_proj.weight.untyped_storage().data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == base == attn.v_proj.weight.untyped_storage().data_ptr()
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.up_proj.weight.untyped_storage().data_ptr()
    assert sum(_storages(model).values()) == before
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), expected)
    hf_fastinfer.uninject(model)
    assert not is_injected(model)
    assert "forward" not in model.model.layers[0].__dict__ and "forward" not in model.lm_head.__dict__
    assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.k_proj.weight.untyped_storage().data_ptr()
    assert sum(_storages(model).values()) == before
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), expected)
    hf_fastinfer.uninject(model)  # idempotent


def test_inject_twice_and_dtype_change_fall_back_safely():
    model = models.tiny("qwen2", attn_implementation="fastinfer")
    ids = PROMPTS[:1]
    hf_fastinfer.inject(model)
    hf_fastinfer.inject(model)  # again: re-detects, reuses the fused tensors
    assert len(injection_report(model).fused_blocks) == 2
    model.to(torch.bfloat16)  # the fused layers were built for fp32: they step aside
    reference = models.tiny("qwen2", attn_implementation="fastinfer").to(torch.bfloat16)
    expected = reference.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expected)
    hf_fastinfer.inject(model)  # rebuilt for bf16
    calls = decode_calls(model)
    model.generate(ids, max_new_tokens=8, do_sample=False)
    assert decode_calls(model) > calls


def test_config_injects_at_load_and_can_turn_it_off(tmp_path):
    models.tiny("phi3").save_pretrained(tmp_path)
    on = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=hf_fastinfer.FastInferConfig(bits=None))
    off = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=hf_fastinfer.FastInferConfig(bits=None, kernel_injection=False))
    assert is_injected(on) and not is_injected(off)
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=hf_fastinfer.FastInferConfig(bits=4))
    assert len(injection_report(quantized).fused_blocks) == 2
    ids = PROMPTS[:1]
    assert torch.equal(on.generate(ids, max_new_tokens=8, do_sample=False),
                       off.generate(ids, max_new_tokens=8, do_sample=False))


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def aten_ops_per_decoded_token(model, cache) -> int:
    """aten ops one decode step of ``model.forward`` dispatches (after a prefill and one warm step)."""
    ids = PROMPTS[:1]
    with torch.inference_mode():
        out = model(ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        model(nxt, past_key_values=cache, use_cache=True)
        with _CountOps() as counter:
            model(nxt, past_key_values=cache, use_cache=True)
    return sum(counter.counts.values())


@pytest.mark.skipif(cpu_extension() is None, reason="needs the compiled CPU kernels (a C++ compiler)")
def test_aten_ops_per_decoded_token_are_a_tenth_of_transformers():
    reference, fast = pair("llama", num_hidden_layers=30)
    baseline = aten_ops_per_decoded_token(reference, DynamicCache(config=reference.config))
    for cache in (DynamicCache(config=fast.config), hf_fastinfer.build_cache("fastinfer", config=fast.config)):
        ops = aten_ops_per_decoded_token(fast, cache)
        assert ops * 10 <= baseline, (ops, baseline)


def test_injected_decode_step_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces the injected decode step (the kernel-library composition the GPU
    runs, each op a torch.library op) with the static-shape cache: what a CUDA graph captures on a GPU."""
    _, fast = pair("qwen3")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ids = PROMPTS[:1]
    cache = hf_fastinfer.build_cache("fastinfer", config=fast.config, max_cache_len=64, growth=False,
                                     static_shapes=True)
    eager_cache = hf_fastinfer.build_cache("fastinfer", config=fast.config, max_cache_len=64, growth=False,
                                           static_shapes=True)
    with torch.no_grad():
        nxt = fast(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        fast(ids, past_key_values=eager_cache, use_cache=True)
        expected = fast(nxt, past_key_values=eager_cache, use_cache=True).logits
        compiled = torch.compile(fast.forward, fullgraph=True, backend=backend)
        got = compiled(input_ids=nxt, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    for op in ("hf_fastinfer.rotary", "hf_fastinfer.decode_attention", "hf_fastinfer.gated_act", "hf_fastinfer.rms_norm"):
        assert any(op in t for t in targets), (op, sorted(targets))


def test_inject_changes_nothing_process_wide():
    """Injecting and decoding leave torch's, the compilers' and the environment's settings as they were."""
    from test_import_side_effects import SNAPSHOT

    code = SNAPSHOT + textwrap.dedent(
        """
        import hf_fastinfer
        from hf_fastinfer import models
        model = models.tiny("llama")
        before = snapshot()
        hf_fastinfer.inject(model)
        model.generate(torch.tensor([[5, 9, 13]]), max_new_tokens=4, do_sample=False)
        after = snapshot()
        print(json.dumps(sorted(k for k in before if before[k] != after[k])))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.skipif(cpu_extension() is None, reason="needs the compiled CPU kernels (a C++ compiler)")
def test_compiled_kernels_use_torchs_thread_count():
    ext = cpu_extension()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert ext.team_size() == 1
    finally:
        torch.set_num_threads(before)
    assert ext.team_size() == before


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["qwen3", "phi3", "mixtral"])
def test_injected_model_on_gpu_matches_transformers(family, dtype):
    """On a GPU the fused step is the kernel library's Triton kernels; greedy tokens as transformers' (fp32), and
    close logits (bf16), eager and with transformers' static cache + torch.compile (CUDA graphs)."""
    reference = models.tiny(family, attn_implementation="sdpa", dtype=dtype).cuda()
    fast = models.tiny(family, attn_implementation="fastinfer", dtype=dtype).cuda()
    hf_fastinfer.inject(fast)
    ids, mask = PROMPTS.cuda(), MASK.cuda()
    for kwargs in (dict(), dict(cache_implementation="static")):
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, **kwargs)
        got = fast.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, **kwargs)
        if dtype == torch.float32:
            assert torch.equal(got, expected), kwargs
        else:
            # bf16 rounds differently (one rounding per op in the kernels): a near-tie may flip a token and every
            # token after it; the logits of a decode step on the same prefix must agree to bf16 precision
            step = []
            for model in (reference, fast):
                cache = DynamicCache(config=model.config)
                with torch.no_grad():
                    model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
                    nxt = expected[:, ids.shape[1] : ids.shape[1] + 1]
                    step.append(model(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                                      past_key_values=cache, use_cache=True).logits.float())
            err = (step[1] - step[0]).abs().max() / step[0].abs().max()
            assert err < 0.03, (kwargs, err)
    assert decode_calls(fast) > 0


@pytest.mark.parametrize("family", models.TINY_FAMILIES)
def test_fused_prefill_matches_transformers(family):
    """A prompt (several tokens, a padded batch) through the fused prefill step: logits and the cache it fills."""
    reference, fast = pair(family)
    caches = [DynamicCache(config=reference.config), DynamicCache(config=fast.config)]
    with torch.no_grad():
        expected = reference(PROMPTS, attention_mask=MASK, past_key_values=caches[0], use_cache=True).logits
        got = fast(PROMPTS, attention_mask=MASK, past_key_values=caches[1], use_cache=True).logits
    valid = MASK.bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)
    for a, b in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(b.keys, a.keys, rtol=1e-5, atol=1e-5)
    assert all(layer.prefill_checked for layer in fast._hf_fastinfer_injection.layers.values())


def test_chained_decode_steps_aside_when_a_hook_changes_a_blocks_output():
    """On CPU a block runs the blocks after it in the same call; a block then called with anything but the
    output the chain assumed (here a forward hook scales block 0's output) recomputes, and the cache positions
    the chain took are given back: the tokens are those of transformers' model with the same hook."""
    reference, fast = pair("llama", num_hidden_layers=4)
    hook = lambda module, args, output: output * 1.01  # noqa: E731
    for model in (reference, fast):
        model.model.layers[1].register_forward_hook(hook)
    ids, mask = PROMPTS[:2], MASK[:2]
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = fast.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, cache_implementation="fastinfer")
    assert torch.equal(got, expected)
    assert decode_calls(fast) >= 4 * 11


def test_chained_decode_runs_every_block_of_the_model():
    reference, fast = pair("qwen2", num_hidden_layers=5)
    ids, mask = PROMPTS, MASK
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    layers = fast._hf_fastinfer_injection.layers
    first = next(iter(layers.values()))
    calls = []
    original = first._decode_chain
    first._decode_chain = lambda *a: calls.append(1) or original(*a)
    step = fast._hf_fastinfer_injection.step
    # the whole step runs every block in one prepared chain, or (off) through the first block's chain
    for prepared in (True, False) if step is not None else (False,):
        if step is not None:
            step.use_prepared = prepared
        calls.clear()
        before, prepared_before = decode_calls(fast), step.prepared_calls if step is not None else 0
        got = fast.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                            cache_implementation="fastinfer")
        assert torch.equal(got, expected)
        chains = step.prepared_calls - prepared_before if prepared else len(calls)
        assert chains >= 15  # one chain of every block at every decode step
        assert decode_calls(fast) - before >= 5 * 15
    if step is not None:
        step.use_prepared = True


def step_calls(model) -> int:
    step = model._hf_fastinfer_injection.step
    return 0 if step is None else step.decode_calls


@pytest.mark.parametrize("family", models.TINY_FAMILIES)
def test_whole_decode_step_gives_transformers_tokens(family):
    """With hf_fastinfer's cache a decoded token is one call of the whole step (embedding, blocks, norm, output
    projection) where the model's forward is only that; a padded batch, greedy, against transformers' tokens."""
    reference, fast = pair(family)
    report = injection_report(fast)
    if family == "mistral":
        # the tiny Mistral's layers all slide: the step leaves them to the per-block path
        assert not report.decode_step and "not one the whole step covers" in report.decode_step_left
    else:
        assert report.decode_step, report.decode_step_left
    kwargs = dict(attention_mask=MASK, max_new_tokens=16, do_sample=False)
    expected = reference.generate(PROMPTS, **kwargs)
    got = fast.generate(PROMPTS, cache_implementation="fastinfer", **kwargs)
    assert torch.equal(got, expected)
    assert step_calls(fast) >= (15 if report.decode_step else 0)
    if report.decode_step and cpu_extension() is not None:
        # where the blocks chain (every MLP fused: not MoE), the chain also ran the final norm and the output
        # projection (probed bit for bit at load); elsewhere their modules did
        step = fast._hf_fastinfer_injection.step
        chained = all(layer.mlp is None for layer in step.layers)
        assert step.head is not None and step.head_calls == (step.decode_calls if chained else 0)


@pytest.mark.skipif(cpu_extension() is None, reason="needs the compiled CPU kernels (a C++ compiler)")
def test_whole_step_takes_the_chained_blocks_outputs_without_calling_them():
    """Where one chain runs every block, the whole step calls only the first block and takes the others' outputs
    from the chain (each block still counts its decoded tokens); the tokens equal those of the step that calls
    every block, which then hands back the chain's output."""
    from hf_fastinfer.injection.layer import FusedDecoderLayer

    _, fast = pair("llama")
    step = fast._hf_fastinfer_injection.step
    assert step is not None and len(step.layers) > 1 and all(layer.mlp is None for layer in step.layers)
    kwargs = dict(attention_mask=MASK, max_new_tokens=12, do_sample=False, cache_implementation="fastinfer")
    original_call = FusedDecoderLayer.__call__
    calls = {id(layer): 0 for layer in step.layers}

    def counting_call(self, hidden_states, *args, **kw):
        if hidden_states.shape[1] == 1:
            calls[id(self)] += 1
        return original_call(self, hidden_states, *args, **kw)

    tokens = {}
    for consume in (True, False):
        step.consume_chain = consume
        for key in calls:
            calls[key] = 0
        before = [layer.decode_calls for layer in step.layers]
        FusedDecoderLayer.__call__ = counting_call
        try:
            tokens[consume] = fast.generate(PROMPTS, **kwargs)
        finally:
            FusedDecoderLayer.__call__ = original_call
        decoded = step.layers[0].decode_calls - before[0]
        assert decoded >= 11
        # every block counted every decoded token, consumed or called
        assert [layer.decode_calls - b for layer, b in zip(step.layers, before)] == [decoded] * len(step.layers)
        later = [calls[id(layer)] for layer in step.layers[1:]]
        assert later == ([0] * len(later) if consume else [decoded] * len(later))
    step.consume_chain = True
    assert torch.equal(tokens[True], tokens[False])


@pytest.mark.skipif(cpu_extension() is None, reason="needs the compiled CPU kernels (a C++ compiler)")
def test_whole_step_runs_a_prepared_chain_built_again_when_the_cache_reallocates():
    """Where one chain runs every block, a decoded token is one prepared chain's call (no block is called, each
    still counts its token); a cache that grows past its capacity mid-generation gets a new plan on its new
    buffers; the tokens equal transformers' and the block-by-block step's; the plan goes with its cache."""
    import gc

    from hf_fastinfer.cache import FastInferCache
    from hf_fastinfer.injection.layer import FusedDecoderLayer

    reference, fast = pair("llama")
    step = fast._hf_fastinfer_injection.step
    assert step is not None and all(layer.mlp is None for layer in step.layers)
    kwargs = dict(attention_mask=MASK, max_new_tokens=60, do_sample=False)
    expected = reference.generate(PROMPTS, **kwargs)
    original_call = FusedDecoderLayer.__call__
    block_calls = []

    def counting_call(self, hidden_states, *args, **kw):
        if hidden_states.shape[1] == 1:
            block_calls.append(self.layer_idx)
        return original_call(self, hidden_states, *args, **kw)

    tokens, plans = {}, []
    build = step._prepare

    def recording_build(cache, head):
        plan = build(cache, head)
        plans.append((plan, cache.layers[0].capacity))
        return plan

    step._prepare = recording_build
    FusedDecoderLayer.__call__ = counting_call
    try:
        for prepared in (True, False):
            step.use_prepared = prepared
            before, calls_before = step.prepared_calls, [layer.decode_calls for layer in step.layers]
            block_calls.clear()
            # 12 prompt positions and 60 new ones: past the first capacity (64), so the cache grows once, at the
            # token that finds it full; that token takes the blocks' calls (each block's update grows its layer)
            cache = FastInferCache(config=fast.config, max_cache_len=12)
            tokens[prepared] = fast.generate(PROMPTS, past_key_values=cache, **kwargs)
            assert cache.layers[0].capacity == 128
            decoded = step.layers[0].decode_calls - calls_before[0]
            assert decoded == 59
            assert [layer.decode_calls - b for layer, b in zip(step.layers, calls_before)] == [decoded] * len(step.layers)
            every_block = list(range(len(step.layers)))
            if prepared:
                assert step.prepared_calls - before == decoded - 1 and block_calls == every_block
            else:  # the first block's call every token (its chain runs the others), every block's at the growth
                assert step.prepared_calls == before and len(block_calls) == decoded - 1 + len(every_block)
            del cache
    finally:
        FusedDecoderLayer.__call__ = original_call
        step.use_prepared = True
        del step._prepare
    assert torch.equal(tokens[True], expected) and torch.equal(tokens[False], expected)
    capacities = [capacity for plan, capacity in plans]
    assert all(plan is not None for plan, _ in plans) and capacities == [64, 128]  # before and after the growth
    gc.collect()
    assert step._prepared is None  # (the last cache is gone, and its buffers with it)


def test_a_head_that_would_change_the_logits_is_dropped_and_the_step_kept():
    """The probe drops a chain head whose logits differ from the model's modules' (here its norm takes Gemma's (1 + w) form, which the model's norm does not)
    and probes the step again without it."""
    from hf_fastinfer.injection.step import probe_step
    from hf_fastinfer.kernels.decoder_layer import DecodeHeadSpec

    reference, fast = pair("llama")
    step = fast._hf_fastinfer_injection.step
    if step is None or step.head is None:
        pytest.skip("reason: no compiled CPU kernels here, so the chain runs no head")
    good = step.head
    step.head = DecodeHeadSpec(good.norm_weight, good.eps, not good.gemma_norm, good.proj, good.dtype)
    del fast.forward  # the probe compares against the model's own forward, as at load
    assert probe_step(fast, step) is None and step.head is None
    fast.forward = step
    kwargs = dict(attention_mask=MASK, max_new_tokens=8, do_sample=False)
    assert torch.equal(fast.generate(PROMPTS, cache_implementation="fastinfer", **kwargs),
                       reference.generate(PROMPTS, **kwargs))
    step.head = good
    del fast.forward
    assert probe_step(fast, step) is None and step.head is good
    fast.forward = step


def test_a_hook_on_the_output_projection_or_final_norm_still_runs():
    """The chain's head stands for the final norm and the output projection only while nothing hooks them: a
    forward hook on either is called at every decoded token (their modules run), and the tokens stay
    transformers'."""
    reference, fast = pair("llama")
    step = fast._hf_fastinfer_injection.step
    if step is None or step.head is None:
        pytest.skip("reason: no compiled CPU kernels here, so the chain runs no head")
    kwargs = dict(attention_mask=MASK, max_new_tokens=8, do_sample=False)
    expected = reference.generate(PROMPTS, **kwargs)
    for module in (fast.lm_head, fast.model.norm):
        seen = []
        handle = module.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        before, head_before = step.decode_calls, step.head_calls
        got = fast.generate(PROMPTS, cache_implementation="fastinfer", **kwargs)
        handle.remove()
        assert torch.equal(got, expected)
        assert step.decode_calls - before == 7 and step.head_calls == head_before  # the step, not its head
        assert len(seen) == 8  # the prompt and every decoded token
    fast.generate(PROMPTS, cache_implementation="fastinfer", **kwargs)
    assert step.head_calls > head_before  # the head again, once the hooks are gone
    # a new output weight (as re-tying or loading another head would give): the module computes, with it
    fast.lm_head.weight = torch.nn.Parameter(fast.lm_head.weight.detach() * -1.0)
    from hf_fastinfer._compat import cache_kwarg

    name = cache_kwarg()
    head_before, before = step.head_calls, step.decode_calls
    with torch.no_grad():
        cache = hf_fastinfer.build_cache("fastinfer", config=fast.config)
        fast(PROMPTS[:1, :4], use_cache=True, **{name: cache})
        logits = fast(PROMPTS[:1, 4:5], use_cache=True, **{name: cache}).logits
        ref_cache = DynamicCache(config=reference.config)
        reference.lm_head.weight = torch.nn.Parameter(reference.lm_head.weight.detach() * -1.0)
        reference(PROMPTS[:1, :4], use_cache=True, **{name: ref_cache})
        expected_logits = reference(PROMPTS[:1, 4:5], use_cache=True, **{name: ref_cache}).logits
    assert step.decode_calls == before + 1 and step.head_calls == head_before
    torch.testing.assert_close(logits, expected_logits)


def test_whole_decode_step_steps_aside_and_undoes():
    """Calls it does not cover take the model's own forward (hidden states asked for, a DynamicCache, a forward
    hook on the base model); uninject gives the model its class's forward back."""
    reference, fast = pair("llama")
    assert "forward" in fast.__dict__
    # generate() reads the forward's signature (e.g. to compute a prompt's logits for its last token only)
    assert inspect.signature(fast.forward) == inspect.signature(reference.forward)
    assert fast._supports_logits_to_keep()
    ids = PROMPTS[:1]

    def one_step(cache, **kwargs) -> int:
        """step calls made by one decode call after a prompt"""
        with torch.no_grad():
            fast(ids, past_key_values=cache, use_cache=True)
            before = step_calls(fast)
            out = fast(ids[:, -1:], past_key_values=cache, use_cache=True, **kwargs)
        assert out.logits.shape == (1, 1, fast.config.vocab_size)
        return step_calls(fast) - before

    ours = lambda: hf_fastinfer.build_cache("fastinfer", config=fast.config)  # noqa: E731
    assert one_step(ours()) == 1
    assert one_step(ours(), output_hidden_states=True) == 0
    assert one_step(DynamicCache(config=fast.config)) == 0
    handle = fast.model.register_forward_hook(lambda module, args, output: None)
    assert one_step(ours()) == 0
    handle.remove()
    assert one_step(ours()) == 1
    hf_fastinfer.uninject(fast)
    assert "forward" not in fast.__dict__


def last_block(model):
    return list(model._hf_fastinfer_injection.layers.values())[-1]


@pytest.mark.parametrize("family", [f for f in models.TINY_FAMILIES if f != "mistral"])  # (mistral: no whole step)
def test_prompt_keeping_its_last_logits_runs_the_last_block_for_those_rows(family):
    """generate()'s prompt call keeps one position's logits (``logits_to_keep=1``): the last block computes keys and
    values for every position and the rest for that row alone. Its logits and the cache it fills are
    transformers', with a padding mask and without one; more kept rows with a mask are trimmed too, and calls
    that could read the other rows are not: no mask with several rows, every row's logits, hidden states asked for,
    a hook on the final norm."""
    reference, fast = pair(family)
    assert injection_report(fast).prefill_trimmed
    last = last_block(fast)

    def both(ids, **kwargs):
        caches = [DynamicCache(config=reference.config), DynamicCache(config=fast.config)]
        with torch.no_grad():
            expected = reference(ids, past_key_values=caches[0], use_cache=True, **kwargs)
            before = last.trimmed_calls
            got = fast(ids, past_key_values=caches[1], use_cache=True, **kwargs)
        for a, b in zip(caches[0].layers, caches[1].layers):
            torch.testing.assert_close(b.keys, a.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-5)
        return expected, got, last.trimmed_calls - before

    for ids, mask, keep, trimmed in [(PROMPTS, MASK, 1, 1), (PROMPTS[2:], None, 1, 1), (PROMPTS, MASK, 3, 1),
                                     (PROMPTS[2:], None, 3, 0), (PROMPTS, MASK, 0, 0)]:
        expected, got, calls = both(ids, attention_mask=mask, logits_to_keep=keep)
        assert got.logits.shape == expected.logits.shape and calls == trimmed, (keep, mask is None)
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    expected, got, calls = both(PROMPTS, attention_mask=MASK, logits_to_keep=1, output_hidden_states=True)
    assert calls == 0 and got.hidden_states[-1].shape == expected.hidden_states[-1].shape == (3, 12, 64)
    torch.testing.assert_close(got.hidden_states[-1], expected.hidden_states[-1], rtol=1e-5, atol=1e-5)
    seen = []
    handle = fast.model.norm.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    expected, got, calls = both(PROMPTS, attention_mask=MASK, logits_to_keep=1)
    handle.remove()
    assert calls == 0 and seen == [(3, 12, 64)]
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    # generate(): greedy tokens and sampling's distributions are computed from the trimmed prompt call
    before = last.trimmed_calls
    kwargs = dict(attention_mask=MASK, max_new_tokens=6, do_sample=False)
    assert torch.equal(fast.generate(PROMPTS, cache_implementation="fastinfer", **kwargs),
                       reference.generate(PROMPTS, **kwargs))
    assert last.trimmed_calls == before + 1


def test_prompt_trim_left_out_when_the_models_forward_reads_every_position():
    """A causal LM whose forward computes every position's logits whatever ``logits_to_keep`` says: the probe sees
    another shape, and prompts run the last block for every row."""
    from transformers import LlamaForCausalLM

    class EveryPosition(LlamaForCausalLM):
        def forward(self, *args, logits_to_keep=0, **kwargs):
            return super().forward(*args, logits_to_keep=0, **kwargs)

    model = EveryPosition._from_config(models.tiny_config("llama"), attn_implementation="fastinfer").eval()
    report = hf_fastinfer.inject(model)
    assert report.decode_step and not report.prefill_trimmed
    reference = LlamaForCausalLM._from_config(models.tiny_config("llama"), attn_implementation="sdpa").eval()
    reference.load_state_dict(model.state_dict())
    before = last_block(model).trimmed_calls  # (the probe's call)
    with torch.no_grad():
        got = model(PROMPTS, attention_mask=MASK, logits_to_keep=1).logits
        expected = reference(PROMPTS, attention_mask=MASK).logits
    assert got.shape == (3, 12, model.config.vocab_size) and last_block(model).trimmed_calls == before
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_whole_decode_step_left_out_when_the_models_forward_does_more():
    """A causal LM whose forward changes the logits after the output projection (here they are halved, as a
    final logit softcap would change them): the probe sees other logits and keeps the per-block path."""
    from transformers import LlamaForCausalLM

    class HalvedLogits(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    model = HalvedLogits._from_config(models.tiny_config("llama"), attn_implementation="fastinfer").eval()
    report = hf_fastinfer.inject(model)
    assert report.fused_blocks and not report.decode_step
    assert "logits differ" in report.decode_step_left
    assert "forward" not in model.__dict__
