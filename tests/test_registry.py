"""Registration with transformers: what is registered, idempotence, disable() by identity, version checks."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap

import pytest
import transformers
from transformers.generation import configuration_utils
from transformers.generation.utils import GenerationMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import hf_fastinfer
from hf_fastinfer import _registry
from hf_fastinfer.attention import fastinfer_attention_forward, fastinfer_mask
from hf_fastinfer.config import FastInferConfig
from hf_fastinfer.quantizer import FastInferQuantizer


def _run_python(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_registers_every_name():
    assert hf_fastinfer.is_enabled()
    assert ALL_ATTENTION_FUNCTIONS["fastinfer"] is fastinfer_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["fastinfer"] is fastinfer_mask
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["fastinfer"] is FastInferConfig
    assert AUTO_QUANTIZER_MAPPING["fastinfer"] is FastInferQuantizer
    for name in ("fastinfer", "fastinfer_int8"):
        assert name in configuration_utils.ALL_CACHE_IMPLEMENTATIONS
        transformers.GenerationConfig(cache_implementation=name).validate()


def test_enable_is_idempotent_in_process():
    names_before = configuration_utils.ALL_CACHE_IMPLEMENTATIONS
    hook_before = GenerationMixin.__dict__["_prepare_cache_for_generation"]
    hf_fastinfer.enable()
    hf_fastinfer.enable()
    # The cache-name tuple is not extended twice, and the hook wraps transformers' method, not our older hook.
    assert configuration_utils.ALL_CACHE_IMPLEMENTATIONS == names_before
    assert configuration_utils.ALL_CACHE_IMPLEMENTATIONS.count("fastinfer") == 1
    hook_after = GenerationMixin.__dict__["_prepare_cache_for_generation"]
    assert hook_after.__hf_fastinfer_original__ is hook_before.__hf_fastinfer_original__


def test_disable_then_enable_round_trip():
    original_hook = GenerationMixin.__dict__["_prepare_cache_for_generation"].__hf_fastinfer_original__
    try:
        hf_fastinfer.disable()
        assert not hf_fastinfer.is_enabled()
        assert "fastinfer" not in ALL_ATTENTION_FUNCTIONS
        assert "fastinfer" not in ALL_MASK_ATTENTION_FUNCTIONS
        assert "fastinfer" not in AUTO_QUANTIZATION_CONFIG_MAPPING
        assert "fastinfer" not in AUTO_QUANTIZER_MAPPING
        assert "fastinfer" not in configuration_utils.ALL_CACHE_IMPLEMENTATIONS
        assert GenerationMixin.__dict__["_prepare_cache_for_generation"] is original_hook
        with pytest.raises(ValueError, match="Invalid `cache_implementation`"):
            transformers.GenerationConfig(cache_implementation="fastinfer").validate()
        hf_fastinfer.disable()  # twice is harmless
    finally:
        hf_fastinfer.enable()
    assert ALL_ATTENTION_FUNCTIONS["fastinfer"] is fastinfer_attention_forward


def test_reload_and_disable_restore_transformers_by_identity():
    # In a fresh process: capture transformers' own objects before hf_fastinfer is imported, then import,
    # reload every registering module, re-run enable, and check that disable() gives back those very objects.
    result = _run_python(
        """
        import importlib, json
        from transformers.generation import configuration_utils
        from transformers.generation.utils import GenerationMixin
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

        names = configuration_utils.ALL_CACHE_IMPLEMENTATIONS
        prepare = GenerationMixin.__dict__["_prepare_cache_for_generation"]
        attn = dict(AttentionInterface._global_mapping)
        mask = dict(AttentionMaskInterface._global_mapping)
        qconf = dict(AUTO_QUANTIZATION_CONFIG_MAPPING)
        quant = dict(AUTO_QUANTIZER_MAPPING)

        import hf_fastinfer
        import hf_fastinfer._registry, hf_fastinfer.generation, hf_fastinfer.attention
        importlib.reload(hf_fastinfer)
        importlib.reload(hf_fastinfer._registry)
        importlib.reload(hf_fastinfer.generation)
        importlib.reload(hf_fastinfer.attention)
        hf_fastinfer = importlib.reload(hf_fastinfer)
        hf_fastinfer.enable()
        registered = {
            "count": configuration_utils.ALL_CACHE_IMPLEMENTATIONS.count("fastinfer"),
            "attn_is_current": AttentionInterface._global_mapping["fastinfer"]
                is hf_fastinfer.attention.fastinfer_attention_forward,
            "hook_wraps_original": GenerationMixin.__dict__["_prepare_cache_for_generation"]
                .__hf_fastinfer_original__ is prepare,
        }
        hf_fastinfer.disable()
        print(json.dumps({
            **registered,
            "names": configuration_utils.ALL_CACHE_IMPLEMENTATIONS is names,
            "prepare": GenerationMixin.__dict__["_prepare_cache_for_generation"] is prepare,
            "attn": AttentionInterface._global_mapping == attn
                and all(AttentionInterface._global_mapping[k] is v for k, v in attn.items()),
            "mask": AttentionMaskInterface._global_mapping == mask,
            "qconf": dict(AUTO_QUANTIZATION_CONFIG_MAPPING) == qconf,
            "quant": dict(AUTO_QUANTIZER_MAPPING) == quant,
        }))
        """
    )
    assert result == {
        "count": 1, "attn_is_current": True, "hook_wraps_original": True,
        "names": True, "prepare": True, "attn": True, "mask": True, "qconf": True, "quant": True,
    }


def test_refuses_to_overwrite_someone_elses_registration():
    from transformers.modeling_utils import AttentionInterface

    def foreign(*args, **kwargs):
        raise AssertionError("never called")

    hf_fastinfer.disable()
    try:
        AttentionInterface.register("fastinfer", foreign)
        with pytest.raises(RuntimeError, match="not hf_fastinfer's"):
            hf_fastinfer.enable()
    finally:
        AttentionInterface._global_mapping.pop("fastinfer", None)
        _registry._STATE["saved"].clear()
        hf_fastinfer.enable()
    assert ALL_ATTENTION_FUNCTIONS["fastinfer"] is fastinfer_attention_forward


@pytest.mark.parametrize("version", ["5.23.0", "5.23.1", "5.30.0.dev0", "5.99.2"])
def test_supported_transformers_versions(version):
    assert str(_registry.check_transformers_version(version)) == version


@pytest.mark.parametrize("version", ["4.57.1", "5.22.0", "5.0.0rc1", "6.0.0", "6.1.0.dev0"])
def test_unsupported_transformers_versions_name_the_fix(version):
    with pytest.raises(hf_fastinfer.UnsupportedTransformersVersion) as info:
        _registry.check_transformers_version(version)
    message = str(info.value)
    assert version in message and hf_fastinfer.SUPPORTED_TRANSFORMERS in message
    assert "pip install 'transformers>=5.23,<6'" in message


def test_import_fails_clearly_on_unsupported_transformers():
    proc = subprocess.run(
        [sys.executable, "-c", "import transformers; transformers.__version__ = '4.46.0'; import hf_fastinfer"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "UnsupportedTransformersVersion" in proc.stderr
    assert "hf_fastinfer supports transformers >=5.23,<6, but transformers 4.46.0 is installed" in proc.stderr


def test_registry_module_reload_keeps_saved_state():
    state = _registry._STATE
    importlib.reload(_registry)
    assert _registry._STATE is state
