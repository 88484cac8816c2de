"""The ``"fastinfer"`` attention function and its mask function.

Registered under the same key in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (see
:mod:`hf_fastinfer._registry`): without the mask function a padded batch would reach attention with no mask.

Dispatch, fastest correct path first:

* decode (up to :data:`DECODE_MAX_QUERY` query tokens): the decode-attention kernel
  (:mod:`hf_fastinfer.kernels.decode_attention`; flash-decoding in Triton on GPU, fused torch code on CPU),
  reading the KV cache as stored (int8 included) without expanding grouped KV heads; causal, padding and
  sliding windows come in through the boolean mask, logit softcapping is applied in the kernel;
* prefill on CPU: the prefill-attention kernel (:mod:`hf_fastinfer.kernels.prefill_attention`, AVX-512 or AVX2 CPUs:
  causal, full or boolean-masked, grouped KV heads unexpanded);
* prefill elsewhere, and what that kernel does not take: ``torch.nn.functional.scaled_dot_product_attention``
  through transformers' own SDPA integration;
* logit softcapping (Gemma 2) and attention sinks (gpt-oss) at prefill, which SDPA cannot express: an exact
  reference path below, with an fp32 softmax.

An additive float mask (not produced by the "fastinfer" mask function) falls back to SDPA with one warning.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.utils import logging

from .kernels.kv_quant import dequantize_kv
from .kernels.decode_attention import decode_attention
from .kernels.prefill_attention import prefill_attention

logger = logging.get_logger(__name__)

__all__ = ["fastinfer_attention_forward", "fastinfer_mask", "attention_ref"]


def attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention with optional softcap and sinks; grouped KV heads handled by reshaping, not copying.

    query: [B, Hq, Lq, D]; key, value: [B, Hkv, Lk, D] with Hq % Hkv == 0;
    attention_mask: None, bool [B|1, 1, Lq, Lk] (True = attend) or additive float [B|1, 1, Lq, Lk];
    sinks: [Hq] per-head sink logits (an extra softmax column that takes probability mass and no value).
    Returns [B, Lq, Hq, D] (transformers' attention output layout).
    """
    batch, num_q_heads, q_len, head_dim = query.shape
    num_kv_heads, kv_len = key.shape[1], key.shape[2]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of key/value heads ({num_kv_heads})")
    groups = num_q_heads // num_kv_heads
    # q: [B, Hkv, G*Lq, D] so that each KV head serves its G query heads in one matmul
    q = query.reshape(batch, num_kv_heads, groups * q_len, head_dim)
    # scores in fp32: softcap's tanh and the softmax lose too much in bf16/fp16
    scores = torch.matmul(q.float(), key.float().transpose(-1, -2)) * scaling
    scores = scores.view(batch, num_kv_heads, groups, q_len, kv_len)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[..., :kv_len].unsqueeze(2)  # [B|1, 1, 1, Lq, Lk]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    if sinks is not None:
        sink = sinks.float().view(1, num_kv_heads, groups, 1, 1).expand(batch, -1, -1, q_len, 1)
        scores = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :kv_len]
    # a fully masked row (left padding) gives NaN; it is never read, but keep it finite
    probs = torch.nan_to_num(probs, nan=0.0)
    probs = probs.view(batch, num_kv_heads, groups * q_len, kv_len).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, Hkv, G*Lq, D]
    out = out.view(batch, num_q_heads, q_len, head_dim)
    return out.transpose(1, 2).contiguous()


#: Query lengths up to this take the decode-attention kernel (plain decoding, speculative verification);
#: longer ones (prefill) take SDPA.
DECODE_MAX_QUERY = 16

_warned: set[str] = set()


def _warn_once(feature: str) -> None:
    if feature not in _warned:
        _warned.add(feature)
        logger.warning(
            "hf_fastinfer attention: %s is not supported by the fastinfer kernels; falling back to transformers' "
            "SDPA for these calls.", feature,
        )


def fastinfer_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention signature. query: [B, Hq, Lq, D]; key/value: [B, Hkv, Lk, D] (cache included;
    int8 with attached scales when they come straight from the ``fastinfer_int8`` cache).

    Returns (attn_output [B, Lq, Hq, D], None).
    """
    if dropout and module.training:
        raise NotImplementedError("hf_fastinfer attention is for inference: dropout in training mode is not supported")
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    quantized = key.dtype == torch.int8
    mask_ok = attention_mask is None or attention_mask.dtype == torch.bool
    if not mask_ok:
        _warn_once("a floating-point (additive) attention mask")

    # Without a mask the kernel would take the queries to be the last q_len keys; that holds for one query
    # token (it sees everything) but not for a short prefill into a static-shape buffer, so those go to SDPA.
    if q_len <= DECODE_MAX_QUERY and sinks is None and mask_ok and (attention_mask is not None or q_len == 1):
        # Decode: the kernel reads the cache as stored (int8 included), grouped KV heads unexpanded.
        k_scale = key._hf_fastinfer_scale if quantized else None
        v_scale = value._hf_fastinfer_scale if quantized else None
        out = decode_attention(query, key, value, k_scale, v_scale, attention_mask, scaling, softcap)
        return out, None

    if quantized:
        # the int8 cache attaches the scales [B, Hkv, S] to the views it hands over
        key = dequantize_kv(key, key._hf_fastinfer_scale, query.dtype)
        value = dequantize_kv(value, value._hf_fastinfer_scale, query.dtype)
    if softcap is None and sinks is None:
        if query.device.type == "cpu" and kwargs.get("position_bias") is None:
            # SDPA's own rule for is_causal (transformers' integration): a prompt without a mask
            causal = q_len > 1 and attention_mask is None and bool(is_causal)
            out = prefill_attention(query, key, value, attention_mask, scaling, causal)
            if out is not None:
                return out, None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if not mask_ok:
        raise NotImplementedError("logit softcapping or attention sinks together with an additive float mask")
    if attention_mask is None and q_len > 1 and is_causal:
        # The mask function skips the mask when causal SDPA would need none; this path must apply it itself.
        # Queries are the last q_len positions of the kv_len keys.
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
        attention_mask = (torch.arange(kv_len, device=query.device)[None, :] <= q_pos)[None, None]
    out = attention_ref(query, key, value, attention_mask, scaling, softcap=softcap, sinks=sinks)
    return out, None


def fastinfer_mask(*args, **kwargs) -> torch.Tensor | None:
    """Mask function for ``"fastinfer"``: the boolean SDPA-style mask (True = attend), or None when causal
    attention needs no explicit mask. Same signature as transformers' ``sdpa_mask``."""
    return sdpa_mask(*args, **kwargs)
