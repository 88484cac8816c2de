"""Group-wise weight quantization formats and the W8A16 / W4A16 matmul: reference against float64, Triton
kernel (interpreter here) and CPU path against the reference, property tests, compile, input checks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_fastinfer.kernels.quant_format import (
    dequantize_weight,
    num_groups,
    pack_int4,
    quantize_weight,
    unpack_int4,
)
from hf_fastinfer.kernels.quant_matmul import quant_matmul, quant_matmul_cpu, quant_matmul_ref, quant_matmul_triton

from _helpers import kernel_cpu_flags, needs_triton


# Output tolerances per activation dtype, relative to the output's magnitude: fp32 sums of K <= 1536 products
# stay within ~1e-5 relative; bf16 / fp16 outputs are rounded to 8 / 11 mantissa bits (plus, on the
# dequantize-then-matmul paths, the weight itself rounded to that dtype).
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _close(got, expected, dtype, scale=None):
    # scale: the output's magnitude, or given (e.g. max of |x| @ |w|^T, what a weight rounded to the activations'
    # dtype can move a sum by when its terms cancel)
    scale = expected.double().abs().max().clamp_min(1.0) if scale is None else scale
    err = (got.double() - expected.double()).abs().max()
    assert err <= TOL[dtype] * scale, (err.item(), float(scale))


def _qweight(n, k, bits, group_size, symmetric, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return w, quantize_weight(w, bits, group_size, symmetric)


# -- formats ---------------------------------------------------------------------------------------------

@given(st.integers(1, 9), st.integers(1, 41), st.integers(0, 2 ** 16))
@settings(max_examples=60, deadline=None)
def test_int4_pack_unpack_round_trip_is_exact(n, k, seed):
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (n, -(-k // 2))
    assert torch.equal(unpack_int4(packed, k), q)


def test_pack_layout_low_nibble_first():
    q = torch.tensor([[-8, 7, 0]], dtype=torch.int8)
    assert pack_int4(q).tolist() == [[0 | (15 << 4), 8 | (8 << 4)]]  # odd K padded with q = 0


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k, group_size", [(576, 128), (1536, 128), (100, 32), (57, 16), (40, 64)])
def test_quantization_error_is_within_half_a_step(bits, symmetric, k, group_size):
    w, qw = _qweight(24, k, bits, group_size, symmetric)
    assert qw.scales.shape == (24, num_groups(k, group_size))
    assert (qw.zeros is None) == symmetric
    q = qw.int_values()
    assert q.shape == (24, k) and q.dtype == torch.int8
    lo = (-127 if bits == 8 else -7) if symmetric else (-128 if bits == 8 else -8)
    assert q.min() >= lo and q.max() <= (127 if bits == 8 else 7)
    step = qw.scales.repeat_interleave(group_size, dim=1)[:, :k]
    error = (dequantize_weight(qw) - w).abs()
    assert (error <= step * 0.5 * (1 + 1e-5) + 1e-7).all()


def test_dequantize_against_float64_formula():
    w, qw = _qweight(5, 37, 4, 8, symmetric=False)
    q = unpack_int4(qw.qweight, 37).double()
    g = torch.arange(37) // 8
    expected = (q - qw.zeros.double()[:, g]) * qw.scales.double()[:, g]
    torch.testing.assert_close(dequantize_weight(qw, torch.float64), expected, rtol=1e-7, atol=1e-7)


def test_weight_bytes():
    _, q8 = _qweight(64, 576, 8, 128, True)
    _, q4 = _qweight(64, 576, 4, 32, True)
    fp32 = 64 * 576 * 4
    assert q8.nbytes() / fp32 <= 0.27 and q4.nbytes() / fp32 <= 0.16


# -- matmul ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_reference_against_float64(bits, symmetric):
    _, qw = _qweight(33, 100, bits, 32, symmetric)
    x = torch.randn(3, 100, dtype=torch.float64).float()
    bias = torch.randn(33)
    got = quant_matmul_ref(x, qw.qweight, qw.scales, qw.zeros, bias, bits, 32, 100)
    expected = x.double() @ dequantize_weight(qw, torch.float64).T + bias.double()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
def test_cpu_path_matches_reference(dtype, bits):
    _, qw = _qweight(70, 130, bits, 48, symmetric=False)
    x = torch.randn(2, 5, 130).to(dtype)
    bias = torch.randn(70)
    got = quant_matmul_cpu(x, qw.qweight, qw.scales, qw.zeros, bias, bits, 48, 130)
    assert got.shape == (2, 5, 70) and got.dtype == dtype
    _close(got, quant_matmul_ref(x, qw.qweight, qw.scales, qw.zeros, bias, bits, 48, 130), dtype)


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize(
    "m, n, k, group_size, bits, symmetric, dtype, with_bias",
    [
        (1, 40, 57, 16, 8, True, torch.float32, True),      # decode, K not a multiple of anything
        (3, 33, 100, 32, 4, True, torch.bfloat16, False),   # odd N, odd packed K
        (20, 70, 130, 48, 4, False, torch.float16, True),   # asymmetric int4, G does not divide K
        (17, 64, 96, 128, 8, False, torch.float32, False),  # group larger than K
        (2, 24, 576, 128, 8, True, torch.bfloat16, True),   # the default model's in_features
    ],
)
def test_triton_kernel_matches_reference(m, n, k, group_size, bits, symmetric, dtype, with_bias):
    _, qw = _qweight(n, k, bits, group_size, symmetric)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n) if with_bias else None
    got = quant_matmul_triton(x, qw.qweight, qw.scales, qw.zeros, bias, bits, group_size, k)
    _close(got, quant_matmul_ref(x, qw.qweight, qw.scales, qw.zeros, bias, bits, group_size, k), dtype)


problems = st.tuples(
    st.integers(1, 20),                    # rows of x
    st.integers(1, 80),                    # out features
    st.integers(1, 200),                   # in features
    # group size: any value, dividing K or not, and often the sizes with dedicated kernels
    st.one_of(st.integers(1, 160), st.sampled_from([32, 64, 128, 256])),
    st.sampled_from([8, 4]),
    st.booleans(),                         # symmetric
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    st.booleans(),                         # bias
    st.integers(0, 2 ** 16),
)


def _problem(params):
    m, n, k, group_size, bits, symmetric, dtype, with_bias, seed = params
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    qw = quantize_weight(w, bits, group_size, symmetric)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g) if with_bias else None
    return x, qw, bias, dtype


@settings(max_examples=100, deadline=None)
@given(problems)
def test_property_cpu_path(params):
    x, qw, bias, dtype = _problem(params)
    args = (qw.qweight, qw.scales, qw.zeros, bias, qw.bits, qw.group_size, qw.in_features)
    got = quant_matmul(x, *args[:4], bits=qw.bits, group_size=qw.group_size, in_features=qw.in_features)
    assert not got.isnan().any()
    # (int4 with an odd group size takes the portable path, F.linear on the weight in x's dtype: a bf16 weight's
    # rounding scales with |x| @ |w|^T, not with the output, which cancellation can make small)
    scale = (x.double().abs() @ dequantize_weight(qw, torch.float64).abs().T).max().clamp_min(1.0)
    _close(got, quant_matmul_ref(x, *args), dtype, scale)


@pytest.mark.interpreter
@needs_triton
@settings(max_examples=100, deadline=None)
@given(problems)
def test_property_triton(params):
    x, qw, bias, dtype = _problem(params)
    args = (qw.qweight, qw.scales, qw.zeros, bias, qw.bits, qw.group_size, qw.in_features)
    got = quant_matmul_triton(x, *args)  # written into torch.empty: unwritten elements would show as garbage
    assert not got.isnan().any()
    _close(got, quant_matmul_ref(x, *args), dtype)


@pytest.mark.parametrize("bits", [8, 4])
def test_compiles_fullgraph_on_cpu(bits):
    _, qw = _qweight(48, 96, bits, 32, symmetric=False)
    x = torch.randn(3, 96)

    def layer(x):
        return torch.relu(quant_matmul(x, qw.qweight, qw.scales, qw.zeros, None, bits=bits, group_size=32, in_features=96))

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=1e-5, atol=1e-5)


def _good():
    _, qw = _qweight(16, 40, 4, 16, symmetric=False)
    return dict(x=torch.randn(2, 40), qweight=qw.qweight, scales=qw.scales, zeros=qw.zeros, bias=None,
                bits=4, group_size=16, in_features=40)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(group_size=0), ValueError, "group_size must be a positive integer"),
        (dict(bits=3), ValueError, "bits must be 8 or 4"),
        (dict(x=torch.randn(2, 40).to(torch.int32)), TypeError, "x must be float32"),
        (dict(x=torch.randn(2, 41)), ValueError, "x has 41 features"),
        (dict(qweight=torch.zeros(16, 40, dtype=torch.int8)), ValueError, "qweight for bits=4 must be torch.uint8"),
        (dict(scales=torch.ones(16, 2)), ValueError, "scales must be float \\[N=16, groups=3\\]"),
        (dict(zeros=torch.ones(16, 3, dtype=torch.int32)), ValueError, "zeros must be float"),
        (dict(bias=torch.ones(15)), ValueError, "bias must be \\[N=16\\]"),
    ],
)
def test_bad_input_is_refused_before_any_kernel(change, error, message):
    args = {**_good(), **change}
    x = args.pop("x")
    with pytest.raises(error, match=message):
        quant_matmul(x, args.pop("qweight"), args.pop("scales"), args.pop("zeros"), args.pop("bias"), **args)


def test_quantize_weight_bad_input():
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        quantize_weight(torch.randn(4, 8), 8, 0)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize_weight(torch.randn(4, 8), 3, 8)
    with pytest.raises(TypeError, match="2-D float tensor"):
        quantize_weight(torch.randn(4, 8, 2), 8, 8)


def test_portable_path_without_the_compiled_kernel():
    # HF_FASTINFER_NO_CPU_EXT=1 stands for a machine without a compiler: same results, from the fallback.
    code = (
        "import torch\n"
        "from hf_fastinfer.kernels.quant_format import quantize_weight\n"
        "from hf_fastinfer.kernels.quant_matmul import quant_matmul, quant_matmul_ref\n"
        "from hf_fastinfer.kernels._cpu_ext import cpu_extension\n"
        "assert cpu_extension() is None\n"
        "qw = quantize_weight(torch.randn(40, 70), 4, 16, False)\n"
        "x = torch.randn(1, 70)\n"
        "y = quant_matmul(x, qw.qweight, qw.scales, qw.zeros, bits=4, group_size=16, in_features=70)\n"
        "r = quant_matmul_ref(x, qw.qweight, qw.scales, qw.zeros, None, 4, 16, 70)\n"
        "torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_FASTINFER_NO_CPU_EXT": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def _ext_or_skip():
    from hf_fastinfer.kernels._cpu_ext import cpu_extension

    ext = cpu_extension()
    if ext is None:
        pytest.skip("reason: no C++ toolchain here, so the compiled CPU kernel cannot be built")
    return ext


def test_compiled_kernel_is_used_for_decode_rows():
    ext = _ext_or_skip()
    _, qw = _qweight(64, 576, 8, 128, symmetric=True)
    x = torch.randn(1, 576)
    direct = ext.quant_gemv(x, qw.qweight, qw.scales, None, None, 8, 128, 576, False)
    torch.testing.assert_close(quant_matmul(x, qw.qweight, qw.scales, bits=8, group_size=128, in_features=576),
                               direct, rtol=0, atol=0)


def _int16_bound(x: torch.Tensor, wd: torch.Tensor, group_size: int) -> torch.Tensor:
    """[m, n] the most a GEMV against x held as int16 per group may differ from x @ wd.T (wd: the dequantized weight
    in float64): half an int16 step, max|x_g| / 65534, per element against |w|, and float32 summation slack."""
    m, k = x.shape
    gmax = torch.zeros(m, k, dtype=torch.float64)
    for g0 in range(0, k, group_size):
        gmax[:, g0:g0 + group_size] = x[:, g0:g0 + group_size].double().abs().amax(-1, keepdim=True)
    return (gmax / 65534) @ wd.abs().T + 1e-6 * (x.double().abs() @ wd.abs().T)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 64), (4, 128), (4, 256), (8, 32), (8, 64), (8, 96),
                                             (8, 128), (8, 256)])
@pytest.mark.parametrize("n, k", [(37, 63), (8, 576), (13, 577), (6, 1536)])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int16_activations_within_their_error_bound(bits, group_size, n, k, m, symmetric):
    # The int4 / int8 x bf16 paths hold x as int16 per group (scale max|x_g| / 32767), so each element is off by
    # at most max|x_g| / 65534: the output may differ from the exact product by at most
    # sum_k |w[n, k]| * max|x_g(k)| / 65534 (plus float32 summation slack), and by no more. (int8 with group 96
    # runs the kernel's run-time group loop; k 63 and 577 end inside a 32-column chunk.)
    ext = _ext_or_skip()
    g = torch.Generator().manual_seed(group_size * 1000 + k + m)
    w = torch.randn(n, k, generator=g)
    # asymmetric with float32 scales and zero points; symmetric with the float16 scales MoQ stores (group 32 with
    # k a multiple of 64 takes the 64-byte block kernel: k 576 ends in a 32-byte block, 1536 does not)
    qw = quantize_weight(w, bits, group_size, symmetric=symmetric, scale_dtype=torch.float16 if symmetric else torch.float32)
    x = torch.randn(m, k, generator=g).bfloat16().float()
    x[0, min(5, k - 1)] = 40.0                       # an outlier channel
    x[-1, :min(group_size, k)] = 0.0                 # an all-zero group
    got = ext.quant_gemv(x, qw.qweight, qw.scales, qw.zeros, None, bits, group_size, k, True).double()
    wd = dequantize_weight(qw, torch.float64)        # [n, k]
    exact = x.double() @ wd.T
    bound = _int16_bound(x, wd, group_size)
    assert ((got - exact).abs() <= bound).all(), ((got - exact).abs() / bound).max().item()


@pytest.mark.parametrize("n, k", [(8, 576), (13, 608), (6, 1536), (5, 32)])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int8_group_pairs_match_the_one_group_road(n, k, m, symmetric):
    # int8 group 32 against int16 x takes two groups per product vector (bytes made unsigned, the offset taken
    # out in the integers): the same integer sums as one group per vector, so the two roads differ only in the
    # order of the float additions. k 608 and 32 end in a block of one group; 1536 and 576 do not.
    ext = _ext_or_skip()
    g = torch.Generator().manual_seed(k + 7 * m + n)
    w = torch.randn(n, k, generator=g)
    qw = quantize_weight(w, 8, 32, symmetric=symmetric, scale_dtype=torch.float16 if symmetric else torch.float32)
    qw.qweight[0, :32] = 127                          # the ends of the int8 range, where q + 128 reaches 0 and 255
    qw.qweight[-1, -32:] = -128
    x = torch.randn(m, k, generator=g).bfloat16().float()
    x[0, min(5, k - 1)] = 40.0                        # an outlier channel
    _same_sums_either_road(ext, "int8_group_pairs", x, qw, 8)


def _same_sums_either_road(ext, switch: str, x: torch.Tensor, qw, bits: int) -> None:
    """A group-32 GEMV against int16 x with the extension's road ``switch`` on (the default) and off: both within
    float32 summation slack of each other (the same integer sums, added in another order: compared in float64
    against the magnitude of the terms), and the default within the int16 error bound of the exact product."""
    k = x.shape[1]
    args = (qw.qweight, qw.scales, qw.zeros, None, bits, 32, k, True)
    assert getattr(ext, switch)()
    on = ext.quant_gemv(x, *args)
    try:
        getattr(ext, "set_" + switch)(False)
        assert not getattr(ext, switch)()
        off = ext.quant_gemv(x, *args)
    finally:
        getattr(ext, "set_" + switch)(True)
    wd = dequantize_weight(qw, torch.float64)         # [n, k]
    scale = x.double().abs() @ wd.abs().T
    assert ((on.double() - off.double()).abs() <= 1e-6 * scale + 1e-30).all()
    assert ((on.double() - x.double() @ wd.T).abs() <= _int16_bound(x, wd, 32)).all()


@pytest.mark.parametrize("n, k", [(8, 576), (13, 576), (6, 1536), (5, 64), (9, 128)])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_byte_products_match_the_int16_products(n, k, m, symmetric):
    # int4 group 32 against int16 x on AVX-512 VNNI: the nibbles times x's low and high bytes (vpdpbusd) give each
    # group the integer sum of the nibbles times x's int16 values (vpdpwssd), spread over the group's four int32
    # lanes by other columns, so the two roads differ only in the order of the float additions. k 576 and 64 end
    # in a half block (32 bytes a row) and read each row as two halves; 1536 and 128 do not; 13 and 9 rows leave
    # tail rows to the single-row loop.
    flags = kernel_cpu_flags()
    if not ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags):
        pytest.skip("byte products are a road of the AVX-512 VNNI build only (this build has none)")
    ext = _ext_or_skip()
    g = torch.Generator().manual_seed(k + 7 * m + n)
    w = torch.randn(n, k, generator=g)
    qw = quantize_weight(w, 4, 32, symmetric=symmetric, scale_dtype=torch.float16 if symmetric else torch.float32)
    qw.qweight[0, :16] = 0xFF                         # the nibbles' ends: 15 and 0
    qw.qweight[-1, -16:] = 0x00
    x = torch.randn(m, k, generator=g).bfloat16().float()
    x[0, :32] = torch.linspace(-1.0, 1.0, 32)         # a group at +-32767 as int16: the high byte's ends
    x[-1, 32:64] = -x[-1, 32:64].abs()                # a group of negative values only
    x[-1, -1] = 50.0                                  # an outlier channel
    _same_sums_either_road(ext, "int4_byte_products", x, qw, 4)


def _int16_road(bits: int) -> bool:
    """Whether the compiled GEMVs hold bf16 activations as int16 for weights of ``bits``: the AVX-512 build with
    VNNI and the AVX2 + FMA build, for int8 and int4 (an AVX-512 build without VNNI multiplies as float). The
    extension is built for this CPU, or for $HF_FASTINFER_CPU_ARCH's target."""
    flags = kernel_cpu_flags()
    if all(f in flags for f in ("avx512f", "avx512bw", "avx512vl")):
        return "avx512_vnni" in flags
    return "avx2" in flags and "fma" in flags


