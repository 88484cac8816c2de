"""KV-cache quantize-and-append: int8 keys and values with one fp16 scale per (sequence, head, token),
written into a pre-allocated cache at given slots.

k, v: [B, H, S, D] float32 / bfloat16 / float16 (new tokens; any strides, contiguous along D);
k_cache, v_cache: int8 [B, H, L, D]; k_scale, v_scale: float16 [B, H, L]; slots: int [B, S], the cache
position of each new token (each in [0, L); rows may differ: padded batches, sequences of different lengths).

Format (symmetric): ``scale = fp16(max|x| / 127)`` (at least 2^-24, fp16's smallest subnormal, so an all-zero
row does not divide by zero) and ``q = round_half_even(x / scale)`` clamped to [-127, 127]. The scale is
rounded to fp16 *before* quantizing, so ``q * scale`` with the stored scale is exactly what was quantized.

GPU: one Triton program per new token quantizes all heads of k and v and writes them (one launch). CPU: the
compiled kernel in ``kernels/cpu/``, or torch code without a compiler.
"""

from __future__ import annotations

import torch

from . import _backend
from ._cpu_ext import cpu_extension

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["MIN_SCALE", "kv_append", "kv_append_cpu", "kv_append_ref", "kv_append_triton", "quantize_kv", "dequantize_kv"]

