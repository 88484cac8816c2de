"""Weight-only quantized matmul: y = x @ dequant(W).T + bias, for W8A16 (int8) and W4A16 (packed int4)
weights with group-wise scales (and zero points when asymmetric); the format is in ``quant_format``.

x: [..., K] float32 / bfloat16 / float16; qweight: int8 [N, K] or uint8 [N, ceil(K/2)]; scales (and zeros):
[N, ceil(K/G)]; bias: [N] or None. Returns [..., N] in x's dtype. K need not be a multiple of G.

GPU: one Triton kernel tiles y into [BLOCK_M, BLOCK_N] blocks; for each BLOCK_K slice it loads the int8 (or
packed int4) weight tile, dequantizes it in registers with the scale (and zero) of each column's group, and
accumulates ``tl.dot`` in fp32 (tensor cores for bf16/fp16; exact IEEE fp32 for fp32 input). Weights are
read once per M-block, as integers: that is the point of weight-only quantization at small batch.
CPU: see :func:`quant_matmul_cpu`.
"""

from __future__ import annotations

import torch

from . import _backend
from ._cpu_ext import cpu_extension
from .linear import native_half_gemm, onednn_linear
from .quant_format import QuantizedWeight, dequantize_weight, num_groups

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["quant_matmul", "quant_matmul_cpu", "quant_matmul_ref", "quant_matmul_triton"]


# ---------------------------------------------------------------------------------------------------------
# 1. Triton kernel
# ---------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _quant_matmul_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        M, N, K, group_size,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg, stride_ym, stride_yn,
        BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            w_mask = n_ok[:, None] & k_ok[None, :]
            if BITS == 8:
                q = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=w_mask, other=0)
                q = q.to(tl.float32)
            else:
                # column k lives in byte k // 2, low nibble for even k, high nibble for odd k; stored as q + 8
                byte = tl.load(w_ptr + rn[:, None] * stride_wn + (rk[None, :] // 2) * stride_wk, mask=w_mask, other=8)
                q = ((byte.to(tl.int32) >> ((rk[None, :] % 2) * 4)) & 0xF).to(tl.float32) - 8.0
            g = rk // group_size
            s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :] * stride_sg, mask=w_mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + rn[:, None] * stride_zn + g[None, :] * stride_zg, mask=w_mask, other=0.0)
                q = q - z.to(tl.float32)
            w = q * s  # [BLOCK_N, BLOCK_K], dequantized in registers
            if IEEE_FP32:
                acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _quant_gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        M, N, K, group_size,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg, stride_ym, stride_yn,
        BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Decode rows (a few x rows): one program per BLOCK_N output features reads its weight rows once per x
        # row, dequantizing [BLOCK_N, BLOCK_K] tiles in registers and reducing with a row sum; no tensor-core
        # tile (whose 16 rows would be mostly padding) and N / BLOCK_N programs to fill the GPU.
        pid_n = tl.program_id(0)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        for m in range(0, M):
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < K
                x = tl.load(x_ptr + m * stride_xm + rk * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
                w_mask = n_ok[:, None] & k_ok[None, :]
                if BITS == 8:
                    q = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=w_mask, other=0)
                    q = q.to(tl.float32)
                else:
                    byte = tl.load(w_ptr + rn[:, None] * stride_wn + (rk[None, :] // 2) * stride_wk, mask=w_mask,
                                   other=8)
                    q = ((byte.to(tl.int32) >> ((rk[None, :] % 2) * 4)) & 0xF).to(tl.float32) - 8.0
                g = rk // group_size
                s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :] * stride_sg, mask=w_mask, other=0.0)
                if HAS_ZEROS:
                    z = tl.load(z_ptr + rn[:, None] * stride_zn + g[None, :] * stride_zg, mask=w_mask, other=0.0)
                    q = q - z.to(tl.float32)
                acc += tl.sum(q * s.to(tl.float32) * x[None, :], axis=1)
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + m * stride_ym + rn * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


# ---------------------------------------------------------------------------------------------------------
# 2. Launcher
# ---------------------------------------------------------------------------------------------------------

