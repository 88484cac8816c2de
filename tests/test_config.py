"""FastInferConfig validation and round trip; the quantizer's lifecycle in this release."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AutoQuantizationConfig

from hf_fastinfer import FastInferConfig, models
from hf_fastinfer.config import CONFIG_VERSION


def test_defaults_per_bits():
    assert FastInferConfig(bits=8).group_size == 32
    assert FastInferConfig(bits=4).group_size == 32
    assert FastInferConfig(bits=None).group_size is None
    assert FastInferConfig(bits=4, group_size=48).group_size == 48
    # symmetric by default for int8, asymmetric (float zero points) for int4 and "auto"
    assert FastInferConfig(bits=8).symmetric is True
    assert FastInferConfig(bits=4).symmetric is False
    assert FastInferConfig(bits="auto", target_bits=5.0).symmetric is False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=3), "bits must be one of 8, 4, 'auto' or None"),
        (dict(bits=16), "bits must be one of"),
        (dict(bits=8, group_size=0), "group_size must be a positive integer"),
        (dict(bits=4, group_size=-32), "group_size must be a positive integer"),
        (dict(bits=4, group_size=True), "group_size must be a positive integer"),
        (dict(bits="auto"), "needs target_bits"),
        (dict(bits="auto", target_bits=3.5), r"outside the achievable range \[4, 8\]"),
        (dict(bits="auto", target_bits=9), r"outside the achievable range \[4, 8\]"),
        (dict(bits=8, target_bits=5.0), "only used with bits='auto'"),
        (dict(tp_size=0), "tp_size must be an integer >= 1"),
        (dict(layer_bits={"model.layers.0.mlp.up_proj": 2}), "layer_bits values must be 4 or 8"),
        (dict(version=CONFIG_VERSION + 1), "saved by a newer hf_fastinfer"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FastInferConfig(**kwargs)


@pytest.mark.parametrize("names", [5, [5], {"lm_head": True}, ["lm_head", None]])
def test_modules_to_not_convert_of_the_wrong_type_is_named(names):
    with pytest.raises(TypeError, match=r"modules_to_not_convert must be a list of module names"):
        FastInferConfig(bits=8, modules_to_not_convert=names)


def test_modules_to_not_convert_accepts_a_single_name():
    assert FastInferConfig(bits=8, modules_to_not_convert="lm_head").modules_to_not_convert == ["lm_head"]
    assert FastInferConfig(bits=8, modules_to_not_convert=("a", "b")).modules_to_not_convert == ["a", "b"]
    assert FastInferConfig(bits=8, modules_to_not_convert=[]).modules_to_not_convert is None


def test_unknown_argument_is_refused():
    with pytest.raises(TypeError, match="unknown arguments: \\['bitz'\\]"):
        FastInferConfig(bitz=8)


def test_round_trip_through_transformers_auto_config():
    config = FastInferConfig(bits="auto", target_bits=5.0, modules_to_not_convert=["lm_head"], symmetric=False)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["quant_method"] == "fastinfer"
    restored = AutoQuantizationConfig.from_dict(data)
    assert isinstance(restored, FastInferConfig)
    assert restored == config


def test_newer_checkpoint_version_is_refused_on_load():
    data = FastInferConfig(bits=None).to_dict()
    data["version"] = CONFIG_VERSION + 1
    with pytest.raises(ValueError, match="pip install --upgrade hf-fastinfer"):
        AutoQuantizationConfig.from_dict(data)


def _saved_tiny(tmp_path):
    model = models.tiny("llama")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    return model, folder


def test_kernels_only_config_loads_saves_and_reloads_in_a_fresh_process(tmp_path):
    reference, folder = _saved_tiny(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=FastInferConfig(bits=None))
    plain = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=FastInferConfig(bits=None, kernel_injection=False))
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    with torch.no_grad():
        expected = reference(ids).logits
        # without injection the forward is transformers' own, bit for bit
        torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=0)
        # with it the output projection and final norm run the kernel library's fp32 kernels (summation order)
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-6)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    assert json.loads((saved / "config.json").read_text())["quantization_config"]["quant_method"] == "fastinfer"
    code = (
        "import torch, hf_fastinfer, json\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(saved)!r})\n"
        "print(json.dumps([type(m.config.quantization_config).__name__, m(torch.tensor([[5, 17, 99, 3, 250]])).logits.sum().item()]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, logit_sum = json.loads(proc.stdout.strip().splitlines()[-1])
    assert name == "FastInferConfig"
    assert logit_sum == pytest.approx(expected.sum().item(), rel=1e-6)
