"""The fused decoder layer (kernels/decoder_layer.py): the compiled CPU layer and the composition of kernel-library
ops against the pure-PyTorch reference, on random layers of every supported shape and precision.

Tolerances: fp32 agrees with the reference up to summation order (relative 1e-5 of the output's scale). bf16 and
fp16 outputs are rounded to 8 / 11 mantissa bits at every step the model rounds; the implementations round at
the same points but accumulate in other orders, so a value may land one rounding step away: bounded by 2^-6
(bf16) and 2^-9 (fp16) of the output's scale.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_fastinfer.kernels import decoder_layer as dl
from hf_fastinfer.kernels._cpu_ext import cpu_extension
from hf_fastinfer.kernels.kv_quant import quantize_kv
from hf_fastinfer.kernels.quant_format import quantize_weight
from hf_fastinfer.kernels.rms_norm import rms_norm

from _helpers import needs_triton

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}


def _projection(gen, n, k, dtype, bits, bias, group_size=16):
    w = torch.randn(n, k, generator=gen) * k**-0.5
    b = torch.randn(n, generator=gen) * 0.1 if bias else None
    if bits == 0:
        return dl.LayerProjection(w.to(dtype), None if b is None else b.to(dtype))
    q = quantize_weight(w, bits, group_size, symmetric=(bits == 8), scale_dtype=torch.float16)
    return dl.LayerProjection(q.qweight, None if b is None else b.to(dtype), bits, group_size, q.scales, q.zeros, k)


def make_spec(dtype=torch.float32, bits=0, *, hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, fused=True,
              bias=False, qk_norm=False, rotary_dim=None, gemma=False, activation="silu", mlp=True, softcap=None,
              seed=0, group_size=16):
    gen = torch.Generator().manual_seed(seed)
    proj = lambda n, k, b=False: _projection(gen, n, k, dtype, bits, b, group_size)  # noqa: E731
    nq, nk = heads * head_dim, kv_heads * head_dim
    qkv = [proj(nq + 2 * nk, hidden, bias)] if fused else [proj(nq, hidden, bias), proj(nk, hidden, bias),
                                                            proj(nk, hidden, bias)]
    gate_up, down = [], None
    if mlp:
        gate_up = [proj(2 * inter, hidden)] if fused else [proj(inter, hidden), proj(inter, hidden)]
        down = proj(hidden, inter)
    norm = lambda n: (torch.randn(n, generator=gen) * 0.2 + (0.0 if gemma else 1.0)).to(dtype)  # noqa: E731
    return dl.DecoderLayerSpec(
        input_norm=norm(hidden), post_attention_norm=norm(hidden), eps=1e-6, qkv=qkv, o=proj(hidden, nq),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rotary_dim=rotary_dim or head_dim,
        scaling=head_dim**-0.5, gate_up=gate_up, down=down, activation=activation, gemma_norm=gemma,
        q_norm=norm(head_dim) if qk_norm else None, k_norm=norm(head_dim) if qk_norm else None, softcap=softcap)


def make_inputs(spec, batch=2, cached=7, seed=1, int8_kv=False, mask="bool"):
    gen = torch.Generator().manual_seed(seed)
    dtype = spec.dtype
    hidden = torch.randn(batch, 1, spec.hidden_size, generator=gen).to(dtype)
    position = torch.arange(cached, cached + batch, dtype=torch.float32)[:, None]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, spec.rotary_dim, 2).float() / spec.rotary_dim))
    angles = position * inv_freq
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]  # [B, 1, R], as a transformers rotary module gives
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    past_k = torch.randn(batch, spec.num_kv_heads, cached, spec.head_dim, generator=gen).to(dtype)
    past_v = torch.randn(batch, spec.num_kv_heads, cached, spec.head_dim, generator=gen).to(dtype)
    masks = None
    if mask is not None:
        allowed = torch.ones(batch, 1, 1, cached + 1, dtype=torch.bool)
        allowed[0, ..., :2] = False  # the first sequence is left-padded by two positions
        masks = allowed if mask == "bool" else torch.zeros(allowed.shape, dtype=dtype).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return hidden, cos, sin, past_k, past_v, masks, int8_kv


def run(which, spec, inputs):
    """One decode step through `which` (ref / compiled / composed): q, k, v and the layer output."""
    hidden, cos, sin, past_k, past_v, mask, int8_kv = inputs
    attn_in = {"ref": dl.attn_in_ref, "compiled": dl.attn_in, "composed": dl.attn_in_composed}[which]
    attn_out = {"ref": dl.attn_out_mlp_ref, "compiled": dl.attn_out_mlp, "composed": dl.attn_out_mlp_composed}[which]
    q, k, v = attn_in(spec, hidden, cos, sin)
    keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    k_scale = v_scale = None
    if int8_kv:
        (keys, k_scale), (values, v_scale) = quantize_kv(keys), quantize_kv(values)
    out = attn_out(spec, hidden, q, keys, values, k_scale, v_scale, mask)
    return (q, k, v), out


def assert_close(actual, expected, dtype, what):
    scale = expected.float().abs().max().clamp_min(1e-6)
    err = (actual.float() - expected.float()).abs().max() / scale
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3g} > {TOLERANCE[dtype]:.3g}"


def check(spec, inputs, which="compiled"):
    (q, k, v), out = run(which, spec, inputs)
    (rq, rk, rv), ref = run("ref", spec, inputs)
    for name, a, b in (("q", q, rq), ("k", k, rk), ("v", v, rv)):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, spec.dtype, name)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for a, b in zip(outs, refs):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_close(a, b, spec.dtype, "output")


needs_compiled = pytest.mark.skipif(cpu_extension() is None, reason="needs the compiled CPU kernels (a C++ compiler)")


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [0, 8, 4])
def test_compiled_layer_matches_reference(dtype, bits):
    spec = make_spec(dtype, bits)
    assert spec.compiled() is not None
    check(spec, make_inputs(spec))


@needs_compiled
@pytest.mark.parametrize("variant", [
    dict(fused=False), dict(bias=True), dict(qk_norm=True), dict(rotary_dim=8), dict(gemma=True, activation="gelu_tanh"),
    dict(mlp=False), dict(softcap=5.0), dict(heads=6, kv_heads=6), dict(heads=8, kv_heads=1, head_dim=20),
    dict(hidden=72, inter=40, head_dim=24, heads=3, kv_heads=1),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_layer_variants(variant, dtype):
    spec = make_spec(dtype, **variant)
    check(spec, make_inputs(spec))


@needs_compiled
@pytest.mark.parametrize("other", [dict(bits=8), dict(bits=4, group_size=16)])
def test_compiled_layers_of_other_formats_after_int4_group_32(other):
    """Each team thread prepares every quantized projection's input in buffers of its own, which serve every
    layer and model in the process: an int4 group-32 layer with bf16 activations (K a multiple of 64: the
    block layout of the int16 activations) run first must leave nothing that an int8 or an int4 group-16
    layer reads. (It once did: an int4 model loaded before an int8 one made the int8 model's probe give NaN,
    and its injection was refused.)"""
    first = make_spec(torch.bfloat16, 4, group_size=32)
    then = make_spec(torch.bfloat16, **other)
    for spec in (first, then, first, then):
        check(spec, make_inputs(spec))


@needs_compiled
@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("int8_kv", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_layer_attention_over_blocks_of_positions(head_dim, int8_kv, dtype):
    """41 attended positions: two 16-position blocks of the vectorised attention loops (with their prefetches)
    and a scalar tail, at head dims whose chunk count the kernel fixes at compile time (64, 128) and one it
    does not (16); three query heads per KV head, a padding mask."""
    spec = make_spec(dtype, head_dim=head_dim, heads=6, kv_heads=2, hidden=128, inter=96)
    check(spec, make_inputs(spec, cached=40, int8_kv=int8_kv, mask="float"))


@needs_compiled
@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("int8_kv", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_layer_masks_and_int8_cache(mask, int8_kv, batch):
    spec = make_spec(torch.bfloat16, 4)
    check(spec, make_inputs(spec, batch=batch, int8_kv=int8_kv, mask=mask))


@needs_compiled
def test_compiled_layer_long_cache_and_threads():
    """A cache many vector chunks long; the thread count changes who computes what, not the result (bit for bit)."""
    spec = make_spec(torch.float32, 8, head_dim=64, heads=4, kv_heads=2, hidden=128, inter=160)
    inputs = make_inputs(spec, batch=2, cached=300)
    check(spec, inputs)
    _, teamed = run("compiled", spec, inputs)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, single = run("compiled", spec, inputs)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(single, teamed)


@needs_compiled
def test_compiled_layer_fully_masked_row_is_zero_attention():
    """A sequence whose mask allows nothing gets zero attention (not NaN), as the reference does."""
    spec = make_spec(torch.float32)
    hidden, cos, sin, pk, pv, mask, int8_kv = make_inputs(spec, batch=2)
    mask = mask.clone()
    mask[1] = False
    check(spec, (hidden, cos, sin, pk, pv, mask, int8_kv))


@needs_compiled
def test_compiled_layer_rejects_bad_input():
    spec = make_spec(torch.float32)
    hidden, cos, sin, pk, pv, mask, _ = make_inputs(spec)
    layer = spec.compiled()
    with pytest.raises(RuntimeError, match="dtype"):
        layer.attn_in(hidden.double(), cos, sin)
    q, k, v = layer.attn_in(hidden, cos, sin)
    with pytest.raises(RuntimeError, match="keys / values"):
        layer.attn_out_mlp(hidden, q, k, v, pk[:, :1], pv[:, :1], None, None, None)
    with pytest.raises(RuntimeError, match="mask"):
        layer.attn_out_mlp(hidden, q, k, v, pk, pv, None, None, mask[..., :2])
    with pytest.raises(RuntimeError, match="slot"):
        layer.attn_out_mlp(hidden, q, k, v, pk, pv, None, None, None, slot=pk.shape[2], attend_len=pk.shape[2] + 1)
    with pytest.raises(ValueError, match="q/k/v projections"):
        dataclasses.replace(spec, num_heads=6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [0, 4])
def test_composed_layer_matches_reference_on_cpu(dtype, bits):
    """The GPU / torch.compile composition, run through the kernels' CPU paths."""
    spec = make_spec(dtype, bits, qk_norm=True)
    check(spec, make_inputs(spec), which="composed")


