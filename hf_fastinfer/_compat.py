"""Names that differ between the transformers releases hf_fastinfer supports.

transformers 5.24 renamed the KV-cache argument of every model, layer and attention forward, of
``prepare_inputs_for_generation`` and of the model outputs from ``past_key_values`` to ``cache`` (the old name
is still accepted by forwards, with a deprecation warning). hf_fastinfer reads whichever name a call carries and
passes the one the installed release takes, so that it neither loses the cache on 5.24 nor warns on every call.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["CACHE_KWARGS", "cache_kwarg", "cache_from", "output_cache"]

#: both names a call may carry the cache under, the current one first
CACHE_KWARGS = ("cache", "past_key_values")


@functools.cache
def cache_kwarg() -> str:
    """The name the installed transformers' forwards take the KV cache under: "cache" or "past_key_values"
    (read from its model outputs on first use, so importing hf_fastinfer imports no modeling code)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_from(mapping: dict) -> Any:
    """The KV cache in a forward's keyword arguments or generate()'s model_kwargs, under either name (or None)."""
    cache = mapping.get("cache")
    return cache if cache is not None else mapping.get("past_key_values")


def output_cache(output: Any) -> Any:
    """The KV cache a model output (or generate()'s dict output) carries, under either name (or None)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
