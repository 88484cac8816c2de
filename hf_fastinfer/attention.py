"""The ``"fastinfer"`` attention function and its mask function.

Registered under the same key in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (see
:mod:`hf_fastinfer._registry`): without the mask function a padded batch would reach attention with no mask.

Dispatch, fastest correct path first:

* plain causal / padded / sliding-window attention: ``torch.nn.functional.scaled_dot_product_attention``
  through transformers' own SDPA integration (grouped KV heads are not expanded where SDPA can avoid it);
* logit softcapping (Gemma 2) and attention sinks (gpt-oss), which SDPA cannot express: an exact
  reference path below, in the query's dtype with an fp32 softmax.

The decode-attention kernel (flash-decoding straight on hf_fastinfer's KV cache) plugs in here once the
kernel library provides it; until then every call takes one of the two paths above, which are exact.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

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
    """transformers attention signature. query: [B, Hq, Lq, D]; key/value: [B, Hkv, Lk, D] (cache included).

    Returns (attn_output [B, Lq, Hq, D], None).
    """
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    if softcap is None and sinks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout and module.training:
        raise NotImplementedError("hf_fastinfer attention is for inference: dropout is not supported in training mode")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
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