def _check_inputs(x, qweight, scales, zeros, bias, bits, group_size, in_features) -> None:
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    _backend.check_float("x", x)
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects in_features={in_features}")
    expected_dtype = torch.int8 if bits == 8 else torch.uint8
    packed_k = in_features if bits == 8 else -(-in_features // 2)
    if qweight.dtype != expected_dtype or qweight.dim() != 2 or qweight.shape[1] != packed_k:
        raise ValueError(
            f"qweight for bits={bits} must be {expected_dtype} [N, {packed_k}], got {qweight.dtype} {tuple(qweight.shape)}"
        )
    n, ng = qweight.shape[0], num_groups(in_features, group_size)
    if scales.shape != (n, ng) or not scales.is_floating_point():
        raise ValueError(f"scales must be float [N={n}, groups={ng}], got {scales.dtype} {tuple(scales.shape)}")
    if zeros is not None and (zeros.shape != (n, ng) or not zeros.is_floating_point()):
        raise ValueError(f"zeros must be float [N={n}, groups={ng}] or None, got {zeros.dtype} {tuple(zeros.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [N={n}], got {tuple(bias.shape)}")
    if qweight.stride(-1) != 1:
        raise ValueError("qweight must be contiguous along in_features")


def _block_sizes(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by the number of activation rows.

    Chosen from ahead-of-time compiles (benchmarks/aot_report.py) as the largest tiles that compile with no
    register spills on sm_80 and sm_90 for both int8 and int4; from 16 rows on, BLOCK_M = 64 lets sm_90 use
    warpgroup MMA (wgmma), which needs 64-row tiles.
    """
    if m < 16:
        return 16, 64, 32, 4
    if m <= 64:
        return 64, 64, 32, 8
    return 128, 64, 32, 8


#: up to this many x rows the GEMV kernel runs on a GPU (decode); more rows take the tensor-core tile kernel
GPU_GEMV_MAX_ROWS = 4


def quant_matmul_triton(x, qweight, scales, zeros, bias, bits, group_size, in_features):
    """Launch the Triton kernel (GPU tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    _check_inputs(x, qweight, scales, zeros, bias, bits, group_size, in_features)
    x2 = x.reshape(-1, in_features)
    m, n = x2.shape[0], qweight.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    z = zeros if zeros is not None else scales  # not read when HAS_ZEROS is False
    b = bias if bias is not None else scales
    if m <= GPU_GEMV_MAX_ROWS:
        # benchmarks/tune_quant_gemv_gpu.py on an H100 (decode shapes of a 1B Llama and of the default model):
        # 4 x 512 with 4 warps is within a few % of the best of 80 candidates on every shape, 2-3x 16 x 256
        block_n, block_k = 4, 512
        _quant_gemv_kernel[(triton.cdiv(n, block_n),)](
            x2, qweight, scales, z, b, y, m, n, in_features, group_size,
            x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
            z.stride(0), z.stride(1), y.stride(0), y.stride(1),
            BITS=bits, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=4,
        )
        return y.reshape(*x.shape[:-1], n)
    block_m, block_n, block_k, num_warps = _block_sizes(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _quant_matmul_kernel[grid](
        x2, qweight, scales, z, b, y, m, n, in_features, group_size,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        z.stride(0), z.stride(1), y.stride(0), y.stride(1),
        BITS=bits, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
        # fp32 input: exact IEEE products (tf32 would drop mantissa bits). CPU tensors run under Triton's
        # interpreter, whose bf16 tl.dot is wrong (Triton 3.9): upcast there; GPUs take the tensor-core path.
        IEEE_FP32=x.dtype == torch.float32 or not x.is_cuda,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    return y.reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------------------------------------------------
# 3. The op PyTorch sees
# ---------------------------------------------------------------------------------------------------------

@torch.library.custom_op("hf_fastinfer::quant_matmul", mutates_args=())
def _quant_matmul_op(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
) -> torch.Tensor:
    if _backend.use_triton(x):
        return quant_matmul_triton(x, qweight, scales, zeros, bias, bits, group_size, in_features)
    return quant_matmul_cpu(x, qweight, scales, zeros, bias, bits, group_size, in_features)


@_quant_matmul_op.register_fake
def _(x, qweight, scales, zeros, bias, bits, group_size, in_features):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, bias, bits, group_size, in_features = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.meta = (bits, group_size, in_features, x.dtype)


def _backward(ctx, grad_y):
    """Gradient with respect to x only (the quantized weight is frozen): grad_x = grad_y @ dequant(W)."""
    qweight, scales, zeros = ctx.saved_tensors
    bits, group_size, in_features, dtype = ctx.meta
    w = _dequantize_fast(qweight, scales, zeros, bits, group_size, in_features, torch.float32)
    grad_x = (grad_y.float() @ w).to(dtype)
    return grad_x, None, None, None, None, None, None, None


_quant_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def quant_matmul(x, qweight, scales, zeros=None, bias=None, *, bits: int, group_size: int, in_features: int):
    """y = x @ dequant(W).T + bias. See the module docstring for shapes and formats.

    Differentiable with respect to x (e.g. for sensitivity analysis); the weight is frozen.
    """
    _check_inputs(x, qweight, scales, zeros, bias, bits, group_size, in_features)
    if _backend.eager_cpu(x) and not (x.requires_grad and torch.is_grad_enabled()):
        return quant_matmul_cpu(x, qweight, scales, zeros, bias, bits, group_size, in_features)
    return _quant_matmul_op(x, qweight, scales, zeros, bias, bits, group_size, in_features)


# ---------------------------------------------------------------------------------------------------------
# 4. Reference and CPU path
# ---------------------------------------------------------------------------------------------------------

def _as_quantized(qweight, scales, zeros, bits, group_size, in_features) -> QuantizedWeight:
    return QuantizedWeight(qweight, scales, zeros, bits, group_size, in_features)


def quant_matmul_ref(x, qweight, scales, zeros=None, bias=None, bits=8, group_size=128, in_features=None):
    """Pure PyTorch: dequantize to fp32, matmul in fp32, cast to x's dtype."""
    in_features = x.shape[-1] if in_features is None else in_features
    w = dequantize_weight(_as_quantized(qweight, scales, zeros, bits, group_size, in_features), torch.float32)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _dequantize_fast(qweight, scales, zeros, bits, group_size, in_features, dtype) -> torch.Tensor:
    """Dequantize into a fresh [N, K] tensor of ``dtype`` with in-place group-broadcast ops (no expanded
    scale tensor): the full groups as an [N, groups, G] view, the shorter last group separately."""
    q = qweight if bits == 8 else _unpack_int4_fast(qweight, in_features)
    n, k = q.shape
    w = q.to(torch.float32)
    full = k // group_size
    main = w[:, : full * group_size].view(n, full, group_size)
    if zeros is not None:
        main.sub_(zeros[:, :full, None].float())
    main.mul_(scales[:, :full, None].float())
    if full * group_size < k:
        tail = w[:, full * group_size :]
        if zeros is not None:
            tail.sub_(zeros[:, full : full + 1].float())
        tail.mul_(scales[:, full : full + 1].float())
    return w.to(dtype)


def _unpack_int4_fast(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    n = packed.shape[0]
    out = torch.empty(n, packed.shape[1], 2, dtype=torch.int8, device=packed.device)
    torch.bitwise_and(packed, 0x0F, out=out[:, :, 0].view(torch.uint8))
    torch.bitwise_right_shift(packed, 4, out=out[:, :, 1].view(torch.uint8))
    return out.view(n, -1)[:, :in_features].sub_(8)


#: Up to this many activation rows the compiled GEMV kernel runs; above it, dequantize + BLAS (compute-bound).
CPU_GEMV_MAX_ROWS = 8


def quant_matmul_cpu(x, qweight, scales, zeros, bias, bits, group_size, in_features):
    """CPU path.

    A few rows (decode): the compiled kernel in ``kernels/cpu/`` reads each weight row once as integers and
    folds dequantization into the dot product (AVX-512 where the CPU has it, else AVX2). int4 and int8 weights
    against bf16 activations run on integer dot products (AVX-512 VNNI, or AVX2's vpmaddwd / vpmaddubsw), with x
    held as int16 per weight group (int8: groups that are multiples of 32; int4 on AVX2: K a multiple of 64; an error of
    at most max|x_g| / 65534 per element, about a tenth of a bf16 output's own rounding); fp16 and fp32
    activations stay float throughout. More rows (prefill): the compiled kernel dequantizes the weight to fp32
    (vectorised, across the threads) and one BLAS product follows, where the arithmetic dominates (bf16 / fp16
    activations are multiplied in fp32 and rounded once; on AMD CPUs that product is oneDNN's linear, not MKL's
    sgemm, :func:`~hf_fastinfer.kernels.linear.onednn_linear`); bf16 activations on a CPU with native bf16 products
    (AMX, AVX512-BF16) get the weight dequantized to bf16 and one bf16 GEMM instead, as F.linear would run on
    that bf16 weight, several times faster there. Without a compiler, in-place group ops dequantize and
    F.linear multiplies, for every size.
    """
    rows = x.numel() // in_features if in_features else 0
    ext = cpu_extension() if rows > 0 and (bits == 8 or group_size % 2 == 0) else None
    if ext is not None:  # dtype conversions and reshapes happen inside: cheaper there than from Python
        if rows <= CPU_GEMV_MAX_ROWS:
            return ext.quant_gemv(x, qweight, scales, zeros, bias, bits, group_size, in_features, x.dtype is torch.bfloat16)
        return ext.prefill_linear(x, qweight, scales, zeros, bias, bits, group_size, in_features,
                                  x.dtype is torch.bfloat16 and native_half_gemm(torch.bfloat16), onednn_linear())
    w = _dequantize_fast(qweight, scales, zeros, bits, group_size, in_features, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
