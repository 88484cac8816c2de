"""Attention for prompts (many query tokens) on CPU: the compiled kernel of ``kernels/cpu/prefill_attention.cpp``.

torch's flash attention for CPU runs a short prompt's attention at about a fifth of the cores' FMA rate (a
256-token prompt of the default model: 1 ms a layer, a quarter of a bf16 prefill). The kernel holds each
16-query block's scores for all the keys it sees in one buffer and reads only the keys a causal block can see;
grouped KV heads are read as stored, never expanded. The result is the exact softmax attention in fp32
arithmetic (bf16 / fp16 inputs: the probabilities rounded to the input dtype before their product with the
values, as torch's kernel does), tested against :func:`hf_fastinfer.attention.attention_ref` and SDPA.

The kernel is built for AVX-512 and for AVX2 + FMA CPUs; elsewhere (ARM, older x86), and for anything it does not take (a float mask, a head
dim not a multiple of 16, gradients), :func:`prefill_attention` returns None and the caller runs SDPA.
"""

from __future__ import annotations

import torch

from ._cpu_ext import cpu_extension

__all__ = ["prefill_attention", "prefill_attention_available"]

#: keys x head dim x KV heads beyond which the kernel's fp32 copies of K and V (8 bytes an element, per batch
#: row) are not worth it: SDPA, which streams them, takes the call instead
MAX_KV_ELEMENTS = 1 << 23

#: benchmarks' A/B: False sends every call to SDPA
enabled = True


def prefill_attention_available() -> bool:
    """Whether the compiled kernel is built here (an AVX-512 or AVX2 + FMA CPU with the compiled kernels)."""
    ext = cpu_extension()
    return ext is not None and hasattr(ext, "prefill_attention")


def prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, causal: bool) -> torch.Tensor | None:
    """query [B, Hq, Lq, D]; key, value [B, Hkv, Lk, D]; attention_mask None or bool [B or 1, 1, Lq, >= Lk]
    (True = attend); causal (without a mask): query i sees keys 0..i, SDPA's ``is_causal``, else every key.

    Returns [B, Lq, Hq, D] (transformers' attention output layout), or None where the kernel does not take the
    call (the caller runs SDPA)."""
    if not enabled or query.device.type != "cpu" or not prefill_attention_available():
        return None
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if key.dtype != query.dtype or value.dtype != query.dtype or value.shape != key.shape:
        return None
    if query.dim() != 4 or key.dim() != 4 or query.shape[-1] % 16 or key.shape[-1] != query.shape[-1]:
        return None
    if query.shape[1] % key.shape[1] or key.shape[0] != query.shape[0]:
        return None
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    batch, _, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if kv_heads * kv_len * head_dim > MAX_KV_ELEMENTS:
        return None
    if attention_mask is not None:
        if (attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
                or attention_mask.shape[0] not in (1, batch) or attention_mask.shape[2] != q_len
                or attention_mask.shape[3] < kv_len):
            return None
        if attention_mask.stride(-1) != 1:
            attention_mask = attention_mask.contiguous()
    elif causal and kv_len < q_len:
        return None
    tensors = [t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value)]
    return cpu_extension().prefill_attention(*tensors, attention_mask, float(scaling), bool(causal))
