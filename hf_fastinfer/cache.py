"""KV caches behind ``cache_implementation="fastinfer"`` and ``"fastinfer_int8"``.

Both are transformers :class:`~transformers.cache_utils.Cache` objects made of hf_fastinfer cache layers
(subclasses of transformers' ``CacheLayerMixin``), so everything ``generate()`` asks of a cache works: beam
search reordering, cropping (assisted and prompt-lookup decoding), batch repeat/select, reset and reuse
across calls, sliding-window layers. They are also usable directly as ``past_key_values=``::

    cache = hf_fastinfer.build_cache("fastinfer_int8", config=model.config, max_cache_len=256)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=3000)   # grows past 256

Layout of one layer: pre-allocated buffers ``keys``/``values`` of shape [B, Hkv, capacity, D], written in
place at ``length`` (the number of stored positions). When generation outgrows the capacity the buffers
are reallocated at twice the size (amortised O(1) per token, unlike a concatenating cache's O(L)), so there
is no fixed token cap. The int8 variant stores K/V as int8 with one fp16 scale per (sequence, head, token):
symmetric absmax quantization, which costs 1 + 2/D bytes per element (0.52x of bf16, 0.26x of fp32 at
D = 64).

Two read-out modes:

* ``static_shapes=False`` (eager, the default): ``update`` returns views of the stored prefix, so attention
  runs over exactly the positions that exist.
* ``static_shapes=True`` (set by the generation hook when transformers compiles the decode step): ``update``
  returns the whole buffers and the mask covers the unused tail (causal masking hides positions past the
  current one), so shapes stay fixed step to step and the compiled graph is reused until the cache grows.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from .kernels.kv_quant import dequantize_kv, kv_append

__all__ = [
    "CACHE_IMPLEMENTATIONS",
    "FastInferCache",
    "FastInferInt8Cache",
    "FastInferLayer",
    "build_cache",
]

#: the ``cache_implementation`` names hf_fastinfer adds to transformers
CACHE_IMPLEMENTATIONS: tuple[str, ...] = ("fastinfer", "fastinfer_int8")

# Buffers are sized in multiples of this many positions (keeps reallocations rare and shapes regular).
_CAPACITY_QUANTUM = 64
# Sliding-window layers keep this many positions beyond the window so that assisted / prompt-lookup
# decoding can roll back rejected candidate tokens after the window has filled.
SLIDING_ROLLBACK_MARGIN = 128


def _round_capacity(n: int) -> int:
    return max(_CAPACITY_QUANTUM, math.ceil(n / _CAPACITY_QUANTUM) * _CAPACITY_QUANTUM)


class FastInferLayer(CacheLayerMixin):
    """One attention layer's KV cache: pre-allocated, growable, optionally int8, optionally sliding-window.

    Args:
        max_cache_len: initial capacity in positions (the buffers grow beyond it unless ``growth=False``).
        sliding_window: window of a sliding-window attention layer; older positions are dropped (keeping
            :data:`SLIDING_ROLLBACK_MARGIN` extra for rollbacks).
        quantized: store K/V as int8 with per-(sequence, head, token) fp16 scales.
        growth: allow reallocating when a call needs more than the capacity; if False, such a call raises.
        static_shapes: return whole buffers (fixed shapes for torch.compile) instead of the stored prefix.
    """

    is_compileable = True
    is_croppable = True
    supports_early_init = False

    def __init__(
        self,
        max_cache_len: int = 256,
        sliding_window: int | None = None,
        quantized: bool = False,
        growth: bool = True,
        static_shapes: bool = False,
        raw_int8_reads: bool = False,
        **kwargs,
    ):
        super().__init__()
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len <= 0:
            raise ValueError(f"max_cache_len must be a positive integer (positions per layer), got {max_cache_len!r}")
        self.max_cache_len = max_cache_len
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.quantized = quantized
        self.growth = growth
        self.static_shapes = static_shapes
        self.record_past = False
        # Set when the model's attention is hf_fastinfer's: int8 K/V are handed over undequantized.
        self.raw_int8_reads = raw_int8_reads
        self.capacity = 0
        self.length = 0  # positions stored in the buffers
        self.cumulative_length = 0  # absolute position of the next token (= dropped + length)
        self.key_scales: torch.Tensor | None = None
        self.value_scales: torch.Tensor | None = None

    def __repr__(self) -> str:
        kind = "int8" if self.quantized else (str(self.dtype).replace("torch.", "") if self.is_initialized else "?")
        window = f", sliding_window={self.sliding_window}" if self.is_sliding else ""
        return f"FastInferLayer({kind}, length={self.length}, capacity={self.capacity}{window})"

    # -- storage ------------------------------------------------------------------------------------------

    def _allocate(self, batch: int, heads: int, k_dim: int, v_dim: int, capacity: int) -> None:
        storage = torch.int8 if self.quantized else self.dtype
        # zeros, not empty: in static-shape mode the unused tail is read (and masked); it must be finite.
        self.keys = torch.zeros(batch, heads, capacity, k_dim, dtype=storage, device=self.device)
        self.values = torch.zeros(batch, heads, capacity, v_dim, dtype=storage, device=self.device)
        if self.quantized:
            self.key_scales = torch.zeros(batch, heads, capacity, dtype=torch.float16, device=self.device)
            self.value_scales = torch.zeros(batch, heads, capacity, dtype=torch.float16, device=self.device)
        self.capacity = capacity

    def _buffers(self) -> list[str]:
        return ["keys", "values", "key_scales", "value_scales"] if self.quantized else ["keys", "values"]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, new, k_dim = key_states.shape
        if new > self.max_cache_len and not self.growth:
            raise ValueError(
                f"The KV cache was built for {self.max_cache_len} positions with growth disabled, but the prompt "
                f"has {new}. Build it with max_cache_len >= {new}, or with growth=True."
            )
        self._allocate(batch, heads, k_dim, value_states.shape[-1], _round_capacity(max(self.max_cache_len, new)))
        self.length = 0
        self.is_initialized = True

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    def _grow(self, capacity: int) -> None:
        """Reallocate the buffers at ``capacity`` positions and copy the stored prefix."""
        if not self.growth:
            raise ValueError(
                f"The KV cache holds {self.capacity} positions but this call needs more, and growth is "
                "disabled. Build the cache with a larger max_cache_len, or with growth=True."
            )
        old = {name: getattr(self, name) for name in self._buffers()}
        batch, heads, _, k_dim = old["keys"].shape
        self._allocate(batch, heads, k_dim, old["values"].shape[-1], capacity)
        for name, tensor in old.items():
            getattr(self, name)[:, :, : self.length].copy_(tensor[:, :, : self.length])

    def _plan(self, incoming: int) -> tuple[int, int]:
        """(positions kept before writing, capacity after writing) for a call adding ``incoming`` positions.

        Shared by ``get_mask_sizes`` (called before ``update``) and ``update`` so the two always agree.
        """
        if not self.is_initialized:
            return 0, _round_capacity(max(self.max_cache_len, incoming))
        kept = self.length
        if self.is_sliding and not self.record_past and kept + incoming > self.capacity:
            # Drop positions no future query of a sliding-window layer can see, keeping a rollback margin.
            kept = min(kept, self.sliding_window - 1 + SLIDING_ROLLBACK_MARGIN)
        needed = kept + incoming
        if needed <= self.capacity:
            return kept, self.capacity
        return kept, _round_capacity(max(needed, 2 * self.capacity))

    def _compact(self, kept: int) -> None:
        drop = self.length - kept
        if drop <= 0:
            return
        for name in self._buffers():
            buffer = getattr(self, name)
            # clone: source and destination overlap
            buffer[:, :, :kept].copy_(buffer[:, :, drop : self.length].clone())
        self.length = kept

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        start, end = self.length, self.length + key_states.shape[-2]
        if self.quantized:
            # the kernel library's quantize-and-append: one call quantizes K and V into their slots
            slots = torch.arange(start, end, device=key_states.device).expand(key_states.shape[0], -1)
            kv_append(key_states, value_states, self.keys, self.values, self.key_scales, self.value_scales, slots)
        else:
            self.keys[:, :, start:end].copy_(key_states)
            self.values[:, :, start:end].copy_(value_states)

    def _read(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[:, :, :end], self.values[:, :, :end]
        if self.quantized and self.raw_int8_reads and not self.static_shapes:
            # hf_fastinfer's attention reads int8 directly; the scales travel with the views.
            keys._hf_fastinfer_scale = self.key_scales[:, :, :end]
            values._hf_fastinfer_scale = self.value_scales[:, :, :end]
            return keys, values
        if self.quantized:
            keys = dequantize_kv(keys, self.key_scales[:, :, :end], self.dtype)
            values = dequantize_kv(values, self.value_scales[:, :, :end], self.dtype)
        return keys, values

    # -- CacheLayerMixin ------------------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store key/value states [B, Hkv, L_new, D]; return the states attention should see."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.batch_size:
            if self.length:
                raise ValueError(
                    f"This KV cache holds a batch of {self.batch_size} sequences, but the model was called with a "
                    f"batch of {key_states.shape[0]}. Call cache.reset() before reusing it for a new batch, or "
                    "build a new cache."
                )
            self.lazy_initialization(key_states, value_states)  # an emptied cache adopts the new batch
        new = key_states.shape[-2]
        kept, capacity = self._plan(new)
        self._compact(kept)
        if capacity != self.capacity:
            self._grow(capacity)
        self._write(key_states, value_states)
        self.length += new
        self.cumulative_length += new
        return self._read(self.capacity if self.static_shapes else self.length)

    def decode_slot_free(self, batch: int) -> bool:
        """Whether :meth:`reserve_decode_slot` would take a position for a one-token append of ``batch``."""
        return self.is_initialized and self.keys.shape[0] == batch and self.length < self.capacity

    def reserve_decode_slot(self, batch: int) -> int | None:
        """For a one-token append (per sequence of ``batch``) that needs neither compaction nor growth: count the
        position as stored and return its buffer index, where the caller writes K/V itself (the fused decode
        layer does, in its compiled call); None when :meth:`update` must handle the call."""
        if not self.decode_slot_free(batch):
            return None
        slot = self.length
        self.length += 1
        self.cumulative_length += 1
        return slot

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Called before `update` with the incoming query length. The offset is the absolute position of
        # buffer index 0 (non-zero once a sliding layer has dropped positions); masks use absolute positions.
        kept, capacity = self._plan(query_length)
        kv_offset = self.cumulative_length - kept
        if self.static_shapes:
            return capacity, kv_offset
        return kept + query_length, kv_offset

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1 if self.growth else self.capacity

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs) -> None:
        # (transformers >= 5.25 passes how many recurrent states to keep for assisted decoding, and its cache
        # hands every layer the same keyword arguments: a KV layer keeps no recurrent state, so it ignores them)
        self.record_past = True

    def reset(self) -> None:
        """Forget the stored positions; the buffers are kept for reuse."""
        self.length = 0
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` positions (a positive value is the legacy 'keep this many')."""
        remove = -tokens_to_remove if tokens_to_remove <= 0 else self.cumulative_length - tokens_to_remove
        if remove <= 0 or not self.is_initialized:
            return
        if remove > self.length:
            raise RuntimeError(
                f"Cannot roll the KV cache back by {remove} positions: this sliding-window layer keeps only the "
                f"last {self.length}. Rollbacks longer than {SLIDING_ROLLBACK_MARGIN} positions need "
                "cache.activate_past_recording() first."
            )
        self.length -= remove
        self.cumulative_length -= remove

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        beam_idx = beam_idx.to(self.device)
        for name in self._buffers():
            buffer = getattr(self, name)
            buffer[:, :, : self.length] = buffer[:, :, : self.length].index_select(0, beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            for name in self._buffers():
                setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            for name in self._buffers():
                setattr(self, name, getattr(self, name)[indices].contiguous())

    def offload(self):
        raise NotImplementedError("hf_fastinfer caches do not support offloading")

    # -- measurement ----------------------------------------------------------------------------------------

    def stored_bytes(self) -> int:
        """Bytes of K/V (and scales) for the positions currently stored."""
        if not self.is_initialized:
            return 0
        total = 0
        for name in self._buffers():
            buffer = getattr(self, name)
            total += buffer[:, :, : self.length].numel() * buffer.element_size()
        return total


_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def _text_config(config, who: str):
    """The decoder's text config of ``config``, or a clear error when it is not a model config."""
    if config is None:
        raise ValueError(f"{who} needs the model's config to size its layers: pass config=model.config")
    if not hasattr(config, "get_text_config"):
        raise TypeError(f"{who}: config must be a transformers model config (e.g. model.config), "
                        f"got {type(config).__name__}")
    return config.get_text_config(decoder=True)


class FastInferCache(Cache):
    """hf_fastinfer's KV cache (``cache_implementation="fastinfer"``), one :class:`FastInferLayer` per layer.

    Args:
        config: the model's config (its text config is used).
        max_cache_len: initial capacity per layer in positions; grows when exceeded unless ``growth=False``.
        growth: allow growing beyond ``max_cache_len``.
        static_shapes: fixed-shape read-out for torch.compile (see the module docstring).
    """

    quantized = False

    def __init__(self, config: PreTrainedConfig, max_cache_len: int = 256, *, growth: bool = True,
                 static_shapes: bool = False):
        text_config = _text_config(config, type(self).__name__)
        layer_types, per_layer_kwargs = get_layer_types_and_kwargs(text_config)
        unsupported = sorted({t for t in layer_types if t not in _SUPPORTED_LAYER_TYPES})
        if unsupported:
            raise NotImplementedError(
                f"hf_fastinfer caches support full and sliding-window attention layers; this model has "
                f"{unsupported} layers. Leave cache_implementation unset for it."
            )
        layers = [
            FastInferLayer(
                max_cache_len=max_cache_len,
                sliding_window=kwargs.get("sliding_window") if layer_type == "sliding_attention" else None,
                quantized=self.quantized,
                growth=growth,
                static_shapes=static_shapes,
                raw_int8_reads=getattr(text_config, "_attn_implementation", None) == "fastinfer",
            )
            for layer_type, kwargs in zip(layer_types, per_layer_kwargs)
        ]
        super().__init__(layers=layers)

    @property
    def static_shapes(self) -> bool:
        return all(layer.static_shapes for layer in self.layers)

    @static_shapes.setter
    def static_shapes(self, value: bool) -> None:
        for layer in self.layers:
            layer.static_shapes = bool(value)

    def mark_eager(self) -> None:
        """Declare that no step reading this cache will be compiled (``generate()`` runs eagerly: the CPU, or
        compilation off): ``is_compileable`` becomes False. transformers builds a 4-D attention mask for every
        decoded token when the cache is compileable (for a fixed-shape compiled step), and keeps even a one-token
        step's mask that an eager step goes without; on the CPU that mask is about 2% of a decoded int4 token."""
        for layer in self.layers:
            layer.is_compileable = False

    def reserve_decode_slots(self, batch: int) -> int | None:
        """A one-token append (per sequence of ``batch``) to every layer at one position: each layer's
        :meth:`FastInferLayer.reserve_decode_slot`, taken in all layers or in none. The buffer index the caller
        writes every layer's K/V at, or None (a layer is full, holds another batch, or another length)."""
        layers = self.layers
        length = layers[0].length
        if any(layer.length != length or not layer.decode_slot_free(batch) for layer in layers):
            return None
        for layer in layers:
            layer.reserve_decode_slot(batch)
        return length

    def stored_bytes(self) -> int:
        """Bytes held for the stored positions across all layers (K, V and, for int8, their scales)."""
        return sum(layer.stored_bytes() for layer in self.layers)


class FastInferInt8Cache(FastInferCache):
    """``cache_implementation="fastinfer_int8"``: K/V stored as int8 with per-token, per-head fp16 scales."""

    quantized = True


_CACHE_CLASSES = {"fastinfer": FastInferCache, "fastinfer_int8": FastInferInt8Cache}


def build_cache(name: str, *, config: PreTrainedConfig, max_cache_len: int = 256, growth: bool = True,
                static_shapes: bool = False) -> FastInferCache:
    """Build the cache registered as ``name`` ("fastinfer" or "fastinfer_int8") for a model's config.

    max_cache_len: initial capacity in positions (prompt + new tokens); it grows beyond unless growth=False.
    """
    if name not in _CACHE_CLASSES:
        raise ValueError(f"Unknown hf_fastinfer cache {name!r}; choose one of {CACHE_IMPLEMENTATIONS}")
    return _CACHE_CLASSES[name](config, max_cache_len, growth=growth, static_shapes=static_shapes)