@needs_triton
@pytest.mark.interpreter
def test_composed_layer_triton_kernels_match_reference():
    """The composition with every op forced onto its Triton kernel (the GPU path), small and odd shapes."""
    from hf_fastinfer.kernels import _backend

    spec = make_spec(torch.float32, 4, hidden=48, heads=3, kv_heads=1, head_dim=16, inter=40, qk_norm=True)
    inputs = make_inputs(spec, batch=2, cached=5)
    device_inputs = inputs
    with _backend.force_triton(True):
        (q, k, v), out = run("composed", spec, device_inputs)
    (rq, rk, rv), ref = run("ref", spec, inputs)
    for a, b in ((q, rq), (k, rk), (v, rv), (out, ref)):
        assert_close(a, b, torch.float32, "triton composed")


def _buffers(spec, inputs, capacity):
    """The cache's own buffers as a FastInferLayer holds them: [B, Hkv, capacity, D], the past at the front."""
    hidden, cos, sin, past_k, past_v, mask, int8_kv = inputs
    batch, heads, cached, dim = past_k.shape
    if int8_kv:
        (pk, ks), (pv, vs) = quantize_kv(past_k), quantize_kv(past_v)
        bufs = [torch.zeros(batch, heads, capacity, dim, dtype=torch.int8) for _ in range(2)]
        scales = [torch.zeros(batch, heads, capacity, dtype=torch.float16) for _ in range(2)]
        for b, s, p, ps in zip(bufs, scales, (pk, pv), (ks, vs)):
            b[:, :, :cached] = p
            s[:, :, :cached] = ps
        return bufs[0], bufs[1], scales[0], scales[1]
    bufs = [torch.zeros(batch, heads, capacity, dim, dtype=past_k.dtype) for _ in range(2)]
    bufs[0][:, :, :cached], bufs[1][:, :, :cached] = past_k, past_v
    return bufs[0], bufs[1], None, None


