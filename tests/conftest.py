"""Shared fixtures and markers.

* ``device``: cuda when a GPU is present, else cpu; tests that take it run everywhere.
* ``gpu`` marker: skipped without CUDA, with that reason.
* ``interpreter`` marker: Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set below, before any
  Triton kernel is decorated, when there is no GPU).
* No test may reach a model hub: HF_HUB_OFFLINE is set for the whole session.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct in fp32 with transformers' own attention (SDPA), and its tokenizer."""
    from hf_fastinfer import models

    return models.load_default(dtype=torch.float32, progress=False)
