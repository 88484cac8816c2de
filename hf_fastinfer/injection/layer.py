"""The forward that kernel injection installs on a recognised decoder block (and on the output projection and
the final norm).

:class:`FusedDecoderLayer` is set as the block instance's ``forward`` (the class is untouched; deleting the
attribute undoes it). For a decode call (one new token per sequence, no gradient, the model's own position
embeddings) it runs the fused layer of :mod:`hf_fastinfer.kernels.decoder_layer` around the cache's own
``update``; on CPU a prefill call (several tokens) runs the same math through the kernel library's fused ops
with the model's own attention function. Every other call (training, attention weights requested, an unusual
mask or cache, a GPU prefill) takes the block's own forward, unchanged.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import nn

from .._compat import CACHE_KWARGS, cache_from
from ..cache import FastInferCache
from ..kernels import decoder_layer as fused
from ..kernels.decoder_layer import rotate_q_k
from ..kernels.gated_act import gated_act
from ..kernels.linear import CPU_GEMV_MAX_ROWS, linear
from ..kernels.rms_norm import rms_norm
from ..kernels.rotary import rotary

__all__ = ["FusedDecoderLayer", "FastLinearForward", "FastNormForward"]


def attention_function(attention: nn.Module):
    """The attention function ``attention`` calls: the model's ``attn_implementation`` from transformers'
    registry, or the eager function of the model's own module; None when neither is found."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules.get(type(attention).__module__), "eager_attention_forward", None)
    implementation = getattr(getattr(attention, "config", None), "_attn_implementation", None)
    if implementation in (None, "eager"):
        return eager
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)


