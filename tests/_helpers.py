"""Helpers shared by the tests."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from hf_fastinfer.kernels import _backend

#: Triton kernels run on a GPU, or on CPU tensors under TRITON_INTERPRET=1 (conftest sets it without CUDA)
needs_triton = pytest.mark.skipif(
    not _backend.triton_available() or not (torch.cuda.is_available() or _backend.interpreter_enabled()),
    reason="needs Triton, on a GPU or under TRITON_INTERPRET=1",
)


def cpuinfo(field: str) -> str:
    """The value of ``field`` (``vendor_id``, ``flags``) on /proc/cpuinfo's first line for it; "" where there is
    none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == field), "")
    except OSError:
        return ""


def saved_tiny_bert(folder):
    """A small random-weight BertModel (vocabulary 300, 2 layers, hidden 64), saved to ``folder``: an encoder
    for the quantization tests. Returns the model, in eval mode."""
    config = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config).eval()
    model.save_pretrained(folder)
    return model