@needs_compiled
@pytest.mark.parametrize("int8_kv", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_layer_writes_the_cache_slot(int8_kv, dtype):
    """slot >= 0: the new token's K/V land in the cache's buffers (int8: quantized as kv_append does) and the
    output is the same as after the cache's own update."""
    spec = make_spec(dtype, 8)
    inputs = make_inputs(spec, batch=2, cached=7, int8_kv=int8_kv)
    hidden, cos, sin, past_k, *_ = inputs
    _, expected = run("ref", spec, inputs)
    mask = inputs[5]
    q, k, v = dl.attn_in(spec, hidden, cos, sin)
    keys, values, ks, vs = _buffers(spec, inputs, capacity=16)
    out = dl.attn_out_mlp(spec, hidden, q, keys, values, ks, vs, mask, new_kv=(k, v), slot=7, attend_len=8)
    assert_close(out, expected, dtype, "output")
    if int8_kv:
        qk, sk = quantize_kv(k)
        assert torch.equal(keys[:, :, 7:8], qk) and torch.equal(ks[:, :, 7:8], sk)
    else:
        assert torch.equal(keys[:, :, 7:8], k) and torch.equal(values[:, :, 7:8], v)
    assert not keys[:, :, 8:].any()  # nothing written past the slot


@needs_compiled
@pytest.mark.parametrize("bits", [0, 4])
def test_compiled_layer_runs_the_next_layers_attn_in(bits):
    """next_spec: the following layer's q, k, v computed on this layer's output in the same call."""
    spec, following = make_spec(torch.bfloat16, bits, seed=0), make_spec(torch.bfloat16, bits, seed=5, qk_norm=True)
    inputs = make_inputs(spec)
    hidden, cos, sin, past_k, past_v, mask, _ = inputs
    q, k, v = dl.attn_in(spec, hidden, cos, sin)
    keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    out, next_qkv = dl.attn_out_mlp(spec, hidden, q, keys, values, None, None, mask, next_spec=following,
                                    next_cos=cos, next_sin=sin)
    alone = dl.attn_out_mlp(spec, hidden, q, keys, values, None, None, mask)
    assert torch.equal(out, alone)
    for a, b in zip(next_qkv, dl.attn_in(following, out, cos, sin)):
        assert torch.equal(a, b)
    for a, b in zip(next_qkv, dl.attn_in_ref(following, out, cos, sin)):
        assert_close(a, b, torch.bfloat16, "next layer's q / k / v")


def test_composed_layer_slot_and_next_match_the_compiled_contract():
    """The composition takes the same shortcuts (slot write, next layer) with the same results."""
    spec, following = make_spec(torch.float32, 0), make_spec(torch.float32, 0, seed=3)
    inputs = make_inputs(spec, int8_kv=True)
    hidden, cos, sin, *_ = inputs
    mask = inputs[5]
    q, k, v = dl.attn_in_composed(spec, hidden, cos, sin)
    keys, values, ks, vs = _buffers(spec, inputs, capacity=12)
    out, next_qkv = dl.attn_out_mlp_composed(spec, hidden, q, keys, values, ks, vs, mask, new_kv=(k, v), slot=7,
                                             attend_len=8, next_spec=following, next_cos=cos, next_sin=sin)
    _, expected = run("ref", spec, inputs)
    assert_close(out, expected, torch.float32, "output")
    for a, b in zip(next_qkv, dl.attn_in_ref(following, out, cos, sin)):
        assert_close(a, b, torch.float32, "next layer's q / k / v")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [0, 8, 4])
