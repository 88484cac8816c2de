"""RMSNorm with an optional fused residual add, in the Llama and Gemma conventions.

x: [..., N] float32 / bfloat16 / float16, contiguous along N; weight: [N]; residual: like x or None.
Returns ``(out, new_residual)``: ``new_residual = x + residual`` (in x's dtype, as the model's own add
rounds it) or None when no residual is given, and ``out = norm(new_residual or x)``, where with
``h = input.float()`` and ``n = h * rsqrt(mean(h^2) + eps)``:

* Llama / Mistral / Qwen / Phi-3 (``gemma=False``): ``out = weight * n.to(dtype)`` (rounded to dtype, then
  multiplied in dtype, exactly as transformers' ``LlamaRMSNorm``);
* Gemma (``gemma=True``): ``out = (n * (1 + weight.float())).to(dtype)`` (all in fp32, as ``GemmaRMSNorm``).

GPU: one Triton program per row holds the whole row in registers (one read of x and residual, one write of
each output). CPU: the compiled kernel in ``kernels/cpu/`` (add, norm and weight in one pass over the row: 4-7x
faster than the add plus transformers' LlamaRMSNorm at one token, BENCHMARKS.md), else ``torch.nn.functional.rms_norm``
(one fused ATen kernel) after the residual add.
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

__all__ = ["rms_norm", "rms_norm_cpu", "rms_norm_ref", "rms_norm_triton"]


# ---------------------------------------------------------------------------------------------------------
# 1. Triton kernel
# ---------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr,
        n_cols, eps,
        stride_x, stride_r, stride_out, stride_res_out,
        HAS_RESIDUAL: tl.constexpr, GEMMA: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        ok = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0)
            # the model adds in its own dtype: round the exact sum once
            h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(res_out_ptr + row * stride_res_out + cols, h, mask=ok)
            x = h
        h32 = x.to(tl.float32)
        variance = tl.sum(h32 * h32, axis=0) / n_cols
        n = h32 * tl.rsqrt(variance + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        if GEMMA:
            y = n * (1.0 + w)
        else:
            y = n.to(x.dtype).to(tl.float32) * w  # round, then multiply (weight is in the model dtype)
        tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------------
# 2. Launcher
# ---------------------------------------------------------------------------------------------------------

def _check_inputs(x, weight, residual, eps) -> None:
    _backend.check_float("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous along its last dimension")
    if weight.shape != (x.shape[-1],) or not weight.is_floating_point():
        raise ValueError(f"weight must be a float tensor of shape [{x.shape[-1]}], got {weight.dtype} {tuple(weight.shape)}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x ({x.dtype} {tuple(x.shape)}), got {residual.dtype} {tuple(residual.shape)}")
        if residual.stride(-1) != 1:
            raise ValueError("residual must be contiguous along its last dimension")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def rms_norm_triton(x, weight, residual=None, eps=1e-6, gemma=False):
    if triton is None:
        raise RuntimeError("Triton is not installed")
    _check_inputs(x, weight, residual, eps)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    r2 = residual.reshape(-1, n) if residual is not None else x2
    out = torch.empty_like(x2)
    res_out = torch.empty_like(x2) if residual is not None else out
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, out, res_out, n, float(eps),
        x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
        HAS_RESIDUAL=residual is not None, GEMMA=gemma, BLOCK_N=block,
        num_warps=4 if block <= 2048 else 8,
    )
    return out.view(x.shape), (res_out.view(x.shape) if residual is not None else None)


# ---------------------------------------------------------------------------------------------------------
# 3. The op PyTorch sees
# ---------------------------------------------------------------------------------------------------------

@torch.library.custom_op("hf_fastinfer::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float,
                 gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if _backend.use_triton(x):
        out, res = rms_norm_triton(x, weight, residual, eps, gemma)
    else:
        out, res = rms_norm_cpu(x, weight, residual, eps, gemma)
    # custom ops cannot return None or alias inputs: an empty tensor stands for "no residual"
    return out, (res if res is not None else x.new_empty(0))


@_rms_norm_op.register_fake
def _(x, weight, residual, eps, gemma):
    return torch.empty_like(x), (torch.empty_like(x) if residual is not None else x.new_empty(0))


def rms_norm(x, weight, residual=None, eps: float = 1e-6, gemma: bool = False):
    """RMSNorm with optional fused residual add; returns ``(out, new_residual or None)``. See module docstring."""
    _check_inputs(x, weight, residual, eps)
    if _backend.eager_cpu(x):
        return rms_norm_cpu(x, weight, residual, eps, gemma)
    out, res = _rms_norm_op(x, weight, residual, float(eps), bool(gemma))
    return out, (res if residual is not None else None)


# ---------------------------------------------------------------------------------------------------------
# 4. Reference and CPU path
# ---------------------------------------------------------------------------------------------------------

def rms_norm_ref(x, weight, residual=None, eps=1e-6, gemma=False):
    """Pure PyTorch, written as transformers' LlamaRMSNorm / GemmaRMSNorm compute it."""
    res = x + residual if residual is not None else None
    h = (res if res is not None else x).float()
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        out = (n * (1.0 + weight.float())).to(x.dtype)
    else:
        out = weight.to(x.dtype) * n.to(x.dtype)
    return out, res


def rms_norm_cpu(x, weight, residual=None, eps=1e-6, gemma=False):
    """CPU path: the compiled kernel (add, norm and weight in one pass, ``kernels/cpu/``) for contiguous
    rows, else the residual add and ATen's fused ``rms_norm``."""
    ext = cpu_extension()
    if ext is not None and x.is_contiguous() and (residual is None or residual.is_contiguous()):
        out, res = ext.rms_norm(x, weight, residual, float(eps), bool(gemma))
        return out, (res if residual is not None else None)
    res = x + residual if residual is not None else None
    h = res if res is not None else x
    if gemma:
        out = torch.nn.functional.rms_norm(h.float(), (h.shape[-1],), 1.0 + weight.float(), eps).to(x.dtype)
    elif x.dtype == torch.float32:
        out = torch.nn.functional.rms_norm(h, (h.shape[-1],), weight.float(), eps)
    else:
        # round the normalised value to the model dtype before the weight, as transformers does
        out = torch.nn.functional.rms_norm(h.float(), (h.shape[-1],), None, eps).to(x.dtype) * weight.to(x.dtype)
    return out, res