@pytest.mark.parametrize("bits", [4, 8])
def test_bf16_activations_take_the_int16_path_and_fp32_the_float_path(bits):
    ext = _ext_or_skip()
    _, qw = _qweight(24, 576, bits, 32, symmetric=False)
    x = torch.randn(2, 576).bfloat16()
    args = (qw.qweight, qw.scales, qw.zeros, None, bits, 32, 576)
    direct16 = ext.quant_gemv(x.float(), *args, True)
    assert torch.equal(quant_matmul_cpu(x, *args), direct16.bfloat16())
    direct32 = ext.quant_gemv(x.float(), *args, False)
    assert torch.equal(quant_matmul_cpu(x.float(), *args), direct32)
    if _int16_road(bits):
        assert not torch.equal(direct16, direct32)  # two roads: x's int16 rounding shows in the low bits
    else:  # one road (int4 without AVX-512 VNNI, or neither VNNI nor AVX2): bf16 x is multiplied as float either way
        assert torch.equal(direct16, direct32)
    # each int16 road can be turned off (benchmarks' A/B): then bf16 x is multiplied as float
    get, set_ = ((ext.int8_int16_activations, ext.set_int8_int16_activations) if bits == 8 else
                 (ext.int4_int16_activations, ext.set_int4_int16_activations))
    assert get()
    try:
        set_(False)
        assert torch.equal(ext.quant_gemv(x.float(), *args, True), direct32)
    finally:
        set_(True)
    # x with inf / NaN: the float path (which propagates them), not int16 garbage
    x_bad = x.float().clone()
    x_bad[0, 3] = float("inf")
    x_bad[1, 7] = float("nan")
    assert torch.equal(ext.quant_gemv(x_bad, *args, True).isnan(), ext.quant_gemv(x_bad, *args, False).isnan())


