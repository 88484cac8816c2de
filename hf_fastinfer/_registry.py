"""The one place that talks to transformers' registries.

Everything hf_fastinfer plugs into transformers goes through :func:`register` and comes back out through
:func:`disable`:

========================================  ===========================================================
transformers extension point              what is registered under the key ``"fastinfer"``
========================================  ===========================================================
``AttentionInterface``                    :func:`hf_fastinfer.attention.fastinfer_attention_forward`
``AttentionMaskInterface``                :func:`hf_fastinfer.attention.fastinfer_mask`
``register_quantization_config``          :class:`hf_fastinfer.config.FastInferConfig`
``register_quantizer``                    :class:`hf_fastinfer.quantizer.FastInferQuantizer`
``cache_implementation`` names            ``"fastinfer"`` and ``"fastinfer_int8"`` (see :mod:`hf_fastinfer.generation`)
========================================  ===========================================================

Rules kept here:

* idempotent: importing twice, ``importlib.reload`` of any hf_fastinfer module, or re-running a notebook cell
  leaves exactly one registration (the newest code) and never loses what transformers had before us;
* reversible: :func:`disable` puts back the very objects transformers had (checked by identity in the tests);
* no process-wide side effects beyond these registrations: no CUDA initialisation, no compiler settings.
"""

from __future__ import annotations

import threading

from packaging.version import Version

#: transformers versions this release is tested with. The generation hook and the v5 loading pipeline rely
#: on internals that change between major versions, so the upper bound is strict.
SUPPORTED_TRANSFORMERS = ">=5.23,<6"
_MIN_TRANSFORMERS = Version("5.23")
_MAX_TRANSFORMERS_EXCLUSIVE = Version("6")

#: the key under which attention, mask and quantization method are registered
METHOD = "fastinfer"

_MISSING = globals().get("_MISSING") or object()  # kept across reload: saved state refers to it

# Survives ``importlib.reload`` of this module (reload re-executes the code in the same namespace), so the
# objects transformers had before the first registration are never forgotten.
_STATE: dict = globals().get("_STATE") or {"enabled": False, "saved": {}}
_LOCK: threading.RLock = globals().get("_LOCK") or threading.RLock()


class UnsupportedTransformersVersion(ImportError):
    """Raised when the installed transformers is outside :data:`SUPPORTED_TRANSFORMERS`."""


def check_transformers_version(version: str | None = None) -> Version:
    """Check that ``version`` (default: the installed transformers) is supported; return it parsed.

    Raises :class:`UnsupportedTransformersVersion` naming the supported range and the command that fixes it.
    """
    if version is None:
        import transformers

        version = transformers.__version__
    parsed = Version(version)
    # Compare the release only, so that 5.23.0.dev0 and 5.24.0rc1 count as 5.23 / 5.24.
    release = Version(parsed.base_version)
    if not (_MIN_TRANSFORMERS <= release < _MAX_TRANSFORMERS_EXCLUSIVE):
        raise UnsupportedTransformersVersion(
            f"hf_fastinfer supports transformers {SUPPORTED_TRANSFORMERS}, but transformers {version} is "
            f"installed. Fix: pip install 'transformers{SUPPORTED_TRANSFORMERS}'"
        )
    return parsed


def _is_ours(obj) -> bool:
    module = getattr(obj, "__module__", "") or ""
    return module == "hf_fastinfer" or module.startswith("hf_fastinfer.")


def _save_once(slot: str, current) -> None:
    """Remember what transformers had in ``slot`` before we first touched it (never one of our own objects)."""
    saved = _STATE["saved"]
    if slot not in saved:
        saved[slot] = _MISSING if current is _MISSING or _is_ours(current) else current


def _targets():
    """The registries we touch, as (slot name, mapping) pairs. Imported lazily: import order stays cheap."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    return {
        "attention": AttentionInterface._global_mapping,
        "mask": AttentionMaskInterface._global_mapping,
        "quantization_config": AUTO_QUANTIZATION_CONFIG_MAPPING,
        "quantizer": AUTO_QUANTIZER_MAPPING,
    }


def register() -> None:
    """Register hf_fastinfer with transformers. Safe to call any number of times."""
    check_transformers_version()
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
    from transformers.quantizers.auto import register_quantization_config, register_quantizer

    from . import generation
    from .attention import fastinfer_attention_forward, fastinfer_mask
    from .config import FastInferConfig
    from .quantizer import FastInferQuantizer

    with _LOCK:
        targets = _targets()
        for slot, mapping in targets.items():
            current = mapping.get(METHOD, _MISSING)
            _save_once(slot, current)
            if current is not _MISSING and not _is_ours(current):
                # Someone else owns the name: refuse rather than silently replace their code.
                raise RuntimeError(
                    f"transformers already has a {slot} registered as {METHOD!r} ({current!r}) that is not "
                    f"hf_fastinfer's; hf_fastinfer cannot register over it."
                )

        AttentionInterface.register(METHOD, fastinfer_attention_forward)
        AttentionMaskInterface.register(METHOD, fastinfer_mask)
        # transformers' register_* refuse a name twice; a re-registration (reload, re-run cell) replaces our
        # own older class with the current one.
        targets["quantization_config"].pop(METHOD, None)
        register_quantization_config(METHOD)(FastInferConfig)
        targets["quantizer"].pop(METHOD, None)
        register_quantizer(METHOD)(FastInferQuantizer)
        generation.enable()
        _STATE["enabled"] = True


def disable() -> None:
    """Undo :func:`register`: transformers gets back exactly the objects it had before."""
    from . import generation

    with _LOCK:
        if not _STATE["saved"]:
            generation.disable()
            _STATE["enabled"] = False
            return
        for slot, mapping in _targets().items():
            original = _STATE["saved"].get(slot, _MISSING)
            if original is _MISSING:
                mapping.pop(METHOD, None)
            else:
                mapping[METHOD] = original
        generation.disable()
        _STATE["saved"].clear()
        _STATE["enabled"] = False


def is_enabled() -> bool:
    """Whether hf_fastinfer is currently registered with transformers."""
    return bool(_STATE["enabled"])
