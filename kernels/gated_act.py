"""Gated activation of a fused gate/up projection: ``act(gate) * up``.

gate_up: [..., 2 * I] float32 / bfloat16 / float16 with ``gate = gate_up[..., :I]`` and
``up = gate_up[..., I:]`` (the layout of Phi-3's ``gate_up_proj`` and of a fused Llama MLP projection);
activation "silu" or "gelu_tanh" (``gelu_pytorch_tanh``, Gemma). Returns [..., I] in the input dtype.

Numerics follow transformers' MLPs: the activation is computed in fp32 and rounded to the dtype, then
multiplied by ``up`` and rounded again (``act_fn(gate) * up`` in the model dtype).

GPU: one Triton program per (row, block of I) reads both halves once and writes the product. CPU: the
compiled kernel (AVX-512: one pass, 16 lanes at a time, its own vectorised exp within about 1 ulp of
torch's in fp32; measured 1.9-2.7x the two ATen ops at one token, BENCHMARKS.md), else the two ATen ops on
views of the halves (no copies). At one token each Python-level layer costs a fair part of the op, so the
compiled kernel checks its own input and the eager call reaches it through one Python function.
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

__all__ = ["ACTIVATIONS", "gated_act", "gated_act_cpu", "gated_act_ref", "gated_act_triton"]

ACTIVATIONS = ("silu", "gelu_tanh")

if triton is not None:

    @triton.jit
    def _gated_act_kernel(x_ptr, out_ptr, inner, stride_x, stride_out, ACT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < inner
        gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        up = tl.load(x_ptr + row * stride_x + inner + cols, mask=ok, other=0.0)
        g = gate.to(tl.float32)
        if ACT == 0:  # silu
            a = g * tl.sigmoid(g)
        else:  # gelu, tanh approximation; tanh(z) = 2 * sigmoid(2z) - 1
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * z) - 1.0))
        a = a.to(gate.dtype).to(tl.float32)  # the model rounds the activation to its dtype first
        tl.store(out_ptr + row * stride_out + cols, (a * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


def _check_inputs(gate_up, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    _backend.check_float("gate_up", gate_up)
    if gate_up.dim() < 1 or gate_up.shape[-1] == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dimension must be 2 * I > 0, got {tuple(gate_up.shape)}")
    if gate_up.stride(-1) != 1:
        raise ValueError("gate_up must be contiguous along its last dimension")


def gated_act_triton(gate_up, activation="silu"):
    if triton is None:
        raise RuntimeError("Triton is not installed")
    _check_inputs(gate_up, activation)
    inner = gate_up.shape[-1] // 2
    x2 = gate_up.reshape(-1, 2 * inner)
    out = torch.empty(x2.shape[0], inner, device=gate_up.device, dtype=gate_up.dtype)
    block = min(1024, triton.next_power_of_2(inner))
    _gated_act_kernel[(x2.shape[0], triton.cdiv(inner, block))](
        x2, out, inner, x2.stride(0), out.stride(0), ACT=ACTIVATIONS.index(activation), BLOCK=block,
    )
    return out.view(*gate_up.shape[:-1], inner)


@torch.library.custom_op("hf_fastinfer::gated_act", mutates_args=())
def _gated_act_op(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    if _backend.use_triton(gate_up):
        return gated_act_triton(gate_up, activation)
    return gated_act_cpu(gate_up, activation)


@_gated_act_op.register_fake
def _(gate_up, activation):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


def gated_act(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` for a fused [..., 2 * I] gate/up tensor. See the module docstring."""
    if _backend.eager_cpu(gate_up):
        return gated_act_cpu(gate_up, activation)  # checks its input (in the compiled kernel when it runs)
    _check_inputs(gate_up, activation)
    return _gated_act_op(gate_up, activation)


_COMPILED = None


def _compiled():
    """The compiled kernel (checks its input; None when it cannot take it), or None without one."""
    global _COMPILED
    _COMPILED = getattr(cpu_extension(), "gated_act", None)
    return _COMPILED


def gated_act_ref(gate_up, activation="silu"):
    """Pure PyTorch, as transformers' MLPs compute it."""
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        a = torch.nn.functional.silu(gate)
    else:
        a = torch.nn.functional.gelu(gate, approximate="tanh")
    return a * up


def gated_act_cpu(gate_up, activation="silu"):
    """CPU path: the compiled one-pass kernel where the CPU has AVX-512 and gate_up is contiguous; else the
    activation on the gate half and the product, on views (no copies of the halves)."""
    compiled = _COMPILED or _compiled()
    if compiled is not None:
        out = compiled(gate_up, activation)  # None, before any work, unless the input is valid and contiguous
        if out is not None:
            return out
    _check_inputs(gate_up, activation)
    inner = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :inner], gate_up[..., inner:]
    a = torch.nn.functional.silu(gate) if activation == "silu" else torch.nn.functional.gelu(gate, approximate="tanh")
    return a.mul_(up)