@pytest.mark.parametrize("bits, k", [(4, 576), (8, 576), (8, 577)])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("column", [0, 17, -1])
def test_one_non_finite_value_takes_the_float_path(bits, k, value, column):
    # The int16 roads look for inf / NaN while they find each group's max|x|: a single one anywhere (the first
    # column, inside a group, the last column, which for k 577 lies in a group's short last chunk) must send
    # bf16 x down the float path, whose output is then the fp32 call's exactly. The other row stays finite.
    ext = _ext_or_skip()
    _, qw = _qweight(13, k, bits, 32, symmetric=False)
    x = torch.randn(2, k).bfloat16().float()
    x[1, column] = value
    args = (qw.qweight, qw.scales, qw.zeros, None, bits, 32, k)
    got, want = ext.quant_gemv(x, *args, True), ext.quant_gemv(x, *args, False)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[0], want[0])  # (13 rows: the block kernels and the single-row tail)


@pytest.mark.parametrize("bits, group_size, activations", [(8, 64, False), (8, 128, True), (4, 32, True), (4, 64, False)])
def test_weight_prefetch_hint_leaves_results_alone(bits, group_size, activations):
    # The GEMVs' software prefetch of the weight stream goes into L2 far ahead and into L1 near by default on every
    # CPU; non-temporal prefetches (slower or no faster wherever measured: BENCHMARKS.md) stay as a switch for
    # benchmarks. The hint changes timing, never a value.
    ext = _ext_or_skip()
    default = ext.quant_prefetch_nta()
    assert default is False
    _, qw = _qweight(4099, 576, bits, group_size, symmetric=False)  # rows enough to prefetch ahead, an odd tail
    x = torch.randn(2, 576).bfloat16().float()
    args = (qw.qweight, qw.scales, qw.zeros, None, bits, group_size, 576, activations)
    try:
        out = {}
        for nta in (True, False):
            ext.set_quant_prefetch_nta(nta)
            assert ext.quant_prefetch_nta() is nta
            out[nta] = ext.quant_gemv(x, *args)
    finally:
        ext.set_quant_prefetch_nta(default)
    assert torch.equal(out[True], out[False])
    # nor does prefetching into L1 alone instead of into L2 far ahead and L1 near (the default)
    assert ext.quant_prefetch_two_level()
    try:
        ext.set_quant_prefetch_nta(False)
        ext.set_quant_prefetch_two_level(False)
        assert not ext.quant_prefetch_two_level()
        assert torch.equal(ext.quant_gemv(x, *args), out[False])
    finally:
        ext.set_quant_prefetch_two_level(True)
        ext.set_quant_prefetch_nta(default)
    # and they are the product (int16 activations: within their rounding, the bound tested above)
    ref = quant_matmul_ref(x, qw.qweight, qw.scales, qw.zeros, None, bits, group_size, 576)
    scale = ref.abs().max().item()
    torch.testing.assert_close(out[False], ref, rtol=0, atol=(1e-3 if activations else 1e-5) * scale)


