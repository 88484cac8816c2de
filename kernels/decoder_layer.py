"""A whole pre-norm decoder layer for decode tokens (one query token per sequence), in two steps around the
KV-cache update, so that any cache's own ``update`` stays in charge of storage::

    q, k, v      = attn_in(spec, hidden, cos, sin)            # norm, q/k/v projections, q/k norms, rotary
    keys, values = cache.update(k, v, layer_idx)              # the cache's own code, unchanged
    out          = attn_out_mlp(spec, hidden, q, keys, values, k_scale, v_scale, mask)
                   # attention, o_proj, residual, norm, gate/up, act * up, down, residual

Three shortcuts save the per-layer Python work where the caller can use them: ``new_kv=(k, v), slot=s`` hands
over a cache's own buffers ([B, Hkv, capacity, D]) instead of an update's result, and the new token's K/V are
written at ``s`` inside the call (attention then reads ``[0, attend_len)``); ``next_spec`` runs the following
layer's ``attn_in`` on this layer's output in the same call, returning ``(out, (q, k, v))``; and
:func:`decode_chain` runs several consecutive layers so, in one call.

Shapes: hidden [B, 1, H]; cos, sin [B or 1, 1, >= R] as the model's rotary module returns them; q [B, Hq, 1, D],
k, v [B, Hkv, 1, D]; keys, values [B, Hkv, L, D] in the model's dtype, or int8 with fp16 scales [B, Hkv, L];
mask [B or 1, 1, 1, >= L] bool (True = attend) or additive float, or None. A :class:`DecoderLayerSpec` names the
layer's own tensors (fused q/k/v and gate/up weights are views that the model's modules share): nothing is
copied. A spec without a gated MLP (``gate_up=[]``: a mixture-of-experts block, say) stops after the post-
attention norm and returns ``(residual, normed)`` for the model's own MLP module.

Implementations, one per place the layer runs:

* CPU (eager): one compiled call per step (``kernels/cpu/decoder_layer.cpp``): each step is one parallel region
  whose threads meet at barriers, the weights are read by the float / quantized GEMV loops, and every value is
  rounded to the model's dtype where the model's own forward rounds it. This is what makes a decoded token cost
  its weights plus a few microseconds per layer instead of ~60 small ops.
* GPU, and under ``torch.compile`` anywhere: the composition of the kernel library's ops (:func:`attn_in_composed`,
  :func:`attn_out_mlp_composed`): Triton RMSNorm, projections (cuBLAS or the Triton dequant-GEMM), Triton rotary,
  flash-decoding attention and gated activation, each a ``torch.library`` op, so that the decode step traces into
  one graph and can be captured in a CUDA graph. There is no Triton kernel of its own here: the ops it launches
  are the kernel library's.
* :func:`attn_in_ref` / :func:`attn_out_mlp_ref`: pure PyTorch, written as transformers computes a Llama layer in
  its dtype; the tests hold the other two to it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from . import _backend
from ._cpu_ext import cpu_extension
from .decode_attention import decode_attention, decode_attention_ref
from .gated_act import gated_act, gated_act_ref
from .kv_quant import kv_append
from .linear import linear, linear_ref
from .quant_format import QuantizedWeight, dequantize_weight
from .quant_matmul import quant_matmul
from .rms_norm import rms_norm, rms_norm_ref
from .rotary import rotary

__all__ = [
    "CacheSlot",
    "DecodeHeadSpec",
    "DecoderLayerSpec",
    "LayerProjection",
    "PreparedChain",
    "decode_chain",
    "attn_in",
    "attn_in_composed",
    "attn_in_ref",
    "attn_out_mlp",
    "attn_out_mlp_composed",
    "attn_out_mlp_ref",
    "rotate_ref",
    "ACTIVATIONS",
]

#: the gated activations the fused MLP computes
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass
class LayerProjection:
    """One projection's tensors: a float weight [N, K] (``bits=0``) or a group-quantized one (``bits`` 8 / 4, the
    :mod:`~hf_fastinfer.kernels.quant_format` layout, with fp16 ``scales`` and ``zeros`` [N, groups])."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    bits: int = 0
    group_size: int = 0
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    in_features: int = 0

    def __post_init__(self):
        if not self.in_features:
            self.in_features = self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] through the kernel library (F.linear / the compiled GEMV, or quant_matmul)."""
        if self.bits == 0:
            return linear(x, self.weight, self.bias)
        return quant_matmul(x, self.weight, self.scales, self.zeros, self.bias, bits=self.bits,
                            group_size=self.group_size, in_features=self.in_features)

    def ref(self, x: torch.Tensor) -> torch.Tensor:
        """Pure PyTorch: the (dequantized) weight in fp32, one rounding to x's dtype."""
        if self.bits == 0:
            w = self.weight.float()
        else:
            w = dequantize_weight(QuantizedWeight(self.weight, self.scales, self.zeros, self.bits, self.group_size,
                                                  self.in_features), torch.float32)
        y = x.float() @ w.T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def compiled(self, ext):
        return ext.Projection(self.weight, self.scales, self.zeros, self.bias, self.bits, self.group_size,
                              self.in_features)


