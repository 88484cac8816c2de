"""The generation hook: lets ``generate()`` accept hf_fastinfer's ``cache_implementation`` names.

transformers 5 validates ``GenerationConfig.cache_implementation`` against a closed tuple
(``transformers.generation.configuration_utils.ALL_CACHE_IMPLEMENTATIONS``) and builds caches in
``GenerationMixin._prepare_cache_for_generation``. :func:`enable` extends the tuple with
:data:`hf_fastinfer.cache.CACHE_IMPLEMENTATIONS` and wraps that one method so that our names build our
caches; every other name goes to transformers' own code untouched. :func:`disable` puts both original objects
back (the tests check identity). Both are idempotent and survive ``importlib.reload`` of this module.
"""

from __future__ import annotations

import functools

from ._compat import cache_from, cache_kwarg
from .cache import CACHE_IMPLEMENTATIONS, FastInferCache, build_cache

__all__ = ["enable", "disable", "is_enabled"]

_STATE: dict = globals().get("_STATE") or {}
_ORIGINAL_ATTR = "__hf_fastinfer_original__"


def _prepare_cache_for_generation(original, self, generation_config, model_kwargs, *args, **kwargs):
    # Same signature as GenerationMixin._prepare_cache_for_generation(generation_config, model_kwargs,
    # generation_mode, batch_size, max_cache_length); only our names are handled here.
    name = generation_config.cache_implementation
    if name not in CACHE_IMPLEMENTATIONS:
        return original(self, generation_config, model_kwargs, *args, **kwargs)
    args_by_name = dict(zip(("generation_mode", "batch_size", "max_cache_length"), args), **kwargs)
    existing = cache_from(model_kwargs)
    if generation_config.is_assistant and isinstance(existing, FastInferCache):
        # An assistant model whose generation_config names our cache gets its own cache handed back by the
        # candidate generator on every call after the first: keep using it.
        return
    if existing is not None or generation_config.use_cache is False:
        # transformers' own checks (cache passed together with cache_implementation; use_cache=False)
        return original(self, generation_config, model_kwargs, *args, **kwargs)
    if self.config.is_encoder_decoder:
        raise NotImplementedError(
            f"cache_implementation={name!r} supports decoder-only models; {type(self).__name__} is an "
            "encoder-decoder model. Leave cache_implementation unset for it."
        )
    if not self._supports_default_dynamic_cache():
        # e.g. state-space models that build their own cache: same behaviour as transformers for "static"
        return original(self, generation_config, model_kwargs, *args, **kwargs)
    cache = build_cache(
        name,
        config=self.config.get_text_config(decoder=True),
        max_cache_len=args_by_name["max_cache_length"],
    )
    model_kwargs[cache_kwarg()] = cache
    # When transformers will compile the decode step (GPU, compileable cache), keep shapes fixed between steps.
    cache.static_shapes = bool(self._valid_auto_compile_criteria(model_kwargs, generation_config))
    if not cache.static_shapes:
        cache.mark_eager()  # no per-token 4-D mask from generate() for a step that is not compiled
    if generation_config.is_assistant:
        # assisted decoding rolls the assistant's cache back: sliding layers must keep their past
        cache.activate_past_recording()


def enable() -> None:
    """Install the hook (idempotent)."""
    import transformers.generation.configuration_utils as configuration_utils
    from transformers.generation.utils import GenerationMixin

    current_names = configuration_utils.ALL_CACHE_IMPLEMENTATIONS
    if _STATE.get("extended_names") is not current_names:
        _STATE.setdefault("original_names", current_names)
        extended = _STATE["original_names"] + tuple(
            n for n in CACHE_IMPLEMENTATIONS if n not in _STATE["original_names"]
        )
        configuration_utils.ALL_CACHE_IMPLEMENTATIONS = extended
        _STATE["extended_names"] = extended

    current = GenerationMixin.__dict__["_prepare_cache_for_generation"]
    # A hook from an earlier import of this module (reload, re-run notebook cell) wraps the true original.
    original = getattr(current, _ORIGINAL_ATTR, current)
    _STATE.setdefault("original_prepare", original)

    @functools.wraps(original)
    def hooked(self, generation_config, model_kwargs, *args, **kwargs):
        return _prepare_cache_for_generation(original, self, generation_config, model_kwargs, *args, **kwargs)

    setattr(hooked, _ORIGINAL_ATTR, original)
    hooked.__module__ = __name__
    GenerationMixin._prepare_cache_for_generation = hooked
    _STATE["enabled"] = True


def disable() -> None:
    """Remove the hook: transformers gets back the very objects it had (idempotent)."""
    import transformers.generation.configuration_utils as configuration_utils
    from transformers.generation.utils import GenerationMixin

    if "original_names" in _STATE:
        configuration_utils.ALL_CACHE_IMPLEMENTATIONS = _STATE.pop("original_names")
        _STATE.pop("extended_names", None)
    current = GenerationMixin.__dict__["_prepare_cache_for_generation"]
    original = _STATE.pop("original_prepare", None) or getattr(current, _ORIGINAL_ATTR, None)
    if original is not None:
        GenerationMixin._prepare_cache_for_generation = original
    _STATE["enabled"] = False


def is_enabled() -> bool:
    return bool(_STATE.get("enabled"))