def test_stale_build_lock_is_removed(tmp_path):
    # a lock left by a process killed mid-compile would make every later build wait forever
    import os
    import time

    from hf_fastinfer.kernels import _cpu_ext

    lock = tmp_path / "lock"
    lock.touch()
    _cpu_ext._clear_stale_lock(lock)
    assert lock.exists()  # fresh: another process may be compiling right now
    old = time.time() - _cpu_ext.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        _cpu_ext._clear_stale_lock(lock)
    assert not lock.exists()


@pytest.mark.parametrize("bits, group_size, symmetric", [(8, 32, True), (4, 32, False), (4, 48, False)])
def test_prefill_bf16_gemm_equals_f_linear_on_the_bf16_weight(bits, group_size, symmetric):
    """Many rows of bf16 activations on a CPU with native bf16 products: the weight dequantized to bf16 (each
    value in fp32, rounded once) and one bf16 GEMM, i.e. F.linear on that bf16 weight; the other road (fp32
    BLAS) stays within the bf16 tolerance of the exact product. Both roads are taken here whatever this CPU is
    (the flag is what the CPU path passes when it multiplies bf16 natively)."""
    ext = _ext_or_skip()
    _, qw = _qweight(70, 130, bits, group_size, symmetric)
    x = torch.randn(37, 130).bfloat16()
    bias = torch.randn(70)
    args = (qw.qweight, qw.scales, qw.zeros, bias, bits, group_size, 130)
    native = ext.prefill_linear(x, *args, native_bf16=True)
    w16 = dequantize_weight(qw, torch.float32).bfloat16()  # the reference's fp32 value, rounded once
    expected = torch.nn.functional.linear(x, w16, bias.bfloat16())
    assert native.dtype == torch.bfloat16 and native.shape == (37, 70)
    # the dequantized value's fp32 formula (s * q - s * shift, against s * (q - shift)) may round a weight to the
    # neighbouring bf16 value: outputs agree to a few bf16 ulps of the output's scale
    _close(native, expected, torch.bfloat16)
    assert (native == expected).float().mean() > 0.9
    via_fp32 = ext.prefill_linear(x, *args, native_bf16=False)
    _close(via_fp32, quant_matmul_ref(x, qw.qweight, qw.scales, qw.zeros, bias, bits, group_size, 130), torch.bfloat16)
    # fp32 activations never take the bf16 GEMM
    xf = x.float()
    assert torch.equal(ext.prefill_linear(xf, *args, native_bf16=True), ext.prefill_linear(xf, *args, native_bf16=False))