class FusedDecoderLayer:
    """``layer.forward`` for an injected block. ``spec`` names the block's tensors (no copies); ``mlp`` is the
    block's MLP module when the spec does not fuse it (mixture of experts)."""

    def __init__(self, layer: nn.Module, spec: fused.DecoderLayerSpec, layer_idx: int, mlp: nn.Module | None,
                 attention: nn.Module | None = None):
        self._layer = weakref.ref(layer)
        #: the block's attention module: the fused prefill step calls the model's attention function on it, as
        #: the block would (set by inject once the probe has checked the prefill step; None: no fused prefill)
        self.attention = attention
        self.prefill_checked = False
        self._original = type(layer).forward
        self.spec = spec
        self.layer_idx = layer_idx
        self.mlp = mlp
        self.device = spec.input_norm.device
        self.dtype = spec.dtype
        # on CPU the compiled layer takes up to this many sequences; GPU kernels take any batch
        self.max_batch = CPU_GEMV_MAX_ROWS if self.device.type == "cpu" else 1 << 30
        #: the block the model calls after this one (set by inject): on CPU its q/k/v are computed at the end of
        #: this block's compiled call, and used only if it is then called with exactly this block's output
        self.next: FusedDecoderLayer | None = None
        self._stash = None  # (hidden it was computed from, cos, sin, (q, k, v)) from the block before
        #: this block's whole decode step, computed in a chain started by an earlier block: (its input, cos, sin,
        #: mask, cache, its output, its cache layer, that layer's length after the step)
        self._chained = None
        #: set by the whole decode step on the model's first block for the duration of its call: the model's final
        #: norm and output projection, which a chain reaching the model's last block then runs in its call, and the
        #: result, (the last block's output, logits [B, V]), for the step to pick up
        self.head: fused.DecodeHeadSpec | None = None
        self.head_logits = None
        #: set by the whole decode step on the model's first block for the duration of its call: the model's blocks
        #: in order. A chain that runs exactly the first of them then leaves its outputs in ``chain_outs`` for the
        #: step, which calls none of the later blocks (their calls would only hand back what the chain computed)
        self.consume_chain: list[FusedDecoderLayer] | None = None
        self.chain_outs: list[torch.Tensor] | None = None
        self.decode_calls = 0  # how many calls took the fused path (tests and report() read it)
        #: set by the whole decode step on the model's last block for the duration of a prompt call whose caller
        #: reads only the last ``keep_rows`` positions of the model's output (``logits_to_keep``, as generate()
        #: asks for): the block's prefill then computes keys and values for every position and the rest of the
        #: block (attention's queries, o_proj, the MLP) for those rows only, and returns [B, keep_rows, H]
        self.keep_rows = 0
        self.trimmed_calls = 0  # how many prefill calls did (tests read it)

    def __call__(self, hidden_states, *args, **kwargs):
        if hidden_states.dim() == 3 and hidden_states.shape[1] > 1:
            out = self.prefill(hidden_states, args, kwargs)
        else:
            out = self.decode(hidden_states, args, kwargs)
        if out is None:
            return self._original(self._layer(), hidden_states, *args, **kwargs)
        return out

    def _discard_chain(self) -> None:
        """A chained step that is not going to be used (its block was called with other inputs): give back the
        cache positions it and the blocks after it in the chain took, if the cache has not moved since."""
        layer = self
        while layer is not None and layer._chained is not None:
            cache_layer, length = layer._chained[6], layer._chained[7]
            layer._chained = None
            if cache_layer.length == length:
                cache_layer.length -= 1
                cache_layer.cumulative_length -= 1
            layer = layer.next

    def covers(self, hidden: torch.Tensor, mask) -> bool:
        """Whether the fused decode step takes these hidden states [B, 1, H] and attention mask (None, or
        [B or 1, 1, 1, L]: bool, or additive float on CPU): the batch within the compiled kernels' rows, the
        block's dtype and device, the block in eval mode."""
        if hidden.dim() != 3 or hidden.shape[1] != 1 or hidden.shape[0] > self.max_batch:
            return False
        if hidden.dtype != self.dtype or hidden.device != self.device or self._layer().training:
            return False
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[2] != 1:
                return False
            if mask.dtype != torch.bool and (hidden.device.type != "cpu" or mask.dtype not in (torch.float32, self.dtype)):
                return False
        return True

    def decode(self, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The fused decode step, or None when this call is not one it covers (the caller runs the original)."""
        if self._chained is not None:
            expected, c_cos, c_sin, c_mask, c_cache, out, _, _ = self._chained
            position_embeddings = kwargs.get("position_embeddings") or (None, None)
            if (not args and hidden is expected and position_embeddings[0] is c_cos and position_embeddings[1] is c_sin
                    and kwargs.get("attention_mask") is c_mask and cache_from(kwargs) is c_cache
                    and not kwargs.get("output_attentions")):
                self._chained = None
                self.decode_calls += 1
                return out
            self._discard_chain()
        stash, self._stash = self._stash, None
        mask = kwargs.get("attention_mask")
        if args or not self.covers(hidden, mask):
            return None
        if torch.is_grad_enabled() and hidden.requires_grad:
            return None  # the fused step has no backward: autograd gets the model's own forward
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None or kwargs.get("output_attentions"):
            return None
        cos, sin = position_embeddings
        if stash is not None and stash[0] is hidden and stash[1] is cos and stash[2] is sin:
            q, k, v = stash[3]  # computed by the block before, in its own call
        else:
            q, k, v = fused.attn_in(self.spec, hidden, cos, sin)
        cache = cache_from(kwargs)
        eager_cpu = hidden.device.type == "cpu" and not torch.compiler.is_compiling()
        slot, attend_len, k_scale, v_scale = -1, 0, None, None
        own = cache.layers[self.layer_idx] if eager_cpu and isinstance(cache, FastInferCache) else None
        if own is not None:
            slot = own.reserve_decode_slot(hidden.shape[0])
        if slot is not None and slot >= 0:
            # hf_fastinfer's own cache: K/V are written into its buffers inside the compiled call
            keys, values = own.keys, own.values
            k_scale, v_scale = own.key_scales, own.value_scales
            attend_len = own.capacity if own.static_shapes else own.length
            if self.mlp is None and self.next is not None and not own.is_sliding:
                chained = self._decode_chain(hidden, q, k, v, cache, mask, cos, sin,
                                             fused.CacheSlot(keys, values, k_scale, v_scale, slot, attend_len))
                if chained is not None:
                    return chained
        else:
            slot = -1
            if cache is not None:
                keys, values = cache.update(k, v, self.layer_idx)
            else:
                keys, values = k, v  # no cache: the token attends to itself
            k_scale = getattr(keys, "_hf_fastinfer_scale", None)  # int8 K/V handed over as stored (fastinfer_int8)
            v_scale = getattr(values, "_hf_fastinfer_scale", None)
            if keys.dtype == torch.int8 and (k_scale is None or v_scale is None):
                raise RuntimeError("the KV cache returned int8 keys without their scales")
        if not torch.compiler.is_compiling():
            self.decode_calls += 1
        following = self.next if eager_cpu and self.mlp is None else None
        out = fused.attn_out_mlp(self.spec, hidden, q, keys, values, k_scale, v_scale, mask, new_kv=(k, v), slot=slot,
                                 attend_len=attend_len, next_spec=following.spec if following is not None else None,
                                 next_cos=cos, next_sin=sin)
        if following is not None:
            out, next_qkv = out
            following._stash = (out, cos, sin, next_qkv)
        if self.mlp is None:
            return out
        residual, normed = out
        mlp_out = self.mlp(normed)
        if isinstance(mlp_out, tuple):  # MoE blocks that also return router logits
            mlp_out = mlp_out[0]
        return residual + mlp_out


    def _decode_chain(self, hidden, q, k, v, cache, mask, cos, sin, first: fused.CacheSlot) -> torch.Tensor | None:
        """This block and the blocks after it in one compiled call (each its slot reserved in hf_fastinfer's
        cache): this block's output now, the later blocks' outputs kept for their own calls, which check that
        they get exactly the inputs the chain assumed. None when no later block can join."""
        chain, slots = [self], [first]
        layer = self.next
        while layer is not None and layer.mlp is None and layer._chained is None and layer.dtype == self.dtype:
            own = cache.layers[layer.layer_idx]
            if own.is_sliding:
                break
            slot = own.reserve_decode_slot(hidden.shape[0])
            if slot is None:
                break
            chain.append(layer)
            slots.append(fused.CacheSlot(own.keys, own.values, own.key_scales, own.value_scales, slot,
                                         own.capacity if own.static_shapes else own.length))
            if layer.next is None or layer.next.layer_idx != layer.layer_idx + 1:
                break
            layer = layer.next
        if len(chain) == 1:
            return None
        after = chain[-1].next
        after = after if after is not None and after.mlp is None and after.dtype == self.dtype else None
        head = self.head if chain[-1].next is None else None  # the chain reaches the model's last block
        outs, next_qkv, logits = fused.decode_chain([layer.spec for layer in chain], hidden, q, k, v, slots, mask, cos,
                                                    sin, after.spec if after is not None else None, head)
        if logits is not None:
            self.head_logits = (outs[-1], logits)
        consumer = self.consume_chain
        if consumer is not None and consumer[: len(chain)] == chain:
            self.chain_outs = outs  # the whole step takes the later blocks' outputs from here
            for layer in chain[1:]:
                layer.decode_calls += 1
        else:
            for j in range(1, len(chain)):
                own = cache.layers[chain[j].layer_idx]
                chain[j]._chained = (outs[j - 1], cos, sin, mask, cache, outs[j], own, own.length)
        if after is not None:
            after._stash = (outs[-1], cos, sin, next_qkv)
        self.decode_calls += 1
        return outs[0]

    def prefill(self, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """Several tokens per sequence on CPU: the block's math through the kernel library's fused ops (RMSNorm,
        one q/k/v product, rotary, residual add + norm, one gate/up product, gated activation), attention by the
        model's own attention function with the model's mask; None when this call is not one it covers."""
        if not self.prefill_checked or args or hidden.dim() != 3 or hidden.device.type != "cpu":
            return None
        attention_fn = attention_function(self.attention)
        if attention_fn is None:
            return None
        if torch.compiler.is_compiling() or hidden.dtype != self.dtype or self._layer().training:
            return None
        if torch.is_grad_enabled() and hidden.requires_grad:
            return None
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None or kwargs.get("output_attentions"):
            return None
        spec = self.spec
        batch, length, _ = hidden.shape
        d, hq, hkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
        normed, _ = rms_norm(hidden, spec.input_norm, None, spec.eps, spec.gemma_norm)
        y = spec.qkv[0](normed) if len(spec.qkv) == 1 else torch.cat([p(normed) for p in spec.qkv], dim=-1)
        q = y[..., : hq * d].reshape(batch, length, hq, d)
        k = y[..., hq * d : (hq + hkv) * d].reshape(batch, length, hkv, d)
        v = y[..., (hq + hkv) * d :].reshape(batch, length, hkv, d).transpose(1, 2)
        if spec.q_norm is not None:
            q = rms_norm(q, spec.q_norm, None, spec.qk_eps, spec.gemma_norm)[0]
            k = rms_norm(k, spec.k_norm, None, spec.qk_eps, spec.gemma_norm)[0]
        cos, sin = position_embeddings
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, L, D]
        if hidden.dtype == torch.float32:
            # the rotary kernel: each product and the sum rounded in fp32, as the model's own ops round them
            half = spec.rotary_dim // 2
            table_cos = cos.reshape(-1, cos.shape[-1])[:, :half].float().contiguous()  # one row per token
            table_sin = sin.reshape(-1, sin.shape[-1])[:, :half].float().contiguous()
            tokens = torch.arange(table_cos.shape[0], device=hidden.device)
            positions = tokens.view(batch, length) if table_cos.shape[0] == batch * length else \
                tokens.expand(batch, length).contiguous()
            q, k = rotary(q, k, table_cos, table_sin, positions, check_range=False)
        else:
            # bf16 / fp16: the model rounds each product to its dtype before the sum, which the table kernel
            # (one rounding from fp32) does not; rotate_q_k computes it with the model's roundings in one call
            # (as torch ops, a quarter of a bf16 prompt's time)
            q, k = rotate_q_k(q, k, cos, sin, spec.rotary_dim)
        cache = cache_from(kwargs)
        keys, values = cache.update(k, v, self.layer_idx) if cache is not None else (k, v)
        rest = {n: value for n, value in kwargs.items()
                if n not in ("attention_mask", "position_embeddings", "hidden_states", *CACHE_KWARGS)}
        mask = kwargs.get("attention_mask")
        rows = self.keep_rows if 0 < self.keep_rows < length else length
        tensor_mask = isinstance(mask, torch.Tensor) and mask.dim() == 4
        if rows < length and (tensor_mask or (mask is None and rows == 1 and keys.shape[2] == length)):
            # Only the last rows leave the model: every position's keys and values are in the cache above, the
            # queries and everything after them are needed for those rows alone. A mask keeps its last rows. No
            # mask (a causal prompt that is all the keys: transformers' mask functions leave it out only then)
            # means the last query sees every key, as it does alone without a mask in every attention function;
            # several rows without a mask would need a causal mask built in the function's own format: not trimmed
            q, hidden = q[:, :, -rows:], hidden[:, -rows:].contiguous()
            if mask is not None:
                mask = mask[:, :, -rows:]  # [B or 1, 1, rows, Lk]
            self.trimmed_calls += 1
        else:
            rows = length
        attn, _ = attention_fn(self.attention, q, keys, values, mask, dropout=0.0, scaling=spec.scaling, **rest)
        o = spec.o(attn.reshape(batch, rows, hq * d))
        if spec.all_reduce is not None:
            o = spec.all_reduce(o)  # tensor parallelism: o is this rank's partial sum
        normed, residual = rms_norm(o, spec.post_attention_norm, hidden, spec.eps, spec.gemma_norm)
        if self.mlp is not None:
            mlp_out = self.mlp(normed)
            return residual + (mlp_out[0] if isinstance(mlp_out, tuple) else mlp_out)
        gate_up = spec.gate_up[0](normed) if len(spec.gate_up) == 1 else torch.cat([p(normed) for p in spec.gate_up], -1)
        down = spec.down(gated_act(gate_up, spec.activation))
        if spec.all_reduce is not None:
            down = spec.all_reduce(down)
        return residual + down


class FastLinearForward:
    """``forward`` of a float ``nn.Linear`` (the output projection): the kernel library's linear op, which on CPU
    reads the weight at the memory bandwidth for a few rows."""

    def __init__(self, module: nn.Linear):
        self._module = weakref.ref(module)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self._module()
        if x.dtype != module.weight.dtype:
            return nn.functional.linear(x, module.weight, module.bias)
        return linear(x, module.weight, module.bias)


class FastNormForward:
    """``forward`` of an RMSNorm module outside the fused blocks (the final norm): the kernel library's op."""

    def __init__(self, module: nn.Module, eps: float, gemma: bool):
        self._module = weakref.ref(module)
        self.eps = eps
        self.gemma = gemma

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self._module()
        if x.dtype != module.weight.dtype or x.stride(-1) != 1 or (torch.is_grad_enabled() and x.requires_grad):
            return type(module).forward(module, x)
        return rms_norm(x, module.weight, None, self.eps, self.gemma)[0]
