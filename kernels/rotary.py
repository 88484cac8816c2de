"""Rotary position embedding applied to q and k in one launch.

q: [B, Hq, S, D], k: [B, Hk, S, D] (the layout attention sees; any strides, contiguous along D), float32 /
bfloat16 / float16. cos, sin: [P, R/2] float tables, row p = cos / sin of p * inv_freq (times the model's
attention scaling), for the R = 2 * cos.shape[1] <= D rotated dims (R < D: partial rotary, e.g. Phi-3 mini
128k / StableLM; the other D - R dims pass through). positions: int [B, S], each token's position (padded
batches and continuing caches give every row its own), every one in [0, P).

Layouts: ``interleaved=False`` (NeoX / Llama, rotate_half) pairs dim i with i + R/2; ``interleaved=True``
(GPT-J / original RoFormer) pairs 2i with 2i + 1. For each pair (x1, x2) and angle t:
``(x1 cos t - x2 sin t, x2 cos t + x1 sin t)``, computed in fp32 and rounded once to the input dtype.

``inplace=True`` overwrites q and k and returns them; otherwise new tensors come back (the pass-through dims
copied). GPU: one Triton program per token rotates all of its q and k heads. CPU: the compiled kernel in
``kernels/cpu/`` (one call for q and k, no temporaries), or the reference's torch code without a compiler.
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

__all__ = ["rotary", "rotary_cpu", "rotary_ref", "rotary_triton", "rotary_tables"]


def rotary_tables(inv_freq: torch.Tensor, max_positions: int, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_positions, len(inv_freq)] (float32) for ``inv_freq`` (e.g. a transformers
    rotary module's ``inv_freq`` buffer and its ``attention_scaling``)."""
    angles = torch.arange(max_positions, dtype=torch.float64, device=inv_freq.device)[:, None] * inv_freq.double()[None, :]
    return (angles.cos() * scaling).float(), (angles.sin() * scaling).float()