def test_composed_layer_on_gpu_matches_reference(dtype, bits):
    """The Triton composition on a GPU against the reference (run on the GPU as well)."""
    spec = make_spec(dtype, bits, qk_norm=True)
    cuda = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    spec = dataclasses.replace(
        spec, input_norm=cuda(spec.input_norm), post_attention_norm=cuda(spec.post_attention_norm),
        q_norm=cuda(spec.q_norm), k_norm=cuda(spec.k_norm),
        qkv=[dataclasses.replace(p, weight=cuda(p.weight), scales=cuda(p.scales), zeros=cuda(p.zeros)) for p in spec.qkv],
        o=dataclasses.replace(spec.o, weight=cuda(spec.o.weight), scales=cuda(spec.o.scales), zeros=cuda(spec.o.zeros)),
        gate_up=[dataclasses.replace(p, weight=cuda(p.weight), scales=cuda(p.scales), zeros=cuda(p.zeros))
                 for p in spec.gate_up],
        down=dataclasses.replace(spec.down, weight=cuda(spec.down.weight), scales=cuda(spec.down.scales),
                                 zeros=cuda(spec.down.zeros)))
    inputs = tuple(cuda(t) for t in make_inputs(spec))
    (q, k, v), out = run("compiled", spec, inputs)  # on CUDA tensors: the composition of Triton kernels
    (rq, rk, rv), ref = run("ref", spec, inputs)
    tolerance = 2.0**-6 if dtype == torch.bfloat16 else 1e-4  # fp32 through tensor-core-free Triton dots
    for a, b in ((q, rq), (k, rk), (v, rv), (out, ref)):
        err = (a.float() - b.float()).abs().max() / b.float().abs().max()
        assert err <= tolerance, err


