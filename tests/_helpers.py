"""Helpers shared by the kernel tests."""

from __future__ import annotations

import pytest
import torch

from hf_fastinfer.kernels import _backend

#: Triton kernels run on a GPU, or on CPU tensors under TRITON_INTERPRET=1 (conftest sets it without CUDA)
needs_triton = pytest.mark.skipif(
    not _backend.triton_available() or not (torch.cuda.is_available() or _backend.interpreter_enabled()),
    reason="needs Triton, on a GPU or under TRITON_INTERPRET=1",
)
