"""KV caches behind ``cache_implementation="fastinfer"`` and ``"fastinfer_int8"``.

:func:`build_cache` is what the generation hook (:mod:`hf_fastinfer.generation`) calls; it is also how a user
builds a cache to pass as ``past_key_values=``.

* ``"fastinfer"``: a pre-allocated, compile-friendly KV cache. This release builds transformers' own
  :class:`~transformers.StaticCache` (sliding-window layers included) sized to the ``generate()`` call, so
  every call has room for all the tokens it asks for and the output is exactly transformers' static-cache
  output. hf_fastinfer's growable cache and decode-attention kernel replace it behind the same name.
* ``"fastinfer_int8"``: int8 K/V with per-token, per-head scales. Not available in this release: asking for
  it raises :class:`NotImplementedError` naming the working alternative, rather than silently storing
  float K/V under an int8 name.
"""

from __future__ import annotations

from transformers import PreTrainedConfig, StaticCache
from transformers.cache_utils import Cache

__all__ = ["CACHE_IMPLEMENTATIONS", "build_cache"]

#: the ``cache_implementation`` names hf_fastinfer adds to transformers
CACHE_IMPLEMENTATIONS: tuple[str, ...] = ("fastinfer", "fastinfer_int8")


def build_cache(name: str, *, config: PreTrainedConfig, max_cache_len: int) -> Cache:
    """Build the cache registered as ``name`` for a model with (text) config ``config``.

    max_cache_len: how many positions (prompt + new tokens) the cache must hold.
    """
    if name not in CACHE_IMPLEMENTATIONS:
        raise ValueError(f"Unknown hf_fastinfer cache {name!r}; choose one of {CACHE_IMPLEMENTATIONS}")
    if max_cache_len <= 0:
        raise ValueError(f"max_cache_len must be positive, got {max_cache_len}")
    if name == "fastinfer_int8":
        raise NotImplementedError(
            "cache_implementation='fastinfer_int8' (int8 KV cache) is not available in this release of "
            "hf_fastinfer. Use cache_implementation='fastinfer' (full-precision pre-allocated cache) instead."
        )
    return StaticCache(config=config, max_cache_len=max_cache_len)