@needs_compiled
def test_decode_chain_keeps_its_buffers_but_never_writes_into_what_it_returned():
    """The compiled chain keeps its layers' buffers between calls; a later call (here a longer chain, in which
    the slot that returned the next layer's q, k, v before is now inside the chain) leaves every tensor an
    earlier call returned as it was, and gives what a first call would."""
    specs = [make_spec(torch.bfloat16, 4, seed=s) for s in range(4)]
    inputs = make_inputs(specs[0], batch=1, cached=6)
    hidden, cos, sin, *_ = inputs

    def caches(count):
        return [dl.CacheSlot(*_buffers(s, make_inputs(s, batch=1, cached=6, seed=9), 12), 6, 7) for s in specs[:count]]

    q, k, v = dl.attn_in(specs[0], hidden, cos, sin)
    outs2, next2, _ = dl.decode_chain(specs[:2], hidden, q, k, v, caches(2), None, cos, sin, specs[2])
    kept = [t.clone() for t in (*outs2, *next2)]
    first = dl.decode_chain(specs[:3], hidden * 2, q, k, v, caches(3), None, cos, sin, specs[3])
    for a, b in zip((*outs2, *next2), kept):
        assert torch.equal(a, b)
    again = dl.decode_chain(specs[:3], hidden * 2, q, k, v, caches(3), None, cos, sin, specs[3])
    for a, b in zip((*first[0], *first[1]), (*again[0], *again[1])):
        assert torch.equal(a, b)


