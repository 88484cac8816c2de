"""hf_fastinfer: fused kernels, tensor parallelism and MoQ weight quantization for transformers' own
``from_pretrained()`` / ``generate()``.

Importing the package registers it with transformers (idempotently; :func:`disable` undoes it)::

    import torch, hf_fastinfer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastinfer")
    out = model.generate(**inputs, max_new_tokens=128, cache_implementation="fastinfer")
"""

from __future__ import annotations

from . import _registry

# Fails here, with the supported range and the fix, before anything else touches transformers internals.
_registry.check_transformers_version()

from . import models  # noqa: E402  (lightweight: loads nothing until called)
from ._registry import SUPPORTED_TRANSFORMERS, UnsupportedTransformersVersion, disable, is_enabled  # noqa: E402
from ._registry import register as enable  # noqa: E402
from .cache import CACHE_IMPLEMENTATIONS, FastInferCache, FastInferInt8Cache, build_cache  # noqa: E402
from .config import FastInferConfig  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "FastInferConfig",
    "MoQLinear",
    "report",
    "inject",
    "uninject",
    "CACHE_IMPLEMENTATIONS",
    "FastInferCache",
    "FastInferInt8Cache",
    "build_cache",
    "enable",
    "disable",
    "is_enabled",
    "models",
    "SUPPORTED_TRANSFORMERS",
    "UnsupportedTransformersVersion",
    "__version__",
]



def __getattr__(name: str):
    # MoQLinear / report live in quant/, inject / uninject in injection/ (a package name apart from the function
    # `inject`); both import the kernel library (and Triton): loaded on first use
    if name in ("MoQLinear", "report"):
        from . import quant

        return getattr(quant, name)
    if name in ("inject", "uninject"):
        from . import injection

        return getattr(injection, name)
    raise AttributeError(f"module 'hf_fastinfer' has no attribute {name!r}")


enable()
