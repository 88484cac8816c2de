"""hf_fastinfer.kernels: one op per module, each a Triton kernel, its launcher, a ``torch.library`` op with a
fake implementation, and a pure-PyTorch reference (which is also the CPU path unless a faster one exists).

This folder sits at the repository root but installs as ``hf_fastinfer.kernels``: a top-level ``kernels``
module would shadow Hugging Face's ``kernels`` library, which transformers probes for.
"""

__all__: list[str] = []