@dataclasses.dataclass
class DecoderLayerSpec:
    """What the fused layer computes with: the layer's own tensors and its shape. ``qkv``: one fused projection
    or three (q, k, v); ``gate_up``: one fused [2I, H] projection (gate rows first), two (gate, up), or none
    (the block's MLP stays the model's module)."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    eps: float
    qkv: list[LayerProjection]
    o: LayerProjection
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    scaling: float
    gate_up: list[LayerProjection] = dataclasses.field(default_factory=list)
    down: LayerProjection | None = None
    activation: str = "silu"
    gemma_norm: bool = False
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    qk_eps: float = 1e-6
    softcap: float | None = None
    #: tensor parallelism: sums a row-wise projection's partial output over the ranks, in place (o and down are
    #: each this rank's slice of input features); None on one process. The compiled CPU layer has no collective
    #: inside, so a spec with one runs the composed ops
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"query heads ({self.num_heads}) must be a multiple of KV heads ({self.num_kv_heads})")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        total = sum(p.out_features for p in self.qkv)
        if total != (self.num_heads + 2 * self.num_kv_heads) * self.head_dim:
            raise ValueError(f"q/k/v projections give {total} features; {self.num_heads} + 2 x {self.num_kv_heads} "
                             f"heads of {self.head_dim} need {(self.num_heads + 2 * self.num_kv_heads) * self.head_dim}")
        if self.gate_up and self.down is None:
            raise ValueError("a gated MLP needs its down projection")
        self._compiled = None

    @property
    def hidden_size(self) -> int:
        return self.input_norm.shape[0]

    @property
    def fused_mlp(self) -> bool:
        return bool(self.gate_up)

    @property
    def dtype(self) -> torch.dtype:
        """The model's compute dtype (its norm weights'): float32, bfloat16 or float16."""
        return self.input_norm.dtype

    def compiled(self):
        """The compiled CPU layer (built once; None without the compiled kernels, or with an all-reduce)."""
        if self.all_reduce is not None:
            return None
        if self._compiled is None:
            ext = cpu_extension()
            if ext is None or not hasattr(ext, "DecoderLayer"):
                return None
            self._compiled = ext.DecoderLayer(
                self.input_norm, self.post_attention_norm, float(self.eps), bool(self.gemma_norm),
                [p.compiled(ext) for p in self.qkv], self.o.compiled(ext), [p.compiled(ext) for p in self.gate_up],
                self.down.compiled(ext) if self.down is not None else None, self.q_norm, self.k_norm,
                float(self.qk_eps), self.num_heads, self.num_kv_heads, self.head_dim, self.rotary_dim,
                float(self.scaling), float(self.softcap or 0.0), self.activation, self.dtype)
        return self._compiled


# ---------------------------------------------------------------------------------------------------------
# The op: compiled CPU layer in eager CPU mode, the composition of the kernel library's ops otherwise
# ---------------------------------------------------------------------------------------------------------

def attn_in(spec: DecoderLayerSpec, hidden, cos, sin):
    """-> (q [B, Hq, 1, D], k [B, Hkv, 1, D], v [B, Hkv, 1, D])."""
    if _backend.eager_cpu(hidden):
        layer = spec.compiled()
        if layer is not None:
            return tuple(layer.attn_in(hidden, cos, sin))
    return attn_in_composed(spec, hidden, cos, sin)


def attn_out_mlp(spec: DecoderLayerSpec, hidden, q, keys, values, k_scale=None, v_scale=None, mask=None, *,
                 new_kv=None, slot: int = -1, attend_len: int = 0, next_spec: DecoderLayerSpec | None = None,
                 next_cos=None, next_sin=None):
    """-> out [B, 1, H]; (out, (q, k, v) of ``next_spec``) when it is given; (residual, normed) [B, 1, H] each
    when the spec has no gated MLP. ``slot >= 0``: ``keys`` / ``values`` (and the int8 scales) are a cache's whole
    buffers and ``new_kv`` is written at ``slot`` first; attention reads ``[0, attend_len)``."""
    if _backend.eager_cpu(hidden):
        layer = spec.compiled()
        next_layer = next_spec.compiled() if next_spec is not None else None
        if layer is not None and (next_spec is None or next_layer is not None):
            k, v = new_kv if new_kv is not None else (q, q)  # (unread when slot < 0)
            outs = layer.attn_out_mlp(hidden, q, k, v, keys, values, k_scale, v_scale, mask, slot, attend_len,
                                      next_layer, next_cos, next_sin)
            if not spec.fused_mlp:
                return tuple(outs)
            return (outs[0], tuple(outs[1:])) if next_spec is not None else outs[0]
    return attn_out_mlp_composed(spec, hidden, q, keys, values, k_scale, v_scale, mask, new_kv=new_kv, slot=slot,
                                 attend_len=attend_len, next_spec=next_spec, next_cos=next_cos, next_sin=next_sin)


@dataclasses.dataclass
class CacheSlot:
    """One layer's cache for a chained decode step: the cache's whole buffers ([B, Hkv, capacity, D], int8 with
    fp16 scales [B, Hkv, capacity] or the model's dtype), the slot the new token's K/V go to, and how many
    positions attention reads."""

    keys: torch.Tensor
    values: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    slot: int
    attend_len: int


@dataclasses.dataclass
class DecodeHeadSpec:
    """A causal LM's final RMSNorm and output projection, which a decode chain that ends at the model's last layer
    runs in its own parallel region on CPU (:func:`decode_chain`'s ``head``), with the roundings of the kernel
    library's standalone ops (``rms_norm``, then ``linear`` / ``quant_matmul`` on the norm in ``dtype``)."""

    norm_weight: torch.Tensor  # [H]
    eps: float
    gemma_norm: bool
    proj: LayerProjection      # [V, H]
    dtype: torch.dtype         # the model's compute dtype

    def __post_init__(self):
        if self.norm_weight.dim() != 1 or self.norm_weight.shape[0] != self.proj.in_features:
            raise ValueError(f"the norm weight {tuple(self.norm_weight.shape)} must be [{self.proj.in_features}]")
        self._compiled = None

    def compiled(self):
        """The compiled head (built once; None without the compiled kernels)."""
        if self._compiled is None:
            ext = cpu_extension()
            if ext is None or not hasattr(ext, "DecodeHead"):
                return None
            self._compiled = ext.DecodeHead(self.norm_weight, float(self.eps), bool(self.gemma_norm),
                                            self.proj.compiled(ext), self.dtype)
        return self._compiled


def decode_chain(specs: list[DecoderLayerSpec], hidden, q, k, v, caches: list[CacheSlot], mask, cos, sin,
                 next_spec: DecoderLayerSpec | None = None, head: DecodeHeadSpec | None = None):
    """Several consecutive layers' attn_out_mlp in one call: layer 0 takes ``hidden`` and its q, k, v; each
    later layer the output of the one before and its own q, k, v computed at the end of that one's step; each
    writes its K/V at its cache slot. One mask and one cos / sin for all (layers of one attention type).
    ``head`` (the chain ending at the model's last layer, no ``next_spec``): the final norm and output projection
    on the last output, in the same call. Returns ([each layer's output [B, 1, H]], q, k, v of ``next_spec`` or
    None, the head's logits [B, V] or None). On CPU one compiled call (one parallel region for all the layers and
    the head); elsewhere the layers one at a time, and no logits (the caller runs its modules)."""
    if len(specs) != len(caches) or not specs or not all(s.fused_mlp for s in specs):
        raise ValueError("decode_chain: one cache slot per layer, every layer's MLP fused")
    if head is not None and next_spec is not None:
        raise ValueError("decode_chain: a head follows the model's last layer, which has no next layer")
    compiled = [s.compiled() for s in specs] if _backend.eager_cpu(hidden) else None
    after = next_spec.compiled() if (compiled and next_spec is not None) else None
    compiled_head = head.compiled() if (compiled and head is not None) else None
    if compiled and all(c is not None for c in compiled) and (next_spec is None or after is not None):
        outs = compiled[0].decode_chain(compiled, hidden, q, k, v, [c.keys for c in caches], [c.values for c in caches],
                                        [c.k_scale for c in caches], [c.v_scale for c in caches],
                                        [c.slot for c in caches], [c.attend_len for c in caches], mask, cos, sin, after,
                                        compiled_head)
        n = len(specs)
        logits = outs.pop() if compiled_head is not None else None
        return outs[:n], (tuple(outs[n:]) if next_spec is not None else None), logits
    outs, qkv = [], (q, k, v)
    for j, (spec, cache) in enumerate(zip(specs, caches)):
        following = specs[j + 1] if j + 1 < len(specs) else next_spec
        result = attn_out_mlp(spec, hidden, qkv[0], cache.keys, cache.values, cache.k_scale, cache.v_scale, mask,
                              new_kv=qkv[1:], slot=cache.slot, attend_len=cache.attend_len, next_spec=following,
                              next_cos=cos, next_sin=sin)
        hidden, qkv = result if following is not None else (result, None)
        outs.append(hidden)
    return outs, qkv, None


class PreparedChain:
    """:func:`decode_chain` over a whole model's layers (first to last, each MLP fused) and the same caches' buffers,
    token after token, on CPU: the layers, the buffers and the head are converted once, and a token's call passes
    only what changes. The first layer's q / k / v are computed in the chain's own parallel region (no call of its
    own), and only the last layer's output is returned (the others keep their buffers between calls). Each value
    is the one :func:`attn_in` then :func:`decode_chain` give (the same compiled code, in the same order).

    ``buffers``: per layer (keys, values, k_scale, v_scale), a cache's whole buffers as :class:`CacheSlot` holds them;
    they are the tensors the plan keeps (a cache that reallocates needs a new plan: :meth:`holds` tells). Build it
    with :meth:`build`, which gives None where the compiled kernels do not cover the layers."""

    def __init__(self, buffers: list[tuple], head: DecodeHeadSpec | None, compiled, compiled_head, ext):
        self.buffers = [tuple(b) for b in buffers]
        self.head = head
        self._layers, self._head = compiled, compiled_head  # the plan holds raw pointers to these: kept alive here
        self._plan = ext.DecodePlan(compiled, [b[0] for b in buffers], [b[1] for b in buffers],
                                    [b[2] for b in buffers], [b[3] for b in buffers], compiled_head)

    @classmethod
    def build(cls, specs: list[DecoderLayerSpec], buffers: list[tuple], head: DecodeHeadSpec | None = None):
        if not specs or len(buffers) != len(specs) or not all(s.fused_mlp for s in specs):
            return None
        ext = cpu_extension()
        if ext is None or not hasattr(ext, "DecodePlan") or any(b[0].device.type != "cpu" for b in buffers):
            return None
        compiled = [s.compiled() for s in specs]
        compiled_head = head.compiled() if head is not None else None
        if any(c is None for c in compiled) or (head is not None and compiled_head is None):
            return None
        return cls(buffers, head, compiled, compiled_head, ext)

    def holds(self, layer: int, keys, values, k_scale, v_scale) -> bool:
        """Whether layer ``layer``'s buffers are still these tensors."""
        b = self.buffers[layer]
        return b[0] is keys and b[1] is values and b[2] is k_scale and b[3] is v_scale

    def __call__(self, hidden, cos, sin, mask, slot: int, attend_len: int):
        """hidden [B, 1, H], cos / sin [B or 1, 1, >= R], mask as :func:`decode_chain`'s; every layer writes the new
        token's K/V at ``slot`` and attends ``[0, attend_len)``. -> (the last layer's output [B, 1, H], the head's
        logits [B, V] or None)."""
        outs = self._plan.run(hidden, cos, sin, mask, slot, attend_len)
        return outs[0], (outs[1] if len(outs) > 1 else None)


def _write_slot(keys, values, k_scale, v_scale, new_kv, slot: int, attend_len: int):
    """The new token's K/V into a cache's buffers at ``slot``; the views attention reads."""
    k, v = new_kv
    if keys.dtype == torch.int8:
        slots = torch.full((k.shape[0], 1), slot, dtype=torch.long, device=k.device)
        kv_append(k, v, keys, values, k_scale, v_scale, slots)
        return keys[:, :, :attend_len], values[:, :, :attend_len], k_scale[:, :, :attend_len], v_scale[:, :, :attend_len]
    keys[:, :, slot : slot + 1] = k
    values[:, :, slot : slot + 1] = v
    return keys[:, :, :attend_len], values[:, :, :attend_len], None, None


# ---------------------------------------------------------------------------------------------------------
# GPU / torch.compile: the kernel library's ops, one after the other
# ---------------------------------------------------------------------------------------------------------

def _split_heads(spec: DecoderLayerSpec, y: torch.Tensor):
    batch, d = y.shape[0], spec.head_dim
    nq, nk = spec.num_heads * d, spec.num_kv_heads * d
    q = y[:, :nq].reshape(batch, spec.num_heads, 1, d)
    k = y[:, nq : nq + nk].reshape(batch, spec.num_kv_heads, 1, d)
    v = y[:, nq + nk :].reshape(batch, spec.num_kv_heads, 1, d)
    return q, k, v


def _project(projections: list[LayerProjection], x: torch.Tensor, reference: bool = False) -> torch.Tensor:
    outs = [p.ref(x) if reference else p(x) for p in projections]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def attn_in_composed(spec: DecoderLayerSpec, hidden, cos, sin):
    batch = hidden.shape[0]
    x = hidden.reshape(batch, spec.hidden_size)
    n, _ = rms_norm(x, spec.input_norm, None, spec.eps, spec.gemma_norm)
    q, k, v = _split_heads(spec, _project(spec.qkv, n))
    if spec.q_norm is not None:
        q = rms_norm(q.contiguous(), spec.q_norm, None, spec.qk_eps, spec.gemma_norm)[0]
        k = rms_norm(k.contiguous(), spec.k_norm, None, spec.qk_eps, spec.gemma_norm)[0]
    # the model's cos / sin rows (one per token, [c | c] halves) as the rotary op's tables, one row per sequence
    half = spec.rotary_dim // 2
    table_cos = cos.reshape(-1, cos.shape[-1])[:, :half].float().contiguous()
    table_sin = sin.reshape(-1, sin.shape[-1])[:, :half].float().contiguous()
    rows = table_cos.shape[0]
    positions = torch.arange(batch, device=hidden.device).view(batch, 1) if rows == batch else \
        torch.zeros(batch, 1, dtype=torch.long, device=hidden.device)
    q, k = rotary(q.contiguous(), k.contiguous(), table_cos, table_sin, positions, check_range=False)
    return q, k, v.contiguous()


def attn_out_mlp_composed(spec: DecoderLayerSpec, hidden, q, keys, values, k_scale=None, v_scale=None, mask=None, *,
                          new_kv=None, slot: int = -1, attend_len: int = 0, next_spec=None, next_cos=None,
                          next_sin=None):
    if slot >= 0:
        keys, values, k_scale, v_scale = _write_slot(keys, values, k_scale, v_scale, new_kv, slot, attend_len)
    batch, hidden_size = hidden.shape[0], spec.hidden_size
    x = hidden.reshape(batch, hidden_size)
    attn = decode_attention(q, keys, values, k_scale, v_scale, mask, spec.scaling, spec.softcap)  # [B, 1, Hq, D]
    o = spec.o(attn.reshape(batch, spec.num_heads * spec.head_dim))
    if spec.all_reduce is not None:
        o = spec.all_reduce(o)
    normed, residual = rms_norm(o, spec.post_attention_norm, x, spec.eps, spec.gemma_norm)  # residual = x + o
    if not spec.fused_mlp:
        return residual.view(batch, 1, hidden_size), normed.view(batch, 1, hidden_size)
    a = gated_act(_project(spec.gate_up, normed), spec.activation)
    down = spec.down(a)
    if spec.all_reduce is not None:
        down = spec.all_reduce(down)
    out = (residual + down).view(batch, 1, hidden_size)
    if next_spec is not None:
        return out, attn_in_composed(next_spec, out, next_cos, next_sin)
    return out


# ---------------------------------------------------------------------------------------------------------
# Reference: pure PyTorch, as transformers computes the layer in the model's dtype
# ---------------------------------------------------------------------------------------------------------

def rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin on the first R dims, in x's dtype (transformers' apply_rotary_pos_emb)."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def rotate_q_k(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int):
    """:func:`rotate_ref` of q and k [B, H, S, D] with cos, sin [B or 1, S, >= R] (the model's rotary module
    output, in q's dtype): on CPU one compiled call with the same roundings (each product rounded to the dtype,
    then the sum), new contiguous tensors; elsewhere, or without the compiled kernels, the torch ops."""
    ext = cpu_extension() if q.device.type == "cpu" else None
    if (ext is not None and cos.dim() == 3 and cos.dtype == q.dtype == k.dtype == sin.dtype
            and cos.stride(-1) == 1 and sin.stride(-1) == 1 and q.stride(-1) == 1 and k.stride(-1) == 1
            and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))):
        q_out, k_out = ext.rotary_model(q, k, cos, sin, rotary_dim)
        return q_out, k_out
    c, s = cos[:, None, :, :rotary_dim], sin[:, None, :, :rotary_dim]
    return rotate_ref(q, c, s, rotary_dim), rotate_ref(k, c, s, rotary_dim)