@needs_compiled
@pytest.mark.parametrize("int8_kv", [False, True])
@pytest.mark.parametrize("dtype,bits", [(torch.float32, 0), (torch.bfloat16, 4)])
def test_decode_chain_matches_layer_by_layer(int8_kv, dtype, bits):
    """Three layers in one compiled call (and a fourth's q, k, v at the end) equal the layers run one by one,
    bit for bit, and the reference within the tolerance; each layer's K/V land in its own cache's slot."""
    specs = [make_spec(dtype, bits, seed=s, qk_norm=s == 1) for s in range(4)]
    inputs = make_inputs(specs[0], batch=2, cached=6, int8_kv=int8_kv)
    hidden, cos, sin, *_ = inputs
    mask = inputs[5]
    q, k, v = dl.attn_in(specs[0], hidden, cos, sin)

    def caches():
        return [dl.CacheSlot(*_buffers(s, make_inputs(s, batch=2, cached=6, int8_kv=int8_kv, seed=9), 12), 6, 7)
                for s in specs[:3]]

    chained, chained_caches = caches(), None
    outs, next_qkv, _ = dl.decode_chain(specs[:3], hidden, q, k, v, chained, mask, cos, sin, specs[3])
    one_by_one = caches()
    x, qkv = hidden, (q, k, v)
    for j in range(3):
        c = one_by_one[j]
        x, qkv = dl.attn_out_mlp(specs[j], x, qkv[0], c.keys, c.values, c.k_scale, c.v_scale, mask, new_kv=qkv[1:],
                                 slot=6, attend_len=7, next_spec=specs[j + 1], next_cos=cos, next_sin=sin)
        assert torch.equal(outs[j], x)
        assert torch.equal(chained[j].keys, c.keys) and torch.equal(chained[j].values, c.values)
    for a, b in zip(next_qkv, qkv):
        assert torch.equal(a, b)
    reference = caches()
    x = hidden
    qkv = dl.attn_in_ref(specs[0], hidden, cos, sin)
    for j in range(3):
        c = reference[j]
        x, qkv = dl.attn_out_mlp_ref(specs[j], x, qkv[0], c.keys, c.values, c.k_scale, c.v_scale, mask,
                                     new_kv=qkv[1:], slot=6, attend_len=7, next_spec=specs[j + 1], next_cos=cos,
                                     next_sin=sin)
        assert_close(outs[j], x, dtype, f"layer {j}")


@needs_compiled
@pytest.mark.parametrize("dtype,bits,gemma", [(torch.float32, 0, False), (torch.bfloat16, 0, True),
                                              (torch.bfloat16, 4, False), (torch.bfloat16, 8, False)])
def test_decode_chain_head_equals_the_norm_and_projection_ops(dtype, bits, gemma):
    """A chain ending at the model's last layer runs the final norm and output projection in its region: the
    logits equal the standalone ops on the last output bit for bit (the ops the model's own modules run), with a
    vocabulary that is not a multiple of 4 (the rows left over from each thread's blocks of four)."""
    specs = [make_spec(dtype, bits, seed=s, group_size=32, gemma=gemma) for s in range(2)]
    inputs = make_inputs(specs[0], batch=2, cached=6)
    hidden, cos, sin, *_ = inputs
    mask = inputs[5]
    gen = torch.Generator().manual_seed(5)
    proj = _projection(gen, 1001, specs[0].hidden_size, dtype, bits, False, 32)
    norm_weight = (torch.randn(specs[0].hidden_size, generator=gen) * 0.2 + (0.0 if gemma else 1.0)).to(dtype)
    head = dl.DecodeHeadSpec(norm_weight, 1e-5, gemma, proj, dtype)
    q, k, v = dl.attn_in(specs[0], hidden, cos, sin)

    def caches():
        return [dl.CacheSlot(*_buffers(s, make_inputs(s, batch=2, cached=6, seed=9), 12), 6, 7) for s in specs]

    outs, next_qkv, logits = dl.decode_chain(specs, hidden, q, k, v, caches(), mask, cos, sin, head=head)
    plain, _, none = dl.decode_chain(specs, hidden, q, k, v, caches(), mask, cos, sin)
    assert next_qkv is None and none is None
    for a, b in zip(outs, plain):  # the head changes nothing before it
        assert torch.equal(a, b)
    normed = rms_norm(outs[-1], norm_weight, None, 1e-5, gemma)[0]
    expected = proj(normed).reshape(2, 1001)
    assert logits.shape == (2, 1001) and logits.dtype == dtype
    assert torch.equal(logits, expected)
    with pytest.raises(ValueError, match="no next layer"):
        dl.decode_chain(specs[:1], hidden, q, k, v, caches()[:1], mask, cos, sin, specs[1], head=head)


@needs_compiled
@pytest.mark.parametrize("int8_kv", [False, True])
@pytest.mark.parametrize("dtype,bits,head,mask", [(torch.float32, 0, True, "bool"), (torch.bfloat16, 4, True, "float"),
                                                  (torch.bfloat16, 8, False, None), (torch.float16, 0, True, "bool")])