if triton is not None:

    @triton.jit
    def _rotate_heads(x_ptr, o_ptr, sx_h, so_h, heads, half, dim, c, s, im, h, o1, o2, rest,
                      COPY_REST: tl.constexpr):
        # x_ptr / o_ptr point at one token's heads; o1 / o2 are the two dims of each rotated pair
        hm = h < heads
        m = hm[:, None] & im[None, :]
        x1 = tl.load(x_ptr + h[:, None] * sx_h + o1[None, :], mask=m, other=0.0)
        x2 = tl.load(x_ptr + h[:, None] * sx_h + o2[None, :], mask=m, other=0.0)
        a1 = x1.to(tl.float32)
        a2 = x2.to(tl.float32)
        y1 = a1 * c[None, :] - a2 * s[None, :]
        y2 = a2 * c[None, :] + a1 * s[None, :]
        tl.store(o_ptr + h[:, None] * so_h + o1[None, :], y1.to(o_ptr.dtype.element_ty), mask=m)
        tl.store(o_ptr + h[:, None] * so_h + o2[None, :], y2.to(o_ptr.dtype.element_ty), mask=m)
        if COPY_REST:
            rm = hm[:, None] & ((rest >= 2 * half) & (rest < dim))[None, :]
            v = tl.load(x_ptr + h[:, None] * sx_h + rest[None, :], mask=rm, other=0.0)
            tl.store(o_ptr + h[:, None] * so_h + rest[None, :], v, mask=rm)

    @triton.jit
    def _rotary_kernel(
        q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr,
        S, HQ, HK, D, HALF,
        sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sqo_b, sqo_h, sqo_s, sko_b, sko_h, sko_s, sc_p, ss_p, sp_b, sp_s,
        INTERLEAVED: tl.constexpr, COPY_REST: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        token = tl.program_id(0)
        b = token // S
        t = token % S
        pos = tl.load(pos_ptr + b * sp_b + t * sp_s).to(tl.int64)
        i = tl.arange(0, BLOCK_R)
        im = i < HALF
        c = tl.load(cos_ptr + pos * sc_p + i, mask=im, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + pos * ss_p + i, mask=im, other=0.0).to(tl.float32)
        if INTERLEAVED:
            o1 = 2 * i
            o2 = 2 * i + 1
        else:
            o1 = i
            o2 = i + HALF
        h = tl.arange(0, BLOCK_H)
        rest = tl.arange(0, BLOCK_D)
        _rotate_heads(q_ptr + b * sq_b + t * sq_s, qo_ptr + b * sqo_b + t * sqo_s, sq_h, sqo_h, HQ, HALF, D,
                      c, s, im, h, o1, o2, rest, COPY_REST)
        _rotate_heads(k_ptr + b * sk_b + t * sk_s, ko_ptr + b * sko_b + t * sko_s, sk_h, sko_h, HK, HALF, D,
                      c, s, im, h, o1, o2, rest, COPY_REST)


def _check_inputs(q, k, cos, sin, positions, check_range: bool = True) -> None:
    _backend.check_float("q", q)
    _backend.check_float("k", k)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, S, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, sequence and head dim")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k must be contiguous along the head dim")
    if cos.dim() != 2 or cos.shape != sin.shape or not cos.is_floating_point() or not sin.is_floating_point():
        raise ValueError(f"cos and sin must be float tables of one shape [P, R/2], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("cos and sin must be contiguous along their last dim")
    rot = 2 * cos.shape[1]
    if rot == 0 or rot > q.shape[-1]:
        raise ValueError(f"cos / sin cover {rot} rotated dims; the head dim is {q.shape[-1]} (need 0 < R <= D)")
    if positions.dtype not in (torch.int32, torch.int64) or positions.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"positions must be int32/int64 [B={q.shape[0]}, S={q.shape[2]}], got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if check_range and positions.numel():
        low, high = int(positions.min()), int(positions.max())
        if low < 0 or high >= cos.shape[0]:
            raise ValueError(f"positions must lie in [0, {cos.shape[0]}) (the rows of the cos / sin tables), got "
                             f"[{low}, {high}]")


def rotary_triton(q, k, cos, sin, positions, interleaved=False, inplace=False, out=None):
    """Launch the Triton kernel (GPU tensors, or CPU tensors under TRITON_INTERPRET=1). ``out``: optional
    (q_out, k_out) to write into."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    _check_inputs(q, k, cos, sin, positions)
    return _launch(q, k, cos, sin, positions, interleaved, inplace, out)


def _outputs(q, k, inplace, out):
    if inplace:
        return q, k
    if out is not None:
        if out[0].shape != q.shape or out[1].shape != k.shape or out[0].stride(-1) != 1 or out[1].stride(-1) != 1:
            raise ValueError("out must be two tensors shaped like q and k, contiguous along the head dim")
        return out
    return torch.empty_like(q), torch.empty_like(k)


def _launch(q, k, cos, sin, positions, interleaved, inplace, out=None):
    bsz, hq, seq, dim = q.shape
    hk = k.shape[1]
    half = cos.shape[1]
    qo, ko = _outputs(q, k, inplace, out)
    if bsz * seq == 0:
        return qo, ko
    _rotary_kernel[(bsz * seq,)](
        q, k, qo, ko, cos, sin, positions, seq, hq, hk, dim, half,
        *q.stride()[:3], *k.stride()[:3], *qo.stride()[:3], *ko.stride()[:3], cos.stride(0), sin.stride(0),
        positions.stride(0), positions.stride(1),
        INTERLEAVED=interleaved, COPY_REST=(not inplace) and 2 * half < dim,
        BLOCK_H=triton.next_power_of_2(max(hq, hk)), BLOCK_R=triton.next_power_of_2(half),
        BLOCK_D=triton.next_power_of_2(dim),
    )
    return qo, ko


@torch.library.custom_op("hf_fastinfer::rotary", mutates_args=())
def _rotary_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if _backend.use_triton(q):
        return _launch(q, k, cos, sin, positions, interleaved, False)
    return rotary_cpu(q, k, cos, sin, positions, interleaved, False)


@_rotary_op.register_fake
def _(q, k, cos, sin, positions, interleaved):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("hf_fastinfer::rotary_", mutates_args=("q", "k"))
def _rotary_inplace_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       positions: torch.Tensor, interleaved: bool) -> None:
    if _backend.use_triton(q):
        _launch(q, k, cos, sin, positions, interleaved, True)
    else:
        rotary_cpu(q, k, cos, sin, positions, interleaved, True)


def rotary(q, k, cos, sin, positions, *, interleaved: bool = False, inplace: bool = False, check_range: bool = True):
    """Rotate q and k by their tokens' positions; returns (q_out, k_out). See the module docstring.

    ``check_range=False`` skips checking that every position indexes the tables, which reads the positions
    back (a device sync on a GPU); for callers that build the positions themselves. It is skipped anyway while
    torch.compile traces.
    """
    _check_inputs(q, k, cos, sin, positions, check_range=check_range and not torch.compiler.is_compiling())
    if _backend.eager_cpu(q):
        return rotary_cpu(q, k, cos, sin, positions, interleaved, inplace)
    if inplace:
        _rotary_inplace_op(q, k, cos, sin, positions, interleaved)
        return q, k
    return _rotary_op(q, k, cos, sin, positions, interleaved)


def rotary_ref(q, k, cos, sin, positions, interleaved=False):
    """Pure PyTorch, out of place: gather each token's angles, rotate pairs in fp32, round once."""
    half = cos.shape[1]
    c = cos[positions.long()].float()[:, None]  # [B, 1, S, R/2]
    s = sin[positions.long()].float()[:, None]

    def one(x):
        y = x.float().clone()
        if interleaved:
            x1, x2 = y[..., 0 : 2 * half : 2], y[..., 1 : 2 * half : 2]
        else:
            x1, x2 = y[..., :half], y[..., half : 2 * half]
        r1, r2 = x1 * c - x2 * s, x2 * c + x1 * s
        if interleaved:
            y[..., 0 : 2 * half : 2], y[..., 1 : 2 * half : 2] = r1, r2
        else:
            y[..., :half], y[..., half : 2 * half] = r1, r2
        return y.to(x.dtype)

    return one(q), one(k)


def rotary_cpu(q, k, cos, sin, positions, interleaved=False, inplace=False, out=None):
    """CPU path: the compiled kernel (one call for q and k) when available, else the reference's torch code."""
    qo, ko = _outputs(q, k, inplace, out)
    ext = cpu_extension()
    if ext is not None and cos.dtype == torch.float32 and sin.dtype == torch.float32:
        ext.rotary(q, k, qo, ko, cos.contiguous(), sin.contiguous(), positions.long(), interleaved)
        return qo, ko
    rq, rk = rotary_ref(q, k, cos, sin, positions, interleaved)
    qo.copy_(rq)
    ko.copy_(rk)
    return qo, ko