#: fp16's smallest subnormal: the floor of a stored scale
MIN_SCALE = 2.0 ** -24


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference quantization of x [..., D] -> (int8 [..., D], float16 scale [...]) in the format above."""
    absmax = x.abs().amax(dim=-1).float()
    scale = (absmax / 127.0).to(torch.float16).clamp_min(MIN_SCALE)
    q = torch.round(x.float() / scale.float().unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [..., D] and float16 scale [...] -> [..., D] in ``dtype``."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


if triton is not None:

    @triton.jit
    def _quantize_heads(x_ptr, sx_h, q_ptr, sq_h, s_ptr, ss_h, heads, dim, h, d):
        m = (h < heads)[:, None] & (d < dim)[None, :]
        x = tl.load(x_ptr + h[:, None] * sx_h + d[None, :], mask=m, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=1)
        scale = tl.maximum((absmax / 127.0).to(tl.float16).to(tl.float32), 5.960464477539063e-08)
        y = tl.math.div_rn(x, scale[:, None])
        r = tl.floor(y + 0.5)
        r = tl.where(((r - y) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0), r - 1.0, r)  # ties to even
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(q_ptr + h[:, None] * sq_h + d[None, :], r.to(tl.int8), mask=m)
        tl.store(s_ptr + h * ss_h, scale.to(tl.float16), mask=h < heads)

    @triton.jit
    def _kv_append_kernel(
        k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr, S, H, D,
        sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, skc_b, skc_h, skc_l, svc_b, svc_h, svc_l,
        sks_b, sks_h, sks_l, svs_b, svs_h, svs_l, sp_b, sp_s,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        token = tl.program_id(0)
        b = token // S
        t = token % S
        slot = tl.load(slot_ptr + b * sp_b + t * sp_s).to(tl.int64)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        _quantize_heads(k_ptr + b * sk_b + t * sk_s, sk_h, kc_ptr + b * skc_b + slot * skc_l, skc_h,
                        ks_ptr + b * sks_b + slot * sks_l, sks_h, H, D, h, d)
        _quantize_heads(v_ptr + b * sv_b + t * sv_s, sv_h, vc_ptr + b * svc_b + slot * svc_l, svc_h,
                        vs_ptr + b * svs_b + slot * svs_l, svs_h, H, D, h, d)


def _check_inputs(k, v, k_cache, v_cache, k_scale, v_scale, slots, check_range: bool = True) -> None:
    _backend.check_float("k", k)
    _backend.check_float("v", v)
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"k and v must be [B, H, S, D] of one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    bsz, heads, seq, dim = k.shape
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dtype != torch.int8 or cache.dim() != 4 or cache.shape[:2] != (bsz, heads) or cache.shape[3] != dim:
            raise ValueError(f"{name} must be int8 [B={bsz}, H={heads}, L, D={dim}], got {cache.dtype} {tuple(cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have one shape")
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale.dtype != torch.float16 or scale.shape != k_cache.shape[:3]:
            raise ValueError(f"{name} must be float16 {list(k_cache.shape[:3])}, got {scale.dtype} {tuple(scale.shape)}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along the head dim")
    if slots.dtype not in (torch.int32, torch.int64) or slots.shape != (bsz, seq):
        raise ValueError(f"slots must be int32/int64 [B={bsz}, S={seq}], got {slots.dtype} {tuple(slots.shape)}")
    if check_range and slots.numel():
        low, high = int(slots.min()), int(slots.max())
        if low < 0 or high >= k_cache.shape[2]:
            raise ValueError(f"slots must lie in [0, {k_cache.shape[2]}) (the cache length), got [{low}, {high}]")


def kv_append_triton(k, v, k_cache, v_cache, k_scale, v_scale, slots) -> None:
    """Launch the Triton kernel (GPU tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    _check_inputs(k, v, k_cache, v_cache, k_scale, v_scale, slots)
    _launch(k, v, k_cache, v_cache, k_scale, v_scale, slots)


def _launch(k, v, k_cache, v_cache, k_scale, v_scale, slots) -> None:
    bsz, heads, seq, dim = k.shape
    if bsz * seq == 0:
        return
    _kv_append_kernel[(bsz * seq,)](
        k, v, k_cache, v_cache, k_scale, v_scale, slots, seq, heads, dim,
        *k.stride()[:3], *v.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        *k_scale.stride(), *v_scale.stride(), slots.stride(0), slots.stride(1),
        BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(dim),
    )


@torch.library.custom_op("hf_fastinfer::kv_append", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def _kv_append_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  k_scale: torch.Tensor, v_scale: torch.Tensor, slots: torch.Tensor) -> None:
    if _backend.use_triton(k):
        _launch(k, v, k_cache, v_cache, k_scale, v_scale, slots)
    else:
        kv_append_cpu(k, v, k_cache, v_cache, k_scale, v_scale, slots)


def kv_append(k, v, k_cache, v_cache, k_scale, v_scale, slots) -> None:
    """Quantize k and v and write them (and their scales) at ``slots``. See the module docstring."""
    # the range check reads the slots (a device sync): skipped while tracing for torch.compile
    _check_inputs(k, v, k_cache, v_cache, k_scale, v_scale, slots, check_range=not torch.compiler.is_compiling())
    if _backend.eager_cpu(k):
        kv_append_cpu(k, v, k_cache, v_cache, k_scale, v_scale, slots)
    else:
        _kv_append_op(k, v, k_cache, v_cache, k_scale, v_scale, slots)


def kv_append_ref(k, v, k_cache, v_cache, k_scale, v_scale, slots) -> None:
    """Pure PyTorch: quantize, then scatter each token's heads into its slot."""
    bsz, heads, seq, _ = k.shape
    rows = torch.arange(bsz, device=k.device)[:, None].expand(bsz, seq)
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        q, s = quantize_kv(x)  # [B, H, S, D], [B, H, S]
        cache[rows, :, slots.long()] = q.transpose(1, 2)  # advanced indexing: [B, S, H, D]
        scale[rows, :, slots.long()] = s.transpose(1, 2)


def kv_append_cpu(k, v, k_cache, v_cache, k_scale, v_scale, slots) -> None:
    """CPU path: the compiled kernel (one call for k and v, no temporaries) when available, else the reference."""
    ext = cpu_extension()
    if ext is not None:
        ext.kv_append(k, v, k_cache, v_cache, k_scale, v_scale, slots.long().contiguous())
    else:
        kv_append_ref(k, v, k_cache, v_cache, k_scale, v_scale, slots)