def test_prepared_chain_equals_attn_in_then_decode_chain(int8_kv, dtype, bits, head, mask):
    """A prepared chain (the first layer's q / k / v inside the region, the layers and buffers converted once)
    gives the last output, the logits and every cache write of attn_in then decode_chain, bit for bit, token after
    token (the kept intermediate buffers reused, a tensor returned earlier never written into), and tells when a
    cache's buffers are no longer the ones it holds."""
    specs = [make_spec(dtype, bits, seed=s, qk_norm=s == 1, group_size=32) for s in range(3)]
    gen = torch.Generator().manual_seed(5)
    head_spec = None
    if head:
        proj = _projection(gen, 203, specs[0].hidden_size, dtype, bits, False, 32)
        head_spec = dl.DecodeHeadSpec((torch.randn(specs[0].hidden_size, generator=gen) * 0.2 + 1).to(dtype), 1e-5,
                                      False, proj, dtype)

    def buffers():
        return [_buffers(s, make_inputs(s, batch=2, cached=6, int8_kv=int8_kv, seed=9), 12) for s in specs]

    planned, plain = buffers(), buffers()
    plan = dl.PreparedChain.build(specs, planned, head_spec)
    assert plan is not None and plan.holds(1, *planned[1]) and not plan.holds(1, *plain[1])
    tokens = [make_inputs(specs[0], batch=2, cached=6 + t, int8_kv=int8_kv, mask=mask, seed=20 + t) for t in range(3)]
    # three tokens through the plan, one after the other (nothing in between touches its kept buffers) ...
    returned = []
    for token, inputs in enumerate(tokens):
        hidden, cos, sin, *_ = inputs
        out, logits = plan(hidden, cos, sin, inputs[5], 6 + token, 7 + token)
        returned.append((out, out.clone(), logits))
    for tensor, copy, _ in returned:  # each token's output is a tensor of its own, never written again
        assert torch.equal(tensor, copy)
    assert len({t.data_ptr() for t, _, _ in returned}) == len(returned)
    # ... then through attn_in and decode_chain
    for token, inputs in enumerate(tokens):
        hidden, cos, sin, *_ = inputs
        q, k, v = dl.attn_in(specs[0], hidden, cos, sin)
        slots = [dl.CacheSlot(*b, 6 + token, 7 + token) for b in plain]
        outs, _, expected_logits = dl.decode_chain(specs, hidden, q, k, v, slots, inputs[5], cos, sin, head=head_spec)
        out, _, logits = returned[token]
        assert torch.equal(out, outs[-1])
        assert (logits is None and expected_logits is None) if not head else torch.equal(logits, expected_logits)
    for a, b in zip(planned, plain):  # every layer's K/V written where the chain writes them
        for x, y in zip(a, b):
            assert (x is None and y is None) or torch.equal(x, y)


@needs_compiled
def test_prepared_chain_rejects_what_it_does_not_cover():
    """No plan for a layer whose MLP is the model's module; a wrong slot or dtype is refused, not run."""
    specs = [make_spec(torch.float32, 0, seed=s) for s in range(2)]
    bufs = [_buffers(s, make_inputs(s, batch=1, cached=4, seed=9), 8) for s in specs]
    assert dl.PreparedChain.build([make_spec(torch.float32, 0, mlp=False), specs[1]], bufs) is None
    plan = dl.PreparedChain.build(specs, bufs)
    hidden, cos, sin, *_ = make_inputs(specs[0], batch=1, cached=4)
    with pytest.raises(RuntimeError, match="slot"):
        plan(hidden, cos, sin, None, 8, 9)
    with pytest.raises(RuntimeError, match="dtype"):
        plan(hidden.double(), cos, sin, None, 4, 5)


@needs_compiled
def test_phase_counters_are_compiled_out_of_the_normal_build():
    # benchmarks/profile_decode.py builds them into a second extension; the one every user loads has no counter
    # in its loops, and a process that already uses it cannot switch (both register the same classes)
    from hf_fastinfer.kernels import _cpu_ext

    assert not hasattr(cpu_extension(), "phase_cycles")
    with pytest.raises(RuntimeError, match="already loaded"):
        _cpu_ext.use_phase_profiling_build()