@pytest.mark.parametrize("bits, group_size, k, symmetric, scale_dtype", [
    (4, 32, 576, True, torch.float16),  # whole 32-column groups: the one-table-per-group bf16 path
    (4, 64, 192, False, torch.float32),
    (4, 128, 256, False, torch.float16),
    (8, 32, 576, True, torch.float16),  # whole 16-column chunks: the int8 bf16 path
    (8, 16, 96, False, torch.float32),
    (4, 16, 96, True, torch.float16),  # int4 groups shorter than 32 columns: the fp32 rows, then rounded
    (4, 32, 100, False, torch.float16),  # K not a multiple of the group size: likewise
])
def test_prefill_bf16_weight_is_the_fp32_dequantized_value_rounded_once(bits, group_size, k, symmetric, scale_dtype):
    """The bf16 weight the native-bf16 prefill multiplies: every value s * u - s * shift in fp32 (u the stored
    integer, shift the zero point plus int4's offset of 8), rounded once to bf16, whichever road computed it
    (a bf16 table per group, or fp32 rows then rounded). Read back exactly by multiplying the identity."""
    ext = _ext_or_skip()
    w = torch.randn(40, k, generator=torch.Generator().manual_seed(bits * k))
    qw = quantize_weight(w, bits, group_size, symmetric, scale_dtype=scale_dtype)
    identity = torch.eye(k, dtype=torch.bfloat16)
    got = ext.prefill_linear(identity, qw.qweight, qw.scales, qw.zeros, None, bits, group_size, k, native_bf16=True)
    stored = qw.int_values().float() + (8.0 if bits == 4 else 0.0)  # u: the stored integer (int4: nibble q + 8)
    s = qw.scales.float().repeat_interleave(group_size, dim=1)[:, :k]
    shift = torch.full_like(s, 8.0 if bits == 4 else 0.0)
    if qw.zeros is not None:
        shift = shift + qw.zeros.float().repeat_interleave(group_size, dim=1)[:, :k]
    expected = (s * stored + (-s) * shift).bfloat16()  # a product, then a sum: the kernel's fp32 rounding
    assert torch.equal(got.t(), expected)
