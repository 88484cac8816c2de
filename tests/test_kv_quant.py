"""KV-cache quantize-and-append: the reference against a float64 formula, the CPU path and the Triton kernel
(interpreter here) bit for bit against the reference, properties on poisoned caches, compile, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_fastinfer.kernels import _backend
from hf_fastinfer.kernels.kv_quant import kv_append, kv_append_cpu, kv_append_ref, kv_append_triton

from _helpers import needs_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
POISON_Q, POISON_SCALE = 99, 7.0  # a value no quantized K/V element or scale here takes


def _case(b, h, s, d, length, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(b, h, s, d, generator=g) * 2).to(dtype)
    v = (torch.randn(b, h, s, d, generator=g) * 0.1).to(dtype)
    slots = torch.stack([torch.randperm(length, generator=g)[:s] for _ in range(b)])  # distinct per row
    return k, v, slots


def _caches(b, h, length, d):
    cache = torch.full((b, h, length, d), POISON_Q, dtype=torch.int8)
    scale = torch.full((b, h, length), POISON_SCALE, dtype=torch.float16)
    return cache, cache.clone(), scale, scale.clone()


def test_reference_against_float64_formula():
    k, v, slots = _case(2, 3, 4, 24, 9, torch.float32, seed=0)
    k[1, 2, 0] = 0  # an all-zero row: scale floored at 2^-24, q = 0
    caches = _caches(2, 3, 9, 24)
    kv_append_ref(k, v, *caches, slots)
    for x, cache, scale in ((k, caches[0], caches[2]), (v, caches[1], caches[3])):
        for b in range(2):
            for t in range(4):
                slot = int(slots[b, t])
                row = x[b, :, t].double()  # [H, D]
                s64 = torch.clamp((row.abs().amax(-1) / 127).half().double(), min=2.0 ** -24)
                assert torch.equal(scale[b, :, slot].double(), s64)
                assert torch.equal(cache[b, :, slot].double(), torch.round(row / s64[:, None]).clamp(-127, 127))
    written = torch.zeros(2, 9, dtype=torch.bool)
    written[torch.arange(2)[:, None], slots] = True
    assert (caches[0].permute(0, 2, 1, 3)[~written] == POISON_Q).all()  # other slots untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["cpu", "triton"])
def test_paths_equal_the_reference_bit_for_bit(dtype, path):
    if path == "triton" and not (_backend.triton_available() and (torch.cuda.is_available() or _backend.interpreter_enabled())):
        pytest.skip("needs Triton, on a GPU or under TRITON_INTERPRET=1")
    k, v, slots = _case(3, 4, 5, 40, 12, dtype, seed=1)
    expected, got = _caches(3, 4, 12, 40), _caches(3, 4, 12, 40)
    kv_append_ref(k, v, *expected, slots)
    (kv_append_cpu if path == "cpu" else kv_append_triton)(k, v, *got, slots)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


def test_ties_round_to_even_like_torch():
    # x / scale landing exactly on .5: absmax 127 gives scale 1, so 2.5 -> 2 and -3.5 -> -4
    k = torch.tensor([[[[127.0, 2.5, -3.5, 0.5]]]])
    caches = _caches(1, 1, 2, 4)
    kv_append(k, k.clone(), *caches, torch.tensor([[1]]))
    assert caches[0][0, 0, 1].tolist() == [127, 2, -4, 0]


cases = st.tuples(
    st.integers(1, 3), st.integers(1, 5), st.integers(1, 6), st.integers(1, 70), st.integers(0, 8),  # B, H, S, D, spare slots
    st.sampled_from(DTYPES), st.integers(0, 2 ** 16),
)


def _check_property(run, params):
    b, h, s, d, spare, dtype, seed = params
    length = s + spare
    k, v, slots = _case(b, h, s, d, length, dtype, seed)
    expected, got = _caches(b, h, length, d), _caches(b, h, length, d)
    kv_append_ref(k, v, *expected, slots)
    run(k, v, *got, slots)  # caches poisoned: a slot written wrongly, or a stray write, shows
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    assert not got[2].isnan().any()


@settings(max_examples=100, deadline=None)
@given(cases)
def test_property_cpu_path(params):
    _check_property(kv_append_cpu, params)


@pytest.mark.interpreter
@needs_triton
@settings(max_examples=100, deadline=None)
@given(cases)
def test_property_triton(params):
    _check_property(kv_append_triton, params)


def test_compiles_fullgraph_on_cpu():
    k, v, slots = _case(2, 2, 3, 16, 6, torch.float32, seed=2)
    expected, got = _caches(2, 2, 6, 16), _caches(2, 2, 6, 16)
    kv_append_ref(k, v, *expected, slots)
    torch._dynamo.reset()

    def step(k, v, kc, vc, ks, vs):
        kv_append(k * 1, v * 1, kc, vc, ks, vs, slots)
        return ks.float().sum()

    torch.compile(step, fullgraph=True)(k, v, *got)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


def _bad(change):
    k, v, slots = _case(1, 2, 3, 8, 5, torch.float32, seed=3)
    args = dict(zip(("k_cache", "v_cache", "k_scale", "v_scale"), _caches(1, 2, 5, 8)), k=k, v=v, slots=slots)
    args.update(change(args))
    return args


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: {"k": a["k"].to(torch.int32)}, TypeError, "k must be float32"),
        (lambda a: {"v": a["v"][..., :4]}, ValueError, "one shape"),
        (lambda a: {"k_cache": a["k_cache"].float()}, ValueError, "k_cache must be int8"),
        (lambda a: {"v_scale": a["v_scale"].float()}, ValueError, "v_scale must be float16"),
        (lambda a: {"slots": a["slots"] + 5}, ValueError, "slots must lie in"),
        (lambda a: {"slots": a["slots"][:, :2]}, ValueError, "slots must be int32/int64"),
        (lambda a: {"k": a["k"].transpose(-1, -2).contiguous().transpose(-1, -2)}, ValueError, "contiguous along the head dim"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(change, error, message):
    args = _bad(change)
    before = [t.clone() for t in (args["k_cache"], args["v_cache"], args["k_scale"], args["v_scale"])]
    with pytest.raises(error, match=message):
        kv_append(args["k"], args["v"], args["k_cache"], args["v_cache"], args["k_scale"], args["v_scale"], args["slots"])
    for b, t in zip(before, (args["k_cache"], args["v_cache"], args["k_scale"], args["v_scale"])):
        assert torch.equal(b, t)