def attn_in_ref(spec: DecoderLayerSpec, hidden, cos, sin):
    batch = hidden.shape[0]
    x = hidden.reshape(batch, spec.hidden_size)
    n, _ = rms_norm_ref(x, spec.input_norm, None, spec.eps, spec.gemma_norm)
    q, k, v = _split_heads(spec, _project(spec.qkv, n, reference=True))
    if spec.q_norm is not None:
        q = rms_norm_ref(q, spec.q_norm, None, spec.qk_eps, spec.gemma_norm)[0]
        k = rms_norm_ref(k, spec.k_norm, None, spec.qk_eps, spec.gemma_norm)[0]
    c = cos.reshape(-1, 1, 1, cos.shape[-1])[..., : spec.rotary_dim].to(q.dtype)  # [B|1, 1, 1, R]
    s = sin.reshape(-1, 1, 1, sin.shape[-1])[..., : spec.rotary_dim].to(q.dtype)
    return rotate_ref(q, c, s, spec.rotary_dim), rotate_ref(k, c, s, spec.rotary_dim), v.contiguous()


def attn_out_mlp_ref(spec: DecoderLayerSpec, hidden, q, keys, values, k_scale=None, v_scale=None, mask=None, *,
                     new_kv=None, slot: int = -1, attend_len: int = 0, next_spec=None, next_cos=None, next_sin=None):
    if slot >= 0:
        keys, values, k_scale, v_scale = _write_slot(keys, values, k_scale, v_scale, new_kv, slot, attend_len)
    batch, hidden_size = hidden.shape[0], spec.hidden_size
    x = hidden.reshape(batch, hidden_size)
    if mask is not None and mask.dtype != torch.bool:
        # an additive float mask: the reference attention takes a boolean one; finite entries must be 0 here
        mask = mask > torch.finfo(mask.dtype).min / 2
    attn = decode_attention_ref(q, keys, values, k_scale, v_scale, mask, spec.scaling, spec.softcap)
    o = spec.o.ref(attn.reshape(batch, spec.num_heads * spec.head_dim))
    if spec.all_reduce is not None:
        o = spec.all_reduce(o)
    residual = x + o
    normed, _ = rms_norm_ref(residual, spec.post_attention_norm, None, spec.eps, spec.gemma_norm)
    if not spec.fused_mlp:
        return residual.view(batch, 1, hidden_size), normed.view(batch, 1, hidden_size)
    a = gated_act_ref(_project(spec.gate_up, normed, reference=True), spec.activation)
    down = spec.down.ref(a)
    if spec.all_reduce is not None:
        down = spec.all_reduce(down)
    out = (residual + down).view(batch, 1, hidden_size)
    if next_spec is not None:
        return out, attn_in_ref(next_spec, out, next_cos, next_sin)
    return out
